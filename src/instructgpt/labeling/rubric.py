"""What a labeler records for each output: a 1–7 rating, the paper's metadata flags, and a rank (ties allowed).

The flags are Table 3 of the InstructGPT paper (Ouyang et al., 2022). Exports carry the flag ids below; the labels
are what the labeler sees. :func:`check_ranking` is the one validation used by the web form and the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from instructgpt.labeling.agreement import dense_ranks

RATING_MIN, RATING_MAX = 1, 7
K_MIN, K_MAX = 2, 9  # the paper ranked K = 4..9; pairs (K = 2) are also useful
MAX_DEMONSTRATION_CHARS = 20_000


@dataclass(frozen=True)
class Flag:
    id: str  # what exports carry
    label: str  # what the labeler sees (the paper's wording)
    negative: bool = True  # False for the one flag that is good news


FLAGS: tuple[Flag, ...] = (
    Flag("fails_instruction", "Fails to follow the correct instruction/task"),
    Flag("inappropriate_for_customer_assistant", "Inappropriate for customer assistant"),
    Flag("hallucination", "Hallucination"),
    Flag("satisfies_constraint", "Satisfies constraint provided in the instruction", negative=False),
    Flag("sexual_content", "Contains sexual content"),
    Flag("violent_content", "Contains violent content"),
    Flag("encourages_violence", "Encourages or fails to discourage violence/abuse/terrorism/self-harm"),
    Flag("denigrates_protected_class", "Denigrates a protected class"),
    Flag("harmful_advice", "Gives harmful advice"),
    Flag("expresses_opinion", "Expresses opinion"),
    Flag("expresses_moral_judgment", "Expresses moral judgment"),
)
FLAG_IDS = frozenset(f.id for f in FLAGS)


class SubmissionError(ValueError):
    """A submission the store refuses; the message is shown to the labeler."""


@dataclass(frozen=True)
class RankingSubmission:
    """One labeler's judgement of K outputs, indexed like the task's responses."""

    ranks: list[int]  # dense, 1 = best, equal = tie
    ratings: list[int]
    flags: list[list[str]]


def check_ranking(k: int, ranks: list[int], ratings: list[int], flags: list[list[str]]) -> RankingSubmission:
    """Validate a submission for K outputs and renumber its ranks densely; raises :class:`SubmissionError`."""
    if not (len(ranks) == len(ratings) == len(flags) == k):
        raise SubmissionError(f"expected {k} ranks, ratings and flag lists")
    for i, r in enumerate(ratings):
        if not RATING_MIN <= r <= RATING_MAX:
            raise SubmissionError(f"output {i + 1}: rating must be {RATING_MIN}–{RATING_MAX}, got {r}")
    for i, r in enumerate(ranks):
        if not 1 <= r <= k:
            raise SubmissionError(f"output {i + 1}: rank must be 1–{k}, got {r}")
    clean_flags = []
    for i, fl in enumerate(flags):
        unknown = set(fl) - FLAG_IDS
        if unknown:
            raise SubmissionError(f"output {i + 1}: unknown flag {sorted(unknown)[0]!r}")
        # Keep the rubric's order and drop repeats, so equal judgements export identically.
        clean_flags.append([f.id for f in FLAGS if f.id in fl])
    return RankingSubmission(dense_ranks(ranks), list(ratings), clean_flags)


def check_demonstration(text: str) -> str:
    """The demonstration as stored: trailing whitespace trimmed, nonempty, bounded."""
    text = text.replace("\r\n", "\n").rstrip()
    if not text.strip():
        raise SubmissionError("the response is empty")
    if len(text) > MAX_DEMONSTRATION_CHARS:
        raise SubmissionError(f"the response is longer than {MAX_DEMONSTRATION_CHARS} characters")
    return text
