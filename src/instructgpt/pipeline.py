"""``instructgpt pipeline``: the embedded default, end to end on the built-in task.

Stages so far: SFT of the shipped base model on simulated demonstrations, then a judgement of the base and SFT models
by the gold labeler on held-out prompts (never seen in training), with samples side by side. The reward-model and
PPO-ptx stages join this loop as they land. Every stage writes its own out_dir under the run directory, so
``--resume`` (or simply the same ``--out``) skips what is finished and resumes what was interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

from instructgpt.config import load_config

DEFAULT_SFT = {
    "model": {"name_or_path": "builtin:base"},
    "data": {"train": "builtin:task-demos?n=4000&seed=0&error_rate=0.2", "max_length": 128, "eval_size": 200},
    "train": {"max_steps": 600, "batch_size": 32, "lr": 1.0e-3, "warmup_steps": 20, "log_every": 10,
              "eval_every": 100, "save_every": 100},
}


def gold_eval(model_dir: str, n_prompts: int, seed: int = 0, batch_size: int = 64) -> dict:
    """Greedy answers to `n_prompts` held-out task prompts, scored by the gold labeler (mean and per family)."""
    from instructgpt import tasks
    from instructgpt.generation import SamplingParams, generate
    from instructgpt.modeling import load_model
    from instructgpt.prompting import render_prompt

    model, tok = load_model(model_dir)
    held = tasks.make_tasks("heldout", n_prompts, seed=seed)
    outs = generate(model, tok, [render_prompt(tok, t.prompt) for t in held],
                    SamplingParams(max_new_tokens=32, temperature=0.0), batch_size=batch_size)
    per_family = defaultdict(list)
    rows = []
    for t, comps in zip(held, outs):
        s = tasks.gold_score(t, comps[0].text)
        per_family[t.family].append(s)
        rows.append({"family": t.family, "prompt": t.prompt, "answer": t.answer, "response": comps[0].text,
                     "gold": round(s, 4)})
    scores = [r["gold"] for r in rows]
    return {"gold_score": sum(scores) / len(scores),
            "accuracy": sum(s == 1.0 for s in scores) / len(scores),
            "per_family": {f: sum(v) / len(v) for f, v in sorted(per_family.items())},
            "samples": rows}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="instructgpt pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the latest run under runs/ (or --out)")
    p.add_argument("--heldout", type=int, default=500, help="held-out prompts for the evaluation (>= 500)")
    p.add_argument("overrides", nargs="*", help="SFT overrides, e.g. train.max_steps=100")
    args = p.parse_args(argv)
    out = args.out
    if out is None and args.resume and os.path.isdir("runs"):
        runs = sorted(d for d in os.listdir("runs") if d[:1].isdigit())
        out = os.path.join("runs", runs[-1]) if runs else None
    out = out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    seconds = {}

    from instructgpt import sft

    cfg = load_config(sft.SFTConfig, None, args.overrides, extra={**DEFAULT_SFT, "out_dir": os.path.join(out, "sft")})
    t = time.time()
    sft.train(cfg)
    seconds["sft"] = time.time() - t

    t = time.time()
    report: dict = {"heldout_prompts": args.heldout}
    for name, path in (("base", "builtin:base"), ("sft", os.path.join(out, "sft", "model"))):
        r = gold_eval(path, args.heldout)
        report[f"gold_score.{name}"] = r["gold_score"]
        report[f"accuracy.{name}"] = r["accuracy"]
        report[f"per_family.{name}"] = r["per_family"]
        with open(os.path.join(out, f"samples_{name}.jsonl"), "w", encoding="utf-8") as fh:
            for row in r["samples"]:
                fh.write(json.dumps(row) + "\n")
    seconds["eval"] = time.time() - t
    seconds["total"] = time.time() - t0
    report.update({f"seconds.{k}": round(v, 1) for k, v in seconds.items()})
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)

    print(f"\nrun directory: {out}")
    print(f"{'family':<14} {'base':>6} {'sft':>6}")
    for f in report["per_family.sft"]:
        print(f"{f:<14} {report['per_family.base'][f]:>6.3f} {report['per_family.sft'][f]:>6.3f}")
    print(f"{'mean gold':<14} {report['gold_score.base']:>6.3f} {report['gold_score.sft']:>6.3f}")
    print(f"{'exact':<14} {report['accuracy.base']:>6.3f} {report['accuracy.sft']:>6.3f}")
    print(f"seconds: {json.dumps(report and {k: round(v, 1) for k, v in seconds.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
