"""`make bench`: our stages against Hugging Face TRL on the same model, data and settings; prints a table of ratios
(ours / theirs, higher is better for us) and writes benchmarks/results.json.

usage: python benchmarks/run.py [--quick] [--only sft,rm_k4,rm_k9,generate,ppo,ppo_bf16,ppo_work,scaling,rloo]
                                [--out FILE]

`--only` re-measures some figures of an existing results file of the same settings and keeps its others
(`machine.remeasured` names the command that measured each); a full run writes a new one.

Every measurement runs in its own process (ours.py, theirs.py, ppo_trl.py), so each side's peak RSS is its own and
TRL is never imported next to our package. Each pair runs back-to-back, alternating which side goes first, `reps`
times; the ratio reported is the median of the per-repetition ratios (this machine is shared: compare only
back-to-back figures). The workload (workload.py) is built once and read by both sides.

| key | ours | theirs |
|---|---|---|
| ratio.sft | `instructgpt.sft.train`, tokens/s | TRL `SFTTrainer` (current TRL) |
| ratio.rm_k4, ratio.rm_k9 | `instructgpt.rm.train` on K-way rankings | TRL `RewardTrainer`, same rankings as pairs |
| ratio.generate_b{1,8,32} | `instructgpt.generation.sample`, new tokens/s | `model.generate` |
| ratio.ppo | `ours.ppo_update` (instructgpt's PPO loop), episodes/s | TRL 1.12.0 `trl.experimental.ppo.PPOTrainer` |
| ratio.ppo_bf16 | the same in bf16 mixed precision (`train.mixed_precision=bf16`) | the same with `bf16=True` |
| ratio.rloo | the same with `ppo.advantage_estimator=rloo`, episodes/s | TRL `RLOOTrainer` (current TRL) |
| ppo_work | the PPO figure's configuration under the profiler: matmul FLOPs and operator seconds an update | the same |
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the workload build loads models: no load reports
os.environ["HF_HUB_OFFLINE"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work")
TRL_CURRENT = os.path.join(HERE, ".trl", "current")
TRL_PPO = os.path.join(HERE, ".trl", "ppo")
TARGETS = {"ratio.sft": 1.0, "ratio.rm_k9": 3.0, "ratio.ppo": 1.5}
BENCHMARKS = ("sft", "rm_k4", "rm_k9", "generate", "ppo", "ppo_bf16", "ppo_work", "scaling", "rloo")


def log(msg: str) -> None:
    print(msg, flush=True)


def ensure_trl() -> None:
    """TRL lives outside the venv (setup_trl.sh); install it if a folder is missing."""
    if not (os.path.isdir(os.path.join(TRL_CURRENT, "trl")) and os.path.isdir(os.path.join(TRL_PPO, "trl"))):
        subprocess.run(["bash", os.path.join(HERE, "setup_trl.sh")], check=True)


def run_worker(script: str, task: str, tag: str, trl_path: str | None, timeout: int = 1800) -> dict:
    """One measurement in a fresh process; its result JSON, or {"error": ...} with the end of its log."""
    out = os.path.join(WORK, "results", f"{tag}.json")
    log_path = os.path.join(WORK, "logs", f"{tag}.log")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if trl_path:
        env["PYTHONPATH"] = trl_path
    t = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as fh:
        try:
            cmd = [sys.executable, os.path.join(HERE, script), task, os.path.join(WORK, "spec.json"), out]
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t
    if rc == 0 and os.path.exists(out):
        with open(out, encoding="utf-8") as fh:
            return {**json.load(fh), "wall_s": round(wall, 1)}
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        tail = fh.read()[-1500:]
    log(f"  !! {tag} failed (rc={rc}); log {os.path.relpath(log_path)}:\n{tail}")
    return {"error": f"rc={rc}", "log": os.path.relpath(log_path, HERE), "wall_s": round(wall, 1)}


SIDES = {  # benchmark -> ((our script, task), (their script, task, PYTHONPATH))
    "sft": (("ours.py", "sft"), ("theirs.py", "sft", TRL_CURRENT)),
    "rm_k4": (("ours.py", "rm_k4"), ("theirs.py", "rm_k4", TRL_CURRENT)),
    "rm_k9": (("ours.py", "rm_k9"), ("theirs.py", "rm_k9", TRL_CURRENT)),
    "generate": (("ours.py", "generate"), ("theirs.py", "generate", None)),
    "ppo": (("ours.py", "ppo"), ("ppo_trl.py", "ppo", TRL_PPO)),
    "scaling": (("ours.py", "ppo_scaling"), ("ppo_trl.py", "ppo_scaling", TRL_PPO)),
    "ppo_bf16": (("ours.py", "ppo_bf16"), ("ppo_trl.py", "ppo_bf16", TRL_PPO)),
    "ppo_work": (("ours.py", "ppo_work"), ("ppo_trl.py", "ppo_work", TRL_PPO)),
    "rloo": (("ours.py", "rloo"), ("theirs.py", "rloo", TRL_CURRENT)),
}


def headline(result: dict) -> str:
    if "error" in result:
        return "error"
    if "skipped" in result:
        return "skipped"
    if "matmul_gflop_per_update" in result:
        return (f"{result['matmul_gflop_per_update']:,.0f} matmul GFLOP an update at {result['matmul_gflops']:.0f} GFLOPS, "
                f"{result['matmul_s_per_update']:.2f} of {result['op_s_per_update']:.2f} operator s")
    if "batches" in result:
        return ", ".join(f"b{b} {r['throughput']:,.0f}" for b, r in result["batches"].items()) + " " + result["unit"]
    if "configs" in result:
        return "; ".join(f"{c['batch']}x{c['length']} {episodes_per_s(c):.2f}" for c in result["configs"]) + \
            " episodes/s (after the first update)"
    acc = f", held-out acc {result['heldout_accuracy']:.3f}" if "heldout_accuracy" in result else ""
    return f"{result['throughput']:,.0f} {result['unit']}{acc}"


def run_pair(name: str, reps: int) -> list[dict]:
    """reps x (ours, theirs), alternating which goes first; [{"ours": result, "trl": result}] per repetition."""
    (o_script, o_task), (t_script, t_task, t_path) = SIDES[name]
    out, ours_skipped = [], None
    for rep in range(reps):
        pair = {}
        order = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
        for side in order:
            if side == "ours" and ours_skipped:
                pair["ours"] = ours_skipped
                continue
            if side == "ours":
                r = run_worker(o_script, o_task, f"{name}_ours_{rep}", None)
            else:
                r = run_worker(t_script, t_task, f"{name}_trl_{rep}", t_path)
            if "skipped" in r:
                ours_skipped = r
            pair[side] = r
            log(f"  {name} rep {rep + 1}/{reps} {side:4s}: {headline(r)}  (peak RSS {r.get('rss_mb', 0):,.0f} MB, "
                f"{r['wall_s']:.0f} s)")
        out.append(pair)
    return out


def stored_pairs(name: str) -> list[dict]:
    """The per-repetition results a previous run left in benchmarks/work/results/ (for --summarize-only)."""
    out = []
    for rep in range(100):
        pair = {}
        for side in ("ours", "trl"):
            path = os.path.join(WORK, "results", f"{name}_{side}_{rep}.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    pair[side] = json.load(fh)
        if not pair:
            break
        out.append(pair)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Summaries


def median_or_none(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def throughputs(reps: list[dict], side: str, get) -> list:
    out = []
    for p in reps:
        r = p.get(side, {})
        out.append(None if "error" in r or "skipped" in r or not r else get(r))
    return out


def ratios_of(ours: list, trl: list) -> list:
    return [None if o is None or not t else round(o / t, 3) for o, t in zip(ours, trl)]


def summarize(name: str, reps: list[dict], get, get_cpu=None, extra=None) -> dict:
    """Per-repetition figures of both sides, their ratios and the median ratio (wall time; CPU time beside it)."""
    ours, trl = throughputs(reps, "ours", get), throughputs(reps, "trl", get)
    d = {"ours": ours, "trl": trl, "ratios": ratios_of(ours, trl), "ratio": median_or_none(ratios_of(ours, trl))}
    if get_cpu is not None:
        ours_c, trl_c = throughputs(reps, "ours", get_cpu), throughputs(reps, "trl", get_cpu)
        d.update(ours_cpu=ours_c, trl_cpu=trl_c, cpu_ratios=ratios_of(ours_c, trl_c),
                 cpu_ratio=median_or_none(ratios_of(ours_c, trl_c)))
    d.update({
         "rss_mb": {s: max((p[s].get("rss_mb", 0) for p in reps if s in p and "rss_mb" in p[s]), default=None)
                    for s in ("ours", "trl")}})
    if extra:
        d.update(extra(reps))
    skipped = next((p["ours"]["skipped"] for p in reps if "skipped" in p.get("ours", {})), None)
    if skipped:
        d["ours_skipped"] = skipped
    errors = [f"{s} rep {i}: {p[s]['error']} ({p[s]['log']})" for i, p in enumerate(reps) for s in ("ours", "trl")
              if "error" in p.get(s, {})]
    if errors:
        d["errors"] = errors
    return d


def accuracy(reps: list[dict]) -> dict:
    return {"heldout_accuracy": {s: median_or_none(throughputs(reps, s, lambda r: r["heldout_accuracy"]))
                                 for s in ("ours", "trl")}}


def ppo_details(reps: list[dict]) -> dict:
    """Seconds per update of each side, and ours' mean response length (TRL's PPO: response_length exactly; its
    RLOO stops at EOS as ours does, and reports its own)."""
    return {"seconds_per_update": {s: throughputs(reps, s, lambda r: r["configs"][0]["seconds_per_update"])
                                   for s in ("ours", "trl")},
            "mean_response_length": {s: throughputs(reps, s, lambda r: r["configs"][0].get("mean_response_length"))
                                     for s in ("ours", "trl")}}


def step_seconds(reps: list[dict]) -> dict:
    return {"step_seconds": {s: throughputs(reps, s, lambda r: r["step_seconds"]) for s in ("ours", "trl")}}


def scaling_table(reps: list[dict]) -> dict:
    out = {}
    for side in ("ours", "trl"):
        r = reps[0].get(side, {})
        if "configs" in r:
            out[side] = [{"batch": c["batch"], "response_length": c["length"],
                          "seconds_per_update": round(statistics.median(c["seconds_per_update"][1:]
                                                                        or c["seconds_per_update"]), 3),
                          "episodes_per_s": round(episodes_per_s(c), 3), "all_seconds": c["seconds_per_update"],
                          **({"mean_response_length": c["mean_response_length"]}
                             if "mean_response_length" in c else {})}
                         for c in r["configs"]]
        else:
            out[side] = {"skipped": r.get("skipped") or r.get("error", "not run")}
    return out


def ppo_work(pair: dict, ppo: dict | None) -> dict:
    """Both sides' matmul FLOPs and operator seconds an update (ours.ppo_work, ppo_trl.ppo_work); with the `ppo`
    figure: `ratio_if_only_matmuls`, the ratio ours would reach if nothing but its matmuls took time (TRL's median
    seconds an update over ours' matmul seconds an update), the most that less overhead alone can give."""
    keys = ("matmul_gflop_per_update", "matmul_s_per_update", "op_s_per_update", "matmul_gflops")
    out = {s: ({k: None if pair[s][k] is None else round(pair[s][k], 3) for k in keys} if s in pair and "error" not in pair[s] else
               {"error": pair.get(s, {}).get("error", "not run")}) for s in ("ours", "trl")}
    o, t = out["ours"], out["trl"]
    if "error" not in o and "error" not in t:
        out["flop_ratio"] = round(t["matmul_gflop_per_update"] / o["matmul_gflop_per_update"], 3)
        out["ours_matmul_share"] = round(o["matmul_s_per_update"] / o["op_s_per_update"], 3)
        secs = [x for rep in (ppo or {}).get("seconds_per_update", {}).get("trl", []) if rep for x in rep[1:]]
        if secs:
            out["ratio_if_only_matmuls"] = round(statistics.median(secs) / o["matmul_s_per_update"], 3)
    return out


def episodes_per_s(c: dict) -> float:
    """episodes/s over the updates after the first (warm-up), from seconds_per_update: the same rule for both."""
    secs = c["seconds_per_update"]
    timed = secs[1:] or secs
    return c["batch"] * len(timed) / sum(timed)


def ppo_episodes(r: dict) -> float:
    return episodes_per_s(r["configs"][0])


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    st = results["settings"]
    table = Table(title=f"instructgpt / TRL: {results['mode']} mode, median of {st['reps']} alternating "
                        f"repetitions, {st['threads']} threads (higher ratio is better for us)")
    for col in ("figure", "ours", "theirs", "ratio", "target", "per rep", "CPU-time ratio", "peak RSS MB ours / theirs",
                "held-out acc ours / theirs"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    raw = results["raw"]

    def fmt(x, p=0):
        return "-" if x is None else f"{x:,.{p}f}"

    rows = [("sft", "SFT tokens/s vs SFTTrainer"), ("rm_k4", "RM K=4 comparisons/s vs RewardTrainer"),
            ("rm_k9", "RM K=9 comparisons/s vs RewardTrainer"), ("ppo", "PPO episodes/s vs TRL 1.12 PPOTrainer"),
            ("ppo_bf16", "PPO bf16 episodes/s vs TRL 1.12 PPOTrainer bf16"), ("rloo", "RLOO episodes/s vs RLOOTrainer")]
    rows += [(f"generate_b{b}", f"generate b={b} new tokens/s vs model.generate") for b in st["gen_batches"]]
    for name, label in rows:
        d = raw.get(name)
        if d is None:
            continue
        ratio, target = results.get(f"ratio.{name}"), TARGETS.get(f"ratio.{name}")
        shown = fmt(ratio, 2)
        if ratio is not None and target is not None:
            shown = f"[{'green' if ratio >= target else 'red'}]{shown}[/]"
        acc = d.get("heldout_accuracy") or {}
        p = 2 if name in ("ppo", "ppo_bf16", "rloo") else 0
        table.add_row(label, fmt(median_or_none(d["ours"]), p), fmt(median_or_none(d["trl"]), p), shown,
                      fmt(target, 1), " ".join(fmt(r, 2) for r in d["ratios"]), fmt(d.get("cpu_ratio"), 2),
                      f"{fmt(d['rss_mb']['ours'])} / {fmt(d['rss_mb']['trl'])}",
                      f"{fmt(acc.get('ours'), 3)} / {fmt(acc.get('trl'), 3)}" if acc else "")
    if table.row_count:
        console.print(table)
    if results.get("ratio.ppo_reason"):
        console.print(f"ratio.ppo: null ({results['ratio.ppo_reason']})")
    pw = results.get("ppo_work")
    if pw:
        for side, label in (("ours", "ours"), ("trl", "TRL 1.12")):
            w = pw[side]
            console.print(f"PPO work, {label}: {w['error'] if 'error' in w else headline(w)}")
        if "flop_ratio" in pw:
            console.print(f"TRL / ours matmul FLOPs {pw['flop_ratio']:.2f}; ours' share in matmuls "
                          f"{pw['ours_matmul_share']:.2f}; PPO ratio if only ours' matmuls took time "
                          f"{fmt(pw.get('ratio_if_only_matmuls'), 2)}")
    sc = results.get("scaling")
    if sc:
        t = Table(title="PPO seconds per update (median after the first) against response length and batch")
        for col in ("batch", "response length", "ours s/update", "TRL 1.12 s/update", "ours / TRL speed"):
            t.add_column(col, justify="right")
        theirs = sc["trl"] if isinstance(sc["trl"], list) else []
        ours = {(c["batch"], c["response_length"]): c for c in sc["ours"]} if isinstance(sc["ours"], list) else {}
        for c in theirs:
            o = ours.get((c["batch"], c["response_length"]))
            t.add_row(str(c["batch"]), str(c["response_length"]), fmt(o and o["seconds_per_update"], 2),
                      fmt(c["seconds_per_update"], 2),
                      fmt(o and c["seconds_per_update"] / o["seconds_per_update"], 2))
        console.print(t)
        if isinstance(sc["ours"], dict):
            console.print(f"ours: {sc['ours'].get('skipped')}")


def build_results(measured: dict, spec: dict, settings) -> dict:
    """results.json: flat `ratio.*` keys, then per-figure raw figures of both sides, scaling, RSS, settings."""
    results: dict = {"mode": settings.mode}
    raw: dict = {}
    wall, cpu = (lambda r: r["throughput"]), (lambda r: r.get("cpu_throughput"))
    if "sft" in measured:
        raw["sft"] = summarize("sft", measured["sft"], wall, cpu, step_seconds)
        raw["sft"]["unit"] = "tokens/s"
    for k in (4, 9):
        if f"rm_k{k}" in measured:
            raw[f"rm_k{k}"] = summarize(f"rm_k{k}", measured[f"rm_k{k}"], wall, cpu,
                                        lambda reps: {**accuracy(reps), **step_seconds(reps)})
            r = spec["rm"][str(k)]
            raw[f"rm_k{k}"].update(unit="comparisons/s", comparisons_per_step=r["comparisons_per_step"],
                                   prompts_per_step=settings.rm_prompts_per_step,
                                   mean_tokens_per_sequence=r["mean_tokens"])
    if "generate" in measured:
        for b in settings.gen_batches:
            raw[f"generate_b{b}"] = summarize(f"generate_b{b}", measured["generate"],
                                              lambda r, b=b: r["batches"][str(b)]["throughput"],
                                              lambda r, b=b: r["batches"][str(b)].get("cpu_throughput"))
            raw[f"generate_b{b}"]["unit"] = "new tokens/s"
    for name in ("ppo", "ppo_bf16", "rloo"):
        if name in measured:
            raw[name] = summarize(name, measured[name], ppo_episodes,
                                  lambda r: r["configs"][0].get("episodes_per_cpu_s"), ppo_details)
            raw[name]["unit"] = "episodes/s"
    for name, d in raw.items():
        results[f"ratio.{name}"] = d["ratio"]
    for key in ("ratio.sft", "ratio.rm_k4", "ratio.rm_k9", "ratio.ppo", "ratio.ppo_bf16", "ratio.rloo",
                "ratio.generate_b32"):
        results.setdefault(key, None)  # always present; null when not measured
    if raw.get("ppo", {}).get("ours_skipped"):
        results["ratio.ppo_reason"] = raw["ppo"]["ours_skipped"]
    results["targets"] = TARGETS
    if "scaling" in measured:
        results["scaling"] = scaling_table(measured["scaling"])
    if "ppo_work" in measured:
        results["ppo_work"] = ppo_work(measured["ppo_work"][0], raw.get("ppo"))
    results["peak_rss_mb"] = {name: d["rss_mb"] for name, d in raw.items()}
    results["raw"] = raw
    results["versions"] = versions_of(measured)
    results["settings"] = {**settings.as_dict(), **SETTINGS_NOTES}
    return results


def same_workload(previous: dict, fresh: dict) -> bool:
    """Whether two results files measured the same workload: the same mode and settings (repetitions, threads, steps,
    batch sizes...; the notes that describe them aside), so that figures of one can stand beside the other's."""
    def measured_settings(r: dict) -> dict:  # as a results file holds them (tuples as lists)
        return json.loads(json.dumps({k: v for k, v in r.get("settings", {}).items() if k not in SETTINGS_NOTES}))

    return previous.get("mode") == fresh.get("mode") and measured_settings(previous) == measured_settings(fresh)


def merged(previous: dict, fresh: dict, command: str) -> dict:
    """`previous` (a results file) with the figures `fresh` measured (a run of some figures, `--only`) in place of its
    own: their ratios, raw figures and peak RSS, `scaling` and `ppo_work` where measured, the library versions.
    `machine.remeasured` lists, for each earlier partial run whose figures still stand, its command and the figures
    it measured, and this one last; `machine` itself stays the run that measured the rest."""
    out = json.loads(json.dumps(previous))  # a deep copy
    figures = list(fresh.get("raw", {})) + [k for k in ("scaling", "ppo_work") if k in fresh]
    for name, d in fresh.get("raw", {}).items():
        out[f"ratio.{name}"] = d["ratio"]
        out.setdefault("raw", {})[name] = d
        out.setdefault("peak_rss_mb", {})[name] = d["rss_mb"]
    if "ppo" in fresh.get("raw", {}):
        out.pop("ratio.ppo_reason", None)
        if "ratio.ppo_reason" in fresh:
            out["ratio.ppo_reason"] = fresh["ratio.ppo_reason"]
    for key in ("scaling", "ppo_work"):
        if key in fresh:
            out[key] = fresh[key]
    out["versions"] = {**out.get("versions", {}), **fresh.get("versions", {})}
    machine = out.setdefault("machine", {})
    earlier = [{**r, "figures": [f for f in r["figures"] if f not in figures]} for r in machine.get("remeasured", [])]
    machine["remeasured"] = [r for r in earlier if r["figures"]] + [
        {"figures": figures, "command": command, "wall_minutes": fresh["machine"]["wall_minutes"],
         "load_average_at_end": fresh["machine"]["load_average_at_end"]}]
    return out


def versions_of(measured: dict) -> dict:
    versions = {}
    for pairs in measured.values():
        for p in pairs:
            for r in p.values():
                for lib, v in r.get("versions", {}).items():
                    key = f"trl ({'PPO' if r['task'].startswith('ppo') else 'SFT, RM, RLOO'})" if lib == "trl" \
                        else lib
                    versions[key] = v
    return versions


SETTINGS_NOTES = {
    "precision": "fp32 on both sides (TRL's bf16 default off), but ppo_bf16: bf16 autocast on both sides (TRL "
                 "bf16=True; ours train.mixed_precision=bf16 with ppo.recompute_logprobs=true, rollouts sampled in "
                 "fp32), fp32 weights and optimizer",
    "gradient_checkpointing": "off on both sides (TRL's default on)",
    "optimizer": "AdamW on both sides, same betas/eps/weight decay, grad clip, cosine to 10%, no warm-up",
    "sft": "same rows in the same order per step (TRL sequential sampler over our batch order); loss on "
           "response tokens; tokens = non-pad tokens; rate over the steps after the warm-up steps",
    "rm": "ours: rm_prompts_per_step K-way rankings per step, each response forwarded once; TRL: the same "
          "prompts' C(K,2) (chosen, rejected) pairs per step; comparisons/s over the steps after warm-up; "
          "held-out accuracy = share of held-out pairs ordered right, one shared function",
    "generate": "sampling at temperature 1, no top-k/top-p, no EOS (exactly gen_new_tokens per row); "
                "median call time after one warm-up call; held-out task prompts, left-padded",
    "ppo": "TRL 1.12.0 PPOTrainer: fp32, no gradient checkpointing, temperature 1, stop_token None "
           "(fixed-length responses), num_sample_generations 0, one rollout forward batch; episodes/s over "
           "the updates after the first; both sides sample the workload's prompts (ours reads them as a "
           "prompt source and renders the same token ids)",
    "rloo": "TRL RLOOTrainer (current TRL): fp32, no gradient checkpointing, dropout off (ours: eval mode), "
            "temperature 1, top_k 0, top_p 1, beta 0.05 with a reference model, one iteration, no advantage "
            "normalisation, responses stop at EOS on both sides; TRL recomputes old log-probs with a forward, "
            "ours takes the sampler's (as in its PPO); episodes/s over the updates after the first",
}


# --------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, few steps: for development")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results.json; "
                                                "benchmarks/work/results_quick.json with --quick)")
    # One thread per worker by default: on a loaded machine (this one is shared) two OpenMP threads that must meet
    # at every op barrier lose far more than half their speed, and unevenly between small and large ops; one
    # thread per side keeps the ratio stable. `--threads 2` on an idle machine measures the two-core case.
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every worker, the same on both sides")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3; 1 with --quick)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="measure nothing: rebuild the results file from benchmarks/work/results/ of the last run")
    a = ap.parse_args()
    only = [b.strip() for b in a.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    out_path = a.out or (os.path.join(WORK, "results_quick.json") if a.quick else os.path.join(HERE, "results.json"))

    sys.path.insert(0, HERE)
    import workload

    settings = workload.Settings.quick() if a.quick else workload.Settings()
    settings.threads = a.threads
    if a.reps:
        settings.reps = a.reps
    t0 = time.perf_counter()
    measured: dict = {}
    if a.summarize_only:
        with open(os.path.join(WORK, "spec.json"), encoding="utf-8") as fh:
            spec = json.load(fh)
        settings = workload.Settings(**{**spec["settings"], "optim": workload.Optim(**spec["settings"]["optim"])})
        for name in only:
            measured[name] = stored_pairs(name)
    else:
        ensure_trl()
        for d in ("results", "logs"):
            shutil.rmtree(os.path.join(WORK, d), ignore_errors=True)
            os.makedirs(os.path.join(WORK, d))
        log(f"building the workload in {os.path.relpath(WORK)} ...")
        spec = workload.build(WORK, settings)
        with open(os.path.join(WORK, "spec.json"), "w", encoding="utf-8") as fh:
            json.dump(spec, fh, indent=1)
        for name in only:
            log(f"[{name}]")
            measured[name] = run_pair(name, 1 if name in ("scaling", "ppo_work") else settings.reps)
    measured = {k: v for k, v in measured.items() if v}
    results = build_results(measured, spec, settings)
    results["machine"] = {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                          "wall_minutes": round((time.perf_counter() - t0) / 60, 1)}
    previous = None
    if set(only) != set(BENCHMARKS) and not a.summarize_only and os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as fh:
            previous = json.load(fh)
    if previous is not None and same_workload(previous, results):
        results = merged(previous, results, " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]))
        log(f"re-measured {', '.join(only)} in {os.path.relpath(out_path)}; its other figures kept")
    elif previous is not None:
        log(f"{os.path.relpath(out_path)} was measured with other settings: replaced by this run's figures alone")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print_table(results)
    log(f"wrote {os.path.relpath(out_path)} in {results['machine']['wall_minutes']} min")


if __name__ == "__main__":
    main()
