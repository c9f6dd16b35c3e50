"""Does `instructgpt data clean` + `dedup` change SFT's held-out gold score, on built-in demonstrations with duplicates
and noise put in? Writes benchmarks/data_clean_sft_results.json.

    .venv/bin/python benchmarks/data_clean_sft.py                 # 3 data sets x 1 seed of SFT, then the evaluation
    .venv/bin/python benchmarks/data_clean_sft.py --seeds 0,1     # more seeds (a finished SFT run is not redone)
    .venv/bin/python benchmarks/data_clean_sft.py --quick         # a smoke run: tiny data, few steps, 50 prompts

The data (seeded): N built-in demonstrations (``builtin:task-demos?n=N``, the default pipeline's), then
- noise in 8% of rows: zero-width spaces and control characters in the response, doubled spaces, trailing blanks;
- echoes in 5%: the response replaced by the prompt, or the prompt put before it;
- over-long rows in 2%: the response repeated past data.max_length (SFT skips them either way: both runs set
  data.skip_bad_lines, which the noisy data needs to run at all);
- exact duplicates: 10% of rows copied 1 to 5 times each, some written in Alpaca's schema;
- near duplicates: 10% of rows copied with their case and spacing changed,
all shuffled in. Three data sets are trained on, each with the same SFT settings and seeds: `noisy`, `cleaned`
(`instructgpt data clean` then `instructgpt data dedup` of the noisy file, default settings but max_length) and
`original` (the N demonstrations as generated, for reference). Each SFT model answers the same held-out prompts
greedily, judged by the hidden gold labeler through `instructgpt.evaluate.evaluate`, the pipeline's own evaluation:
gold score per policy, win rate of `cleaned` (and `original`) against `noisy` with ties left out and its 95%
bootstrap interval, and the per-prompt gold difference with its 95% bootstrap interval, per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

from instructgpt import builtin
from instructgpt.cli import main as cli_main
from instructgpt.evaluate import EvalConfig, bootstrap_ci, evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "data_clean_sft_results.json")
MAX_LENGTH = 192  # the default recipe's SFT data.max_length
INVISIBLE = ("\u200b", "\x00", "\x07", "\u00ad", "\ufeff")


def add_noise(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words))
        words[i] = words[i] + rng.choice(INVISIBLE)
    j = rng.randrange(len(words))
    words[j] = words[j] + " "  # a doubled space
    return " ".join(words) + rng.choice(["  ", " \n", "\t", "\n\n\n"])


def recase(text: str, rng: random.Random) -> str:
    text = text.lower() if rng.random() < 0.5 else text.upper()
    return text.replace(" ", "  ", 1)


def corrupt(rows: list[dict], seed: int) -> tuple[list[dict], dict]:
    """The noisy data set from the clean rows, and how many of each corruption went in."""
    rng = random.Random(seed)
    out, counts = [], {"noise": 0, "echo": 0, "over_long": 0, "exact_copies": 0, "near_copies": 0}
    for r in rows:
        r = dict(r)
        u = rng.random()
        if u < 0.08:
            r["response"] = add_noise(r["response"], rng)
            counts["noise"] += 1
        elif u < 0.13:
            r["response"] = r["prompt"] if rng.random() < 0.5 else f"{r['prompt']}\n{r['response']}"
            counts["echo"] += 1
        elif u < 0.15:
            r["response"] = " ".join([r["response"]] * 40)
            counts["over_long"] += 1
        out.append(r)
    for r in list(out):
        u = rng.random()
        if u < 0.10:
            for _ in range(rng.randint(1, 5)):
                out.append(r if rng.random() < 0.5 else {"instruction": r["prompt"], "output": r["response"]})
                counts["exact_copies"] += 1
        elif u < 0.20:
            out.append({"prompt": recase(r["prompt"], rng), "response": recase(r["response"], rng)})
            counts["near_copies"] += 1
    rng.shuffle(out)
    return out, counts


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def sft(data: str, out_dir: str, seed: int, steps: int) -> None:
    """One SFT run, the default recipe's settings but the pretraining mix (off) and the length."""
    subprocess.run([sys.executable, "-m", "instructgpt.cli", "sft", f"data.train={data}", f"out_dir={out_dir}",
                    f"seed={seed}", "model.name_or_path=builtin:base", f"data.max_length={MAX_LENGTH}",
                    "data.skip_bad_lines=true", "data.eval_size=0", f"train.max_steps={steps}", "train.batch_size=32",
                    "train.lr=1e-3", "train.warmup_steps=20", "train.mixed_precision=bf16", "train.log_every=50",
                    f"train.eval_every={steps}", f"train.save_every={steps}"], check=True)


def gold_of(out_dir: str, name: str) -> np.ndarray:
    with open(os.path.join(out_dir, f"samples_{name}.jsonl"), encoding="utf-8") as fh:
        return np.asarray([json.loads(line)["gold"] for line in fh])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="built-in demonstrations before corruption")
    # 150 steps of 32 over 2,000 demonstrations: 2.4 epochs, as the default run's 300 over 4,000
    p.add_argument("--steps", type=int, default=150, help="SFT steps of 32 examples")
    p.add_argument("--seeds", default="0", help="SFT seeds, comma-separated")
    p.add_argument("--heldout", type=int, default=500, help="held-out prompts")
    p.add_argument("--work", default=os.path.join(HERE, "work", "data_clean_sft"))
    p.add_argument("--quick", action="store_true", help="smoke run: n=200, 10 steps, one seed, 50 prompts")
    args = p.parse_args()
    if args.quick:
        args.n, args.steps, args.seeds, args.heldout = 200, 10, "0", 50
        args.work += "_quick"
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.work, exist_ok=True)
    t_start = time.time()

    # 1. the data sets: original, noisy, and noisy through clean + dedup (the real commands)
    original = list(builtin.rows(f"builtin:task-demos?n={args.n}&seed=0"))
    noisy, injected = corrupt(original, seed=0)
    paths = {name: os.path.join(args.work, f"{name}.jsonl") for name in ("original", "noisy", "cleaned")}
    write_jsonl(paths["original"], original)
    write_jsonl(paths["noisy"], noisy)
    clean_out = os.path.join(args.work, "noisy.clean.jsonl")
    t0 = time.time()
    assert cli_main(["data", "clean", "-i", paths["noisy"], "-o", clean_out, f"max_length={MAX_LENGTH}"]) == 0
    assert cli_main(["data", "dedup", "-i", clean_out, "-o", paths["cleaned"]]) == 0
    prep_seconds = time.time() - t0
    with open(clean_out.replace(".jsonl", ".report.json"), encoding="utf-8") as fh:
        clean_report = json.load(fh)
    with open(paths["cleaned"].replace(".jsonl", ".report.json"), encoding="utf-8") as fh:
        dedup_report = json.load(fh)

    # 2. SFT on each data set, per seed; 3. the pipeline's evaluation on held-out prompts, per seed
    runs, sft_seconds = {}, {}
    for seed in seeds:
        policies = {}
        for name in ("noisy", "cleaned", "original"):
            out_dir = os.path.join(args.work, f"sft_{name}_s{seed}")
            sft(paths[name], out_dir, seed, args.steps)  # a run finished by an earlier call is not redone
            with open(os.path.join(out_dir, "DONE.json"), encoding="utf-8") as fh:
                sft_seconds[f"{name}_s{seed}"] = json.load(fh)["seconds"]  # the stage's own, however long ago
            policies[name] = os.path.join(out_dir, "model")
        eval_dir = os.path.join(args.work, f"eval_s{seed}")
        report = evaluate(policies, EvalConfig(sft="noisy", heldout=args.heldout, max_new_tokens=48, ptx_text="none",
                                               kl_prompts=64, seed=0), out_dir=eval_dir)
        run = {"gold_score": {n: round(report[f"gold_score.{n}"], 4) for n in policies},
               "all_properties": {n: round(report[f"all_properties.{n}"], 4) for n in policies}}
        noisy_gold = gold_of(eval_dir, "noisy")
        for other in ("cleaned", "original"):
            vs = f"{other}_vs_noisy"
            diff = gold_of(eval_dir, other) - noisy_gold
            run[vs] = {"gold_difference": round(float(diff.mean()), 4),
                       "gold_difference_ci95": [round(x, 4) for x in bootstrap_ci(diff, lambda x: x.mean(-1))],
                       "win_rate_no_ties": round(report[f"win_rate_no_ties.{vs}"], 4),
                       "win_rate_no_ties_ci95": [round(x, 4) for x in report[f"win_rate_no_ties_ci95.{vs}"]]}
        runs[f"seed_{seed}"] = run
        print(json.dumps({f"seed_{seed}": run}, indent=2), flush=True)

    means = {n: round(float(np.mean([r["gold_score"][n] for r in runs.values()])), 4)
             for n in ("noisy", "cleaned", "original")}
    results = {
        "command": "python benchmarks/data_clean_sft.py " + " ".join(sys.argv[1:]),
        "demonstrations": args.n, "injected": injected,
        "rows": {"original": len(original), "noisy": len(noisy), "after_clean": clean_report["rows_out"],
                 "after_dedup": dedup_report["kept"]},
        "clean_rules": {k: v.get("rows_changed", v.get("rows_dropped")) for k, v in clean_report["rules"].items()},
        "dedup": {k: dedup_report[k] for k in ("dropped_exact", "dropped_near")},
        "sft": {"steps": args.steps, "batch_size": 32, "lr": 1e-3, "max_length": MAX_LENGTH, "seeds": seeds,
                "mixed_precision": "bf16", "pretrain_coef": 0.0},
        "eval": {"heldout": args.heldout, "max_new_tokens": 48, "temperature": 0.0},
        "runs": runs, "mean_gold_score": means,
        "seconds": {"clean_and_dedup": round(prep_seconds, 2), "sft": sft_seconds,
                    "total": round(time.time() - t_start, 1)},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
    }
    path = RESULTS if not args.quick else os.path.join(args.work, "results.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    print(json.dumps({k: results[k] for k in ("rows", "clean_rules", "dedup", "mean_gold_score", "seconds")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
