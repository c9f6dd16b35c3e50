"""``instructgpt data augment``: more data from the data there is, two ways.

Instruction filling (``mode: instructions``): each row is kept and joined by `variants` copies whose prompt (the last
user turn before the answer) is rewritten from a template (``"Could you do this for me? {prompt}"``) and given noise
that keeps its meaning, each kind with probability `noise_prob`: ``case`` (the first letter's case flipped),
``punctuation`` (the final mark dropped, or a full stop added), ``whitespace`` (one space doubled) and, off by default,
``typo`` (two inner letters of a long word swapped: a prompt that asks about that very word changes meaning). The
answer stays as it is. A copy that comes out equal to the original or to another copy is not written.

Answer diversity (``mode: answers``): for each prompt, `n` answers sampled from `model`, the one `reward_model`
scores highest kept (best-of-n, :func:`instructgpt.best_of.best_of_n`): rejection-sampling data for SFT, as in
Llama 2's and others' fine-tuning rounds. `min_reward` drops the prompts whose best answer scores below it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Sequence

from instructgpt.best_of import best_of_n
from instructgpt.config import ConfigError
from instructgpt.data import Demonstration
from instructgpt.dataprep.configs import AugmentConfig
from instructgpt.dataprep.rows import (Item, Record, last_user_text, prompt_messages, read_input, report_header,
                                       to_json)
from instructgpt.generation import SamplingParams, generate
from instructgpt.judges import GOLD, GoldJudge, JudgeReward
from instructgpt.modeling import load_model, pick_device
from instructgpt.prompting import render_prompt
from instructgpt.reward import RewardModel

_SPACE = re.compile(r" (?=\S)")
_LONG_WORD = re.compile(r"\b[A-Za-z]{6,}\b")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


# --------------------------------------------------------------------------------------------------------------------
# Instruction filling: pure functions of a text and a seeded random generator


def flip_case(text: str, rng: random.Random) -> str:
    return text[:1].swapcase() + text[1:] if text[:1].isalpha() else text


def toggle_final_punctuation(text: str, rng: random.Random) -> str:
    return text[:-1] if text[-1:] in ".!?" else text + "."


def double_a_space(text: str, rng: random.Random) -> str:
    spaces = [m.start() for m in _SPACE.finditer(text)]
    if not spaces:
        return text
    i = rng.choice(spaces)
    return text[:i] + " " + text[i:]


def swap_letters(text: str, rng: random.Random) -> str:
    """Two adjacent inner letters of one word of 6+ letters swapped; never inside quotes (a quoted word is often what
    the prompt is about)."""
    quoted = [m.span() for m in _QUOTED.finditer(text)]
    spans = [m.span() for m in _LONG_WORD.finditer(text) if not any(a <= m.start() < b for a, b in quoted)]
    if not spans:
        return text
    start, end = rng.choice(spans)
    i = rng.randrange(start + 1, end - 2)  # keeps the first and last letter
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


NOISE_FUNCTIONS = {"case": flip_case, "punctuation": toggle_final_punctuation, "whitespace": double_a_space,
                   "typo": swap_letters}


def rewrite(prompt: str, template: str, noise: Sequence[str], noise_prob: float, rng: random.Random) -> str:
    """Each kind of `noise` applied to `prompt` with `noise_prob`, then the prompt put in `template` (at its
    ``{prompt}``)."""
    for name in noise:
        if rng.random() < noise_prob:
            prompt = NOISE_FUNCTIONS[name](prompt, rng)
    return template.replace("{prompt}", prompt)


def with_prompt(record: Record, text: str) -> Record:
    """`record` with its last user turn before the answer replaced by `text`."""
    n = len(prompt_messages(record))
    i = max(j for j in range(n) if record.messages[j]["role"] == "user")
    msgs = [dict(m) for m in record.messages]
    msgs[i]["content"] = text
    return replace(record, messages=msgs)


def instruction_variants(items: Sequence[Item], templates: Sequence[str], noise: Sequence[str], noise_prob: float,
                         variants: int, keep_original: bool, seed: int) -> tuple[list[dict], dict]:
    """Each row (if `keep_original`) and up to `variants` distinct rewrites of it, in order; and the report's counts.
    Templates are drawn without replacement while they last."""
    rng = random.Random(seed)
    rows, written, repeated, no_user = [], 0, 0, 0
    for it in items:
        prompt = last_user_text(prompt_messages(it.record))
        seen = {prompt}
        if keep_original:
            rows.append(to_json(it.record))
        if not prompt:  # a conversation with no user turn (a system prompt alone): nothing to rewrite
            no_user += 1
            continue
        order = rng.sample(list(templates), len(templates))
        for v in range(variants):
            text = rewrite(prompt, order[v % len(order)], noise, noise_prob, rng)
            if text in seen:
                repeated += 1
                continue
            seen.add(text)
            rows.append(to_json(with_prompt(it.record, text)))
            written += 1
    return rows, {"rows_in": len(items), "originals_kept": len(items) if keep_original else 0,
                  "variants_written": written, "variants_not_distinct": repeated, "rows_without_user_turn": no_user}


# --------------------------------------------------------------------------------------------------------------------
# Answer diversity: best of n by a reward model


def load_scorer(reward_model: str, prompts: Sequence, device: str):
    """The reward model (an `instructgpt rm` out_dir), or for ``builtin:gold`` the built-in suites' gold labeler as a
    reward in [-1, 1]; either has ``score(prompts, responses, batch_size)``."""
    if reward_model == GOLD:
        judge = GoldJudge()
        if not judge.covers(prompts):
            raise ValueError(f"reward_model={GOLD}: the gold labeler scores only the built-in suites' prompts")
        return JudgeReward(judge)
    rm = RewardModel.load(reward_model)
    rm.model.to(device)
    return rm


@dataclass
class Best:
    """The answer kept for one prompt: its text and reward, and the mean reward of all its nonempty samples."""

    response: str
    reward: float
    mean_reward: float
    samples: int


def best_answers(model, tokenizer, scorer, prompts: Sequence[list[dict]], params: SamplingParams,
                 batch_size: int) -> list[Best | None]:
    """Per prompt, the best of `params.n` samples by `scorer`; None when every sample was empty."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    results = generate(model, tokenizer, texts, params, batch_size=batch_size)
    results = [[c for c in comps if c.text.strip()] for comps in results]  # an empty answer is no demonstration
    todo = [i for i, comps in enumerate(results) if comps]
    kept, scores = best_of_n(scorer, [prompts[i] for i in todo], [results[i] for i in todo],
                             keep=max(len(results[i]) for i in todo) if todo else 1, batch_size=batch_size)
    out: list[Best | None] = [None] * len(prompts)
    for i, comps, s in zip(todo, kept, scores):
        out[i] = Best(comps[0].text, s[0], sum(s) / len(s), len(s))
    return out


def answer_rows(items: Sequence[Item], model_path: str, reward_model: str, params: SamplingParams,
                min_reward: float | None, batch_size: int, device: str) -> tuple[list[dict], dict]:
    """Demonstrations of each row's prompt with its best sampled answer (and that answer's ``reward``), in order; and
    the report's figures."""
    prompts = [prompt_messages(it.record) for it in items]
    scorer = load_scorer(reward_model, prompts, device)
    model, tok = load_model(model_path)
    model.to(device)
    best = best_answers(model, tok, scorer, prompts, params, batch_size)
    rows, empty, low = [], 0, 0
    for p, b in zip(prompts, best):
        if b is None:
            empty += 1
        elif min_reward is not None and b.reward < min_reward:
            low += 1
        else:
            demo = Demonstration(p + [{"role": "assistant", "content": b.response}])
            rows.append({**to_json(demo), "reward": round(b.reward, 6)})
    found = [b for b in best if b is not None]
    return rows, {"prompts": len(items), "rows_out": len(rows), "all_samples_empty": empty, "below_min_reward": low,
                  "min_reward": min_reward,
                  "mean_best_reward": round(sum(b.reward for b in found) / len(found), 6) if found else None,
                  "mean_sample_reward": round(sum(b.mean_reward for b in found) / len(found), 6) if found else None}


def run_augment(cfg: AugmentConfig) -> tuple[list[dict], dict]:
    """``instructgpt data augment``: the original and rewritten rows (instructions), or one demonstration per prompt
    with its best sampled answer (answers); and the report."""
    read = read_input(cfg)
    if read.kind == "text":
        raise ConfigError("augment: pretraining text has no prompt to rewrite or answer")
    if cfg.mode == "instructions":
        rows, figures = instruction_variants(read.items, cfg.templates, cfg.noise, cfg.noise_prob, cfg.variants,
                                             cfg.keep_original, cfg.seed)
        settings = {"variants": cfg.variants, "templates": cfg.templates, "noise": cfg.noise,
                    "noise_prob": cfg.noise_prob, "seed": cfg.seed}
    else:
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                n=cfg.n, seed=cfg.seed)
        rows, figures = answer_rows(read.items, cfg.model, cfg.reward_model, params, cfg.min_reward, cfg.batch_size,
                                    pick_device(cfg.device))
        settings = {"model": cfg.model, "reward_model": cfg.reward_model, "n": cfg.n, "temperature": cfg.temperature,
                    "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    kind = read.kind if cfg.mode == "instructions" else "demonstrations"
    return rows, {**report_header("augment", cfg, read), "mode": cfg.mode, "kind_out": kind, **settings,
                  "rows_out": len(rows), **figures}
