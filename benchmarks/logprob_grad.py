"""The response log-probs' forward and backward: `modeling.logprobs_from_logits` (one autograd function, its backward
written in place) against the same math through autograd's gather + logsumexp (and the division by the temperature),
as PPO, DPO and the monitor computed it before, in one process, back to back.

usage: python benchmarks/logprob_grad.py [--threads 1] [--reps 6] [--out FILE]

Random fp32 logits of the built-in model's vocabulary (4,096: 32 rows x 32 response tokens, PPO's benchmark
minibatch) and of SmolLM2's (49,152: 16 x 40, a PPO minibatch of its recipe, and 16 x 64), sliced off one more
position as `policy.policy_forward` slices them; labels uniform; temperature 1 and 0.7. Each repetition runs both
ways, alternating which goes first; the figure is the median seconds of a forward and backward. The gradients are
compared too: equal bitwise at temperature 1, the largest difference otherwise. Writes
benchmarks/logprob_grad_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from instructgpt.modeling import logprobs_from_logits

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {"builtin 32x32": (32, 32, 4096), "smollm2 16x40": (16, 40, 49152), "smollm2 16x64": (16, 64, 49152)}


def autograd_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The same log-probs with autograd's own backward: gather - logsumexp of logits / temperature."""
    z = logits.float() / temperature
    return torch.gather(z, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def forward_backward(fn, full: torch.Tensor, labels: torch.Tensor, temperature: float, dy: torch.Tensor):
    x = full.detach().requires_grad_(True)
    fn(x[:, :-1], labels, temperature).backward(dy)
    return x.grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "logprob_grad_results.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ways = {"autograd": autograd_logprobs, "ours": logprobs_from_logits}
    results = {}
    for name, (b, r, v) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        full = torch.randn(b, r + 1, v, generator=g) * 3
        labels = torch.randint(0, v, (b, r), generator=g)
        dy = torch.randn(b, r, generator=g) * 1e-3
        row = {"rows": b, "response_tokens": r, "vocab": v}
        for t in (1.0, 0.7):
            want = forward_backward(autograd_logprobs, full, labels, t, dy)
            got = forward_backward(logprobs_from_logits, full, labels, t, dy)
            row[f"grad_equal_bitwise_t{t}"] = bool(torch.equal(want, got))
            row[f"grad_max_abs_diff_t{t}"] = float((want - got).abs().max())
        secs = {w: [] for w in ways}
        for rep in range(a.reps):
            for w in (("autograd", "ours") if rep % 2 == 0 else ("ours", "autograd")):
                t0 = time.perf_counter()
                forward_backward(ways[w], full, labels, 1.0, dy)
                secs[w].append(time.perf_counter() - t0)
        row.update({f"{w}_s": round(statistics.median(s), 4) for w, s in secs.items()})
        row["speedup"] = round(row["autograd_s"] / row["ours_s"], 2)
        results[name] = row
        print(f"{name}: autograd {row['autograd_s'] * 1e3:.1f} ms, ours {row['ours_s'] * 1e3:.1f} ms "
              f"({row['speedup']}x); gradient bitwise equal at T=1: {row['grad_equal_bitwise_t1.0']}", flush=True)
    out = {"command": "python benchmarks/logprob_grad.py" + (f" --threads {a.threads}" if a.threads != 1 else ""),
           "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                       "threads": a.threads, "torch": torch.__version__},
           "reps": a.reps, "shapes": results}
    with open(a.out, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {os.path.relpath(a.out)}")


if __name__ == "__main__":
    main()
