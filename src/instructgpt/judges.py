"""Judges: what scores a policy's answers beside the reward model, for monitoring and evaluation, never as the
training signal (unless a run asks for the oracle: ``reward_model.name_or_path: builtin:gold``).

A judge scores (prompt, response) pairs in [0, 1] and says which prompts it can score. The built-in suites' gold
labeler is the one shipped; a stage asks `judge_for(prompts)` and does not know which it got.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from instructgpt import gold
from instructgpt.prompting import as_messages

GOLD = "builtin:gold"


class Judge(Protocol):
    def covers(self, prompts: Sequence) -> bool:
        """Whether every prompt is one this judge can score."""

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        """One score in [0, 1] per (prompt, response); prompts are strings or message lists."""


def _user_turns(prompts: Sequence) -> list[str]:
    return [as_messages(p)[-1]["content"] for p in prompts]


class GoldJudge:
    """The built-in suites' hidden gold labeler (`instructgpt.gold`)."""

    def covers(self, prompts: Sequence) -> bool:
        return all(gold.suite_of(u) for u in _user_turns(prompts))

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        return [gold.gold_score(u, r) for u, r in zip(_user_turns(prompts), responses)]


def judge_for(prompts: Sequence) -> Judge | None:
    """A judge that can score all of `prompts`, or None (prompts of a user's own data)."""
    judge = GoldJudge()
    return judge if prompts and judge.covers(prompts) else None


class JudgeReward:
    """A judge as PPO's reward, with a reward model's `score` interface: 2 * score - 1, in [-1, 1] (an oracle run,
    showing what PPO gets from a perfect reward model; not RLHF)."""

    model = None  # no network to move to a device or start a value model from

    def __init__(self, judge: Judge):
        self.judge = judge

    def score(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32, n_groups: int = 1,
              trim_mlp: bool = False) -> list[float]:
        return [2.0 * s - 1.0 for s in self.judge.score(prompts, responses)]  # (no forward to batch or trim)
