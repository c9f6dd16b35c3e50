"""``instructgpt eval``: compare policies (base, SFT, PPO-ptx, PPO without ptx, best-of-n) on held-out prompts.

What is measured, per policy, on prompts never seen in any training stage (``make_tasks("heldout", ...)``):

- gold labeler (built-in task only): mean gold score, exact-answer accuracy, both per task family; against SFT, the
  right answers gained and lost and the win rate where both answers are wrong (partial credit alone decides);
- win rate against the SFT policy, per prompt (win 1, tie 1/2, loss 0): ties counted half, and ties left out,
  each with a 95% bootstrap interval over prompts. Judged by the gold labeler when there is one, else by the
  reward model (``--prompts`` with prompts outside the built-in task, the real-model recipes);
- reward model: mean (normalised) RM score beside the gold score, so the gap between proxy and gold shows, the
  RM's accuracy against the gold order on the held-out pairs the policies' answers form, and how often it prefers
  the longer of a policy's and SFT's answers (beside how often gold does);
- KL of the policy to SFT (see :func:`sequence_kl`) and perplexity on held-out pretraining text (the alignment tax);
- BLEU and ROUGE-L against the reference answers.

Policies answer greedily by default (``temperature=0``): the gold judgement then measures each model's most likely
answer rather than sampling noise. The KL needs the policy's own samples, so it is estimated on separate samples
at temperature 1. Best-of-n (``best_of > 0``) is the SFT model sampled n times at ``best_of_temperature`` (1 by
default), the answer the reward model scores highest kept: below 1 its candidates are the SFT model's likelier
answers, so it asks whether the RM can choose among them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import numpy as np
import sacrebleu
import torch
from rich.console import Console
from rich.table import Table
from rouge_score import rouge_scorer

from instructgpt import gold as gold_labeler
from instructgpt.assistant import NEGATIVE_FLAGS
from instructgpt.batching import left_pad, right_pad, text_blocks
from instructgpt.best_of import best_of_n
from instructgpt.config import (ConfigError, add_alias, add_config_arguments, command_error, config_from_args,
                                parse_command_line)
from instructgpt.data import (DataError, check_sources, iter_pretrain_text, iter_rows, parse_prompt,
                              rendered_prompts)
from instructgpt.generation import SamplingParams, autocast, generate
from instructgpt.modeling import (is_encoder_decoder, load_model, logprobs_from_logits, pick_device,
                                  position_ids_from_mask, resolve_path, sequence_logprobs)
from instructgpt.prompting import encode_prompt
from instructgpt.report import write_report
from instructgpt.reward import RewardModel
from instructgpt.tasks import RIGHT_CONTENT

# held-out pretraining text: plays held out of every training stage (builtin.HELDOUT_PLAYS) and short documents about
# the assistant suite's held-out shops and topics
DEFAULT_PTX = "builtin:pretrain?split=heldout&assistant=3000"


@dataclass
class EvalConfig:
    """``instructgpt eval``'s settings; also a recipe's `eval` section, where the pipeline sets policy, sft, seed,
    stage and out itself."""

    # name -> model directory, hub id, .gguf file or builtin:base (on the command line: --policy NAME=DIR)
    policy: dict[str, str] = field(default_factory=dict)
    sft: str = "sft"  # the policy win rates and KL are measured against
    reward_model: Optional[str] = None  # RM score and accuracy; the judge where there is no gold labeler
    heldout: int = 500  # held-out prompts
    suite: Optional[str] = None  # the built-in suite of the held-out prompts (None: the default suite)
    # a prompt source instead of the built-in suite: no gold labeler unless its prompts are a suite's (the RM judges)
    prompts: Optional[str] = None
    seed: int = 0
    best_of: int = 0  # also evaluate best-of-N: N samples of the SFT model, the one the RM scores highest kept
    best_of_temperature: float = 1.0  # the best-of-N candidates' sampling temperature
    bon_curve: int = 0  # N (a power of 2): the best-of-n curve for n = 1, 2, 4, ..., N from N samples of the SFT model
    bon_prompts: int = 160  # prompts the best-of-n curve is measured on
    max_new_tokens: int = 32
    temperature: float = 0.0  # the policies' decoding (0: greedy)
    batch_size: int = 64
    kl_prompts: Optional[int] = 256  # prompts for the KL estimate (0 or null: all)
    ptx_text: Optional[str] = DEFAULT_PTX  # held-out pretraining text for perplexity (null or "none": skip)
    ptx_max_tokens: Optional[int] = None  # read only its first N tokens (a hub dataset is then streamed)
    ptx_blocks: int = 32  # perplexity over this many blocks, spread evenly through the text
    ptx_block_size: int = 256  # tokens per block
    n_resamples: int = 2000  # bootstrap resamples of the 95% intervals
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16: sample under bf16 autocast
    # bf16: the reward model scores under bf16 autocast too (as a bf16 PPO run's rollouts read it); the KL and
    # perplexity passes stay fp32
    rm_mixed_precision: Literal["no", "bf16"] = "no"
    device: str = "auto"  # auto: cuda when available
    # name -> a training stage's out_dir, for the training curves (found next to the policies otherwise)
    stage: dict[str, str] = field(default_factory=dict)
    out: Optional[str] = None  # the output directory; None: runs/eval-<timestamp>

    def ptx_source(self) -> str | None:
        """The held-out text read for perplexity: `ptx_text`, None where it is null or "none"."""
        return None if (self.ptx_text or "none").lower() == "none" else self.ptx_text

    def validate(self) -> None:
        if (self.best_of or self.bon_curve) and not self.reward_model:
            raise ConfigError("best-of-n needs a reward model")
        if self.bon_curve and (self.bon_curve & (self.bon_curve - 1) or self.bon_prompts < 1):
            raise ConfigError(f"bon_curve: a power of 2 with bon_prompts >= 1, got {self.bon_curve} and "
                              f"{self.bon_prompts}")
        for name in ("temperature", "best_of_temperature"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ConfigError(f"{name}: must be >= 0 (0: greedy), got {getattr(self, name)}")
        if self.ptx_max_tokens is not None and self.ptx_max_tokens < self.ptx_block_size:
            raise ConfigError(f"ptx_max_tokens: must be at least one block of {self.ptx_block_size} tokens, got "
                              f"{self.ptx_max_tokens}")
        for name in ("heldout", "batch_size", "max_new_tokens", "ptx_blocks", "ptx_block_size", "n_resamples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------------------------------------------------
# Math: pure functions of scores and log-probs


def pairwise_outcomes(a: Sequence[float], b: Sequence[float], tol: float = 1e-9) -> np.ndarray:
    """Per prompt, 1 where `a` scores higher than `b`, 0.5 on a tie (|a - b| <= tol), 0 where lower. -> (N,)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return np.where(d > tol, 1.0, np.where(d < -tol, 0.0, 0.5))


def win_rate(outcomes: np.ndarray) -> np.ndarray:
    """Win rate with ties counted half: mean outcome over the last axis ((N,) -> scalar, (R, N) -> (R,))."""
    return np.mean(outcomes, axis=-1)


def win_rate_no_ties(outcomes: np.ndarray) -> np.ndarray:
    """Win rate with ties left out: wins / (wins + losses) over the last axis; NaN where every prompt is a tie."""
    wins = np.sum(outcomes == 1.0, axis=-1)
    decided = np.sum(outcomes != 0.5, axis=-1)
    return np.where(decided > 0, wins / np.maximum(decided, 1), np.nan)


def right_answer_changes(a: Sequence[float], b: Sequence[float], right: float | tuple[Sequence[bool], Sequence[bool]]
                         ) -> tuple[int, int, np.ndarray]:
    """Gold scores `a` and `b` of two answers per prompt, an answer being right at `right` or above (or as the pair
    of boolean sequences `right` says): the prompts `a` answers right and `b` wrong (gained), the reverse (lost), and
    the outcomes (:func:`pairwise_outcomes`) on the prompts both answer wrong, where only partial credit decides."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if isinstance(right, tuple):
        ra, rb = np.asarray(right[0], dtype=bool), np.asarray(right[1], dtype=bool)
    else:
        ra, rb = a >= right, b >= right
    both_wrong = ~ra & ~rb
    return int(np.sum(ra & ~rb)), int(np.sum(~ra & rb)), pairwise_outcomes(a[both_wrong], b[both_wrong])


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], np.ndarray], n_resamples: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the prompts: resample the N per-prompt values with replacement
    `n_resamples` times. `statistic` maps (R, N) -> (R,); resamples where it is NaN are dropped."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))  # (R, N)
    stats = statistic(x[idx])  # (R,)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def rm_accuracy(rm_scores: Sequence[Sequence[float]], gold_scores: Sequence[Sequence[float]],
                tol: float = 1e-9) -> tuple[float | None, int]:
    """The reward model's pairwise accuracy against the gold order: over every pair of responses to the same prompt
    whose gold scores differ (gold ties carry no order), the fraction the RM orders the same way (an RM tie counts
    half). `rm_scores[i][j]` and `gold_scores[i][j]` score response j to prompt i. -> (accuracy or None, pairs)."""
    hits = [hit for *_, hit in ordered_pairs(rm_scores, gold_scores, tol)]
    return (sum(hits) / len(hits) if hits else None), len(hits)


def ordered_pairs(rm_scores: Sequence[Sequence[float]], gold_scores: Sequence[Sequence[float]], tol: float = 1e-9
                  ) -> Iterator[tuple[int, int, int, float]]:
    """(prompt i, response j, response k, hit) for every pair of responses to the same prompt whose gold scores
    differ: hit 1 when the RM orders them as gold does, 0 when the other way, 0.5 for an RM tie."""
    for i, (rm_i, gold_i) in enumerate(zip(rm_scores, gold_scores)):
        for j in range(len(gold_i)):
            for k in range(j + 1, len(gold_i)):
                g = gold_i[j] - gold_i[k]
                if abs(g) <= tol:
                    continue
                r = rm_i[j] - rm_i[k]
                yield i, j, k, 0.5 if abs(r) <= tol else float((r > 0) == (g > 0))


def prefers_longer(a: Sequence[float], b: Sequence[float], len_a: Sequence[int], len_b: Sequence[int]
                   ) -> tuple[float | None, int]:
    """A judge's length bias: over the prompts whose two answers differ in length, the fraction where the judge's
    scores `a`, `b` favour the longer answer (a tie counts half). -> (fraction or None, pairs)."""
    return rm_accuracy(list(zip(a, b)), list(zip(len_a, len_b)))


def sequence_kl(logprobs: Sequence[Sequence[float]], ref_logprobs: Sequence[Sequence[float]]) -> float:
    """Monte-Carlo estimate of KL(pi || pi_sft) over whole responses, from responses y_i ~ pi(. | x_i):

        KL ~= 1/N sum_i sum_t [log pi(y_it | x_i, y_i<t) - log pi_sft(y_it | x_i, y_i<t)]

    (log-probs at temperature 1, EOS included). Unbiased for the sequence-level KL, though a single sample can be
    negative; it is the `objective/kl` PPO logs (Ziegler et al. 2019, eq. 2), so the two compare."""
    if not logprobs:
        return math.nan
    return float(np.mean([sum(a) - sum(b) for a, b in zip(logprobs, ref_logprobs)]))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi) = log n - (n - 1) / n, the analytic value for best-of-n sampling (Stiennon et al. 2020,
    appendix G.3; Gao et al. 2023, sec. 2.3): exact when the n samples' rewards are distinct."""
    return math.log(n) - (n - 1) / n


def best_of_n_expectations(rm: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per prompt, the expected `values` of the response the reward model picks from n of the N samples drawn at
    random without replacement (Nakano et al. 2021, appendix: one set of N samples serves every n <= N).

    rm, values: (P, N). Sorting each prompt's samples by RM score, the k-th lowest (k = 0..N-1) is the pick exactly
    when it is in the subset and the other n - 1 are among the k below it: probability C(k, n-1) / C(N, n). -> (P,)."""
    P, N = rm.shape
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n: n must be in 1..{N}, got {n}")
    weights = np.array([math.comb(k, n - 1) for k in range(N)], dtype=float) / math.comb(N, n)  # (N,), sums to 1
    order = np.argsort(rm, axis=1, kind="stable")  # (P, N) ascending RM score
    return np.take_along_axis(values, order, axis=1) @ weights


def best_of_n_curve(rm: Sequence[Sequence[float]], gold: Sequence[Sequence[float]],
                    ns: Sequence[int]) -> list[dict]:
    """The best-of-n curve of Gao et al. (2023): for each n, KL_bon = log n - (n-1)/n and the mean (over prompts) gold
    and RM score of the RM's pick, with the gold labeler's own pick ("gold_oracle") beside it."""
    r, g = np.asarray(rm, dtype=float), np.asarray(gold, dtype=float)
    return [{"n": n, "kl": best_of_n_kl(n), "gold": float(best_of_n_expectations(r, g, n).mean()),
             "rm": float(best_of_n_expectations(r, r, n).mean()),
             "gold_oracle": float(best_of_n_expectations(g, g, n).mean())} for n in ns]


def flag_rates(judgements: Sequence) -> dict[str, float]:
    """Share of answers carrying each of the rubric's flags (`satisfies_constraint`: of the answers to prompts with
    constraints), and `all_properties`: no fault flagged and every constraint followed."""
    out = {f: float(np.mean([f in j.flags for j in judgements])) for f in NEGATIVE_FLAGS}
    constrained = [j for j in judgements if j.has_constraints]
    if constrained:
        out["satisfies_constraint"] = float(np.mean(["satisfies_constraint" in j.flags for j in constrained]))
    out["all_properties"] = float(np.mean([j.all_properties for j in judgements]))
    return out


def rm_accuracy_by_flag(rm_scores: Sequence[Sequence[float]], judgements: Sequence[Sequence]) -> dict[str, dict]:
    """The RM's accuracy against the gold order on the pairs whose gold differs and where one answer carries a flag
    the other does not, flag by flag: which of the rubric's properties the reward model can see."""
    agree: dict[str, float] = defaultdict(float)
    pairs: dict[str, int] = defaultdict(int)
    gold_scores = [[j.score for j in js] for js in judgements]
    for i, a, b, hit in ordered_pairs(rm_scores, gold_scores):
        for f in set(judgements[i][a].flags) ^ set(judgements[i][b].flags):
            agree[f] += hit
            pairs[f] += 1
    return {f: {"accuracy": agree[f] / pairs[f], "pairs": pairs[f]} for f in sorted(pairs)}


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams), 0..100."""
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, no stemming), 0..1."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return float(np.mean(scores)) if scores else math.nan


# --------------------------------------------------------------------------------------------------------------------
# Model passes: log-probs of given responses, perplexity


def response_logprobs(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                      pad_token_id: int, batch_size: int = 64) -> list[list[float]]:
    """log p(response token | prompt, earlier response tokens) at temperature 1, per response token, in one forward
    pass per batch of left-padded (prompt + response) rows.

    Left padding puts every response at the end of its row, so the LM head is applied to the last positions only
    (`logits_to_keep`, where the model supports it): the prompt positions would cost most of the pass for nothing.
    An encoder-decoder model reads each prompt with its encoder and scores the response with its decoder.
    """
    if is_encoder_decoder(model):
        return _seq2seq_response_logprobs(model, prompt_ids, response_ids, pad_token_id, batch_size)
    device = next(model.parameters()).device
    can_slice = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: list[list[float]] = []
    with torch.no_grad():
        for s in range(0, len(prompt_ids), batch_size):
            resp = response_ids[s:s + batch_size]
            seqs = [list(p) + list(r) for p, r in zip(prompt_ids[s:s + batch_size], resp)]
            ids, mask = left_pad(seqs, pad_token_id, device)  # (B, T): rows end at the last response token
            keep = max(len(r) for r in resp) + 1  # positions whose logits predict a response token, plus the last
            extra = {"logits_to_keep": keep} if can_slice else {}
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False, **extra).logits[:, -keep:]  # (B, keep, V)
            lp = logprobs_from_logits(logits[:, :-1], ids[:, ids.shape[1] - keep + 1:])  # (B, keep-1)
            for row, r in zip(lp, resp):
                out.append(row[lp.shape[1] - len(r):].tolist() if len(r) else [])
    return out


def _seq2seq_response_logprobs(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                               pad_token_id: int, batch_size: int) -> list[list[float]]:
    """`response_logprobs` of an encoder-decoder model: right-padded prompts to the encoder, each response behind the
    decoder start token to the decoder; log p of every response token."""
    device = next(model.parameters()).device
    start = model.config.decoder_start_token_id
    out: list[list[float]] = []
    with torch.no_grad():
        for s in range(0, len(prompt_ids), batch_size):
            resp = [list(r) for r in response_ids[s:s + batch_size]]
            ids, mask = right_pad(prompt_ids[s:s + batch_size], pad_token_id, device)  # (B, S)
            dec, _ = right_pad([[start] + r for r in resp], pad_token_id, device)  # (B, R + 1)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :-1],
                           use_cache=False).logits  # (B, R, V): position t predicts response token t
            lp = logprobs_from_logits(logits, dec[:, 1:])  # (B, R)
            out.extend(row[:len(r)].tolist() for row, r in zip(lp, resp))
    return out


def kl_to_reference(model, ref_model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    pad_token_id: int, batch_size: int = 64) -> float:
    """:func:`sequence_kl` of `model` to `ref_model` on responses sampled from `model` (both scored the same way)."""
    return sequence_kl(response_logprobs(model, prompt_ids, response_ids, pad_token_id, batch_size),
                       response_logprobs(ref_model, prompt_ids, response_ids, pad_token_id, batch_size))


def perplexity_blocks(tokenizer, texts: Iterable[str], block_size: int, n_blocks: int,
                      max_tokens: int | None = None) -> list[list[int]]:
    """`n_blocks` blocks of `block_size` tokens, evenly spaced through the documents (joined by EOS), or through their
    first `max_tokens` tokens."""
    blocks = text_blocks(tokenizer, texts, block_size, max_tokens)
    if not blocks:
        raise ValueError(f"the perplexity text is shorter than one block of {block_size} tokens")
    step = max(1, len(blocks) // n_blocks)
    return [b.input_ids for b in blocks[::step][:n_blocks]]


def perplexity(model, blocks: Sequence[Sequence[int]], batch_size: int = 16) -> float:
    """Token-weighted perplexity exp(sum of NLL / number of predicted tokens) over the blocks (first token of each
    block is context only)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(blocks), batch_size):
                chunk = blocks[s:s + batch_size]
                ids, mask = right_pad(chunk, 0, device)  # the mask keeps the padding out of the sum
                lp = sequence_logprobs(model, ids, mask)  # (B, T-1)
                keep = mask[:, 1:].bool()
                nll -= float(lp[keep].double().sum())
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return math.exp(nll / count)


# --------------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class EvalPrompt:
    messages: list[dict]  # the conversation the policy answers
    text: str  # the last user turn (what the gold labeler parses)
    task: object = None  # tasks.Task when the prompt is one of the built-in task's (gold labeler available)
    reference: str | None = None  # the reference answer for BLEU / ROUGE-L
    file: str = field(default="built-in held-out prompts", compare=False)  # where it came from, for errors
    line: int | None = field(default=None, compare=False)

    @property
    def family(self) -> str | None:
        return getattr(self.task, "family", None)


def heldout_prompts(n: int, seed: int = 0, suite: str | None = None) -> list[EvalPrompt]:
    """`n` held-out prompts of a built-in suite (the default one unless named); the reference is the suite's
    reference answer."""
    return [EvalPrompt([{"role": "user", "content": t.prompt}], t.prompt, t, t.answer)
            for t in gold_labeler.make_tasks("heldout", n, seed=seed, suite=suite or gold_labeler.DEFAULT_SUITE)]


_REFERENCE_KEYS = ("reference", "response", "answer", "output")


def load_eval_prompts(source: str, n: int | None = None) -> list[EvalPrompt]:
    """Prompts from any prompt source (the first `n`); a reference answer is taken from a row's "reference",
    "response", "answer" or "output" field; the gold labeler applies to prompts of the built-in task."""
    out = []
    for file, line, row in iter_rows(source):
        if n is not None and len(out) >= n:
            break
        if not isinstance(row, dict):
            raise DataError(file, line, None, "expected a JSON object")
        rec = parse_prompt(file, line, row)
        task = gold_labeler.parse_task(rec.text)
        ref = next((row[k] for k in _REFERENCE_KEYS if isinstance(row.get(k), str)), None)
        out.append(EvalPrompt(rec.messages, rec.text, task, ref if ref is not None else getattr(task, "answer", None),
                              file, line))
    if not out:
        raise DataError(source, None, None, "no prompts")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Summaries: flat report keys from per-prompt scores (no model needed)


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def win_rate_keys(prefix: str, name: str, sft: str, outcomes: np.ndarray, n_resamples: int,
                  seed: int) -> dict:
    """`<prefix>.<name>_vs_<sft>` (ties half), `<prefix>_no_ties...`, and their 95% bootstrap intervals."""
    key = f"{name}_vs_{sft}"
    return {
        f"{prefix}.{key}": _finite(win_rate(outcomes)),
        f"{prefix}_ci95.{key}": [_finite(v) for v in bootstrap_ci(outcomes, win_rate, n_resamples, seed)],
        f"{prefix}_no_ties.{key}": _finite(win_rate_no_ties(outcomes)),
        f"{prefix}_no_ties_ci95.{key}": [_finite(v) for v in
                                         bootstrap_ci(outcomes, win_rate_no_ties, n_resamples, seed)],
    }


def family_means(families: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for f, v in zip(families, values):
        groups[f].append(v)
    return {f: float(np.mean(v)) for f, v in sorted(groups.items())}


def summarize(prompts: Sequence[EvalPrompt], responses: dict[str, Sequence[str]], sft: str,
              gold: dict[str, Sequence[float]] | None = None, rm: dict[str, Sequence[float]] | None = None,
              rm_pool: Sequence[str] = (), n_resamples: int = 2000, seed: int = 0,
              judged: dict[str, Sequence] | None = None) -> dict:
    """The flat report of everything computed from per-prompt responses and scores (KL and perplexity excluded).

    Win rates against `sft` are judged by `gold` when given, else by `rm` (`judge` says which); `win_rate_rm.*`
    adds the RM's verdict when both exist. `rm_accuracy_gold` uses the responses of the policies in `rm_pool`.
    `judged`: the gold labeler's judgements (:class:`instructgpt.gold.Judgement`) behind `gold`: they add the rubric's
    flag rates (`flag_rate.<policy>`), and "right" for the answers gained and lost means every property kept (no
    fault flagged, every constraint followed) instead of a gold score of tasks.RIGHT_CONTENT or more.
    """
    report: dict = {"heldout_prompts": len(prompts), "policies": list(responses), "sft_policy": sft}
    judge = gold if gold is not None else rm
    report["judge"] = "gold" if gold is not None else ("reward_model" if rm is not None else None)
    families = [p.family for p in prompts]
    for name, resp in responses.items():
        vs = f"{name}_vs_{sft}"  # the key suffix of everything measured against SFT
        if gold is not None:
            g = np.asarray(gold[name])
            exact = (g == 1.0).astype(float)
            report[f"gold_score.{name}"] = float(g.mean())
            report[f"accuracy.{name}"] = float(exact.mean())
            report[f"per_family.{name}"] = family_means(families, g)
            report[f"per_family_accuracy.{name}"] = family_means(families, exact)
        if judged is not None:
            report[f"flag_rate.{name}"] = flag_rates(judged[name])
            report[f"all_properties.{name}"] = report[f"flag_rate.{name}"]["all_properties"]
        if rm is not None:
            report[f"rm_score.{name}"] = float(np.mean(rm[name]))
        with_ref = [(r, p.reference) for r, p in zip(resp, prompts) if p.reference is not None]
        if with_ref:
            report[f"bleu.{name}"] = bleu([h for h, _ in with_ref], [r for _, r in with_ref])
            report[f"rouge_l.{name}"] = rouge_l([h for h, _ in with_ref], [r for _, r in with_ref])
        report[f"response_chars.{name}"] = float(np.mean([len(r) for r in resp]))
        if name != sft and judge is not None:
            report.update(win_rate_keys("win_rate", name, sft, pairwise_outcomes(judge[name], judge[sft]),
                                        n_resamples, seed))
            if gold is not None:
                # A won prompt is either a right answer gained or a wrong answer closer than another (partial
                # credit): the split shows which of the two a win rate is made of
                right = RIGHT_CONTENT if judged is None else ([j.all_properties for j in judged[name]],
                                                              [j.all_properties for j in judged[sft]])
                if judged is None:
                    report["right_answer_gold"] = RIGHT_CONTENT  # the gold score a right answer has
                gained, lost, wrong = right_answer_changes(gold[name], gold[sft], right)
                report[f"right_gained.{vs}"], report[f"right_lost.{vs}"] = gained, lost
                report[f"win_rate_no_ties_both_wrong.{vs}"] = _finite(win_rate_no_ties(wrong))
                report[f"win_rate_no_ties_both_wrong_pairs.{vs}"] = int(np.sum(wrong != 0.5))
            if gold is not None and rm is not None:
                report.update(win_rate_keys("win_rate_rm", name, sft, pairwise_outcomes(rm[name], rm[sft]),
                                            n_resamples, seed))
        if name != sft and rm is not None:
            # Length bias (Singhal et al. 2023): does the RM favour the longer answer more often than gold does?
            lens = [len(r) for r in resp], [len(r) for r in responses[sft]]
            report[f"rm_prefers_longer.{vs}"], report[f"prefers_longer_pairs.{vs}"] = prefers_longer(
                rm[name], rm[sft], *lens)
            if gold is not None:
                report[f"gold_prefers_longer.{vs}"] = prefers_longer(gold[name], gold[sft], *lens)[0]
    if gold is not None and rm is not None and rm_pool:
        acc, pairs = rm_accuracy(list(zip(*[rm[n] for n in rm_pool])), list(zip(*[gold[n] for n in rm_pool])))
        report["rm_accuracy_gold"] = acc
        report["rm_accuracy_gold_pairs"] = pairs
        # ... split by the pair of policies against SFT: the untouched model's answers are easy to rank below SFT's,
        # a PPO policy's are what PPO needs the RM to judge (the pooled figure mixes the two); and by task family
        # within each pair: which kinds of answer the RM cannot judge (families without a gold-ordered pair left out)
        by_family: dict[str, list[int]] = defaultdict(list)
        for i, f in enumerate(families):
            by_family[f].append(i)
        for name in (n for n in rm_pool if n != sft and sft in rm_pool):
            acc, pairs = rm_accuracy(list(zip(rm[name], rm[sft])), list(zip(gold[name], gold[sft])))
            report[f"rm_accuracy_gold.{name}_vs_{sft}"] = acc
            report[f"rm_accuracy_gold_pairs.{name}_vs_{sft}"] = pairs
            per_family = {}
            for f, idx in sorted(by_family.items()):
                f_acc, f_pairs = rm_accuracy([(rm[name][i], rm[sft][i]) for i in idx],
                                             [(gold[name][i], gold[sft][i]) for i in idx])
                if f_pairs:
                    per_family[f] = {"accuracy": f_acc, "pairs": f_pairs}
            report[f"rm_accuracy_gold_per_family.{name}_vs_{sft}"] = per_family
    return report


# --------------------------------------------------------------------------------------------------------------------
# Generation


def generate_sorted(model, tokenizer, texts: Sequence[str], params, batch_size: int) -> list:
    """`generation.generate` on prompts sorted by length (batches of similar prompts pad less and, on the task,
    stop together), results in the original order; one list of `params.n` completions per prompt."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outs = generate(model, tokenizer, [texts[i] for i in order], params, batch_size=batch_size)
    result: list = [None] * len(texts)
    for i, o in zip(order, outs):
        result[i] = o
    return result


def rm_scores(scorer, prompts: Sequence[EvalPrompt], responses: dict[str, Sequence[str]],
              batch_size: int) -> dict[str, list[float]]:
    """Reward-model scores of every policy's responses; each distinct (prompt, response) is scored once (policies
    often agree), in order of length so that batches pad little."""
    unique = sorted({(i, r) for resp in responses.values() for i, r in enumerate(resp)},
                    key=lambda ir: (len(prompts[ir[0]].text) + len(ir[1]), ir))
    scores = scorer.score([prompts[i].messages for i, _ in unique], [r for _, r in unique], batch_size=batch_size)
    by_pair = dict(zip(unique, scores))
    return {name: [by_pair[(i, r)] for i, r in enumerate(resp)] for name, resp in responses.items()}


def _canonical(path: str) -> str:
    """A model path in one spelling (builtin names resolved, local directories made absolute), to spot the SFT model."""
    path = resolve_path(path)
    return os.path.realpath(path) if os.path.exists(path) else path


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a is tok_b or tok_a.get_vocab() == tok_b.get_vocab()


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _write_samples(path: str, prompts: Sequence[EvalPrompt], responses: Sequence[str], finish: Sequence[str],
                   gold: Sequence[float] | None, rm: Sequence[float] | None) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        for i, (p, r) in enumerate(zip(prompts, responses)):
            row = {"index": i, "family": p.family, "prompt": p.text, "reference": p.reference, "response": r,
                   "finish_reason": finish[i]}
            if len(p.messages) > 1:
                row["messages"] = p.messages
            if gold is not None:
                row["gold"] = round(gold[i], 4)
            if rm is not None:
                row["rm"] = round(rm[i], 4)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def evaluate(policies: dict[str, str], config: EvalConfig | None = None, *, out_dir: str | None = None,
             **overrides) -> dict:
    """Evaluate every policy (name -> model directory, hub id or builtin:base) against the SFT one (`policies[sft]`),
    with the settings of `config` (an :class:`EvalConfig`; its defaults otherwise) and keyword `overrides` of its
    fields; in `out_dir` (else `config.out`).

    Prompts: `heldout` held-out prompts of the built-in task, or the first `heldout` of the prompt source `prompts`.
    Writes `samples_<policy>.jsonl` in `out_dir`; returns the flat report (see the module docstring and
    :func:`summarize`) with `kl.<policy>` (on the first `kl_prompts` prompts, every family among them; 0 or None: all) and
    `ptx_perplexity.<policy>` (`ptx_blocks` blocks of `ptx_block_size` tokens spread evenly through `ptx_text`, or
    through its first `ptx_max_tokens` tokens, a Hugging Face dataset then streamed; None skips it).
    Greedy answers by default (`temperature` 0); the policies are loaded one at a time beside the SFT model.
    `suite`: the built-in suite of the held-out prompts (default: the default suite). `bon_curve` N (a power of 2):
    the best-of-n curve for n = 1, 2, 4, ..., N from N samples of the SFT model on the first `bon_prompts` prompts
    (:func:`best_of_n_curve`), the RM's accuracy on pairs of those samples, by flag too, and the flag rates of the
    RM's pick of N.
    `mixed_precision` "bf16" samples (answers, KL samples, best-of-n candidates) under bf16 autocast, and
    `rm_mixed_precision` "bf16" scores with the reward model under it; the KL and perplexity passes stay in the
    models' own precision.
    """
    cfg = replace(config or EvalConfig(), **overrides)
    cfg.validate()
    out_dir = out_dir or cfg.out
    if not out_dir:
        raise ConfigError("out: the directory the samples and the report go to")
    sft, reward_model, heldout, prompts, suite, seed = (cfg.sft, cfg.reward_model, cfg.heldout, cfg.prompts,
                                                        cfg.suite, cfg.seed)
    best_of, best_of_temperature, bon_curve, bon_prompts = (cfg.best_of, cfg.best_of_temperature, cfg.bon_curve,
                                                            cfg.bon_prompts)
    max_new_tokens, temperature, batch_size, mixed_precision = (cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                                                cfg.mixed_precision)
    ptx_text = cfg.ptx_source()
    ptx_blocks, ptx_block_size, ptx_max_tokens = cfg.ptx_blocks, cfg.ptx_block_size, cfg.ptx_max_tokens
    kl_prompts, n_resamples = cfg.kl_prompts or None, cfg.n_resamples  # kl_prompts 0: all
    if sft not in policies:
        raise ValueError(f"the SFT policy '{sft}' is not among the policies {list(policies)}")
    device = pick_device(cfg.device)  # before anything is written: a bad name is refused here
    t_start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    # 1. prompts, never seen in training, and the models every policy is compared with
    items = load_eval_prompts(prompts, heldout) if prompts else heldout_prompts(heldout, seed, suite)
    check_sources(ptx_text)  # read after every policy has answered: a missing file is named now
    has_gold = all(p.task is not None for p in items)
    _log(f"{len(items)} prompts ({'gold labeler' if has_gold else 'no gold labeler'}), policies: {list(policies)}"
         + (f" + best_of_{best_of}" if best_of else ""))

    sft_path = _canonical(policies[sft])
    sft_model, sft_tok = load_model(sft_path)
    sft_model.to(device)
    scorer = None
    if reward_model:
        scorer = RewardModel.load(reward_model)
        scorer.model.to(device)
        scorer.mixed_precision = cfg.rm_mixed_precision
    ptx_cache: dict[tuple, list[list[int]]] = {}
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + 1)
    n_kl = len(items) if kl_prompts is None else min(kl_prompts, len(items))

    responses: dict[str, list[str]] = {}
    finish: dict[str, list[str]] = {}
    report: dict = {}
    seconds: dict[str, float] = {}
    # 2. each policy: greedy answers, KL to SFT on its own samples, perplexity on held-out text
    for name, path in policies.items():
        t0 = time.time()
        is_sft = _canonical(path) == sft_path
        model, tok = (sft_model, sft_tok) if is_sft else load_model(path)
        model.to(device)
        texts = rendered_prompts(tok, items)
        with autocast(model, mixed_precision):
            comps = [c[0] for c in generate_sorted(model, tok, texts, greedy, batch_size)]
        responses[name] = [c.text for c in comps]
        finish[name] = [c.finish_reason for c in comps]
        # KL to SFT on the policy's own samples at temperature 1 (0 by definition for the SFT model itself)
        if is_sft:
            report[f"kl.{name}"] = 0.0
        elif _same_vocab(tok, sft_tok):
            with autocast(model, mixed_precision):
                samples = [c[0] for c in generate_sorted(model, tok, texts[:n_kl], sampled, batch_size)]
            prompt_ids = [encode_prompt(tok, p.messages) for p in items[:n_kl]]
            report[f"kl.{name}"] = kl_to_reference(model, sft_model, prompt_ids, [c.token_ids for c in samples],
                                                   tok.pad_token_id, batch_size)
        else:
            _log(f"{name}: tokenizer differs from the SFT model's; no KL")
        # perplexity on held-out pretraining text (the alignment tax)
        if ptx_text and is_encoder_decoder(model):
            _log(f"{name}: an encoder-decoder model; no ptx perplexity")
        elif ptx_text:
            report[f"ptx_perplexity.{name}"] = perplexity(model, _ptx(ptx_cache, tok, model, ptx_text, ptx_blocks,
                                                                      ptx_block_size, ptx_max_tokens))
        seconds[name] = time.time() - t0
        _log(f"{name}: {seconds[name]:.1f}s")
        if not is_sft:
            del model

    # 3. best-of-n: n samples of the SFT model (temperature 1 by default), the one the RM prefers kept
    if best_of:
        t0 = time.time()
        name = f"best_of_{best_of}"
        texts = rendered_prompts(sft_tok, items)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=best_of_temperature, n=best_of,
                                seed=seed + 2)
        # every sample kept, best first: the best is the policy's answer; all n feed the RM accuracy below
        with autocast(sft_model, mixed_precision):
            candidates = generate_sorted(sft_model, sft_tok, texts, params, batch_size)
        ranked, ranked_rm = best_of_n(scorer, [p.messages for p in items], candidates, keep=best_of,
                                      batch_size=batch_size)
        responses[name] = [k[0].text for k in ranked]
        finish[name] = [k[0].finish_reason for k in ranked]
        if has_gold:
            cand_gold = [[gold_labeler.gold_score(p.text, c.text) for c in comps] for p, comps in zip(items, ranked)]
            acc, pairs = rm_accuracy(ranked_rm, cand_gold)
            report["rm_accuracy_gold_sft_samples"], report["rm_accuracy_gold_sft_samples_pairs"] = acc, pairs
            # the same n candidates picked by the gold labeler (the headroom a perfect RM would have) and at random
            report[f"gold_score.{name}_oracle"] = float(np.mean([max(g) for g in cand_gold]))
            report[f"gold_score.{name}_random"] = float(np.mean([np.mean(g) for g in cand_gold]))
        report[f"kl.{name}"] = best_of_n_kl(best_of)  # analytic; the language model itself is the SFT model's
        if f"ptx_perplexity.{sft}" in report:
            report[f"ptx_perplexity.{name}"] = report[f"ptx_perplexity.{sft}"]
        seconds[name] = time.time() - t0
        _log(f"{name}: {seconds[name]:.1f}s")

    # 3b. the best-of-n curve: N samples of the SFT model on a subset of the prompts, the RM's pick of n for each n
    if bon_curve:
        t0 = time.time()
        sub = items[:bon_prompts]
        texts = rendered_prompts(sft_tok, sub)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=best_of_temperature, n=bon_curve,
                                seed=seed + 3)
        with autocast(sft_model, mixed_precision):
            cands = generate_sorted(sft_model, sft_tok, texts, params, batch_size)
        flat = rm_scores(scorer, [p for p, comps in zip(sub, cands) for _ in comps],
                         {"c": [c.text for comps in cands for c in comps]}, batch_size)["c"]
        cand_rm = np.asarray(flat).reshape(len(sub), bon_curve)  # (P, N)
        ns = [2 ** i for i in range(bon_curve.bit_length())]
        report["best_of_n_prompts"] = len(sub)
        if has_gold:
            cand_judged = [[gold_labeler.judge(p.text, c.text) for c in comps] for p, comps in zip(sub, cands)]
            cand_gold = np.asarray([[j.score for j in js] for js in cand_judged])  # (P, N)
            report["best_of_n_curve"] = best_of_n_curve(cand_rm, cand_gold, ns)
            acc, pairs = rm_accuracy(cand_rm.tolist(), cand_gold.tolist())
            report["rm_accuracy_gold_sft_samples"], report["rm_accuracy_gold_sft_samples_pairs"] = acc, pairs
            report["rm_accuracy_gold_sft_samples_by_flag"] = rm_accuracy_by_flag(cand_rm.tolist(), cand_judged)
            pick = np.argmax(cand_rm, axis=1)  # the RM's pick of all N
            report[f"flag_rate.best_of_{bon_curve}"] = flag_rates([js[k] for js, k in zip(cand_judged, pick)])
        else:
            report["best_of_n_curve"] = [{"n": n, "kl": best_of_n_kl(n),
                                          "rm": float(best_of_n_expectations(cand_rm, cand_rm, n).mean())} for n in ns]
        seconds["best_of_n_curve"] = time.time() - t0
        _log(f"best-of-n curve (n <= {bon_curve}, {len(sub)} prompts): {seconds['best_of_n_curve']:.1f}s")

    # 4. judges: the gold labeler, the reward model
    gold = rm = judged = None
    if has_gold:
        judged = {n: [gold_labeler.judge(p.text, r) for p, r in zip(items, resp)] for n, resp in responses.items()}
        gold = {n: [j.score for j in js] for n, js in judged.items()}
    if scorer is not None:
        t0 = time.time()
        rm = rm_scores(scorer, items, responses, batch_size)
        seconds["reward_model"] = time.time() - t0
    # 5. the report. RM accuracy on the policies' own answers: best-of-n's were picked by the RM, which would bias it
    report = {**summarize(items, responses, sft, gold, rm, list(policies), n_resamples, seed, judged), **report}
    if bon_curve and gold is not None:  # what the curve's n = 1 is measured against: SFT's greedy answer there
        report["best_of_n_sft_greedy_gold"] = float(np.mean(gold[sft][:report["best_of_n_prompts"]]))
    report["decoding"] = {"temperature": temperature, "max_new_tokens": max_new_tokens, "kl_prompts": n_kl,
                          "kl_temperature": 1.0, "mixed_precision": mixed_precision,
                          "rm_mixed_precision": cfg.rm_mixed_precision, "device": device}
    if best_of:
        report["decoding"]["best_of_temperature"] = best_of_temperature
    for name, resp in responses.items():
        _write_samples(os.path.join(out_dir, f"samples_{name}.jsonl"), items, resp, finish[name],
                       gold[name] if gold else None, rm[name] if rm else None)
    report["eval_seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    report["seconds.eval"] = round(time.time() - t_start, 2)
    return report


def _ptx(cache: dict, tok, model, source: str, n_blocks: int, block_size: int,
         max_tokens: int | None = None) -> list[list[int]]:
    """Held-out text blocks for this tokenizer and context length, tokenised once per (vocab, length)."""
    limit = getattr(model.config, "max_position_embeddings", None) or block_size
    size = min(block_size, limit)
    key = (len(tok), tok.eos_token_id, size)
    if key not in cache:
        texts = iter_pretrain_text(source, streaming=max_tokens is not None)
        cache[key] = perplexity_blocks(tok, texts, size, n_blocks, max_tokens)
    return cache[key]


# --------------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """``instructgpt eval [--config FILE.yaml] [key=value ...]``; every flag sets one key of :class:`EvalConfig`."""
    p = argparse.ArgumentParser(prog="instructgpt eval", description="Compare policies on held-out prompts.")
    add_config_arguments(p, example="heldout=1000 policy.ppo=runs/x/ppo/model")

    def flag(*names, key=None, **kw):
        add_alias(p, EvalConfig, *names, key=key or names[0][2:].replace("-", "_"), **kw)

    flag("--policy", metavar="NAME=DIR",
         help="a policy to evaluate (repeatable), e.g. sft=runs/x/sft/model or base=builtin:base")
    flag("--sft", help="name of the SFT policy: the reference of win rates and KL")
    flag("--reward-model", help="reward-model directory (RM score, RM accuracy, judge without gold)")
    flag("--best-of", help="add best-of-N of the SFT model reranked by the RM")
    flag("--best-of-temperature", help="sampling temperature of the best-of-N candidates")
    flag("--bon-curve", metavar="N",
         help="the best-of-n curve for n = 1, 2, 4, ..., N (a power of 2) from N samples of the SFT model")
    flag("--bon-prompts", help="prompts the best-of-n curve is measured on")
    flag("--suite", help="the built-in suite of the held-out prompts: assistant or puzzles")
    flag("--heldout", help="number of held-out prompts")
    flag("--seed")
    flag("--ptx-text", help="held-out pretraining text for perplexity ('none': skip)")
    flag("--ptx-max-tokens", help="read only the first N tokens of --ptx-text (a hub dataset is then streamed)")
    flag("--prompts", help="prompt source instead of the built-in held-out task (no gold labeler unless its prompts "
                           "are the task's; win rates are then judged by the RM)")
    flag("--max-new-tokens")
    flag("--temperature", help="policy decoding (0 = greedy)")
    flag("--device", help="where the models run: auto (cuda when available), cpu, cuda:1 ...")
    flag("--batch-size")
    flag("--mixed-precision", help="sample under bf16 autocast (answers, KL samples, best-of-n candidates)")
    flag("--rm-mixed-precision", help="the reward model scores under bf16 autocast")
    flag("--kl-prompts", help="prompts for the KL estimate (0: all)")
    flag("--stage", metavar="NAME=DIR",
         help="a training stage's out_dir for the curves (repeatable; found next to policies otherwise)")
    flag("--out", help="output directory (default runs/eval-<timestamp>)")
    return p


def stage_dirs_near(paths: Sequence[str]) -> dict[str, str]:
    """Stage out_dirs next to model directories (`<out_dir>/model` with `<out_dir>/metrics.jsonl`), named by folder."""
    found = {}
    for p in paths:
        for d in (p, os.path.dirname(os.path.normpath(p))):
            if d and os.path.exists(os.path.join(d, "metrics.jsonl")):
                found[os.path.basename(os.path.normpath(d))] = d
                break
    return found


def print_table(report: dict) -> None:
    sft = report.get("sft_policy", "sft")
    cols = [("gold", "gold_score"), ("exact", "accuracy"), (f"win vs {sft}", "win_rate"),
            ("95% CI", "win_rate_ci95"), ("win (no ties)", "win_rate_no_ties"), ("RM", "rm_score"), ("KL", "kl"),
            ("ptx ppl", "ptx_perplexity"), ("BLEU", "bleu"), ("ROUGE-L", "rouge_l")]
    names = report.get("policies", [])
    table = Table(title=f"{report.get('heldout_prompts')} held-out prompts, judged by {report.get('judge')}")
    table.add_column("policy")
    shown = []
    for label, key in cols:
        if any(_lookup(report, key, n, sft) is not None for n in names):
            table.add_column(label, justify="right")
            shown.append(key)
    for n in names:
        table.add_row(n, *[_fmt(_lookup(report, k, n, sft)) for k in shown])
    Console(file=sys.stdout, width=max(120, Console().width)).print(table)
    if report.get("rm_accuracy_gold") is not None:
        print(f"reward model accuracy against the gold order: {report['rm_accuracy_gold']:.3f} "
              f"({report['rm_accuracy_gold_pairs']} held-out pairs)")
    if report.get("rm_accuracy_gold_sft_samples") is not None:
        print(f"... on pairs of SFT samples: {report['rm_accuracy_gold_sft_samples']:.3f} "
              f"({report['rm_accuracy_gold_sft_samples_pairs']} pairs)")


def _lookup(report: dict, key: str, name: str, sft: str):
    if key.startswith("win_rate"):
        return report.get(f"{key}.{name}_vs_{sft}")
    return report.get(f"{key}.{name}")


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def main(argv: list[str]) -> int:
    args = parse_command_line(build_parser(), argv)
    t0 = time.time()
    try:
        cfg = config_from_args(EvalConfig, args)
        if not cfg.policy:
            raise ConfigError("policy: no policies (--policy NAME=DIR, or policy.NAME=DIR)")
        out = cfg.out or os.path.join("runs", time.strftime("eval-%Y%m%d-%H%M%S"))
        report = evaluate(cfg.policy, cfg, out_dir=out)
    except (ValueError, DataError, FileNotFoundError) as e:
        return command_error("eval", e)
    report["seconds.total"] = round(time.time() - t0, 2)
    near = stage_dirs_near(list(cfg.policy.values()) + ([cfg.reward_model] if cfg.reward_model else []))
    write_report(out, report, {**near, **cfg.stage})
    print_table(report)
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0
