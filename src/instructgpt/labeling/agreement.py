"""Ranking math: rank normalisation and inter-labeler pairwise agreement.

The paper (Ouyang et al., 2022, sec. 5.1) reports that training labelers agree with each other 72.6 ± 1.5% of the
time. We measure it the same way on the overlapping tasks: for two labelers who ranked the same K outputs, look at
every pair of outputs that *both* put in a strict order (a tie from either labeler drops the pair) and count how often
they chose the same winner. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Mapping, Sequence


def dense_ranks(ranks: Sequence[int]) -> list[int]:
    """Renumber ranks as 1, 2, 3 ... keeping order and ties: [3, 1, 3, 7] -> [2, 1, 2, 3]."""
    order = {r: i for i, r in enumerate(sorted(set(ranks)), start=1)}
    return [order[r] for r in ranks]


def all_tied(ranks: Sequence[int]) -> bool:
    """True when a ranking says nothing about any pair (every output has the same rank)."""
    return len(set(ranks)) <= 1


def pair_agreement(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int]:
    """(agreeing pairs, comparable pairs) between two rankings of the same outputs; 1 = best, ties excluded."""
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"rankings of different lengths: {len(ranks_a)} and {len(ranks_b)}")
    agree = comparable = 0
    for i, j in combinations(range(len(ranks_a)), 2):
        da, db = ranks_a[i] - ranks_a[j], ranks_b[i] - ranks_b[j]
        if da == 0 or db == 0:
            continue
        comparable += 1
        agree += (da > 0) == (db > 0)
    return agree, comparable


@dataclass
class LabelerAgreement:
    """How often one labeler agreed with the others on the tasks they shared."""

    agree: int = 0
    comparable: int = 0
    tasks: int = 0

    @property
    def rate(self) -> float | None:
        return self.agree / self.comparable if self.comparable else None


@dataclass
class AgreementReport:
    """Inter-labeler agreement over all tasks ranked by two or more labelers."""

    agree: int = 0
    comparable: int = 0  # response pairs, over every pair of labelers on every shared task
    tasks: int = 0  # tasks with at least two rankings
    labeler_pairs: int = 0  # (task, labeler, labeler) triples compared
    per_labeler: dict[str, LabelerAgreement] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        """Pooled agreement: agreeing pairs / comparable pairs."""
        return self.agree / self.comparable if self.comparable else None

    @property
    def mean_and_stderr(self) -> tuple[float, float] | None:
        """Mean of the per-labeler agreement rates and its standard error (the paper's "72.6 ± 1.5%" form)."""
        rates = [a.rate for a in self.per_labeler.values() if a.rate is not None]
        if not rates:
            return None
        mean = sum(rates) / len(rates)
        if len(rates) < 2:
            return mean, 0.0
        var = sum((r - mean) ** 2 for r in rates) / (len(rates) - 1)
        return mean, math.sqrt(var / len(rates))


def agreement_report(rankings_by_task: Mapping[object, Mapping[str, Sequence[int]]]) -> AgreementReport:
    """Agreement over ``{task: {labeler: ranks}}``; tasks with fewer than two labelers are ignored."""
    report = AgreementReport()
    for by_labeler in rankings_by_task.values():
        if len(by_labeler) < 2:
            continue
        report.tasks += 1
        for name in by_labeler:
            report.per_labeler.setdefault(name, LabelerAgreement()).tasks += 1
        for a, b in combinations(sorted(by_labeler), 2):
            agree, comparable = pair_agreement(by_labeler[a], by_labeler[b])
            report.labeler_pairs += 1
            report.agree += agree
            report.comparable += comparable
            for name in (a, b):
                report.per_labeler[name].agree += agree
                report.per_labeler[name].comparable += comparable
    return report


def format_rate(rate: float | None, stderr: float | None = None) -> str:
    """72.6% or 72.6 ± 1.5%; an em dash when there is nothing to measure yet."""
    if rate is None:
        return "—"
    if stderr is None:
        return f"{100 * rate:.1f}%"
    return f"{100 * rate:.1f} ± {100 * stderr:.1f}%"
