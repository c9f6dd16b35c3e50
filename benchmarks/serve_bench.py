"""Requests/s and p50/p99 latency of `instructgpt serve` at concurrency 1, 8 and 32, against serving the same requests
one by one with plain Hugging Face `model.generate`, back to back in one script; and at concurrency 32 with mixed
lengths (one request in 16 asks 128 tokens), the latency of the short requests.

The requests: N held-out instructions of the built-in task, rendered with the prompt template, sent raw to
/v1/completions with max_tokens 32 and temperature 1 (the baseline: `generate(do_sample=True, temperature=1,
top_k=0, max_new_tokens=32)`, stopping at EOS like the server). The server runs in a subprocess on 127.0.0.1 (no
keys, no rate limit, no audit log), the clients are asyncio + httpx in this process. The baseline is run before and
after the server runs; the ratio uses their mean.

usage: python benchmarks/serve_bench.py [--model builtin:base] [--requests 128] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time

import httpx
import torch

from instructgpt.modeling import load_model
from instructgpt.prompting import render_prompt
from instructgpt.serving.config import ServeConfig
from instructgpt.tasks import make_tasks

MAX_TOKENS = 32
LONG_MAX_TOKENS = 128  # the mixed run: one request in LONG_EVERY asks this many
LONG_EVERY = 16


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summary(latencies: list[float], wall: float, tokens: int) -> dict:
    return {"requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "wall_s": round(wall, 2), "completion_tokens": tokens}


@torch.no_grad()
def one_by_one(model, tok, prompts: list[str], device: str) -> dict:
    """Plain HF generate, one request at a time (what a naive server does)."""
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        ids = tok(p, return_tensors="pt", add_special_tokens=False).to(device)
        out = model.generate(**ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=MAX_TOKENS,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        lat.append(time.perf_counter() - t)
    return summary(lat, time.perf_counter() - t0, tokens)


async def against_server(url: str, model_name: str, prompts: list[str], concurrency: int,
                         long_every: int = 0) -> dict:
    """Closed-loop clients, `concurrency` requests in flight. With `long_every`, every long_every-th request asks
    LONG_MAX_TOKENS instead of MAX_TOKENS, and the latencies reported are those of the MAX_TOKENS requests (how long
    a short request waits behind long ones), the long ones' p50 beside them."""
    sem = asyncio.Semaphore(concurrency)
    lat, long_lat, tokens = [], [], [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(i: int, p: str) -> None:
            async with sem:
                long = long_every and i % long_every == long_every - 1
                t = time.perf_counter()
                r = await client.post("/v1/completions", json={"model": model_name, "prompt": p, "temperature": 1.0,
                                                               "max_tokens": LONG_MAX_TOKENS if long else MAX_TOKENS})
                r.raise_for_status()
                (long_lat if long else lat).append(time.perf_counter() - t)
                tokens[0] += r.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts[:4])))  # warm-up (connections, batches)
        lat.clear()
        long_lat.clear()
        tokens[0] = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        out = summary(lat, time.perf_counter() - t0, tokens[0])
        if long_lat:
            out["requests_per_s"] = round((len(lat) + len(long_lat)) / out["wall_s"], 2)
            out["long_requests"], out["long_p50_ms"] = len(long_lat), round(1000 * percentile(long_lat, 50), 1)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, device: str, max_batch_size: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "instructgpt.cli", "serve", "--model", model, "--port", str(port), "--device", device,
           "--rate-limit", "0", "--no-audit-log", "--max-batch-size", str(max_batch_size), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not come up")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:base")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for both sides (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_results.json"))
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.to(args.device).eval()
    prompts = [render_prompt(tok, t.prompt) for t in make_tasks("heldout", args.requests, seed=0)]
    one_by_one(model, tok, prompts[:2], args.device)  # warm-up
    base_before = one_by_one(model, tok, prompts, args.device)
    print(f"one by one (HF generate), before: {base_before}", flush=True)

    port = free_port()
    proc = start_server(args.model, port, args.device, args.max_batch_size, args.threads)
    served = {}
    url, name = f"http://127.0.0.1:{port}", ServeConfig(args.model).resolved_model_name()
    try:
        for c in (1, 8, 32):
            served[c] = asyncio.run(against_server(url, name, prompts, c))
            print(f"server, concurrency {c}: {served[c]}", flush=True)
        mixed = asyncio.run(against_server(url, name, prompts, 32, long_every=LONG_EVERY))
        print(f"server, concurrency 32, one request in {LONG_EVERY} asking {LONG_MAX_TOKENS} tokens: {mixed}",
              flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base_after = one_by_one(model, tok, prompts, args.device)
    print(f"one by one (HF generate), after: {base_after}", flush=True)

    base_rps = (base_before["requests_per_s"] + base_after["requests_per_s"]) / 2
    ratios = {c: round(s["requests_per_s"] / base_rps, 2) for c, s in served.items()}
    for c, s in served.items():
        print(f"concurrency {c:>2}: {s['requests_per_s']:7.2f} req/s  p50 {s['p50_ms']:8.1f} ms  "
              f"p99 {s['p99_ms']:8.1f} ms  = {ratios[c]:.2f}x one-by-one ({base_rps:.2f} req/s)")
    print(f"concurrency 32, mixed lengths: {mixed['requests_per_s']:7.2f} req/s  {MAX_TOKENS}-token requests p50 "
          f"{mixed['p50_ms']:8.1f} ms  p99 {mixed['p99_ms']:8.1f} ms")
    result = {
        "model": args.model, "device": args.device, "requests": args.requests, "max_tokens": MAX_TOKENS,
        "temperature": 1.0, "max_batch_size": args.max_batch_size,
        "threads": args.threads or "torch default",
        "one_by_one_hf_generate": {"before": base_before, "after": base_after, "mean_requests_per_s": base_rps},
        "server": {str(c): s for c, s in served.items()},
        # latencies of the 32-token requests while one in LONG_EVERY asks LONG_MAX_TOKENS
        "server_32_mixed_lengths": {"long_every": LONG_EVERY, "long_max_tokens": LONG_MAX_TOKENS, **mixed},
        "speedup_vs_one_by_one": {str(c): r for c, r in ratios.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                    "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
    }
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
