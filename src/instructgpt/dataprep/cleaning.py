"""``instructgpt data clean``: rules that rewrite texts, then filters that drop rows; every rule counts its rows.

In order, on every text of a row (prompts, responses, system turns, documents):

1. ``unicode``: Unicode normal form NFC (composed characters) or NFKC (also full-width letters, ligatures, ...);
2. ``control_chars``: ``\\r\\n``, ``\\r``, ``\\v`` and ``\\f`` become ``\\n``; the other control characters (C0 but
   tab and newline, DEL, C1) and the invisible zero-width space, word joiner, byte order mark and soft hyphen go;
3. ``whitespace``: trailing spaces of each line go, a run of spaces or tabs between two words becomes one space (a
   line's indentation stays), three or more line breaks become two, and the text is trimmed;
4. ``redact_pii`` (off by default): emails, card-like numbers and phone numbers become ``[EMAIL]``, ``[CARD]``,
   ``[PHONE]``, by the rules the server's audit log uses (:func:`instructgpt.serving.security.redact`).

Then the first filter a row fails drops it: ``empty`` (a text left empty), ``echo`` (a demonstration whose response
repeats its prompt), ``too_long`` (more tokens than ``max_length``, as the stages count them: the stage would refuse
it), ``too_short`` (a response or document of fewer than ``min_response_tokens`` tokens).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import replace
from typing import Callable, Sequence

from instructgpt.data import Demonstration
from instructgpt.dataprep.configs import CleanConfig
from instructgpt.dataprep.rows import (Document, Item, Record, empty_field, last_user_text, map_texts,
                                       prompt_messages, read_input, report_header, responses, texts, to_json)
from instructgpt.dataprep.stats import token_lengths
from instructgpt.modeling import load_tokenizer
from instructgpt.serving.security import redact

INVISIBLE = "\u200b\u2060\ufeff\u00ad"  # zero-width space, word joiner, byte order mark, soft hyphen
_LINE_BREAK = re.compile(r"\r\n|[\r\v\f]")
_CONTROL = re.compile(f"[\x00-\x08\x0e-\x1f\x7f-\x9f{INVISIBLE}]")
_TRAILING = re.compile(r"[^\S\n]+(?=\n|$)")
_BETWEEN_WORDS = re.compile(r"(?<=\S)[^\S\n]+(?=\S)")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")
PII_TAGS = ("EMAIL", "CARD", "PHONE")


def strip_control(text: str) -> str:
    return _CONTROL.sub("", _LINE_BREAK.sub("\n", text))


def tidy_whitespace(text: str) -> str:
    text = _BETWEEN_WORDS.sub(" ", _TRAILING.sub("", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


def text_rules(cfg: CleanConfig) -> list[tuple[str, Callable[[str], str]]]:
    """The enabled text rules, in the order they apply: (name, text -> text)."""
    rules: list[tuple[str, Callable[[str], str]]] = []
    if cfg.unicode != "none":
        form = cfg.unicode
        rules.append(("unicode", lambda t: unicodedata.normalize(form, t)))
    if cfg.control_chars:
        rules.append(("control_chars", strip_control))
    if cfg.whitespace:
        rules.append(("whitespace", tidy_whitespace))
    if cfg.redact_pii:
        rules.append(("redact_pii", redact))
    return rules


def pii_tags(record: Record) -> Counter:
    """How many [EMAIL], [CARD] and [PHONE] placeholders the texts of `record` hold."""
    return Counter({tag.lower(): sum(t.count(f"[{tag}]") for _, t in texts(record)) for tag in PII_TAGS})


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def is_echo(prompt: str, response: str, min_words: int = 4) -> bool:
    """Whether `response` repeats `prompt`: the same words (case and punctuation aside), or, for a prompt of at least
    `min_words` words, all of them in a row inside the response (a short prompt may be quoted by a fair answer)."""
    p, r = words(prompt), words(response)
    if not p:
        return False
    if p == r:
        return True
    return len(p) >= min_words and f" {' '.join(p)} " in f" {' '.join(r)} "


def failed_filter(record: Record, cfg: CleanConfig, tokenizer) -> str | None:
    """The first filter `record` fails (empty, echo, too_long, too_short), else None."""
    if empty_field(record) is not None:
        return "empty"
    if cfg.drop_echo and isinstance(record, Demonstration) and \
            is_echo(last_user_text(prompt_messages(record)), responses(record)[0], cfg.echo_min_words):
        return "echo"
    if cfg.max_length is None and not cfg.min_response_tokens:
        return None
    n = token_lengths(tokenizer, record)
    if cfg.max_length is not None and not isinstance(record, Document) and n.example > cfg.max_length:
        return "too_long"  # a document is cut into blocks by the stages, never refused for its length
    if n.responses and min(n.responses) < cfg.min_response_tokens:
        return "too_short"
    return None


FILTERS = ("empty", "echo", "too_long", "too_short")


def clean(items: Sequence[Item], cfg: CleanConfig, tokenizer) -> tuple[list[Item], dict]:
    """The rows kept, cleaned, in order; and the report's count per rule (rows changed, rows dropped) with a few
    example lines each."""
    rules = text_rules(cfg)
    changed: Counter = Counter()
    dropped: Counter = Counter()
    tags: Counter = Counter()
    examples: dict[str, list[dict]] = {name: [] for name in [n for n, _ in rules] + list(FILTERS)}
    kept = []
    for it in items:
        # 1. the text rules, each counting the rows it changes
        record = it.record
        for name, rule in rules:
            new = map_texts(record, rule)
            if new != record:
                changed[name] += 1
                if len(examples[name]) < cfg.examples:
                    examples[name].append({"file": it.file, "line": it.line})
                if name == "redact_pii":
                    tags += pii_tags(new) - pii_tags(record)
            record = new
        # 2. the filters: the first one failed drops the row
        reason = failed_filter(record, cfg, tokenizer)
        if reason is None:
            kept.append(replace(it, record=record))
            continue
        dropped[reason] += 1
        if len(examples[reason]) < cfg.examples:
            examples[reason].append({"file": it.file, "line": it.line})
    on = {name for name, _ in rules}
    report: dict = {}
    for name in ("unicode", "control_chars", "whitespace", "redact_pii"):
        report[name] = {"enabled": name in on, "rows_changed": changed[name]}
    report["unicode"]["form"] = cfg.unicode
    report["redact_pii"].update({tag.lower(): tags[tag.lower()] for tag in PII_TAGS})
    settings = {"empty": {}, "echo": {"enabled": cfg.drop_echo, "min_words": cfg.echo_min_words},
                "too_long": {"max_length": cfg.max_length},
                "too_short": {"min_response_tokens": cfg.min_response_tokens}}
    for name in FILTERS:
        report[name] = {**settings[name], "rows_dropped": dropped[name]}
    return kept, {"rules": report, "examples": {k: v for k, v in examples.items() if v}}


def run_clean(cfg: CleanConfig) -> tuple[list[dict], dict]:
    """``instructgpt data clean``: the rows kept, cleaned; the report counts every rule."""
    read = read_input(cfg)
    kept, counts = clean(read.items, cfg, load_tokenizer(cfg.tokenizer))
    report = {**report_header("clean", cfg, read), "tokenizer": cfg.tokenizer, "rows_out": len(kept),
              "rows_dropped": len(read.items) - len(kept), **counts}
    return [to_json(it.record) for it in kept], report
