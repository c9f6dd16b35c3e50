"""``instructgpt label-sim``: simulated labelers for the built-in task (after AlpacaFarm's simulated annotators).

For each prompt, sample K responses from a policy (the SFT model), rank them with the gold labeler plus noise, and
write a rankings file in the format ``instructgpt rm`` reads, with 1-7 ratings. The reward model and PPO never see the
gold labeler: only these noisy rankings.

Noise models:
- ``flip`` (default): each non-tied pair's gold order is flipped with probability ``--flip-prob`` (AlpacaFarm: 0.25);
  the ranking is then the Copeland order of the noisy pairwise wins (equal wins are ties).
- ``bt``: Bradley-Terry: rank by gold score + Gumbel noise of scale ``--bt-scale``.
Identical responses are judged once, as a person shown two copies would: they tie and share a rating.

``--resolution rating`` makes the labeler as coarse as a person: it sees the gold score only on the 1-7 scale of its
ratings, so two answers of the same rating (say two wrong reversals, gold 0.13 and 0.16) are a tie rather than a
coin-flip preference. ``score`` (the default) ranks by the exact gold score.

``--temperatures 0.3,0.7,1.0,1.3`` samples the K responses at several temperatures (response i at temperature
i mod len): the paper's labelers ranked outputs of several models, which differ in quality far more than K samples of
one policy at one temperature do.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from typing import Sequence


def perceived(gold: float, resolution: str = "score") -> float:
    """The gold score as the labeler perceives it: exact ("score") or on the 7-point rating scale ("rating")."""
    if resolution == "score":
        return gold
    if resolution == "rating":
        return float(round(6 * gold))
    raise ValueError(f"unknown resolution '{resolution}' (score or rating)")


def noisy_ranks(gold: Sequence[float], rng: random.Random, noise: str = "flip", flip_prob: float = 0.25,
                bt_scale: float = 0.1, resolution: str = "score") -> list[int]:
    """Dense ranks (1 = best, equal = tie) of K responses from their gold scores under the given noise model."""
    k = len(gold)
    gold = [perceived(g, resolution) for g in gold]
    if noise == "bt":
        util = [g + bt_scale * -math.log(-math.log(max(rng.random(), 1e-12))) for g in gold]
    elif noise == "flip":
        util = [0.0] * k
        for i in range(k):
            for j in range(i + 1, k):
                if gold[i] == gold[j]:
                    util[i] += 0.5
                    util[j] += 0.5
                    continue
                i_wins = gold[i] > gold[j]
                if rng.random() < flip_prob:
                    i_wins = not i_wins
                util[i if i_wins else j] += 1.0
    else:
        raise ValueError(f"unknown noise model '{noise}' (flip or bt)")
    levels = sorted(set(util), reverse=True)
    return [levels.index(u) + 1 for u in util]


def label(responses: Sequence[str], gold: Sequence[float], rng: random.Random, noise: str = "flip",
          flip_prob: float = 0.25, bt_scale: float = 0.1, resolution: str = "score") -> tuple[list[int], list[int]]:
    """(ranks, ratings) of K responses as one labeler gives them: each distinct text is judged once, so identical
    responses (frequent among near-greedy samples) tie and share a rating. Judged one by one, the noise on their pairs
    with the other responses could rank a text above its own copy."""
    distinct = list(dict.fromkeys(responses))
    g = [gold[responses.index(t)] for t in distinct]
    ranks = noisy_ranks(g, rng, noise, flip_prob, bt_scale, resolution)
    ratings = [rating_of(x, rng, flip_prob) for x in g]
    at = {t: i for i, t in enumerate(distinct)}
    return [ranks[at[t]] for t in responses], [ratings[at[t]] for t in responses]


def rating_of(gold: float, rng: random.Random, flip_prob: float) -> int:
    """A 1-7 Likert rating: the gold score on the 7-point scale, moved one step with the labeler's noise rate."""
    r = 1 + round(6 * gold)
    if rng.random() < flip_prob:
        r += rng.choice((-1, 1))
    return min(7, max(1, r))


def main(argv: list[str]) -> int:
    from instructgpt import tasks
    from instructgpt.data import DataError, load_prompts, write_jsonl
    from instructgpt.generation import SamplingParams, autocast, generate
    from instructgpt.modeling import load_model, pick_device
    from instructgpt.prompting import render_prompt

    p = argparse.ArgumentParser(prog="instructgpt label-sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the model whose samples are ranked (the SFT model)")
    p.add_argument("--prompts", default="builtin:task-prompts?split=train&n=2000&seed=1")
    p.add_argument("--out", required=True, help="rankings JSONL to write")
    p.add_argument("--k", type=int, default=4, help="responses per prompt (the paper: 4..9)")
    p.add_argument("--noise", choices=("flip", "bt"), default="flip")
    p.add_argument("--flip-prob", type=float, default=0.25)
    p.add_argument("--bt-scale", type=float, default=0.1)
    p.add_argument("--resolution", choices=("score", "rating"), default="score",
                   help="rank by the exact gold score, or by the 1-7 rating (equal ratings tie), as a person would")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--temperatures", default=None,
                   help="comma-separated sampling temperatures, cycled over the K responses (overrides --temperature)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="sample under bf16 autocast")
    p.add_argument("--device", default="auto", help="where the policy samples: auto (cuda when available), cpu, ...")
    args = p.parse_args(argv)
    if not 2 <= args.k <= 9:
        print("instructgpt label-sim: error: --k must be in 2..9", file=sys.stderr)
        return 2
    try:
        device = pick_device(args.device)
        prompts = load_prompts(args.prompts)
    except (DataError, ValueError) as e:
        print(f"instructgpt label-sim: error: {e}", file=sys.stderr)
        return 2
    model, tok = load_model(args.policy)
    model.to(device)
    temps = [float(x) for x in args.temperatures.split(",")] if args.temperatures else [args.temperature]
    texts = [render_prompt(tok, r.messages) for r in prompts]
    counts = [sum(1 for i in range(args.k) if i % len(temps) == j) for j in range(len(temps))]
    with autocast(model, args.mixed_precision):
        per_temp = [generate(model, tok, texts, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=t, n=c,
                                                               seed=args.seed + j), batch_size=args.batch_size)
                    for j, (t, c) in enumerate(zip(temps, counts)) if c]
    outs = [[c for group in per_temp for c in group[i]] for i in range(len(texts))]  # K responses per prompt
    rng = random.Random(args.seed)
    rows, skipped = [], 0
    for rec, comps in zip(prompts, outs):
        responses = [c.text.strip() for c in comps]
        if any(not r for r in responses):
            skipped += 1  # an empty response cannot be ranked (and is an error in the rankings format)
            continue
        gold = [tasks.gold_score(rec.text, r) for r in responses]
        ranks, ratings = label(responses, gold, rng, args.noise, args.flip_prob, args.bt_scale, args.resolution)
        if len(set(ranks)) == 1:
            skipped += 1  # all tied: nothing for the reward model to learn
            continue
        rows.append({"prompt": rec.text, "responses": responses, "ranks": ranks, "ratings": ratings,
                     "labeler": f"sim-{args.noise}"})
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} rankings (K={args.k}) to {args.out}; skipped {skipped} (all tied or empty)",
          file=sys.stderr)
    return 0
