"""Best-of-n: sample n completions per prompt and keep the best, for ``generate --best-of``, the evaluation's
best-of-n policy and curve, and the server's ``best_of``.

With a reward model, "best" is the reward model's score: the paper's best-of-n (rejection sampling against the RM).
Without one (the server), it is the mean per-token log-prob, what OpenAI's completions API did.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from instructgpt.batching import right_pad
from instructgpt.generation import Completion
from instructgpt.modeling import context_length
from instructgpt.prompting import encode_response
from instructgpt.reward import RewardModel, last_token_rewards


def mean_logprob(c: Completion) -> float:
    return sum(c.logprobs) / len(c.logprobs) if c.logprobs else -math.inf


def best_indices(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the `n` highest scores, best first (ties: the earlier sample first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


def best_of_n(rm: RewardModel, messages: Sequence, results: Sequence[Sequence[Completion]], keep: int = 1,
              batch_size: int = 32) -> tuple[list[list[Completion]], list[list[float]]]:
    """Per prompt, the `keep` completions the reward model `rm` scores highest, best first, with their scores.

    `results[i]` are the n samples for `messages[i]`; every (prompt, completion) pair is scored in one batched pass.
    """
    flat_prompts = [m for m, comps in zip(messages, results) for _ in comps]
    flat_scores = rm.score(flat_prompts, [c.text for comps in results for c in comps], batch_size=batch_size)
    kept, scores, start = [], [], 0
    for comps in results:
        s = flat_scores[start: start + len(comps)]
        start += len(comps)
        order = best_indices(s, keep)
        kept.append([comps[i] for i in order])
        scores.append([s[i] for i in order])
    return kept, scores


@torch.no_grad()
def reward_scores(rm: RewardModel, prompt_text: str, responses: Sequence[str]) -> list[float]:
    """Normalised RM rewards of `responses` to a prompt given as the exact text the policy continued.

    `RewardModel.score` renders a user prompt with the template; /v1/completions prompts are already raw text,
    so the RM reads that same text followed by each response ended the way the template ends a turn.
    """
    tok = rm.tokenizer
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    ctx = context_length(rm.model.config, tok)
    seqs = [(prompt_ids + encode_response(tok, r))[-ctx:] for r in responses]  # keep the response end the RM reads
    device = next(rm.model.parameters()).device
    raw = last_token_rewards(rm.model, *right_pad(seqs, tok.pad_token_id, device))  # (N,)
    return rm.norm.apply(raw).tolist()
