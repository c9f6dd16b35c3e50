"""What ``instructgpt data inspect`` measures: token lengths as the stages count them, their percentiles, and the
counts of schemas, bad, empty, over-long and duplicate rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from instructgpt.data import DataError, Demonstration, PromptRecord, Ranking
from instructgpt.dataprep.configs import InspectConfig
from instructgpt.dataprep.dedup import Duplicate, find_in, settings_report
from instructgpt.dataprep.rows import Document, Item, Record, prompt_messages, read_input, report_header
from instructgpt.modeling import load_tokenizer
from instructgpt.prompting import encode_answers, encode_prompt, encode_response

PERCENTILES = (50, 90, 95, 99)


@dataclass
class Lengths:
    """A record's tokens with its model's prompt template, as the stages count them."""

    prompt: int  # the conversation before the answer, rendered for generation (0 for a document)
    responses: list[int]  # each answer with the token that ends its turn (demonstration 1, ranking K, prompt none)
    example: int  # what a stage's data.max_length limits: prompt + answer (a ranking's longest); a document's tokens


def token_lengths(tokenizer, record: Record) -> Lengths:
    if isinstance(record, Document):
        n = len(tokenizer(record.text, add_special_tokens=False)["input_ids"])
        return Lengths(0, [n], n)
    if isinstance(record, Demonstration):
        # SFT's own encoding (a row, or a row per answer); the answer is the last run of assistant tokens of the last
        # row (the last assistant turn), the example SFT's longest row
        rows = encode_answers(tokenizer, record.messages)
        ids, mask = rows[-1]
        answer = len(mask) - next((i + 1 for i in range(len(mask) - 1, -1, -1) if not mask[i]), 0)
        return Lengths(len(ids) - answer, [answer], max(len(r) for r, _ in rows))
    prompt = len(encode_prompt(tokenizer, prompt_messages(record)))
    if isinstance(record, PromptRecord):
        return Lengths(prompt, [], prompt)
    assert isinstance(record, Ranking)
    answers = [len(encode_response(tokenizer, r)) for r in record.responses]
    return Lengths(prompt, answers, prompt + max(answers))


def percentiles(values: Sequence[float]) -> dict | None:
    """min, p50, p90, p95, p99, max and mean of `values` (linear interpolation between ranks, numpy's default);
    None for no values."""
    if not len(values):
        return None
    v = np.asarray(values, dtype=np.float64)
    out = {"min": int(v.min())}
    out.update({f"p{q}": round(float(x), 3) for q, x in zip(PERCENTILES, np.percentile(v, PERCENTILES))})
    out.update({"max": int(v.max()), "mean": round(float(v.mean()), 3)})
    return out


def is_empty_error(e: DataError) -> bool:
    """A reader's refusal of an empty (or whitespace-only) text: "empty", "empty response", "empty prompt ..."."""
    return e.message.split(" ", 1)[0] == "empty"


def line_rows(items: Sequence[Item], lengths: Sequence[Lengths], duplicates: Sequence[Duplicate | None],
              bad: Sequence[DataError], kind: str, max_length: int) -> list[dict]:
    """One row per input line, in the input's order: where, schema, status ("ok", "empty", "bad"), token lengths,
    over-long, and the earlier line a duplicate repeats."""
    rows = []
    for it, n, d in zip(items, lengths, duplicates):
        rows.append({"file": it.file, "line": it.line, "kind": kind, "schema": it.schema, "status": "ok",
                     "prompt_tokens": n.prompt, "response_tokens": n.responses, "example_tokens": n.example,
                     "over_long": n.example > max_length,
                     "duplicate": None if d is None else {"exact": d.exact, "similarity": round(d.similarity, 4),
                                                          "file": items[d.of].file, "line": items[d.of].line}})
    for e in bad:
        rows.append({"file": e.file, "line": e.line, "kind": kind, "schema": None,
                     "status": "empty" if is_empty_error(e) else "bad", "error": str(e)})
    return sorted(rows, key=lambda r: (r["file"], r["line"] or 0))


def summary(items: Sequence[Item], lengths: Sequence[Lengths], duplicates: Sequence[Duplicate | None],
            bad: Sequence[DataError], max_length: int, examples: int) -> dict:
    """The report's figures: counts, token-length percentiles, duplicate rates, empty, bad and over-long rows."""
    n = len(items)
    empty = [e for e in bad if is_empty_error(e)]
    exact = sum(1 for d in duplicates if d is not None and d.exact)
    near = sum(1 for d in duplicates if d is not None and not d.exact)
    prompts = Counter(str(prompt_messages(it.record)) for it in items if not isinstance(it.record, Document))
    over = [it for it, ln in zip(items, lengths) if ln.example > max_length]
    documents = all(isinstance(it.record, Document) for it in items)
    return {
        "lines": n + len(bad), "rows": n, "bad": len(bad) - len(empty), "empty": len(empty),
        "schemas": dict(Counter(it.schema for it in items).most_common()),
        "tokens": {"prompt": None if documents else percentiles([ln.prompt for ln in lengths]),
                   "response": percentiles([x for ln in lengths for x in ln.responses]),
                   "example": percentiles([ln.example for ln in lengths])},
        "max_length": max_length, "over_long": len(over),
        "over_long_examples": [{"file": it.file, "line": it.line} for it in over[:examples]],
        "duplicates": {"exact": exact, "near": near, "rate": round((exact + near) / n, 6),
                       "exact_rate": round(exact / n, 6),
                       "repeated_prompts": sum(c - 1 for c in prompts.values()),
                       "repeated_prompt_rate": round(sum(c - 1 for c in prompts.values()) / n, 6)},
    }


def run_inspect(cfg: InspectConfig) -> tuple[list[dict], dict]:
    """``instructgpt data inspect``: one row per input line, and the summary as the report."""
    read = read_input(cfg, skip_bad=True)  # bad lines are what it reports
    tok = load_tokenizer(cfg.tokenizer)
    lengths = [token_lengths(tok, it.record) for it in read.items]
    dups = find_in(read, cfg)
    rows = line_rows(read.items, lengths, dups, read.bad, read.kind, cfg.max_length)
    report = {**report_header("inspect", cfg, read), "tokenizer": cfg.tokenizer,
              "near_duplicates": settings_report(cfg),
              **summary(read.items, lengths, dups, read.bad, cfg.max_length, cfg.examples)}
    return rows, report
