"""``instructgpt pipeline``: the whole InstructGPT loop in one command, in one run directory.

    sft/          1. supervised fine-tuning on demonstrations
    rankings.jsonl 2. simulated labelers rank K samples of the SFT model per prompt (the built-in task only;
                     a recipe with human rankings names them in rm.data.train instead)
    rm/           3. reward model from the K-way rankings
    ppo/          4. PPO-ptx from the SFT model against the reward model
    ppo_noptx/       and plain PPO (ptx_coef = 0), to show what the pretraining mix buys
    dpo/             optional (a `dpo` section): DPO on the same rankings, the baseline without RL
    rloo/            optional (an `rloo` section): PPO-ptx's settings with RLOO's critic-free advantages
    round2/, ...     with `rounds: N`, rounds 2..N: rankings.jsonl of the previous round's policy's samples,
                     rankings_all.jsonl (every ranking so far), rm/ trained on them, ppo/ continued from that policy
    report.json, report.md, *.png, samples_<policy>.jsonl   5. evaluation on held-out prompts

A recipe (``--config FILE.yaml``, a :class:`RecipeConfig`) has one section per stage, each a stage config (see
``instructgpt <stage>``), plus ``label_sim`` (:class:`~instructgpt.label_sim.LabelSimConfig`), ``eval``
(:class:`~instructgpt.evaluate.EvalConfig`) and its ``expectations``. The default recipe is ``recipes/default.yaml``
in the package (``configs/recipes/default.yaml`` in the repository); a section left out of a recipe keeps the
default's, and links between stages (the SFT model that starts RM and PPO, the rankings the RM trains on, the RM that
PPO optimises) are filled in unless the recipe sets them. Every stage writes its own out_dir, so ``--resume`` (or the
same ``--out``) skips what is finished and resumes what was interrupted. With ``labelers: people`` the pipeline writes
the samples to rank for the labeling app and stops (exit status 75) until their rankings are exported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Optional

import torch
import yaml
from rich.console import Console
from rich.table import Table

from instructgpt import dpo, label_sim, ppo, rm, rounds, sft
from instructgpt.config import (ConfigError, command_error, deep_merge, from_dict, load_config, parse_command_line,
                                parse_overrides, read_yaml_mapping, to_dict)
from instructgpt.data import DataError, check_sources
from instructgpt.evaluate import EvalConfig, evaluate
from instructgpt.files import hold_dir, read_jsonl, release_dir, write_json
from instructgpt.label_sim import LabelSimConfig
from instructgpt.report import Expectation, write_report
from instructgpt.runs import Interrupted, StageError

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "default.yaml")
# The exit status of a pipeline that stops for people's rankings (sysexits.h's EX_TEMPFAIL: "try again later")
WAITING_FOR_RANKINGS = 75

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
# Keys of the label_sim and eval sections that the pipeline sets itself (the models it trains, its run directory, the
# recipe's seed): a recipe leaves them at their defaults, as its own recipe.yaml in a run directory does
SET_BY_PIPELINE = {"label_sim": (LabelSimConfig, ("policy", "out", "seed")),
                   "eval": (EvalConfig, ("policy", "sft", "seed", "stage", "out"))}


@dataclass
class RecipeConfig:
    """``instructgpt pipeline``'s recipe. The stage sections hold a stage config's keys (SFTConfig, RMConfig,
    PPOConfig, DPOConfig; rloo: PPOConfig keys over the ppo section's), checked when they are resolved
    (:func:`stage_configs`); a null section leaves its stage out."""

    seed: int = 0
    suite: str = "assistant"  # the built-in suite whose sources fill in the data a section leaves out
    sft: dict[str, Any] = field(default_factory=dict)
    label_sim: Optional[LabelSimConfig] = None  # None: no simulated labelers (rm.data.train names the rankings)
    rm: Optional[dict[str, Any]] = None  # None: no reward model, nor PPO
    ppo: Optional[dict[str, Any]] = None
    ppo_noptx: bool = False  # also plain PPO (ptx_coef = 0)
    dpo: Optional[dict[str, Any]] = None  # DPO on the rankings; {} for its defaults
    rloo: Optional[dict[str, Any]] = None  # the ppo section's run with RLOO's advantages; {} for its defaults
    # passes of the loop: each round after the first ranks samples of the previous round's PPO policy, retrains the
    # reward model on every ranking so far and continues PPO from that policy (round<r>/); 1: the loop once
    rounds: int = 1
    # who ranks the samples the pipeline draws (as the label_sim section says: prompts, k, temperatures): the
    # simulated labelers, or people in the labeling app (the samples go to to_rank.jsonl beside the round's
    # rankings.jsonl, and the pipeline stops until `instructgpt label export` has written that file)
    labelers: Literal["simulated", "people"] = "simulated"
    eval: EvalConfig = field(default_factory=EvalConfig)
    # expected results, checked in report.md: {report.json key: {min: x} and/or {max: y}}, x and y numbers or other
    # report keys (gold_score.sft: {min: gold_score.base}); a key the report lacks is marked missing
    expectations: dict[str, Expectation] = field(default_factory=dict)

    def validate(self) -> None:
        for key, exp in self.expectations.items():
            if exp.min is None and exp.max is None:
                raise ConfigError(f"expectations.{key}: give min, max or both")
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if self.rounds > 1 and (self.rm is None or self.ppo is None or self.label_sim is None):
            raise ConfigError("rounds: the rounds after the first need the rm and ppo sections, and a label_sim "
                              "section: how each round samples the policy for ranking (prompts, k, temperatures)")
        stage_configs(self, "out")  # each stage's own checks
        if self.label_sim is not None:
            label_sim_config(self, "out").validate()
        eval_config(self, "out").validate()


BOUNDS = {f.name for f in fields(Expectation)}


def _fill_suite(recipe: dict) -> None:
    """The built-in suite's sources wherever the recipe leaves a stage's data out (a real-model recipe names its
    own)."""
    suite = recipe.get("suite") or "assistant"
    if not isinstance(suite, str) or suite not in SUITE_SOURCES:
        raise ConfigError(f"suite: unknown suite '{suite}' (known: {', '.join(SUITE_SOURCES)})")
    src = SUITE_SOURCES[suite]

    def fill(section: str, path: tuple[str, ...], value) -> None:
        node = recipe.get(section)
        if not isinstance(node, dict):
            return
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                return  # not a section: the stage's typed check names it
        if node.get(path[-1]) is None:
            node[path[-1]] = value

    fill("sft", ("data", "train"), src["demos"])
    fill("label_sim", ("prompts",), src["rankings"])
    fill("ppo", ("data", "train"), src["ppo"])
    fill("ppo", ("data", "eval"), src["monitor"])
    if isinstance(recipe.get("eval"), dict) and not recipe["eval"].get("prompts"):
        recipe["eval"].setdefault("suite", suite)


def _flat_expectations(node: Any) -> dict:
    """{report key: bounds} from expectations whose keys may be nested at their dots, as dotted overrides write them
    (``expectations.gold_gain.ppo_vs_sft.min=0.2``); a key set to null is dropped."""
    out: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            # bounds are a mapping of plain values; a mapping of mappings (or of a null) goes on down the key
            if isinstance(v, dict) and v and not set(v) <= BOUNDS and \
                    any(isinstance(x, dict) or x is None for x in v.values()):
                walk(v, key + ".")
            else:  # a later mention (an override) adds to an earlier one's bounds, or replaces it
                out[key] = {**out[key], **v} if isinstance(out.get(key), dict) and isinstance(v, dict) else v

    if not isinstance(node or {}, dict):
        raise ConfigError(f"expectations: expected a mapping of report keys to {{min, max}}, got {node!r}")
    walk(node or {}, "")
    return {k: v for k, v in out.items() if v is not None}


def load_recipe(path: str | None, overrides: list[str]) -> RecipeConfig:
    """The default recipe <- the recipe file's sections (each replaces the default's) <- ``section.key=value``
    overrides; typed and checked."""
    recipe = read_yaml_mapping(DEFAULT_RECIPE, "recipe")
    if path:
        recipe["expectations"] = None  # a recipe's expectations are its own, not the default run's
        recipe.update(read_yaml_mapping(path, "recipe"))
    if overrides:
        recipe = deep_merge(recipe, parse_overrides(overrides))
    try:
        for name in ("dpo", "rloo"):  # true: the section with its defaults; false: off
            if isinstance(recipe.get(name), bool):
                recipe[name] = {} if recipe[name] else None
        for section, (cls, keys) in SET_BY_PIPELINE.items():
            for k in keys:
                if isinstance(recipe.get(section), dict) and recipe[section].get(k, getattr(cls(), k)) != \
                        getattr(cls(), k):
                    raise ConfigError(f"{section}.{k}: set by the pipeline (the models it trains, the run directory, "
                                      f"the recipe's seed)")
        recipe["expectations"] = _flat_expectations(recipe.get("expectations"))
        _fill_suite(recipe)
        cfg = from_dict(RecipeConfig, recipe)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg


def stage_configs(recipe: RecipeConfig, out: str) -> dict:
    """Every stage's typed config, with the links between stages filled in where the recipe leaves them out."""
    seed = recipe.seed
    sft_d = deep_merge({"seed": seed}, recipe.sft)
    sft_d["out_dir"] = os.path.join(out, "sft")
    cfgs = {"sft": load_config(sft.SFTConfig, None, None, sft_d)}
    sft_model = os.path.join(out, "sft", "model")

    if recipe.rm is not None:
        rm_d = deep_merge({"seed": seed, "model": {"name_or_path": sft_model},
                           "normalize": {"demonstrations": cfgs["sft"].data.train}}, recipe.rm)
        if recipe.label_sim is not None and _left_out(rm_d, "data", "train"):
            rm_d = deep_merge(rm_d, {"data": {"train": os.path.join(out, "rankings.jsonl")}})
        rm_d["out_dir"] = os.path.join(out, "rm")
        cfgs["rm"] = load_config(rm.RMConfig, None, None, rm_d)
    if recipe.ppo is not None:
        ppo_d = deep_merge({"seed": seed, "model": {"name_or_path": sft_model},
                            "reward_model": {"name_or_path": os.path.join(out, "rm", "model")}}, recipe.ppo)
        ppo_d["out_dir"] = os.path.join(out, "ppo")
        cfgs["ppo"] = load_config(ppo.PPOConfig, None, None, ppo_d)
        if recipe.ppo_noptx:
            plain = deep_merge(ppo_d, {"ppo": {"ptx_coef": 0.0}, "out_dir": os.path.join(out, "ppo_noptx")})
            cfgs["ppo_noptx"] = load_config(ppo.PPOConfig, None, None, plain)
        if recipe.rloo is not None:
            rloo_d = deep_merge(deep_merge(ppo_d, {"ppo": {"advantage_estimator": "rloo", "samples_per_prompt": 4}}),
                                recipe.rloo)
            if isinstance(rloo_d["ppo"], dict) and rloo_d["ppo"].get("advantage_estimator") != "rloo":
                raise ConfigError("rloo.ppo.advantage_estimator: the rloo section runs RLOO (its report names it so)")
            rloo_d["out_dir"] = os.path.join(out, "rloo")
            cfgs["rloo"] = load_config(ppo.PPOConfig, None, None, rloo_d)
    if recipe.dpo is not None:
        dpo_d = deep_merge({"seed": seed, "model": {"name_or_path": sft_model}}, recipe.dpo)
        if _left_out(dpo_d, "data", "train"):  # the rankings the RM learns from (without an RM, label-sim's)
            rankings = cfgs["rm"].data.train if "rm" in cfgs else \
                (os.path.join(out, "rankings.jsonl") if recipe.label_sim is not None else None)
            dpo_d = deep_merge(dpo_d, {"data": {"train": rankings}})
        dpo_d["out_dir"] = os.path.join(out, "dpo")
        cfgs["dpo"] = load_config(dpo.DPOConfig, None, None, dpo_d)
    return cfgs


def _left_out(d: dict, section: str, key: str) -> bool:
    """Whether a stage's dict leaves section.key out, to be filled in; a section that is not a mapping is not filled
    but left to the stage's typed check, which names it."""
    node = d.get(section)
    return node is None or isinstance(node, dict) and not node.get(key)


def label_sim_config(recipe: RecipeConfig, out: str) -> LabelSimConfig:
    """The recipe's label_sim section, ranking samples of the run's SFT model into its rankings.jsonl."""
    return replace(recipe.label_sim, policy=os.path.join(out, "sft", "model"), out=os.path.join(out, "rankings.jsonl"),
                   seed=recipe.seed)


STAGE_MODULES = {"sft": sft, "rm": rm, "ppo": ppo, "ppo_noptx": ppo, "rloo": ppo, "dpo": dpo}


def recipe_sources(recipe: RecipeConfig, out: str, cfgs: dict) -> list[str]:
    """The data the run's stages, label-sim and evaluation read that no step of the run writes (outside `out`): what
    the pipeline checks before its first stage, so a missing file is not found only once the stages before its
    reader have run."""
    ev = eval_config(recipe, out)
    named = [s for name, c in cfgs.items() for s in STAGE_MODULES[name].data_sources(c)]
    named += [ev.prompts, ev.ptx_source()]
    named += [recipe.label_sim.prompts] if recipe.label_sim is not None else []
    inside = os.path.abspath(out) + os.sep
    return [s for s in named if s and not os.path.abspath(s).startswith(inside)]


def eval_config(recipe: RecipeConfig, out: str) -> EvalConfig:
    """The recipe's eval section for the run in `out`: judged with its reward model unless the section names one
    (best-of-n needs one), the report written there."""
    ev = recipe.eval
    rm_dir = ev.reward_model or (os.path.join(out, "rm", "model") if recipe.rm is not None else None)
    return replace(ev, sft="sft", reward_model=rm_dir, best_of=ev.best_of if rm_dir else 0, seed=recipe.seed, out=out)


class WaitingForRankings(Exception):
    """People are to rank the samples in `items` (the labeling app's import format); the pipeline goes on once their
    rankings are exported to `rankings`."""

    def __init__(self, items: str, rankings: str, prompts: int, policy: str):
        super().__init__(f"{prompts} prompts to rank in {items}")
        self.items, self.rankings, self.prompts, self.policy = items, rankings, prompts, policy


def to_rank_path(rankings: str) -> str:
    """Where the samples people rank go: to_rank.jsonl beside the rankings file they become."""
    return os.path.join(os.path.dirname(rankings), "to_rank.jsonl")


def rank_samples(recipe: RecipeConfig, cfg: LabelSimConfig) -> str:
    """`cfg.out`: rankings of K samples of `cfg.policy` per prompt (skipped once the file exists). By the simulated
    labelers; or, with `labelers: people`, the samples are written once for the labeling app and WaitingForRankings
    stops the pipeline until people's rankings are exported to `cfg.out`."""
    if os.path.exists(cfg.out):
        return cfg.out
    if recipe.labelers == "simulated":
        label_sim.run(cfg)
        return cfg.out
    items = to_rank_path(cfg.out)
    prompts = len(read_jsonl(items)) if os.path.exists(items) else rounds.write_items_to_rank(cfg, items)
    raise WaitingForRankings(items, cfg.out, prompts, cfg.policy)


def round_dir(out: str, r: int) -> str:
    """Round r's directory: the run directory itself for round 1 (a one-round run's layout), round<r>/ after."""
    return out if r == 1 else os.path.join(out, f"round{r}")


def round_policy(r: int) -> str:
    """The name of round r's PPO-ptx policy in the report: "ppo" (round 1), "ppo_round<r>"."""
    return "ppo" if r == 1 else f"ppo_round{r}"


def round_configs(recipe: RecipeConfig, out: str, r: int, cfgs: dict) -> dict:
    """Round r >= 2's label_sim, rm and ppo configs, in round<r>/ with seed + r - 1 (other prompts' order and other
    samples than the round before), from round 1's (`cfgs`, :func:`stage_configs`)."""
    d, seed = round_dir(out, r), recipe.seed + r - 1
    previous = os.path.join(round_dir(out, r - 1), "ppo", "model")  # the policy the round starts from
    ranking = replace(label_sim_config(recipe, out), policy=previous, out=os.path.join(d, "rankings.jsonl"), seed=seed)
    # The reward model trains afresh from the SFT model (round 1's start) on every ranking so far, as the paper's RMs
    # always start from the SFT model: one epoch over all of them (more overfits, sec. C.2), where continuing round
    # r-1's RM would give the earlier rankings a second epoch and the new ones only one
    rm_cfg = replace(cfgs["rm"], data=replace(cfgs["rm"].data, train=os.path.join(d, "rankings_all.jsonl")),
                     out_dir=os.path.join(d, "rm"), seed=seed)
    # PPO continues from the previous round's policy against the new RM, with a fresh optimiser and value model
    # (from the new RM, as the paper's). Its KL penalty stays anchored at round 1's reference (the SFT model, unless
    # the ppo section names another), the paper's pi_SFT: each round's policy is held near SFT, not near the round
    # before, so the KL to SFT cannot grow round by round unchecked
    reference = cfgs["ppo"].reference_model.name_or_path or cfgs["ppo"].model.name_or_path
    ppo_cfg = replace(cfgs["ppo"], model=replace(cfgs["ppo"].model, name_or_path=previous),
                      reference_model=replace(cfgs["ppo"].reference_model, name_or_path=reference),
                      reward_model=replace(cfgs["ppo"].reward_model, name_or_path=os.path.join(d, "rm", "model")),
                      out_dir=os.path.join(d, "ppo"), seed=seed)
    return {"label_sim": ranking, "rm": rm_cfg, "ppo": ppo_cfg}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="instructgpt pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE.yaml", help="a recipe (default: recipes/default.yaml, the built-in task)")
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the latest run under runs/ (or --out)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. sft.train.max_steps=100 eval.heldout=1000")
    args = parse_command_line(p, argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except ConfigError as e:
        return command_error("pipeline", e)
    if args.print_config:
        print(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        return 0
    out = args.out
    if out is None and args.resume and os.path.isdir("runs"):
        runs = sorted(d for d in os.listdir("runs") if d[:1].isdigit())
        out = os.path.join("runs", runs[-1]) if runs else None
    out = out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    holder = hold_dir(out)  # each stage holds its own out_dir too
    if holder is not None:
        return command_error("pipeline", f"{out} is in use by another pipeline ({holder}): let it finish or stop it, "
                                         f"or give this one another --out")
    try:
        return run(recipe, out)
    except ConfigError as e:
        return command_error("pipeline", e)
    finally:
        release_dir(out)


def run(recipe: RecipeConfig, out: str) -> int:
    with open(os.path.join(out, "recipe.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(recipe), fh, sort_keys=False)
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

    stage_dirs = {k: cfgs[k].out_dir for k in cfgs}
    ranking = label_sim_config(recipe, out) if recipe.label_sim is not None else None
    try:
        check_sources(*recipe_sources(recipe, out, cfgs))
        timed("sft", sft.train, cfgs["sft"])
        # the pipeline ranks samples of the SFT model when the RM or DPO learns from its rankings.jsonl
        if ranking is not None and any(cfgs[k].data.train == ranking.out for k in ("rm", "dpo") if k in cfgs):
            timed("label_sim", rank_samples, recipe, ranking, done_file=ranking.out)
        if "rm" in cfgs:
            timed("rm", rm.train, cfgs["rm"])
        for name in ("ppo", "ppo_noptx", "rloo"):
            if name in cfgs:
                timed(name, ppo.train, cfgs[name])
        if "dpo" in cfgs:
            timed("dpo", dpo.train, cfgs["dpo"])
        # rounds 2..N: rank the last policy's samples, a reward model on every ranking so far, PPO on from that policy
        for r in range(2, recipe.rounds + 1):
            rc, name = round_configs(recipe, out, r, cfgs), f"round{r}"
            timed(f"{name}.label_sim", rank_samples, recipe, rc["label_sim"], done_file=rc["label_sim"].out)
            if not os.path.exists(rc["rm"].data.train):
                sources = [cfgs["rm"].data.train] + [os.path.join(round_dir(out, q), "rankings.jsonl")
                                                     for q in range(2, r + 1)]
                rounds.union_rankings(sources, rc["rm"].data.train, rc["rm"].data.skip_bad_lines)
            for stage, train in (("rm", rm.train), ("ppo", ppo.train)):
                timed(f"{name}.{stage}", train, rc[stage], done_file=os.path.join(rc[stage].out_dir, "DONE.json"))
                stage_dirs[f"{name}.{stage}"] = rc[stage].out_dir
    except (DataError, StageError) as e:
        return command_error("pipeline", e)
    except Interrupted:  # a stage stopped on SIGTERM / SIGINT with its checkpoint: say how this run goes on
        print(f"[pipeline] stopped; `instructgpt pipeline --out {out}` with the same recipe and overrides goes on",
              flush=True)
        raise
    except WaitingForRankings as w:
        print(f"[pipeline] waiting for people's rankings: {w.prompts} prompts with samples of {w.policy} are in "
              f"{w.items}, in the labeling app's import format. Import them, have them ranked, export the rankings:\n"
              f"    instructgpt label import --db labels.sqlite --prompts {w.items}\n"
              f"    instructgpt label serve --db labels.sqlite\n"
              f"    instructgpt label export --db labels.sqlite --out-dir {os.path.dirname(w.rankings)}"
              f"   # writes {w.rankings}\n"
              f"then `instructgpt pipeline --out {out}` with the same recipe and overrides goes on", flush=True)
        return WAITING_FOR_RANKINGS

    # 5. evaluation and the report
    policies = {"base": cfgs["sft"].model.name_or_path, "sft": os.path.join(out, "sft", "model")}
    for name in ("ppo", "ppo_noptx", "rloo", "dpo"):
        if name in cfgs:
            policies[name] = os.path.join(out, name, "model")
    for r in range(2, recipe.rounds + 1):
        policies[round_policy(r)] = os.path.join(round_dir(out, r), "ppo", "model")
    reset_peak_cuda_memory()
    t = time.time()
    report = evaluate(policies, eval_config(recipe, out))
    seconds["eval"] = time.time() - t
    memory["eval"] = peak_memory_gib()
    if recipe.rounds > 1:
        t = time.time()
        report.update(rounds_report(recipe, out, cfgs))
        seconds["eval_rounds"] = time.time() - t
        memory["eval_rounds"] = peak_memory_gib()
    # each stage's time is measured when it runs (a resumed run keeps the earlier stages' times): their sum is the
    # wall time of an uninterrupted run
    seconds["total"] = sum(v for k, v in seconds.items() if k != "total")
    report.update({f"seconds.{k}": round(v, 1) for k, v in seconds.items()})
    report.update(memory_report(memory))
    report["heldout_prompts"] = report.get("heldout_prompts", len(read_jsonl(os.path.join(out, "samples_sft.jsonl"))))
    # always written, so a rerun without expectations leaves none of an earlier run's in report.json
    report["expectations"] = {k: {b: v for b, v in asdict(e).items() if v is not None}
                              for k, e in recipe.expectations.items()}
    _save(out, seconds, memory)
    write_report(out, report, stage_dirs)
    print(f"\nrun directory: {out}  (report.md, report.json)")
    _print_summary(report)
    return 0


def rounds_report(recipe: RecipeConfig, out: str, cfgs: dict) -> dict:
    """The report keys of a run of several rounds: each round's policy (`round_policies`), the rankings each round
    added and those its reward model trained on (`rankings.round<r>`, `rankings_total.round<r>`), and each round's
    RM's accuracy against the gold order on pairs of samples of SFT and of each round's policy on held-out prompts
    (`rm_accuracy_samples.round<r>.<policy>`, :func:`instructgpt.rounds.rm_accuracy_on_samples`)."""
    n = recipe.rounds
    report: dict = {"rounds": n, "round_policies": [round_policy(r) for r in range(1, n + 1)]}
    stats = _read_json(os.path.join(round_dir(out, n), "rankings_all.jsonl.stats.json"))
    total = 0
    for r, added in enumerate(stats.get("per_source", []), 1):
        total += added
        report[f"rankings.round{r}"], report[f"rankings_total.round{r}"] = added, total
    policies = {"sft": os.path.join(out, "sft", "model"),
                **{round_policy(r): os.path.join(round_dir(out, r), "ppo", "model") for r in range(1, n + 1)}}
    reward_models = {"round1": os.path.join(cfgs["rm"].out_dir, "model"),
                     **{f"round{r}": os.path.join(round_dir(out, r), "rm", "model") for r in range(2, n + 1)}}
    report.update(rounds.rm_accuracy_on_samples(policies, reward_models, label_sim_config(recipe, out),
                                                eval_config(recipe, out)))
    return report


def peak_memory_gib() -> dict[str, float]:
    """This process's peak memory so far, GiB: resident ("rss", the kernel's ru_maxrss: KiB on Linux, bytes on macOS)
    and, on a GPU, what torch allocated since the last :func:`reset_peak_cuda_memory` ("cuda"). No "rss" on Windows,
    which has no `resource` module."""
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
        write_json(os.path.join(out, name), value)  # read back by --resume


def _print_summary(report: dict) -> None:
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
    by_round = report.get("round_policies") or []
    for r, (name, ranked) in enumerate(zip(by_round, ["sft", *by_round]), 1):  # round r ranks round r - 1's policy
        print(f"round {r}: {name} gold {f(f'gold_score.{name}')}, win vs sft (no ties) "
              f"{f(f'win_rate_no_ties.{name}_vs_sft')}; its RM on {ranked}'s pairs "
              f"{f(f'rm_accuracy_samples.round{r}.{ranked}')}")
    secs = {k.split(".", 1)[1]: v for k, v in report.items() if k.startswith("seconds.")}
    print("seconds:", json.dumps(secs))
    if "peak_rss_gib.total" in report:
        print(f"peak resident memory: {report['peak_rss_gib.total']:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
