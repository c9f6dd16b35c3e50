"""Any source read as records of one kind, with the line each came from; their texts; the rows written out.

The kinds are the stages' (:mod:`instructgpt.data`): demonstrations, prompts, comparisons and pretraining text. A
source's kind is given, or is the kind most of its rows are (``kind: auto``); every record is then parsed by that kind's
reader, so a bad one is a :class:`~instructgpt.data.DataError` naming the file, the line and the field. Records are
written back in the kind's plain schema, the one the stages read first: ``{"prompt", "response"}`` (``{"messages"}``
for a conversation), ``{"prompt"}``, rankings ``{"prompt", "responses", "ranks", ...}``, ``{"text"}``.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Union

from instructgpt import data
from instructgpt.config import ConfigError
from instructgpt.data import (SHAREGPT_ROLES, DataError, Demonstration, PromptRecord, Ranking, iter_rows,
                              parse_comparison, parse_demonstration, parse_prompt, parse_text, ranking_to_json)
from instructgpt.dataprep.configs import InputConfig
from instructgpt.files import write_json, write_jsonl

KINDS = ("demonstrations", "prompts", "comparisons", "text")


@dataclass
class Document:
    """A pretraining document (``{"text"}`` rows, ``.txt`` files)."""

    text: str
    file: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)


Record = Union[Demonstration, PromptRecord, Ranking, Document]


def parse_document(file: str, line: int, row: dict) -> Document:
    return Document(parse_text(file, line, row), file, line)


PARSERS: dict[str, Callable[[str, int, dict], Record]] = {
    "demonstrations": parse_demonstration, "prompts": parse_prompt, "comparisons": parse_comparison,
    "text": parse_document}


# --------------------------------------------------------------------------------------------------------------------
# Schemas and kinds


def schema_of(row: Any) -> str:
    """The name of the schema a raw row is written in (``prompt+response``, ``alpaca``, ``sharegpt``, ``rankings``,
    ``hh-rlhf`` ...), ``unknown`` for none the readers take."""
    if not isinstance(row, dict):
        return "unknown"
    if "responses" in row or "ranks" in row:
        return "rankings"
    if "summaries" in row or "info" in row:
        return "summarize-from-feedback"
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        return "trl-pairs"
    if "chosen" in row and "rejected" in row and ("prompt" in row or "messages" in row):
        return "pairs"
    if "chosen" in row:
        return "hh-rlhf"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        key = next((k for k in ("response", "completion", "label") if k in row), None)
        return f"prompt+{key}" if key else "prompt"
    if "text" in row:
        return "text"
    return "unknown"


def kind_of(file: str, line: int, row: dict) -> str:
    """The kind of data a raw row is (a conversation ending with the assistant is a demonstration, one ending with the
    user a prompt); a DataError when no reader takes it."""
    schema = schema_of(row)
    if schema in ("rankings", "trl-pairs", "pairs") or (schema == "hh-rlhf" and "rejected" in row) or \
            "summaries" in row:
        return "comparisons"
    if schema in ("summarize-from-feedback", "prompt"):
        return "prompts"
    if schema in ("messages", "sharegpt"):
        key, role_key, roles = (("messages", "role", {r: r for r in data.ROLES}) if schema == "messages" else
                                ("conversations", "from", dict(SHAREGPT_ROLES)))
        turns = row[key]
        last = turns[-1] if isinstance(turns, list) and turns else None
        return "demonstrations" if isinstance(last, dict) and roles.get(last.get(role_key)) == "assistant" \
            else "prompts"
    if schema == "alpaca":
        return "demonstrations" if "output" in row else "prompts"
    if schema.startswith("prompt+") or schema == "hh-rlhf":
        return "demonstrations"
    if schema == "text":
        return "text"
    raise DataError(file, line, None, "cannot tell which kind of data this row is (expected demonstrations, prompts, "
                                      "comparisons or {'text'} rows); give kind=")


# --------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Item:
    """One record and where it came from."""

    file: str
    line: int
    schema: str
    record: Record


@dataclass
class Read:
    """A source read as one kind: its records, and its bad lines (only when they were allowed: `skip_bad`)."""

    source: str
    kind: str
    items: list[Item]
    bad: list[DataError] = field(default_factory=list)


def row_error(file: str, line: int, row: Any) -> DataError | None:
    """The error of what `iter_rows` yields for a line it could not read (malformed JSON, not UTF-8) or a line that is
    not an object; None for a row to parse."""
    if isinstance(row, dict):
        return None
    if isinstance(row, data._Malformed):  # the readers' own stand-in for a line that is not a record
        return DataError(file, line, row.field, row.message)
    return DataError(file, line, None, f"expected a JSON object, got {type(row).__name__}")


def _kind_or_none(file: str, line: int, row: Any) -> str | None:
    try:
        return kind_of(file, line, row) if isinstance(row, dict) else None
    except DataError:
        return None


def _first_error(source: str, raw: list[tuple[str, int, Any]]) -> DataError:
    """Why not one row of `source` could be read: its first row's error."""
    if not raw:
        return DataError(source, None, None, "no records")
    err = row_error(*raw[0])
    if err is not None:
        return err
    try:
        kind_of(*raw[0])
    except DataError as e:
        return e
    raise AssertionError("the first row has a kind")


def read_source(source: str, kind: str = "auto", skip_bad: bool = False) -> Read:
    """Every record of `source` as `kind`. ``auto``: the kind most of its rows are, and a row of another kind is bad
    (a prompts file with a few demonstrations in it, or the reverse, would otherwise lose or invent answers); a
    kind given reads every row as that kind (``kind=prompts`` takes the prompts of demonstrations). A bad line
    raises its DataError, or with `skip_bad` is kept in `Read.bad`; a source with no good record is an error."""
    raw = list(iter_rows(source))
    auto = kind == "auto"
    kinds = [_kind_or_none(*r) for r in raw] if auto else []
    if auto:
        votes = Counter(k for k in kinds if k is not None)
        if not votes:  # not one row any reader takes
            raise _first_error(source, raw)
        kind = votes.most_common(1)[0][0]
    parse = PARSERS[kind]
    items, bad = [], []
    for i, (file, line, row) in enumerate(raw):
        try:
            err = row_error(file, line, row)
            if err is not None:
                raise err
            if auto and (own := kinds[i] or kind_of(file, line, row)) != kind:  # kind_of raises for no kind
                raise DataError(file, line, None, f"a row of {own} among {kind} (give kind= to read every row as "
                                                  "one kind)")
            items.append(Item(file, line, schema_of(row), parse(file, line, row)))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(e)
    if not items:
        raise DataError(source, None, None, f"no usable {kind} records" + (f" ({len(bad)} bad lines)" if bad else ""))
    return Read(source, kind, items, bad)


def log(msg: str) -> None:
    print(f"instructgpt data: {msg}", file=sys.stderr, flush=True)


def read_input(cfg: InputConfig, skip_bad: bool | None = None) -> Read:
    """The subcommand's input, once its output is known not to overwrite it (`skip_bad`: in place of
    cfg.skip_bad_lines)."""
    check_output(cfg.out, [cfg.input])
    read = read_source(cfg.input, cfg.kind, cfg.skip_bad_lines if skip_bad is None else skip_bad)
    log(f"{cfg.input}: {len(read.items)} {read.kind} rows" + (f", {len(read.bad)} bad lines skipped"
                                                                if read.bad else ""))
    return read


def report_header(command: str, cfg: Any, read: Read | None = None) -> dict:
    """What every report starts with: the command, its output, and what it read."""
    head: dict = {"command": f"data {command}", "output": cfg.out}
    if read is not None:
        head.update({"input": read.source, "kind": read.kind, "rows_in": len(read.items),
                     "bad_lines_skipped": len(read.bad),
                     "bad_line_examples": [str(e) for e in read.bad[:cfg.examples]]})
    return head


# --------------------------------------------------------------------------------------------------------------------
# Texts of a record


def _single_user(messages: list[dict]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "user"


def texts(record: Record) -> list[tuple[str, str]]:
    """(field, text) of every text in `record`, named as in its output row (``prompt``, ``response``,
    ``messages[2].content``, ``responses[1]``, ``text``)."""
    if isinstance(record, Document):
        return [("text", record.text)]
    msgs = record.messages
    if isinstance(record, Demonstration) and len(msgs) == 2 and _single_user(msgs[:1]) and \
            msgs[1]["role"] == "assistant":
        return [("prompt", msgs[0]["content"]), ("response", msgs[1]["content"])]
    out = [("prompt", msgs[0]["content"])] if _single_user(msgs) else \
        [(f"messages[{i}].content", m["content"]) for i, m in enumerate(msgs)]
    if isinstance(record, Ranking):
        out += [(f"responses[{j}]", r) for j, r in enumerate(record.responses)]
    return out


def map_texts(record: Record, fn: Callable[[str], str]) -> Record:
    """`record` with `fn` applied to every text (a new record; `record` is left as it is)."""
    if isinstance(record, Document):
        return replace(record, text=fn(record.text))
    msgs = [{**m, "content": fn(m["content"])} for m in record.messages]
    if isinstance(record, Ranking):
        return replace(record, messages=msgs, responses=[fn(r) for r in record.responses])
    return replace(record, messages=msgs)


def prompt_messages(record: Record) -> list[dict]:
    """The conversation a model answers: a demonstration's turns before its last assistant turn, a prompt's or a
    ranking's whole conversation; none for a document."""
    if isinstance(record, Document):
        return []
    if isinstance(record, Demonstration):
        last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        return record.messages[:last]
    return record.messages


def last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def responses(record: Record) -> list[str]:
    """What a model is trained to answer: a demonstration's last assistant turn, a ranking's responses, a document's
    text; none for a prompt."""
    if isinstance(record, Document):
        return [record.text]
    if isinstance(record, Demonstration):
        return [next(m["content"] for m in reversed(record.messages) if m["role"] == "assistant")]
    if isinstance(record, Ranking):
        return list(record.responses)
    return []


def empty_field(record: Record) -> str | None:
    """The first text of `record` that is empty or whitespace only (a system turn may be empty), else None."""
    system = {f"messages[{i}].content" for i, m in enumerate(getattr(record, "messages", ())) if m["role"] == "system"}
    return next((name for name, t in texts(record) if not t.strip() and name not in system), None)


# --------------------------------------------------------------------------------------------------------------------
# Output rows


def to_json(record: Record) -> dict:
    """The row a record is written as: the plain schema of its kind."""
    if isinstance(record, Document):
        return {"text": record.text}
    if isinstance(record, Ranking):
        return ranking_to_json(record)
    msgs = record.messages
    if isinstance(record, Demonstration):
        if len(msgs) == 2 and _single_user(msgs[:1]) and msgs[1]["role"] == "assistant":
            return {"prompt": msgs[0]["content"], "response": msgs[1]["content"]}
        return {"messages": msgs}
    return {"prompt": msgs[0]["content"]} if _single_user(msgs) else {"messages": msgs}


def content_key(record: Record) -> str:
    """Equal for two records of the same content, whatever schema they were read from."""
    return json.dumps(to_json(record), ensure_ascii=False, sort_keys=True)


def report_path(out: str) -> str:
    """Where the report of a command writing `out` goes, beside it: ``data/clean.jsonl`` -> ``data/clean.report.json``.
    """
    return os.path.splitext(out)[0] + ".report.json"


def check_output(out: str | None, inputs: Iterable[str]) -> None:
    """A ConfigError unless `out` is a new ``.jsonl`` path outside every input: a command never writes to its input
    (not to an input file, not into an input directory)."""
    if not out:
        raise ConfigError("out: required (the JSONL file to write)")
    if not out.lower().endswith((".jsonl", ".ndjson")):
        raise ConfigError(f"out: must be a .jsonl file, got {out}")
    targets = {os.path.realpath(out), os.path.realpath(report_path(out))}
    for src in inputs:
        real = os.path.realpath(src)
        if os.path.isfile(src) and real in targets:
            raise ConfigError(f"out: {out} would overwrite the input {src}; write to a new file")
        if os.path.isdir(src) and any(t.startswith(real.rstrip(os.sep) + os.sep) for t in targets):
            raise ConfigError(f"out: {out} is inside the input directory {src}; write it elsewhere")


def write_output(out: str, rows: Iterable[dict], report: dict) -> str:
    """Write the rows (atomically), then the report beside them; returns the report's path."""
    write_jsonl(out, rows)
    path = report_path(out)
    write_json(path, report)
    return path
