"""`instructgpt pipeline` killed with SIGKILL at random moments and resumed: does it end where an uninterrupted run ends?

usage: python benchmarks/pipeline_kill9.py [--trials 5] [--seed 0] [--max-kills 3] [--work DIR] [--summary FILE]
                                           [recipe overrides ...]

1. One uninterrupted run (`instructgpt pipeline --out WORK/ref OVERRIDES`), timed stage by stage (its seconds.json).
2. `--trials` trials. Each draws (seeded) 1 to `--max-kills` moments spread uniformly over that run's length. A moment
   is a stage and seconds into it, so a kill lands where it was drawn even when the machine runs faster or slower than
   it did for the reference (a shared machine does): the pipeline is started, SIGKILLed (its whole process group) that
   many seconds after the stage began (its first file, sft/config.yaml or the previous stage's DONE.json, appeared;
   or this invocation started, if it was already there), rerun with `--resume` on the same directory and killed at the next moment, and so on; the last
   rerun goes on until it finishes.
3. Each trial's report.json against the reference's, key by key, leaving out what measures time or memory
   (seconds.*, peak_*, eval_seconds, ...); also each stage's final weights (a hash of model.safetensors) and its
   metrics.jsonl (timing columns left out). Prints "k of N identical" and every difference; writes a JSON summary.

The overrides go to every run, so the benchmark can be made smaller than the default recipe, e.g.
    sft.train.max_steps=60 sft.train.save_every=20 ppo.train.max_steps=4 ppo.train.save_every=2 eval.heldout=100
(save_every does not change what a run computes, only how much a kill costs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("sft", "rm", "ppo", "ppo_noptx", "rloo", "dpo")


def is_timing(key: str) -> bool:
    """Report or metrics keys that measure time, speed or memory (seconds.*, peak_rss_gib.*, eval_seconds,
    train/tokens_per_s, time/update_s ...): they differ between any two runs."""
    return (key.startswith(("seconds.", "peak_", "time/")) or key == "eval_seconds"
            or key.endswith(("_per_s", "_seconds")))


PHASES = ("sft", "label_sim", "rm", "ppo", "ppo_noptx", "rloo", "dpo", "eval")  # the order the pipeline runs them


def phases(seconds: dict) -> list[tuple[str, str | None, float]]:
    """(phase, the file that marks its start, its seconds in the reference) for the phases the recipe runs: SFT
    begins when it writes its config.yaml, each other phase when the one before it finishes."""
    ran = [name for name in PHASES if name in seconds]
    done = {"label_sim": "rankings.jsonl"}
    return [(name, "sft/config.yaml" if i == 0 else done.get(ran[i - 1], f"{ran[i - 1]}/DONE.json"), seconds[name])
            for i, name in enumerate(ran)]


def run_pipeline(out: str, overrides: list[str], resume: bool, log: str, kill: tuple[str | None, float] | None,
                 timeout: float) -> dict:
    """One invocation; with `kill` = (start marker, seconds), SIGKILLed that many seconds after the marker file
    exists (or after the start, without one). -> {seconds, returncode, killed}."""
    cmd = [sys.executable, "-m", "instructgpt.cli", "pipeline", "--out", out, *(["--resume"] if resume else []),
           *overrides]
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        if kill is not None:
            marker, delay = kill
            while marker is not None and proc.poll() is None and not os.path.exists(os.path.join(out, marker)):
                time.sleep(0.05)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: any process the pipeline started goes too
                killed = True
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{out}: no end after {timeout:.0f} s (see {log})") from None
    return {"seconds": round(time.time() - t0, 1), "returncode": rc, "killed": killed}


def where(out: str) -> dict:
    """What a run directory holds: per stage DONE, the checkpoint's step, or started; rankings and report."""
    state = {}
    for s in STAGES:
        d = os.path.join(out, s)
        if os.path.exists(os.path.join(d, "DONE.json")):
            state[s] = "done"
        elif os.path.isdir(d):
            step = None
            for name in ("checkpoint", "checkpoint.old"):
                try:
                    with open(os.path.join(d, name, "trainer_state.json")) as fh:
                        step = json.load(fh)["step"]
                    break
                except (OSError, ValueError, KeyError):
                    pass
            state[s] = f"checkpoint {step}" if step is not None else "started"
    state["rankings"] = os.path.exists(os.path.join(out, "rankings.jsonl"))
    state["report"] = os.path.exists(os.path.join(out, "report.json"))
    return state


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def fingerprint(out: str) -> dict:
    """report.json (timing keys left out), each stage's weights hash and metrics (timing columns left out)."""
    with open(os.path.join(out, "report.json")) as fh:
        report = {k: v for k, v in json.load(fh).items() if not is_timing(k)}
    weights, metrics = {}, {}
    for s in STAGES:
        p = os.path.join(out, s, "model", "model.safetensors")
        if os.path.exists(p):
            with open(p, "rb") as fh:
                weights[s] = hashlib.sha256(fh.read()).hexdigest()[:16]
        m = os.path.join(out, s, "metrics.jsonl")
        if os.path.exists(m):
            with open(m) as fh:
                metrics[s] = [{k: v for k, v in json.loads(line).items() if not is_timing(k)} for line in fh if line.strip()]
    return {"report": report, "weights": weights, "metrics": metrics}


def differences(ref: dict, got: dict) -> list[str]:
    out = []
    for k in sorted(set(ref["report"]) | set(got["report"])):
        a, b = ref["report"].get(k, "<missing>"), got["report"].get(k, "<missing>")
        if not same(a, b):
            out.append(f"report {k}: {a!r} uninterrupted, {b!r} killed and resumed")
    for s in sorted(set(ref["weights"]) | set(got["weights"])):
        if ref["weights"].get(s) != got["weights"].get(s):
            out.append(f"weights {s}/model: {ref['weights'].get(s)} vs {got['weights'].get(s)}")
    for s in sorted(set(ref["metrics"]) | set(got["metrics"])):
        a, b = ref["metrics"].get(s, []), got["metrics"].get(s, [])
        if [r.get("step") for r in a] != [r.get("step") for r in b]:
            out.append(f"metrics {s}: steps {[r.get('step') for r in a]} vs {[r.get('step') for r in b]}")
            continue
        for ra, rb in zip(a, b):
            for k in sorted(set(ra) | set(rb)):
                if not same(ra.get(k), rb.get(k)):
                    out.append(f"metrics {s} step {ra.get('step')} {k}: {ra.get(k)!r} vs {rb.get(k)!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--max-kills", type=int, default=3, help="kills per trial: 1 to this many, drawn")
    p.add_argument("--work", default=os.path.join(HERE, "work", "kill9"), help="run directories (emptied first)")
    p.add_argument("--summary", help="the JSON summary (default WORK/summary.json)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one uninterrupted invocation may take")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. sft.train.max_steps=60")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    summary_path = args.summary or os.path.join(args.work, "summary.json")
    t_start = time.time()

    ref_out = os.path.join(args.work, "ref")
    ref_run = run_pipeline(ref_out, args.overrides, False, ref_out + ".log", None, args.timeout)
    if ref_run["returncode"] != 0:
        print(f"the uninterrupted run failed (exit {ref_run['returncode']}): see {ref_out}.log", file=sys.stderr)
        return 1
    with open(os.path.join(ref_out, "seconds.json")) as fh:
        timeline = phases(json.load(fh))
    T = sum(sec for _, _, sec in timeline)
    print(f"uninterrupted: {ref_run['seconds']:.1f} s, " + ", ".join(f"{n} {sec:.0f} s" for n, _, sec in timeline),
          flush=True)
    ref = fingerprint(ref_out)

    def moment(x: float) -> tuple[str, str | None, float]:
        """The phase, its start marker and the seconds into it at `x` seconds of the reference's stage time."""
        for name, marker, sec in timeline:
            if x < sec:
                return name, marker, x
            x -= sec
        name, marker, sec = timeline[-1]
        return name, marker, sec

    trials = []
    for i in range(1, args.trials + 1):
        rng = random.Random(args.seed * 1_000_003 + i)
        moments = [moment(x) for x in sorted(rng.uniform(0, T) for _ in range(rng.randint(1, args.max_kills)))]
        out = os.path.join(args.work, f"trial{i}")
        attempts = []
        for j, (phase, marker, into) in enumerate(moments):
            a = run_pipeline(out, args.overrides, j > 0, f"{out}.{j}.log", (marker, into), args.timeout)
            a.update({"kill_at": f"{phase} +{into:.1f} s", "state_after": where(out)})
            attempts.append(a)
            if not a["killed"]:
                break  # finished before this moment
        if attempts[-1]["killed"]:
            a = run_pipeline(out, args.overrides, True, f"{out}.{len(attempts)}.log", None, args.timeout)
            attempts.append(a)
        kills = sum(a["killed"] for a in attempts)
        final = attempts[-1]
        if final["returncode"] != 0:
            diffs = [f"the last rerun failed (exit {final['returncode']}): see {out}.{len(attempts) - 1}.log"]
        else:
            diffs = differences(ref, fingerprint(out))
        trials.append({"trial": i, "kills": kills, "attempts": attempts, "identical": not diffs,
                       "differences": diffs, "seconds": round(sum(a["seconds"] for a in attempts), 1)})
        print(f"trial {i}: {kills} kill(s) at {', '.join(a['kill_at'] for a in attempts if a['killed'])} "
              f"({'; '.join(str(a['state_after']) for a in attempts if a['killed'])}): "
              f"{'identical' if not diffs else f'{len(diffs)} differences'}", flush=True)
        for d in diffs[:20]:
            print("    " + d)

    k = sum(t["identical"] for t in trials)
    print(f"\n{k} of {len(trials)} identical (report.json without timing keys, every stage's weights and metrics)")
    with open(os.path.join(ref_out, "report.json")) as fh:
        ignored = sorted(key for key in json.load(fh) if is_timing(key))
    summary = {"identical": k, "trials": len(trials), "overrides": args.overrides, "seed": args.seed,
               "max_kills": args.max_kills, "uninterrupted_seconds": ref_run["seconds"],
               "reference_stage_seconds": {n: round(sec, 1) for n, _, sec in timeline}, "ignored_report_keys": ignored,
               "total_seconds": round(time.time() - t_start, 1), "reference": {"weights": ref["weights"]},
               "runs": trials}
    with open(summary_path, "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"summary: {summary_path}")
    return 0 if k == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
