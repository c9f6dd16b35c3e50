"""Rounds of the loop: the default recipe with `rounds: 2`, and what the second round buys.

usage: python benchmarks/rounds.py [--out DIR] [--results FILE] [--summarize-only] [recipe overrides ...]

Runs `instructgpt pipeline --out DIR rounds=2 OVERRIDES` (resumable: rerun the same command after an interruption),
then writes the per-round figures of its report.json to `--results` (default benchmarks/rounds_results.json) with the
command, the machine and the seconds, and checks the two targets:

- `rm_accuracy_gain.round2_vs_round1` > 0: round 2's reward model, trained on round 1's rankings and on rankings of
  the round-1 policy's samples, orders pairs of that policy's held-out samples as gold does more often than round 1's;
- `gold_gain.round2_vs_round1` > 0: round 2's policy scores higher by gold than round 1's (500 held-out prompts).

Where round 2's gold comes from (`round2_vs_round1`): the gain per task family, the prompts whose greedy answer got
better or worse, and on the prompts where the two rounds' answers differ in gold, how often each round's reward model
orders the two answers as gold does. `--summarize-only` rewrites the results from a finished run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("rm_accuracy_gain.round2_vs_round1", "gold_gain.round2_vs_round1")


def _proc_field(path: str, name: str) -> str | None:
    """The value of the first "name: value" line of a /proc file (Linux), else None."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return next((line.split(":", 1)[1].strip() for line in fh if line.startswith(name)), None)


def machine() -> dict:
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor()
    mem = _proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    mem = int(mem.split()[0]) / 2**20 if mem else None
    import torch
    import transformers

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(mem, 1) if mem else None, "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def per_round(report: dict) -> list[dict]:
    """A row per round: its policy, rankings, its RM's accuracy on the ranked policy's pairs (and the previous RM's),
    the policy's gold, win rate against SFT and KL to SFT."""
    rounds = report["round_policies"]
    ranked = ["sft", *rounds[:-1]]
    rows = []
    for r, (policy, before) in enumerate(zip(rounds, ranked), 1):
        vs = f"{policy}_vs_sft"
        rows.append({
            "round": r, "policy": policy, "ranked_policy": before,
            "rankings_new": report.get(f"rankings.round{r}"), "rankings_total": report.get(f"rankings_total.round{r}"),
            "rm_accuracy_on_ranked_policy_pairs": report.get(f"rm_accuracy_samples.round{r}.{before}"),
            "previous_rm_accuracy_on_ranked_policy_pairs": report.get(f"rm_accuracy_samples.round{r - 1}.{before}"),
            "rm_accuracy_on_own_policy_pairs": report.get(f"rm_accuracy_samples.round{r}.{policy}"),
            "rm_accuracy_on_sft_pairs": report.get(f"rm_accuracy_samples.round{r}.sft"),
            "gold_score": report.get(f"gold_score.{policy}"),
            "all_properties": report.get(f"all_properties.{policy}"),
            "win_rate_no_ties_vs_sft": report.get(f"win_rate_no_ties.{vs}"),
            "win_rate_no_ties_ci95_vs_sft": report.get(f"win_rate_no_ties_ci95.{vs}"),
            "rm_score": report.get(f"rm_score.{policy}"), "kl_to_sft": report.get(f"kl.{policy}"),
            "ptx_perplexity": report.get(f"ptx_perplexity.{policy}"),
            "seconds": {s: report.get(f"seconds.{s}" if r == 1 else f"seconds.round{r}.{s}")
                        for s in ("label_sim", "rm", "ppo")},
        })
    return rows


def read_samples(out: str, policy: str) -> list[dict]:
    with open(os.path.join(out, f"samples_{policy}.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def round2_vs_round1(out: str) -> dict:
    """Round 2's greedy answers against round 1's on the held-out prompts (samples_ppo*.jsonl): the gold gain per task
    family (its share of the mean over all prompts), prompts better and worse, and each round's RM against gold on the
    pairs (round 1's answer, round 2's answer) whose gold differs, overall and per family."""
    from instructgpt.reward import RewardModel

    a, b = read_samples(out, "ppo"), read_samples(out, "ppo_round2")
    families = sorted({r["family"] for r in a})
    gain = {f: sum(y["gold"] - x["gold"] for x, y in zip(a, b) if x["family"] == f) / len(a) for f in families}
    differ = [(x, y) for x, y in zip(a, b) if x["gold"] != y["gold"]]
    result: dict = {"gold_gain_by_family": gain, "prompts": {f: sum(r["family"] == f for r in a) for f in families},
                    "better": sum(y["gold"] > x["gold"] for x, y in zip(a, b)),
                    "worse": sum(y["gold"] < x["gold"] for x, y in zip(a, b)), "pairs_whose_gold_differs": len(differ)}
    for name, rm_dir in (("round1", "rm"), ("round2", os.path.join("round2", "rm"))):
        rm = RewardModel.load(os.path.join(out, rm_dir, "model"))
        s1 = rm.score([x["prompt"] for x, _ in differ], [x["response"] for x, _ in differ])
        s2 = rm.score([x["prompt"] for x, _ in differ], [y["response"] for _, y in differ])
        hits = [(r2 > r1) == (y["gold"] > x["gold"]) for (x, y), r1, r2 in zip(differ, s1, s2)]
        result[f"rm_accuracy.{name}"] = sum(hits) / len(hits) if hits else None
        result[f"rm_accuracy_by_family.{name}"] = {
            f: {"accuracy": sum(h for h, (x, _) in zip(hits, differ) if x["family"] == f) / n, "pairs": n}
            for f in families if (n := sum(x["family"] == f for x, _ in differ))}
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "rounds2"), help="the run directory (resumed when present)")
    p.add_argument("--results", default=os.path.join(HERE, "rounds_results.json"))
    p.add_argument("--summarize-only", action="store_true", help="rewrite the results from the finished run in --out")
    p.add_argument("overrides", nargs="*", help="recipe overrides after rounds=2")
    args = p.parse_args(argv)
    cmd = ["instructgpt", "pipeline", "--out", args.out, "rounds=2", *args.overrides]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.time()
    rc = 0 if args.summarize_only else subprocess.call([sys.executable, "-m", "instructgpt.cli", *cmd[1:]])
    wall = None if args.summarize_only else round(time.time() - t0, 1)
    if rc != 0:
        print(f"the pipeline exited with {rc}; rerun the same command to resume", file=sys.stderr)
        return rc
    previous = {}
    if args.summarize_only and os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as fh:
            previous = json.load(fh)  # the load and wall time of the invocation that ran the pipeline
    with open(os.path.join(args.out, "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    rounds = per_round(report)
    matrix = {f"round{r}": {p_: report.get(f"rm_accuracy_samples.round{r}.{p_}")
                            for p_ in ["sft", *report["round_policies"]]}
              for r in range(1, report["rounds"] + 1)}
    results = {
        "command": " ".join(cmd), "machine": machine(),
        "load_average_at_start": previous.get("load_average_at_start") if args.summarize_only else load_before,
        "wall_seconds": previous.get("wall_seconds") if args.summarize_only else wall,
        "seconds": {k.removeprefix("seconds."): v for k, v in report.items() if k.startswith("seconds.")},
        "peak_rss_gib": report.get("peak_rss_gib.total"),
        "heldout_prompts": report.get("heldout_prompts"),
        "rm_accuracy_samples_prompts": report.get("rm_accuracy_samples_prompts"),
        "rm_accuracy_samples_k": report.get("rm_accuracy_samples_k"),
        "rm_accuracy_samples_pairs": {p_: report.get(f"rm_accuracy_samples_pairs.{p_}")
                                      for p_ in ["sft", *report["round_policies"]]},
        "gold_score.sft": report.get("gold_score.sft"),
        "rounds": rounds, "rm_accuracy_matrix": matrix,
        "targets": {k: {"value": report.get(k), "met": (report.get(k) or 0) > 0} for k in TARGETS},
        "round2_vs_round1": round2_vs_round1(args.out),
    }
    with open(args.results, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    for row in rounds:
        print(json.dumps(row))
    for k, v in results["targets"].items():
        print(f"{k}: {v['value']:+.3f} ({'met' if v['met'] else 'not met'})" if v["value"] is not None
              else f"{k}: missing")
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
