"""``instructgpt label-sim``: simulated labelers for the built-in suites (after AlpacaFarm's simulated annotators).

For each prompt, sample K responses from a policy (the SFT model), have the hidden gold labeler judge each one
(:mod:`instructgpt.gold`: a 1-7 rating and the paper's flags), and rank them as a noisy person would; write a rankings
file in the format ``instructgpt rm`` reads, with the ratings and flags. The reward model and PPO never see the gold
labeler: only these rankings.

A labeler cannot tell apart two answers the gold labeler scores the same (the rubric's equal ratings; identical
texts): they tie. Between answers that differ, noise:
- ``flip`` (default): each pair's gold order is flipped with a probability; the ranking is then the Copeland order of
  the noisy pairwise wins (equal wins tie);
- ``bt``: Bradley-Terry: rank by gold score + Gumbel noise of a scale.

How much noise: ``--agreement A`` (default 0.726, the paper's: its labelers agreed with each other on 72.6 +- 1.5% of
comparisons) sets the flip probability (or the BT scale) so that two simulated labelers, ranking the same responses
independently, order A of the pairs whose gold differs the same way. label-sim measures that agreement on its own
rankings and prints it (and writes it to ``<out>.stats.json``). ``--agreement none`` (``agreement=null``) takes
``--flip-prob`` (0.25, AlpacaFarm's) or ``--bt-scale`` as given.

``--resolution rating`` makes a puzzle's labeler as coarse as a person: it sees the gold score only on the 1-7 scale,
so two answers of the same rating tie (the assistant suite's gold is a rating already). ``score`` (the default) ranks
by the exact gold score.

``--temperatures 0.3,0.7,1.0,1.3`` samples the K responses at several temperatures (response i at temperature
i mod len): the paper's labelers ranked outputs of several models, which differ in quality far more than K samples of
one policy at one temperature do.

Every setting is a key of :class:`LabelSimConfig`: ``--config FILE.yaml`` and ``key=value`` overrides set them too.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from instructgpt import generation, gold
from instructgpt.config import (ConfigError, add_alias, add_config_arguments, command_error, config_from_args,
                                parse_command_line)
from instructgpt.data import DataError, load_prompts, rendered_prompts
from instructgpt.files import write_json, write_jsonl
from instructgpt.generation import SamplingParams, autocast
from instructgpt.modeling import load_model, pick_device

PAPER_AGREEMENT = 0.726  # Ouyang et al. 2022, sec. 3.4: training labelers agree with each other 72.6 +- 1.5%


@dataclass
class LabelSimConfig:
    """``instructgpt label-sim``'s settings; also a recipe's `label_sim` section, where the pipeline sets policy, out
    and seed itself."""

    policy: Optional[str] = None  # the model whose samples are ranked (the SFT model)
    prompts: str = "builtin:task-prompts?split=train&n=2000&seed=1"
    out: Optional[str] = None  # the rankings JSONL to write
    k: int = 4  # responses per prompt (the paper: 4..9)
    noise: Literal["flip", "bt"] = "flip"
    # the pairwise agreement of two simulated labelers the noise is set to; None: flip_prob or bt_scale as given
    agreement: Optional[float] = PAPER_AGREEMENT
    flip_prob: float = 0.25  # AlpacaFarm's
    bt_scale: float = 0.1
    # rank by the exact gold score, or by the 1-7 rating (equal ratings tie), as a person would
    resolution: Literal["score", "rating"] = "score"
    temperature: float = 1.0
    temperatures: Optional[list[float]] = None  # cycled over the K responses, in place of `temperature`
    max_new_tokens: int = 32
    seed: int = 0
    batch_size: int = 64
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16: sample under bf16 autocast
    device: str = "auto"  # where the policy samples: auto (cuda when available), cpu, ...

    def validate(self) -> None:
        if not self.policy:
            raise ConfigError("policy: required (the model whose samples are ranked)")
        if not self.out:
            raise ConfigError("out: required (the rankings file to write)")
        if not 2 <= self.k <= 9:
            raise ConfigError(f"k: must be in 2..9, got {self.k}")
        if self.agreement is not None and not 0.5 < self.agreement <= 1.0:
            raise ConfigError(f"agreement: must be in (0.5, 1] or null, got {self.agreement}")
        if self.temperatures is not None and (not self.temperatures or min(self.temperatures) < 0):
            raise ConfigError(f"temperatures: one or more, each >= 0, got {self.temperatures}")


def perceived(gold: float, resolution: str = "score") -> float:
    """The gold score as the labeler perceives it: exact ("score") or on the 7-point rating scale ("rating")."""
    if resolution == "score":
        return gold
    if resolution == "rating":
        return float(round(6 * gold))
    raise ValueError(f"unknown resolution '{resolution}' (score or rating)")


def noisy_ranks(gold: Sequence[float], rng: random.Random, noise: str = "flip", flip_prob: float = 0.25,
                bt_scale: float = 0.1, resolution: str = "score") -> list[int]:
    """Dense ranks (1 = best, equal = tie) of K responses from their gold scores under the given noise model; responses
    of equal (perceived) gold are one answer to the labeler, so they tie."""
    seen = [perceived(g, resolution) for g in gold]
    levels = list(dict.fromkeys(seen))  # the distinct answers as the labeler sees them
    k = len(levels)
    if noise == "bt":
        util = [g + bt_scale * -math.log(-math.log(max(rng.random(), 1e-12))) for g in levels]
    elif noise == "flip":
        util = [0.0] * k
        for i in range(k):
            for j in range(i + 1, k):
                i_wins = levels[i] > levels[j]
                if rng.random() < flip_prob:
                    i_wins = not i_wins
                util[i if i_wins else j] += 1.0
    else:
        raise ValueError(f"unknown noise model '{noise}' (flip or bt)")
    order = sorted(set(util), reverse=True)
    rank_of = {g: order.index(u) + 1 for g, u in zip(levels, util)}
    return [rank_of[g] for g in seen]


def label(responses: Sequence[str], gold: Sequence[float], rng: random.Random, noise: str = "flip",
          flip_prob: float = 0.25, bt_scale: float = 0.1, resolution: str = "score",
          ratings: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(ranks, ratings) of K responses as one labeler gives them: each distinct text is judged once (identical
    responses, frequent among near-greedy samples, tie and share a rating). `ratings`: the gold 1-7 ratings (else
    the gold score on the 7-point scale); the labeler moves each one step with its noise rate."""
    distinct = list(dict.fromkeys(responses))
    first = [responses.index(t) for t in distinct]
    g = [gold[i] for i in first]
    ranks = noisy_ranks(g, rng, noise, flip_prob, bt_scale, resolution)
    base = [ratings[i] if ratings is not None else 1 + round(6 * gold[i]) for i in first]
    noisy = [rating_of(r, rng, flip_prob if noise == "flip" else 0.0) for r in base]
    at = {t: i for i, t in enumerate(distinct)}
    return [ranks[at[t]] for t in responses], [noisy[at[t]] for t in responses]


def rating_of(rating: int, rng: random.Random, flip_prob: float) -> int:
    """A 1-7 Likert rating as a labeler gives it: the gold rating, moved one step with the labeler's noise rate."""
    if rng.random() < flip_prob:
        rating += rng.choice((-1, 1))
    return min(7, max(1, rating))


def agreement(golds: Sequence[Sequence[float]], rng: random.Random, noise: str, level: float,
              resolution: str = "score", repeats: int = 1) -> tuple[float | None, int]:
    """How often two simulated labelers, each ranking every prompt's responses independently at noise `level` (the
    flip probability or the BT scale), order a pair whose gold differs the same way (both ahead, both behind, or
    both tied); over `repeats` draws of the two. -> (agreement or None, pairs compared in all)."""
    agree = pairs = 0
    kw = {"flip_prob": level} if noise == "flip" else {"bt_scale": level}
    for _ in range(repeats):
        for g in golds:
            a = noisy_ranks(g, rng, noise, resolution=resolution, **kw)
            b = noisy_ranks(g, rng, noise, resolution=resolution, **kw)
            seen = [perceived(x, resolution) for x in g]
            for i in range(len(g)):
                for j in range(i + 1, len(g)):
                    if seen[i] != seen[j]:
                        pairs += 1
                        agree += (a[i] > a[j]) - (a[i] < a[j]) == (b[i] > b[j]) - (b[i] < b[j])
    return (agree / pairs if pairs else None), pairs


def calibrate(golds: Sequence[Sequence[float]], target: float, noise: str = "flip", resolution: str = "score",
              seed: int = 0, repeats: int = 8) -> float:
    """The noise level (flip probability, or BT scale) at which two simulated labelers agree on `target` of the pairs
    of these responses, by bisection; every evaluation draws the same random numbers, so agreement falls smoothly as
    the noise rises."""
    if not 0.5 < target <= 1.0:
        raise ValueError(f"agreement: must be in (0.5, 1], got {target}")

    def at(level: float) -> float:
        acc, _ = agreement(golds, random.Random(seed), noise, level, resolution, repeats)
        return 1.0 if acc is None else acc

    lo, hi = 0.0, 0.5 if noise == "flip" else 1.0
    while noise == "bt" and at(hi) > target and hi < 1e3:
        hi *= 2
    for _ in range(20):  # to within 1e-6 of the flip probability
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) > target else (lo, mid)
    return (lo + hi) / 2


def _agreement(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructgpt label-sim", description=__doc__.split("\n\n")[0])
    add_config_arguments(p, example="k=8 temperatures=0.7,1.0,1.3")

    def flag(*names, **kw):
        add_alias(p, LabelSimConfig, *names, key=names[0][2:].replace("-", "_"), **kw)

    flag("--policy", help="the model whose samples are ranked (the SFT model)")
    flag("--prompts")
    flag("--out", help="rankings JSONL to write")
    flag("--k", help="responses per prompt (the paper: 4..9)")
    flag("--noise")
    flag("--agreement", type=_agreement,
         help="two simulated labelers' pairwise agreement the noise is set to (the paper's); 'none': use "
              "--flip-prob or --bt-scale as given")
    flag("--flip-prob")
    flag("--bt-scale")
    flag("--resolution",
         help="rank by the exact gold score, or by the 1-7 rating (equal ratings tie), as a person would")
    flag("--temperature")
    flag("--temperatures", action="store",
         help="comma-separated sampling temperatures, cycled over the K responses (overrides --temperature)")
    flag("--max-new-tokens")
    flag("--seed")
    flag("--batch-size")
    flag("--mixed-precision", help="sample under bf16 autocast")
    flag("--device", help="where the policy samples: auto (cuda when available), cpu, ...")
    return p


def main(argv: list[str]) -> int:
    args = parse_command_line(build_parser(), argv)
    try:
        run(config_from_args(LabelSimConfig, args))
    except (ConfigError, DataError) as e:
        return command_error("label-sim", e)
    return 0


def sample_responses(model, tok, prompts: Sequence, cfg: LabelSimConfig) -> list[list[str]]:
    """`cfg.k` responses of `model` to each prompt's conversation (records with `messages`, a file and a line),
    stripped, response i sampled at temperature i mod len(cfg.temperatures) (seed cfg.seed + that index): what the
    labelers rank. A conversation the chat template refuses is a DataError naming its file and line."""
    temps = cfg.temperatures or [cfg.temperature]
    texts = rendered_prompts(tok, prompts)
    counts = [sum(1 for i in range(cfg.k) if i % len(temps) == j) for j in range(len(temps))]
    with autocast(model, cfg.mixed_precision):
        per_temp = [generation.generate(model, tok, texts, SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                                                          temperature=t, n=c, seed=cfg.seed + j),
                                        batch_size=cfg.batch_size)
                    for j, (t, c) in enumerate(zip(temps, counts)) if c]
    return [[c.text.strip() for group in per_temp for c in group[i]] for i in range(len(texts))]


def run(cfg: LabelSimConfig) -> dict:
    """Sample, judge and rank; write the rankings to `cfg.out` and their statistics beside. Returns the statistics.
    A bad setting, device or prompt source is a ConfigError or DataError before anything is written."""
    cfg.validate()
    try:
        device = pick_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    prompts = load_prompts(cfg.prompts)
    unknown = next((r.text for r in prompts if gold.suite_of(r.text) is None), None)
    if unknown is not None:
        raise ConfigError(f"{cfg.prompts}: not a prompt of a built-in suite, which the gold labeler judges: "
                          f"{unknown[:80]!r}")
    model, tok = load_model(cfg.policy)
    model.to(device)
    outs = sample_responses(model, tok, prompts, cfg)
    # 1. the gold labeler judges every response
    judged, skipped = [], 0
    for rec, responses in zip(prompts, outs):
        if any(not r for r in responses):
            skipped += 1  # an empty response cannot be ranked (and is an error in the rankings format)
            continue
        judged.append((rec, responses, [gold.judge(rec.text, r) for r in responses]))
    golds = [[j.score for j in js] for _, _, js in judged]
    # 2. the noise: set to the target agreement, or as given
    level = cfg.flip_prob if cfg.noise == "flip" else cfg.bt_scale
    target = cfg.agreement
    if target is not None:
        level = calibrate(golds, target, cfg.noise, cfg.resolution, seed=cfg.seed)
    kw = {"flip_prob": level} if cfg.noise == "flip" else {"bt_scale": level}
    # 3. one labeler ranks each prompt's responses
    rng = random.Random(cfg.seed)
    rows = []
    for rec, responses, js in judged:
        ranks, ratings = label(responses, [j.score for j in js], rng, cfg.noise, resolution=cfg.resolution,
                               ratings=[j.rating for j in js], **kw)
        if len(set(ranks)) == 1:
            skipped += 1  # all tied: nothing for the reward model to learn
            continue
        rows.append({"prompt": rec.text, "responses": responses, "ranks": ranks, "ratings": ratings,
                     "flags": [list(j.flags) for j in js], "labeler": f"sim-{cfg.noise}"})
    # 4. what a second labeler would say: the agreement these rankings carry (pairs of one prompt rise and fall
    # together, with a Copeland cycle say, so the expectation is taken over 20 draws of the two labelers)
    measured, pairs = agreement(golds, random.Random(cfg.seed + 1), cfg.noise, level, cfg.resolution, repeats=20)
    pairs //= 20
    write_jsonl(cfg.out, rows)
    stats = {"rankings": len(rows), "skipped": skipped, "k": cfg.k, "noise": cfg.noise, "noise_level": level,
             "agreement_target": target, "agreement": measured, "agreement_pairs": pairs}
    write_json(cfg.out + ".stats.json", stats)
    print(f"wrote {len(rows)} rankings (K={cfg.k}) to {cfg.out}; skipped {skipped} (all tied or empty)",
          file=sys.stderr)
    if measured is not None:
        print(f"two simulated labelers agree on {100 * measured:.1f}% of {pairs} pairs whose gold differs "
              f"({cfg.noise} noise {level:.4f}" + (f", set for {100 * target:.1f}%)" if target else ")"),
              file=sys.stderr)
    return stats
