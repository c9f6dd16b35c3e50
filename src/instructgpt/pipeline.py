"""``instructgpt pipeline``: the whole InstructGPT loop in one command, in one run directory.

    sft/          1. supervised fine-tuning on demonstrations
    rankings.jsonl 2. simulated labelers rank K samples of the SFT model per prompt (the built-in task only;
                     a recipe with human rankings names them in rm.data.train instead)
    rm/           3. reward model from the K-way rankings
    ppo/          4. PPO-ptx from the SFT model against the reward model
    ppo_noptx/       and plain PPO (ptx_coef = 0), to show what the pretraining mix buys
    dpo/             optional (a `dpo` section): DPO on the same rankings, the baseline without RL
    rloo/            optional (an `rloo` section): PPO-ptx's settings with RLOO's critic-free advantages
    report.json, report.md, *.png, samples_<policy>.jsonl   5. evaluation on held-out prompts

A recipe (``--config FILE.yaml``) has one section per stage, each a stage config (see ``instructgpt <stage>``),
plus ``label_sim`` and ``eval``; a section left out of a recipe keeps the embedded default's, and links between
stages (the SFT model that starts RM and PPO, the rankings the RM trains on, the RM that PPO optimises) are filled
in unless the recipe sets them. Every stage writes its own out_dir, so ``--resume`` (or the same ``--out``) skips what
is finished and resumes what was interrupted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import yaml

from instructgpt.config import ConfigError, deep_merge, load_config, parse_overrides, read_yaml_mapping

# The base model's pretraining text (the plays, and sentences and short documents of both suites' domains), mixed
# into SFT and PPO-ptx against the alignment tax; and its held-out counterpart, where the tax is measured: the
# held-out plays and documents about held-out shops and topics, text no stage trains on
PRETRAIN_MIX = "builtin:pretrain?assistant=20000"
HELDOUT_PRETRAIN = "builtin:pretrain?split=heldout&assistant=3000"

# The embedded default: the shipped 4-layer base model and the built-in suite, sized for a 2-core CPU.
# Departures from the paper's settings, each for the CPU budget, are commented where they are made. The data sources
# of the built-in suite (demonstrations, the prompts labelers rank, PPO's prompts, held-out prompts) come from
# SUITE_SOURCES for the recipe's `suite` wherever the recipe leaves them out.
DEFAULT_RECIPE: dict = {
    "seed": 0,
    "suite": "assistant",  # the built-in suite; "puzzles" is the control, where a reward model has nothing to learn
    "sft": {
        "model": {"name_or_path": "builtin:base"},
        "data": {"max_length": 192, "eval_size": 200, "pretrain": PRETRAIN_MIX},
        # the pretraining mix against the alignment tax: 4 blocks of the base model's pretraining text beside each
        # step's 32 demonstrations (a quarter of its tokens); with plays alone, their held-out perplexity stayed
        # near the base model's (88 against 75; 3,629 without the mix). bf16 autocast (weights and optimizer fp32):
        # on a CPU with avx512_bf16 twice the tokens/s of fp32 at the same loss; where bf16 is slow, set it to "no"
        "train": {"max_steps": 300, "batch_size": 32, "lr": 1.0e-3, "warmup_steps": 20, "log_every": 10,
                  "eval_every": 100, "save_every": 100, "pretrain_coef": 1.0, "pretrain_batch_size": 4,
                  "mixed_precision": "bf16"},
    },
    # K = 8 samples per prompt at three temperatures: the paper's labelers ranked 4 to 9 outputs of several models;
    # at the same sampling cost, 400 prompts of 8 taught the RM more than 800 of 4 (held-out RM accuracy 0.76
    # against 0.74: 28 pairs a prompt against 6), and 0.7/1.0/1.3 more than 0.2..1.4 (0.81 against 0.78): samples
    # near 0 are all alike, samples above 1.4 are all garbled
    "label_sim": {"k": 8, "temperatures": "0.7,1.0,1.3", "max_new_tokens": 48},
    "rm": {
        "data": {"max_length": 192, "eval_size": 16},
        "train": {"batch_size": 8, "lr": 5.0e-4, "log_every": 10, "eval_every": 25, "save_every": 25,
                  "mixed_precision": "bf16"},
        "epochs": 1.0,
        "normalize": {"max_demonstrations": 500},
    },
    "ppo": {
        "data": {"pretrain": PRETRAIN_MIX, "max_length": 128},  # the prompt's tokens at most; also the ptx block
        # length
        # CPU budget: 20 updates of 64 episodes (the paper: 500 of 512). lr 5e-5: at 1e-4 even the gold labeler as
        # the reward (reward_model=builtin:gold) made the policy drift
        "train": {"max_steps": 20, "batch_size": 64, "lr": 5.0e-5, "warmup_steps": 2, "log_every": 1,
                  "eval_every": 20, "save_every": 5},
        # ptx: the paper's gamma = 27.8 and 8x pretraining tokens cost 9x the update on a CPU; 1.0 and 1x here.
        # kl_coef 0.3, not the paper's 0.02: a reward model trained on rankings of 500 prompts is a far weaker
        # proxy than the paper's 6B one on 33k prompts; at 0.02 the RM score kept rising while gold peaked near
        # update 10 and fell (the over-optimisation run in docs/results.md)
        "ppo": {"kl_coef": 0.3, "ptx_coef": 1.0, "ptx_token_ratio": 1.0, "ppo_epochs": 1, "num_minibatches": 2,
                "response_length": 48, "eval_prompts": 64},
    },
    "ppo_noptx": True,  # also train plain PPO (ptx_coef = 0) for the alignment-tax comparison
    "dpo": None,  # a DPO config (even {}) adds DPO on the same rankings, evaluated beside PPO; not InstructGPT
    # an `rloo` section (even {}) adds RLOO: the ppo section's run with ppo.advantage_estimator=rloo and 4 responses
    # to each prompt (no value model), the section's own keys over it; evaluated beside PPO; not InstructGPT
    "rloo": None,
    # the best-of-n curve (n = 1..16) on 128 of the 500 held-out prompts: 16 samples of all 500 would take minutes
    "eval": {"heldout": 500, "best_of": 0, "bon_curve": 16, "bon_prompts": 128, "max_new_tokens": 48, "kl_prompts": 128,
             "prompts": None, "ptx_text": HELDOUT_PRETRAIN},
}
# Per suite: demonstrations (SFT), the prompts the simulated labelers rank, PPO's prompts, PPO's held-out monitor
SUITE_SOURCES: dict[str, dict[str, str]] = {
    "assistant": {"demos": "builtin:task-demos?n=4000&seed=0",
                  "rankings": "builtin:task-prompts?split=train&n=500&seed=1",
                  "ppo": "builtin:task-prompts?split=train&n=4000&seed=2",
                  "monitor": "builtin:task-prompts?split=heldout&n=128&seed=7"},
    "puzzles": {"demos": "builtin:task-demos?n=4000&seed=0&suite=puzzles&error_rate=0.2",
                "rankings": "builtin:task-prompts?split=train&n=400&seed=1&suite=puzzles",
                "ppo": "builtin:task-prompts?split=train&n=4000&seed=2&suite=puzzles",
                "monitor": "builtin:task-prompts?split=heldout&n=128&seed=7&suite=puzzles"},
}
STAGE_KEYS = ("suite", "sft", "label_sim", "rm", "ppo", "ppo_noptx", "dpo", "rloo", "eval", "targets", "seed")
LABEL_SIM_KEYS = {"prompts", "k", "noise", "agreement", "flip_prob", "bt_scale", "resolution", "temperature",
                  "temperatures", "max_new_tokens", "batch_size", "mixed_precision"}
EVAL_KEYS = {"heldout", "best_of", "best_of_temperature", "prompts", "ptx_text", "ptx_max_tokens", "max_new_tokens",
             "temperature", "batch_size", "reward_model", "mixed_precision", "bon_curve", "bon_prompts", "kl_prompts"}


def _fill_suite(recipe: dict) -> None:
    """The built-in suite's sources wherever the recipe leaves a stage's data out (a real-model recipe names its
    own)."""
    suite = recipe.get("suite") or "assistant"
    if suite not in SUITE_SOURCES:
        raise ConfigError(f"suite: unknown suite '{suite}' (known: {', '.join(SUITE_SOURCES)})")
    src = SUITE_SOURCES[suite]

    def fill(section: str, path: tuple[str, ...], value) -> None:
        node = recipe.get(section)
        if not isinstance(node, dict):
            return
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if node.get(path[-1]) is None:
            node[path[-1]] = value

    fill("sft", ("data", "train"), src["demos"])
    fill("label_sim", ("prompts",), src["rankings"])
    fill("ppo", ("data", "train"), src["ppo"])
    fill("ppo", ("data", "eval"), src["monitor"])
    if isinstance(recipe.get("eval"), dict) and not recipe["eval"].get("prompts"):
        recipe["eval"].setdefault("suite", suite)


def load_recipe(path: str | None, overrides: list[str]) -> dict:
    """The embedded default <- the recipe file <- ``stage.key=value`` overrides; unknown sections are errors."""
    recipe = copy.deepcopy(DEFAULT_RECIPE)
    if path:
        for k, v in read_yaml_mapping(path, "recipe").items():
            if k not in STAGE_KEYS:
                raise ConfigError(f"{path}: unknown section '{k}' (known: {', '.join(STAGE_KEYS)})")
            # a section the recipe gives replaces the default's (a real-model recipe shares nothing with it)
            recipe[k] = v
    if overrides:
        recipe = deep_merge(recipe, parse_overrides(overrides))
    for section, keys in (("label_sim", LABEL_SIM_KEYS), ("eval", EVAL_KEYS | {"suite"})):
        for k in (recipe.get(section) or {}):
            if k not in keys:
                raise ConfigError(f"{section}.{k}: unknown key (known: {', '.join(sorted(keys))})")
    _fill_suite(recipe)
    from instructgpt.report import targets_with

    try:  # a recipe's targets for its report: {report key: threshold, or null to drop it}
        targets_with(recipe.get("targets"))
    except ValueError as e:
        raise ConfigError(f"{path or 'recipe'}: {e}") from None
    return recipe


def _optional_section(recipe: dict, name: str) -> dict | None:
    """An optional stage's section (`dpo`, `rloo`): None when off (absent, null or false), else its keys ({} for
    true or an empty section)."""
    section = recipe.get(name)
    if section in (None, False):
        return None
    return section if isinstance(section, dict) else {}


def stage_configs(recipe: dict, out: str) -> dict:
    """Every stage's typed config, with the links between stages filled in where the recipe leaves them out."""
    from instructgpt import dpo, ppo, rm, sft

    seed = recipe.get("seed", 0)
    sft_d = deep_merge({"seed": seed}, recipe["sft"])
    sft_d["out_dir"] = os.path.join(out, "sft")
    cfgs = {"sft": load_config(sft.SFTConfig, None, None, sft_d)}
    sft_model = os.path.join(out, "sft", "model")

    if recipe.get("rm") is not None:
        rm_d = deep_merge({"seed": seed, "model": {"name_or_path": sft_model},
                           "normalize": {"demonstrations": cfgs["sft"].data.train}}, recipe["rm"])
        if recipe.get("label_sim") and not (rm_d.get("data") or {}).get("train"):
            rm_d = deep_merge(rm_d, {"data": {"train": os.path.join(out, "rankings.jsonl")}})
        rm_d["out_dir"] = os.path.join(out, "rm")
        cfgs["rm"] = load_config(rm.RMConfig, None, None, rm_d)
    if recipe.get("ppo") is not None:
        ppo_d = deep_merge({"seed": seed, "model": {"name_or_path": sft_model},
                            "reward_model": {"name_or_path": os.path.join(out, "rm", "model")}}, recipe["ppo"])
        ppo_d["out_dir"] = os.path.join(out, "ppo")
        cfgs["ppo"] = load_config(ppo.PPOConfig, None, None, ppo_d)
        if recipe.get("ppo_noptx"):
            plain = deep_merge(ppo_d, {"ppo": {"ptx_coef": 0.0}, "out_dir": os.path.join(out, "ppo_noptx")})
            cfgs["ppo_noptx"] = load_config(ppo.PPOConfig, None, None, plain)
        if (rloo := _optional_section(recipe, "rloo")) is not None:
            rloo_d = deep_merge(deep_merge(ppo_d, {"ppo": {"advantage_estimator": "rloo", "samples_per_prompt": 4}}),
                                rloo)
            if rloo_d["ppo"]["advantage_estimator"] != "rloo":
                raise ConfigError("rloo.ppo.advantage_estimator: the rloo section runs RLOO (its report names it so)")
            rloo_d["out_dir"] = os.path.join(out, "rloo")
            cfgs["rloo"] = load_config(ppo.PPOConfig, None, None, rloo_d)
    if (dpo_section := _optional_section(recipe, "dpo")) is not None:
        dpo_d = deep_merge({"seed": seed, "model": {"name_or_path": sft_model}}, dpo_section)
        if not (dpo_d.get("data") or {}).get("train"):  # the rankings the RM learns from (without an RM, label-sim's)
            rankings = cfgs["rm"].data.train if "rm" in cfgs else \
                (os.path.join(out, "rankings.jsonl") if recipe.get("label_sim") else None)
            dpo_d = deep_merge(dpo_d, {"data": {"train": rankings}})
        dpo_d["out_dir"] = os.path.join(out, "dpo")
        cfgs["dpo"] = load_config(dpo.DPOConfig, None, None, dpo_d)
    return cfgs


def run_label_sim(recipe: dict, out: str) -> str:
    """Rankings of K samples of the SFT model per prompt, by the simulated labelers (skipped when already written)."""
    from instructgpt import label_sim

    path = os.path.join(out, "rankings.jsonl")
    if os.path.exists(path):
        return path
    ls = recipe["label_sim"]
    argv = ["--policy", os.path.join(out, "sft", "model"), "--out", path, "--seed", str(recipe.get("seed", 0))]
    for k, v in ls.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    if label_sim.main(argv) != 0:
        raise ConfigError("label_sim failed (see above)")
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="instructgpt pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a recipe YAML (default: the embedded default on the built-in task)")
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the latest run under runs/ (or --out)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. sft.train.max_steps=100 eval.heldout=1000")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except ConfigError as e:
        print(f"instructgpt pipeline: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(recipe, sort_keys=False))
        return 0
    out = args.out
    if out is None and args.resume and os.path.isdir("runs"):
        runs = sorted(d for d in os.listdir("runs") if d[:1].isdigit())
        out = os.path.join("runs", runs[-1]) if runs else None
    out = out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    try:
        return run(recipe, out)
    except ConfigError as e:
        print(f"instructgpt pipeline: error: {e}", file=sys.stderr)
        return 2


def run(recipe: dict, out: str) -> int:
    from instructgpt import dpo, ppo, rm, sft
    from instructgpt.data import DataError
    from instructgpt.runs import StageError

    with open(os.path.join(out, "recipe.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(recipe, fh, sort_keys=False)
    cfgs = stage_configs(recipe, out)
    seconds: dict[str, float] = _read_json(os.path.join(out, "seconds.json"))
    memory: dict[str, dict] = _read_json(os.path.join(out, "memory.json"))  # stage -> peak_memory_gib()

    def measured(name: str) -> None:
        memory[name] = peak_memory_gib()
        _save(out, seconds, memory)  # after every stage, so a killed pipeline keeps the figures of what it finished

    def timed(name, fn, *a, done_file=None):
        """Run a stage, recording its seconds and memory when it did its work in this invocation; `done_file` (its
        DONE.json by default) existing beforehand means an earlier one finished it."""
        done_file = done_file or os.path.join(out, name, "DONE.json")
        done_before = os.path.exists(done_file)
        reset_peak_cuda_memory()
        t = time.time()
        fn(*a)
        if not done_before:  # a stage finished in an earlier invocation keeps its measured time and memory
            seconds[name] = seconds.get(name, 0.0) + time.time() - t
            measured(name)
            return
        # ... or, if that invocation was killed before recording it, the stage's own DONE.json's (label-sim has none)
        if name not in seconds and done_file.endswith("DONE.json"):
            with open(done_file, encoding="utf-8") as fh:
                seconds[name] = float(json.load(fh).get("seconds", 0.0))
        _save(out, seconds, memory)

    try:
        timed("sft", sft.train, cfgs["sft"])
        if ("rm" in cfgs or "dpo" in cfgs) and recipe.get("label_sim"):
            timed("label_sim", run_label_sim, recipe, out, done_file=os.path.join(out, "rankings.jsonl"))
        if "rm" in cfgs:
            timed("rm", rm.train, cfgs["rm"])
        for name in ("ppo", "ppo_noptx", "rloo"):
            if name in cfgs:
                timed(name, ppo.train, cfgs[name])
        if "dpo" in cfgs:
            timed("dpo", dpo.train, cfgs["dpo"])
    except (DataError, StageError) as e:
        print(f"instructgpt pipeline: error: {e}", file=sys.stderr)
        return 2

    # 5. evaluation and the report
    from instructgpt.evaluate import evaluate
    from instructgpt.report import write_report

    ev = dict(recipe.get("eval") or {})
    policies = {"base": cfgs["sft"].model.name_or_path, "sft": os.path.join(out, "sft", "model")}
    for name in ("ppo", "ppo_noptx", "rloo", "dpo"):
        if name in cfgs:
            policies[name] = os.path.join(out, name, "model")
    rm_dir = ev.pop("reward_model", None) or (os.path.join(out, "rm", "model") if "rm" in cfgs else None)
    reset_peak_cuda_memory()
    t = time.time()
    report = evaluate(policies, sft="sft", reward_model=rm_dir, out_dir=out, seed=recipe.get("seed", 0),
                      heldout=ev.pop("heldout", 500), best_of=ev.pop("best_of", 0) if rm_dir else 0, **ev)
    seconds["eval"] = time.time() - t
    memory["eval"] = peak_memory_gib()
    # each stage's time is measured when it runs (a resumed run keeps the earlier stages' times): their sum is the
    # wall time of an uninterrupted run
    seconds["total"] = sum(v for k, v in seconds.items() if k != "total")
    report.update({f"seconds.{k}": round(v, 1) for k, v in seconds.items()})
    report.update(memory_report(memory))
    report["heldout_prompts"] = report.get("heldout_prompts", len(_read_jsonl(os.path.join(out, "samples_sft.jsonl"))))
    if recipe.get("targets"):
        report["targets"] = recipe["targets"]  # overrides of report.TARGETS, null drops one
    _save(out, seconds, memory)
    stage_dirs = {k: cfgs[k].out_dir for k in cfgs}
    write_report(out, report, stage_dirs)
    print(f"\nrun directory: {out}  (report.md, report.json)")
    _print_summary(report)
    return 0


def _read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(x) for x in fh if x.strip()]


def peak_memory_gib() -> dict[str, float]:
    """This process's peak memory so far, GiB: resident ("rss", the kernel's ru_maxrss: KiB on Linux, bytes on macOS)
    and, on a GPU, what torch allocated since the last :func:`reset_peak_cuda_memory` ("cuda"). No "rss" on Windows,
    which has no `resource` module."""
    import torch

    out = {}
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss"] = rss / (2**30 if sys.platform == "darwin" else 2**20)
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def reset_peak_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_report(memory: dict[str, dict]) -> dict[str, float]:
    """Report keys from {stage: peak_memory_gib()}: `peak_rss_gib.<stage>` and `peak_cuda_gib.<stage>`, and their
    largest as `.total`. The stages run in one process and the kernel keeps one resident peak per process, so a
    stage's RSS figure is the pipeline's peak up to the end of that stage (the largest of them is the run's peak); the
    GPU figure is the stage's own (torch resets its peak before each stage)."""
    out = {}
    for kind in ("rss", "cuda"):
        per_stage = {k: v[kind] for k, v in memory.items() if kind in v}
        if per_stage:
            out.update({f"peak_{kind}_gib.{k}": round(v, 2) for k, v in per_stage.items()})
            out[f"peak_{kind}_gib.total"] = round(max(per_stage.values()), 2)
    return out


def _read_json(path: str) -> dict:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return {}


def _save(out: str, seconds: dict, memory: dict) -> None:
    for name, value in (("seconds.json", seconds), ("memory.json", memory)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
            json.dump(value, fh, indent=2)


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [k.split(".", 1)[1] for k in report if k.startswith("gold_score.")]
    table = Table(title="held-out evaluation (gold labeler)")
    for col in ("policy", "gold", "exact", "win vs sft", "win (no ties)", "RM score", "KL", "ptx ppl"):
        table.add_column(col, justify="right" if col != "policy" else "left")

    def f(key):
        v = report.get(key)
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, (int, float)) else str(v))
    for n in names:
        table.add_row(n, f(f"gold_score.{n}"), f(f"accuracy.{n}"), f(f"win_rate.{n}_vs_sft"),
                      f(f"win_rate_no_ties.{n}_vs_sft"), f(f"rm_score.{n}"), f(f"kl.{n}"), f(f"ptx_perplexity.{n}"))
    Console().print(table)
    secs = {k.split(".", 1)[1]: v for k, v in report.items() if k.startswith("seconds.")}
    print("seconds:", json.dumps(secs))
    if "peak_rss_gib.total" in report:
        print(f"peak resident memory: {report['peak_rss_gib.total']:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
