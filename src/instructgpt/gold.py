"""The hidden gold labeler of the built-in suites: one interface for label-sim, evaluation and PPO's monitor.

Two suites of prompts are built in, told apart by their text:

- ``assistant`` (the default, :mod:`instructgpt.assistant`): a customer assistant judged by the InstructGPT
  labelers' rubric, a 1-7 rating and the paper's flags;
- ``puzzles`` (the control, :mod:`instructgpt.tasks`): exact-answer instructions (reverse a word, add two numbers...)
  scored in [0, 1] with partial credit. Ranking two wrong answers there means solving the puzzle, which a reward
  model the size of the policy cannot do: the case where RLHF has nothing to learn from.

The reward model and PPO never call this module's judgements; only simulated labelers and evaluation do.
"""

from __future__ import annotations

from instructgpt import assistant, tasks
from instructgpt.assistant import Judgement
from instructgpt.tasks import Task

SUITES = ("assistant", "puzzles")
DEFAULT_SUITE = "assistant"

__all__ = ["SUITES", "DEFAULT_SUITE", "Judgement", "judge", "gold_score", "parse_task", "suite_of", "make_tasks"]


def suite_of(prompt: str) -> str | None:
    """The built-in suite a prompt belongs to, or None."""
    if assistant.parse(prompt) is not None:
        return "assistant"
    return "puzzles" if tasks.parse_task(prompt) is not None else None


def parse_task(prompt: str) -> Task | None:
    """The built-in task a prompt states (either suite), or None."""
    return assistant.parse_task(prompt) or tasks.parse_task(prompt)


def judge(prompt: str | Task, response: str) -> Judgement:
    """The gold labeler's verdict on `response`. A puzzle's gold score is its partial credit, its rating that score
    on the 1-7 scale, and its one flag "fails_instruction" when the content is wrong (gold below
    tasks.RIGHT_CONTENT). Raises ValueError for a prompt of neither suite."""
    text = prompt.prompt if isinstance(prompt, Task) else prompt
    if assistant.parse(text) is not None:
        return assistant.judge(text, response)
    score = tasks.gold_score(text, response)
    flags = () if score >= tasks.RIGHT_CONTENT else ("fails_instruction",)
    return Judgement(rating=1 + round(6 * score), flags=flags, score=score)


def gold_score(prompt: str | Task, response: str) -> float:
    """The gold score in [0, 1]: the rubric's rating as (rating - 1) / 6, or a puzzle's partial credit."""
    return judge(prompt, response).score


def make_tasks(split: str, n: int, seed: int = 0, suite: str = DEFAULT_SUITE) -> list[Task]:
    """`n` distinct prompts of a suite's `split` ("train" or "heldout"), deterministic and prefix-stable."""
    if suite == "assistant":
        return assistant.make_tasks(split, n, seed=seed)
    if suite == "puzzles":
        return tasks.make_tasks(split, n, seed=seed)
    raise ValueError(f"unknown suite {suite!r} (known: {', '.join(SUITES)})")
