"""``best_of``: sample `best_of` completions per prompt and keep the `n` best.

With a reward model loaded, "best" is the reward model's score: the paper's best-of-n (rejection sampling against
the RM). Without one, it is the mean per-token log-prob, what OpenAI's completions API did.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from instructgpt.generation import Completion
from instructgpt.prompting import encode_response
from instructgpt.reward import RewardModel, last_token_rewards, right_pad
from instructgpt.serving.config import context_length


def mean_logprob(c: Completion) -> float:
    return sum(c.logprobs) / len(c.logprobs) if c.logprobs else -math.inf


def best_indices(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the `n` highest scores, best first (ties: the earlier sample first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


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
