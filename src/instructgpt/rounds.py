"""The pieces of the pipeline's later rounds (``rounds: N`` in a recipe), after the first pass of the loop.

Ouyang et al. (2022) collected comparisons continually, and later ones ranked outputs of their RLHF policies; Bai et
al. (2022, "iterated online RLHF") showed why: a reward model trained on one policy's samples loses accuracy
where PPO moves the policy, and fresh rankings of the current policy's samples bring it back. Each round after the
first ranks samples of the previous round's policy (simulated labelers, or people in the labeling app), retrains the
reward model on every ranking so far and continues PPO from that policy. Here:

- :func:`write_items_to_rank`: the samples people rank, in the labeling app's import format;
- :func:`union_rankings`: every round's rankings in one file, the next reward model's training data;
- :func:`rm_accuracy_on_samples`: each round's reward model against the gold order on pairs of samples of each
  round's policy on held-out prompts: how accurate the RM is where the policy went.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from instructgpt import gold, label_sim
from instructgpt.data import load_comparisons, load_prompts, ranking_to_json
from instructgpt.evaluate import EvalConfig, heldout_prompts, load_eval_prompts, rm_accuracy
from instructgpt.files import write_json, write_jsonl
from instructgpt.label_sim import LabelSimConfig
from instructgpt.modeling import load_model, pick_device
from instructgpt.reward import RewardModel

# Held-out prompts the RM-accuracy figures sample each policy on: with K = 8 samples, the default run's policies give
# 1,400 to 2,300 pairs whose gold differs (fewer for a PPO policy, whose samples are more alike): a binomial 95%
# interval of about +-2 points
HELDOUT_PROMPTS = 128


def write_items_to_rank(cfg: LabelSimConfig, path: str) -> int:
    """K samples of `cfg.policy` for each of `cfg.prompts`, drawn as the simulated labelers' are (k, temperatures,
    max_new_tokens, seed), written to `path` in the labeling app's import format (``{"prompt" or "messages",
    "responses"}``: ``instructgpt label import --prompts path``). A prompt with an empty sample is left out, as the
    app refuses one (label-sim leaves it out too). Returns the prompts written."""
    prompts = load_prompts(cfg.prompts)
    model, tok = load_model(cfg.policy)
    model.to(pick_device(cfg.device))
    outs = label_sim.sample_responses(model, tok, prompts, cfg)
    rows = []
    for rec, responses in zip(prompts, outs):
        if all(responses):
            single = len(rec.messages) == 1 and rec.messages[0]["role"] == "user"
            rows.append({**({"prompt": rec.text} if single else {"messages": rec.messages}), "responses": responses})
    write_jsonl(path, rows)
    return len(rows)


def union_rankings(sources: Sequence[str], path: str, skip_bad: bool = False) -> dict:
    """Every ranking of `sources` (any comparison source: round 1's may be a Hub data set of pairs), in order, into
    one rankings JSONL at `path`. A ranking that an earlier source already holds is not written again: an export of
    the labeling database holds every earlier round's rankings beside the new ones. Writes the statistics first, to
    ``<path>.stats.json`` (``{"rankings": total, "per_source": [rankings each source added]}``), so `path` existing
    means both are whole. Returns the statistics."""
    seen: set[str] = set()
    rows, per_source = [], []
    for src in sources:
        added, keys = 0, set()
        for r in load_comparisons(src, skip_bad):
            row = ranking_to_json(r)
            key = json.dumps(row, sort_keys=True, ensure_ascii=False)
            if key not in seen:  # repeats within one source stay (they are that source's data)
                rows.append(row)
                added += 1
                keys.add(key)
        seen |= keys
        per_source.append(added)
    stats = {"rankings": len(rows), "per_source": per_source}
    write_json(path + ".stats.json", stats)
    write_jsonl(path, rows)
    return stats


def rm_accuracy_on_samples(policies: dict[str, str], reward_models: dict[str, str], sampling: LabelSimConfig,
                           ev: EvalConfig, n_prompts: int = HELDOUT_PROMPTS) -> dict:
    """Each reward model's accuracy against the gold order on pairs of samples of each policy: K samples per prompt,
    drawn as the labelers' are (`sampling`: k, temperatures, max_new_tokens, seed), on the first `n_prompts` of the
    evaluation's held-out prompts (`ev`: heldout, suite or prompts); every RM judges the same pairs.

    -> ``{"rm_accuracy_samples.<rm>.<policy>": accuracy, "rm_accuracy_samples_pairs.<policy>": pairs whose gold
    differs, "rm_accuracy_samples_prompts": prompts, "rm_accuracy_samples_k": K}``; empty without a gold labeler
    (prompts outside the built-in suites)."""
    n = min(n_prompts, ev.heldout)
    items = load_eval_prompts(ev.prompts, n) if ev.prompts else heldout_prompts(n, ev.seed, ev.suite)
    if not all(p.task is not None for p in items):
        return {}
    device = pick_device(ev.device)
    samples: dict[str, list[list[str]]] = {}  # policy -> K responses per prompt
    for name, path in policies.items():
        model, tok = load_model(path)
        model.to(device)
        samples[name] = label_sim.sample_responses(model, tok, items, sampling)
        del model
    report: dict = {"rm_accuracy_samples_prompts": len(items), "rm_accuracy_samples_k": sampling.k}
    golds = {name: [[gold.gold_score(p.text, r) for r in resp] for p, resp in zip(items, outs)]
             for name, outs in samples.items()}
    for rm_name, rm_path in reward_models.items():
        scorer = RewardModel.load(rm_path)
        scorer.model.to(device)
        for name, outs in samples.items():
            flat = scorer.score([p.messages for p, resp in zip(items, outs) for _ in resp],
                                [r for resp in outs for r in resp], batch_size=ev.batch_size)
            k = len(outs[0])
            scores = [flat[i * k:(i + 1) * k] for i in range(len(items))]  # (prompts, K)
            acc, pairs = rm_accuracy(scores, golds[name])
            report[f"rm_accuracy_samples.{rm_name}.{name}"] = acc
            report[f"rm_accuracy_samples_pairs.{name}"] = pairs
        del scorer
    return report

