"""One data layer for every stage: demonstrations, prompts, pretraining text and comparisons.

Sources are a file (``.jsonl``, ``.json``, ``.parquet``, ``.txt``), a Hugging Face dataset ``name[@config][:split]``, or a
built-in source ``builtin:NAME[?key=value&...]`` (the embedded default's data, see :mod:`instructgpt.builtin`).
Every schema the field uses is parsed into one internal record per kind, so the stages never see the file format.
Bad input raises :class:`DataError` naming the file, the line and the field; with ``skip_bad=True`` bad lines are
skipped and counted instead (``Loaded.skipped``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from instructgpt import builtin
from instructgpt.prompting import ChatTemplateError, render_prompt

ROLES = ("system", "user", "assistant")
MAX_RANKED = 9  # the paper: labelers ranked K = 4..9 outputs; we accept 2..9


class DataError(ValueError):
    """A bad input record: says which file, which line (1-based) and which field."""

    def __init__(self, file: str, line: int | None, field_name: str | None, message: str):
        self.file, self.line, self.field, self.message = file, line, field_name, message
        where = file + (f", line {line}" if line is not None else "")
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {what}{message}")


@contextlib.contextmanager
def rendering(record):
    """Within: the chat template refusing `record`'s conversation (ChatTemplateError) is a DataError naming the
    record's file and line, field 'messages'."""
    try:
        yield
    except ChatTemplateError as e:
        raise DataError(record.file, record.line, "messages", str(e)) from e


def rendered_prompts(tok, records: Iterable) -> list[str]:
    """Each record's `messages` as `tok`'s chat template renders them for generation (PromptRecord, evaluate's
    EvalPrompt: records with a file and line); one the template refuses is a DataError naming its file and line, before
    anything is sampled."""
    out = []
    for r in records:
        with rendering(r):
            out.append(render_prompt(tok, r.messages))
    return out


R = TypeVar("R")
E = TypeVar("E")


def encode_each(records: Iterable[R], encode: Callable[[R], E], skip_bad: bool,
                limit: int | None = None) -> tuple[list[tuple[R, E]], int]:
    """(record, encode(record)) for the records, the first `limit` that encode, and how many were skipped: a record
    whose encoding raises a DataError (longer than data.max_length, a conversation the chat template refuses, through
    `rendering`) stops the reading with it or, with `skip_bad`, is skipped and counted."""
    out, skipped = [], 0
    for record in records:
        try:
            with rendering(record):
                value = encode(record)
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        out.append((record, value))
        if limit and len(out) >= limit:
            break
    return out, skipped


# --------------------------------------------------------------------------------------------------------------------
# Internal records. `file`/`line` say where a record came from (for errors raised later, e.g. "too long"); they are
# left out of equality so that every accepted schema of the same content gives an equal record.


@dataclass
class Demonstration:
    """A conversation whose assistant turns are the demonstration (SFT trains on those tokens only)."""

    messages: list[dict[str, str]]
    file: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)


@dataclass
class PromptRecord:
    """A prompt to sample from: the conversation so far, ending with a user (or system) turn."""

    messages: list[dict[str, str]]
    file: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        """The last user turn: what the built-in task's gold labeler parses."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class Ranking:
    """K = 2..9 responses to one prompt with their ranks (1 = best, equal ranks are ties).

    Pairs are the K = 2 case: ranks [1, 2] for (chosen, rejected).
    """

    messages: list[dict[str, str]]
    responses: list[str]
    ranks: list[int]
    ratings: list[int] | None = None  # Likert 1..7 per response (the paper's labeling interface)
    flags: list[list[str]] | None = None  # metadata flags per response (the paper's Table 3)
    labeler: str | None = None
    file: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)

    @property
    def k(self) -> int:
        return len(self.responses)


class Loaded(list):
    """A list of records that also remembers how many bad lines were skipped."""

    def __init__(self, items: Sequence[Any] = (), skipped: int = 0):
        super().__init__(items)
        self.skipped = skipped


# --------------------------------------------------------------------------------------------------------------------
# Reading raw rows: (file, line, dict)


def _not_utf8(line: bytes, start: int) -> str:
    """What a line that is not UTF-8 gets as its error: its first bad byte (at `start`) and that byte's column
    (1-based, in characters)."""
    col = len(line[:start].decode("utf-8", "replace")) + 1
    return f"not UTF-8 text (byte 0x{line[start]:02x} at column {col}; save the file as UTF-8)"


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors put first in a file; not part of the text
# JSON's \uXXXX escape of a UTF-16 surrogate: a pair reads as one character, a lone one as a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json(text: str) -> Any:
    """json.loads, with every way it can refuse a text as ValueError (a JSONDecodeError where it has a position)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # a number longer than int() reads (4300 digits)
        raise ValueError(str(e).split(";")[0]) from None


def _json_error(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON ({e.msg} at column {e.colno})"
    return f"malformed JSON ({e})"


def _lone_surrogate(row: Any) -> str | None:
    """The field of the first string in `row` (e.g. "messages[1].content") holding a lone surrogate, else None. JSON's
    "\\ud800" escape reads as one, and no UTF-8 text (a tokenizer's input, the labeling store, an output file) can hold
    it."""
    stack: list[tuple[str, Any]] = [("", row)]
    while stack:  # no recursion: JSON nests as deep as its own parser allows
        where, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return where or None
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                name = k if isinstance(k, str) and not _SURROGATE.search(k) else ascii(k)
                stack.append((f"{where}.{name}" if where else name, x))
        elif isinstance(v, list):
            stack.extend((f"{where}[{j}]", x) for j, x in reversed(list(enumerate(v))))
    return None


def _checked(row: Any, escapes_surrogate: bool) -> Any:
    """`row`, or _Malformed when a string in it holds a lone surrogate (looked for only where the JSON text escapes
    one: `escapes_surrogate`)."""
    if escapes_surrogate:
        where = _lone_surrogate(row)
        if where is not None:
            return _Malformed("not UTF-8 text (a \\u escape of a lone surrogate, half of a UTF-16 pair)", where)
    return row


def iter_rows(source: str, streaming: bool = False) -> Iterator[tuple[str, int, Any]]:
    """Yield (file, 1-based line or row number, raw object) from any supported source. `streaming`: read a Hugging
    Face dataset as it downloads (for a reader that stops early) instead of downloading it whole first."""
    if source.startswith("builtin:"):
        for i, row in enumerate(builtin.rows(source), start=1):
            yield source, i, row
        return
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if not f.startswith("."))
        for f in files:
            yield from iter_rows(f, streaming)
        return
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext in (".jsonl", ".ndjson"):
            with open(source, "rb") as fh:  # decoded line by line: a byte that is not UTF-8 is that line's error
                for i, raw_bytes in enumerate(fh, start=1):
                    if i == 1 and raw_bytes.startswith(BOM):
                        raw_bytes = raw_bytes[len(BOM):]
                    try:
                        raw = raw_bytes.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield source, i, _Malformed(_not_utf8(raw_bytes, e.start))
                        continue
                    if not raw.strip():
                        continue
                    try:
                        row = _json(raw)
                    except ValueError as e:
                        yield source, i, _Malformed(_json_error(e))
                        continue
                    yield source, i, _checked(row, bool(_SURROGATE_ESCAPE.search(raw)))
            return
        if ext == ".json":
            with open(source, "rb") as fh:
                data = fh.read()
            if data.startswith(BOM):
                data = data[len(BOM):]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line_start = data.rfind(b"\n", 0, e.start) + 1
                raise DataError(source, data.count(b"\n", 0, e.start) + 1, None,
                                _not_utf8(data[line_start:], e.start - line_start)) from None
            try:
                obj = _json(text)
            except json.JSONDecodeError as e:
                raise DataError(source, e.lineno, None, f"malformed JSON ({e.msg})") from None
            except ValueError as e:
                raise DataError(source, None, None, f"malformed JSON ({e})") from None
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                obj = obj["data"]
            if not isinstance(obj, list):
                raise DataError(source, None, None, "a .json file must hold a list of records (or {'data': [...]})")
            escapes_surrogate = bool(_SURROGATE_ESCAPE.search(text))
            for i, row in enumerate(obj, start=1):
                yield source, i, _checked(row, escapes_surrogate)
            return
        if ext == ".parquet":
            try:
                table = pq.read_table(source).to_pylist()
            except (pa.ArrowException, OSError) as e:  # not Parquet, cut short, or a type Arrow cannot convert
                raise DataError(source, None, None, f"not a readable Parquet file ({e})") from None
            for i, row in enumerate(table, start=1):
                yield source, i, row
            return
        if ext == ".txt":
            with open(source, encoding="utf-8-sig", errors="replace") as fh:
                yield source, 1, {"text": fh.read()}
            return
        raise DataError(source, None, None, f"unsupported file type '{ext}' (use .jsonl, .json, .parquet or .txt)")
    if _missing_file(source):
        raise DataError(source, None, None, "no such file")
    # A Hugging Face dataset: [owner/]name[@config][:split], e.g. openai/summarize_from_feedback@comparisons:validation
    name, _, split = source.partition(":")
    name, _, subset = name.partition("@")
    try:
        ds = datasets.load_dataset(name, subset or None, split=split or "train", streaming=streaming)
    except Exception as e:  # offline, no such dataset, config or split: datasets raises many kinds
        raise DataError(source, None, None, f"not a local file, and the Hugging Face hub could not load it: "
                                            f"{type(e).__name__}: {e}") from e
    for i, row in enumerate(ds, start=1):
        yield source, i, row


# what a hub dataset id looks like: at most one "/" (owner/name), then @config and :split; a missing local path
# (./x, /abs/x, a/b/c, x.jsonl) is "no such file" instead
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w.-]+)?(:[\w.%:\[\]+-]+)?$")  # train[:10%]
_FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")


def _missing_file(source: str) -> bool:
    """`source` names a local file or directory (a path, or a name with a data file's extension) that is not there:
    neither a built-in source nor what could be a Hugging Face dataset id."""
    return (not source.startswith("builtin:") and not os.path.exists(source)
            and (source.lower().endswith(_FILE_TYPES) or not _HUB_ID.match(source)))


def check_sources(*sources: str | None) -> None:
    """A DataError for the first of `sources` (None: not used) that names a local file that is not there: what a
    stage checks before it loads a model, which can take minutes, only to find its data missing."""
    for source in sources:
        if source and _missing_file(source):
            raise DataError(source, None, None, "no such file")


@dataclass
class _Malformed:
    message: str
    field: str | None = None


T = TypeVar("T")


def _parsed(source: str, parse: Callable[[str, int, Any], T], skip_bad: bool, skipped: list[int],
            streaming: bool = False) -> Iterator[T]:
    """The source's records through `parse`, lazily; a bad one raises DataError or, with `skip_bad`, counts in
    skipped[0]."""
    for file, line, row in iter_rows(source, streaming):
        try:
            if isinstance(row, _Malformed):
                raise DataError(file, line, row.field, row.message)
            if not isinstance(row, dict):
                raise DataError(file, line, None, f"expected a JSON object, got {type(row).__name__}")
            item = parse(file, line, row)
        except DataError:
            if not skip_bad:
                raise
            skipped[0] += 1
            continue
        yield item


def _load(source: str, parse: Callable[[str, int, Any], T], skip_bad: bool) -> Loaded:
    skipped = [0]
    out = list(_parsed(source, parse, skip_bad, skipped))
    if not out:
        raise DataError(source, None, None,
                        "no usable records" + (f" ({skipped[0]} bad lines skipped)" if skipped[0] else ""))
    return Loaded(out, skipped[0])


# --------------------------------------------------------------------------------------------------------------------
# Field helpers


def _str(file: str, line: int, row: dict, key: str, *, nonempty: bool = True, prefix: str = "") -> str:
    if key not in row or row[key] is None:
        raise DataError(file, line, prefix + key, "missing")
    v = row[key]
    if not isinstance(v, str):
        raise DataError(file, line, prefix + key, f"expected a string, got {type(v).__name__}")
    if nonempty and not v.strip():
        raise DataError(file, line, prefix + key, "empty")
    return v


# ShareGPT's speaker names ({"conversations": [{"from", "value"}]}, the layout of many open SFT sets) -> our roles
SHAREGPT_ROLES = MappingProxyType({"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                                   "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"})


def _conversation_key(row: dict) -> str:
    """Where a row keeps its conversation: "messages", or ShareGPT's "conversations" when only that is there."""
    return "conversations" if "messages" not in row and "conversations" in row else "messages"


def _messages(file: str, line: int, row: dict, key: str = "messages") -> list[dict[str, str]]:
    """row[key] as [{"role", "content"}] messages; for "messages" missing, ShareGPT's {"conversations": [{"from",
    "value"}]}."""
    role_key, text_key, roles = "role", "content", {r: r for r in ROLES}
    if key == "messages" and _conversation_key(row) == "conversations":
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    msgs = row.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(file, line, key, f"expected a nonempty list of {{'{role_key}', '{text_key}'}} objects")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(file, line, f"{key}[{j}]", f"expected an object with '{role_key}' and '{text_key}'")
        role = roles.get(m.get(role_key)) if isinstance(m.get(role_key), str) else None
        if role is None:
            raise DataError(file, line, f"{key}[{j}].{role_key}",
                            f"expected one of {tuple(roles)}, got {m.get(role_key)!r}")
        content = _str(file, line, m, text_key, nonempty=role != "system", prefix=f"{key}[{j}].")
        out.append({"role": role, "content": content})
    return out


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _prompt_messages(file: str, line: int, row: dict) -> list[dict[str, str]]:
    """The prompt as messages, from "prompt" or "messages" (or ShareGPT's "conversations")."""
    key = _conversation_key(row)
    if row.get(key) is not None:
        msgs = _messages(file, line, row)
        if msgs[-1]["role"] == "assistant":
            raise DataError(file, line, key, "a prompt must not end with an assistant turn")
        return msgs
    if "prompt" not in row:
        raise DataError(file, line, "prompt", "missing (give 'prompt' or 'messages')")
    return _user(_str(file, line, row, "prompt"))


# --------------------------------------------------------------------------------------------------------------------
# Demonstrations: {"prompt", "response"} | {"messages"} | ShareGPT {"conversations"} |
# Alpaca {"instruction", "input"?, "output"}


def _alpaca_input(file: str, line: int, row: dict) -> str | None:
    inp = row.get("input")
    if inp is not None and not isinstance(inp, str):
        raise DataError(file, line, "input", f"expected a string, got {type(inp).__name__}")
    return inp


def alpaca_prompt(instruction: str, inp: str | None) -> str:
    """Alpaca's instruction plus optional input, joined as one user turn."""
    return instruction if not inp or not inp.strip() else f"{instruction}\n\n{inp}"


def parse_demonstration(file: str, line: int, row: dict) -> Demonstration:
    if "messages" in row or "conversations" in row:
        msgs = _messages(file, line, row)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(file, line, _conversation_key(row), "no assistant turn to learn from")
        return Demonstration(msgs, file, line)
    if "instruction" in row:
        instruction = _str(file, line, row, "instruction")
        inp = _alpaca_input(file, line, row)
        output = _str(file, line, row, "output")
        return Demonstration(_user(alpaca_prompt(instruction, inp)) + [{"role": "assistant", "content": output}],
                             file, line)
    if "prompt" in row or "response" in row:
        # {"prompt", "response"}; TRL's prompt-completion rows and the TL;DR SFT data's "label" name it differently
        key = next((k for k in ("response", "completion", "label") if k in row), "response")
        prompt = _str(file, line, row, "prompt")
        response = _str(file, line, row, key)
        return Demonstration(_user(prompt) + [{"role": "assistant", "content": response}], file, line)
    if isinstance(row.get("chosen"), str) and "Assistant:" in row["chosen"]:
        # an Anthropic HH-RLHF row: its chosen conversation is the demonstration (as in the usual HH SFT recipes)
        msgs = hh_messages(row["chosen"])
        if not msgs or msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
            raise DataError(file, line, "chosen", "transcript does not end with a non-empty Assistant turn")
        return Demonstration(msgs, file, line)
    raise DataError(file, line, None, "not a demonstration: expected 'prompt'+'response' (or 'completion'/'label'), "
                                      "'messages' (or ShareGPT 'conversations'), 'instruction'+'output', or an "
                                      "HH-RLHF 'chosen' transcript")


def load_demonstrations(source: str, skip_bad: bool = False) -> Loaded:
    return _load(source, parse_demonstration, skip_bad)


# --------------------------------------------------------------------------------------------------------------------
# Prompts: {"prompt"} | {"messages"}


def parse_prompt(file: str, line: int, row: dict) -> PromptRecord:
    if "instruction" in row and "prompt" not in row and "messages" not in row:
        instruction = _str(file, line, row, "instruction")
        return PromptRecord(_user(alpaca_prompt(instruction, _alpaca_input(file, line, row))), file, line)
    if "prompt" not in row and "messages" not in row and isinstance(row.get("chosen"), str):
        # an Anthropic HH-RLHF row: the conversation up to its last Assistant turn is the prompt
        msgs = hh_messages(row["chosen"])
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise DataError(file, line, "chosen", "not an HH-RLHF transcript ending with an Assistant turn")
        if msgs[-2]["role"] == "assistant":
            raise DataError(file, line, "chosen", "a prompt must not end with an assistant turn (two Assistant turns "
                                                  "in a row before the last)")
        return PromptRecord(msgs[:-1], file, line)
    if "info" in row and "prompt" not in row and "messages" not in row:
        return PromptRecord(_user(tldr_prompt(_tldr_info(file, line, row))), file, line)  # summarize-from-feedback
    return PromptRecord(_prompt_messages(file, line, row), file, line)


def load_prompts(source: str, skip_bad: bool = False) -> Loaded:
    return _load(source, parse_prompt, skip_bad)


# --------------------------------------------------------------------------------------------------------------------
# Pretraining text: {"text"} or .txt files


def parse_text(file: str, line: int, row: dict) -> str:
    return _str(file, line, row, "text")


def load_pretrain_text(source: str, skip_bad: bool = False) -> Loaded:
    return _load(source, parse_text, skip_bad)


def iter_pretrain_text(source: str, skip_bad: bool = False, streaming: bool = False) -> Iterator[str]:
    """The documents of `source`, read as they are consumed (for a reader that needs only the first tokens). Blank
    documents are passed over (WikiText's test split is a third blank lines): joined into a token stream they would
    add nothing but an EOS."""
    return (t for t in _parsed(source, _document, skip_bad, [0], streaming) if t.strip())


def _document(file: str, line: int, row: dict) -> str:
    return _str(file, line, row, "text", nonempty=False)


# --------------------------------------------------------------------------------------------------------------------
# Comparisons: rankings, pairs, Anthropic HH-RLHF, OpenAI summarize-from-feedback


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def hh_messages(transcript: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(transcript)
    msgs = []
    # parts = [preamble, role, text, role, text, ...]
    for role, text in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    return msgs


def tldr_prompt(info: dict) -> str:
    """The summarize-from-feedback prompt, laid out as in the OpenAI TL;DR data (Stiennon et al., 2020)."""
    body = info.get("post") or info.get("article") or ""
    head = []
    if info.get("subreddit"):
        head.append(f"SUBREDDIT: r/{info['subreddit']}")
    if info.get("title"):
        head.append(f"TITLE: {info['title']}")
    return "\n".join(head + [f"POST: {body}" if "post" in info else f"ARTICLE: {body}", "TL;DR:"])


def _tldr_info(file: str, line: int, row: dict) -> dict:
    """row["info"], checked: an object with a nonempty 'post' or 'article' string, and string 'subreddit'/'title'."""
    info = row.get("info")
    if not isinstance(info, dict):
        raise DataError(file, line, "info", "expected an object with 'post' or 'article'")
    body = info.get("post") or info.get("article")
    if not isinstance(body, str) or not body.strip():
        raise DataError(file, line, "info.post", "missing (summarize-from-feedback needs 'post' or 'article')")
    for key in ("subreddit", "title"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise DataError(file, line, f"info.{key}", f"expected a string, got {type(info[key]).__name__}")
    return info


def parse_comparison(file: str, line: int, row: dict) -> Ranking:
    if "responses" in row or "ranks" in row:
        return _parse_ranking(file, line, row)
    if "summaries" in row:
        info = _tldr_info(file, line, row)
        s = row["summaries"]
        if not isinstance(s, list) or len(s) != 2:
            raise DataError(file, line, "summaries", "expected a list of two {'text': ...} objects")
        texts = []
        for j, item in enumerate(s):
            if not isinstance(item, dict):
                raise DataError(file, line, f"summaries[{j}]", "expected an object with 'text'")
            texts.append(_str(file, line, item, "text", prefix=f"summaries[{j}]."))
        choice = row.get("choice")
        if isinstance(choice, float) and choice.is_integer():  # a float column (Parquet, pandas): 1.0
            choice = int(choice)
        if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
            raise DataError(file, line, "choice", f"expected 0 or 1, got {choice!r}")
        chosen, rejected = texts[choice], texts[1 - choice]
        return Ranking(_user(tldr_prompt(info)), [chosen, rejected], [1, 2], file=file, line=line)
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        return _conversational_pair(file, line, row)
    if "chosen" in row and "rejected" in row:
        chosen = _str(file, line, row, "chosen")
        rejected = _str(file, line, row, "rejected")
        if "prompt" in row or "messages" in row:
            return Ranking(_prompt_messages(file, line, row), [chosen, rejected], [1, 2], file=file, line=line)
        # Anthropic HH-RLHF: whole transcripts; the prompt is the shared prefix up to the last "Assistant:".
        cut_c = chosen.rfind("\n\nAssistant:")
        cut_r = rejected.rfind("\n\nAssistant:")
        if cut_c < 0 or cut_r < 0:
            raise DataError(file, line, "chosen" if cut_c < 0 else "rejected",
                            "no '\\n\\nAssistant:' turn (an HH-RLHF transcript, or give 'prompt')")
        if chosen[:cut_c] != rejected[:cut_r]:
            raise DataError(file, line, "rejected", "chosen and rejected transcripts do not share the prompt")
        prompt = hh_messages(chosen[:cut_c])
        if not prompt:
            raise DataError(file, line, "chosen", "empty prompt before the last 'Assistant:'")
        resp_c = chosen[cut_c + len("\n\nAssistant:"):].strip()
        resp_r = rejected[cut_r + len("\n\nAssistant:"):].strip()
        for name, r in (("chosen", resp_c), ("rejected", resp_r)):
            if not r:
                raise DataError(file, line, name, "empty response after the last 'Assistant:'")
        return Ranking(prompt, [resp_c, resp_r], [1, 2], file=file, line=line)
    raise DataError(file, line, None, "not a comparison: expected 'responses'+'ranks', 'chosen'+'rejected', "
                                      "or 'summaries'+'choice'")


def _conversational_pair(file: str, line: int, row: dict) -> Ranking:
    """TRL's conversational preference rows: "chosen" and "rejected" as message lists ending with the assistant's reply,
    either whole conversations (the prompt is the turns they share before it: UltraFeedback-binarized, whose string
    "prompt" is its first user turn, then ignored) or, with "prompt" given as messages or a string, the reply alone."""
    convs = [_messages(file, line, row, key) for key in ("chosen", "rejected")]
    if row.get("prompt") is not None and any(all(m["role"] == "assistant" for m in c) for c in convs):
        prompt = _messages(file, line, row, "prompt") if isinstance(row["prompt"], list) else \
            _user(_str(file, line, row, "prompt"))
        convs = [prompt + c if all(m["role"] == "assistant" for m in c) else c for c in convs]
    for key, c in zip(("chosen", "rejected"), convs):
        if c[-1]["role"] != "assistant":
            raise DataError(file, line, key, "the conversation must end with the assistant's reply")
    if convs[0][:-1] != convs[1][:-1]:
        raise DataError(file, line, "rejected", "chosen and rejected differ before their last (assistant) turn")
    if not convs[0][:-1]:
        raise DataError(file, line, "chosen", "no prompt: give the user's turn in the conversation or as 'prompt'")
    return Ranking(convs[0][:-1], [convs[0][-1]["content"], convs[1][-1]["content"]], [1, 2], file=file, line=line)


def _parse_ranking(file: str, line: int, row: dict) -> Ranking:
    prompt = _prompt_messages(file, line, row)
    responses, ranks = row.get("responses"), row.get("ranks")
    if not isinstance(responses, list):
        raise DataError(file, line, "responses", "expected a list of strings")
    if not isinstance(ranks, list):
        raise DataError(file, line, "ranks", "expected a list of integers")
    k = len(responses)
    if k < 2:
        raise DataError(file, line, "responses", f"need at least 2 responses to compare, got {k}")
    if k > MAX_RANKED:
        raise DataError(file, line, "responses", f"at most {MAX_RANKED} responses per prompt, got {k}")
    if len(ranks) != k:
        raise DataError(file, line, "ranks", f"{len(ranks)} ranks for {k} responses")
    for j, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(file, line, f"responses[{j}]", f"expected a string, got {type(r).__name__}")
        if not r.strip():
            raise DataError(file, line, f"responses[{j}]", "empty response")
    for j, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int):
            if isinstance(r, float) and r.is_integer():
                ranks[j] = int(r)
            else:
                raise DataError(file, line, f"ranks[{j}]", f"expected an integer rank, got {r!r}")
        if ranks[j] < 1:
            raise DataError(file, line, f"ranks[{j}]", f"ranks start at 1 (best), got {ranks[j]}")
        if ranks[j] > k:  # ties or not, the worst of K responses ranks K at most
            raise DataError(file, line, f"ranks[{j}]", f"ranks run 1..{k} for {k} responses, got {ranks[j]}")
    if len(set(ranks)) == 1:
        raise DataError(file, line, "ranks", "every response is tied: nothing to learn")
    ratings = row.get("ratings")
    if ratings is not None:
        if not isinstance(ratings, list) or len(ratings) != k:
            raise DataError(file, line, "ratings", f"expected {k} integer ratings 1..7")
        for j, r in enumerate(ratings):
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 7:
                raise DataError(file, line, f"ratings[{j}]", f"expected an integer 1..7, got {r!r}")
    flags = row.get("flags")
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != k:
            raise DataError(file, line, "flags", f"expected {k} lists of strings")
        for j, fl in enumerate(flags):
            if not isinstance(fl, list) or not all(isinstance(x, str) for x in fl):
                raise DataError(file, line, f"flags[{j}]", "expected a list of strings")
    labeler = row.get("labeler")
    if labeler is not None and not isinstance(labeler, str):
        raise DataError(file, line, "labeler", f"expected a string, got {type(labeler).__name__}")
    return Ranking(prompt, list(responses), [int(r) for r in ranks], ratings, flags, labeler, file, line)


def load_comparisons(source: str, skip_bad: bool = False) -> Loaded:
    return _load(source, parse_comparison, skip_bad)


def ranking_to_json(r: Ranking) -> dict:
    """The rankings JSONL schema (what `instructgpt rm` reads)."""
    d: dict[str, Any] = {}
    if len(r.messages) == 1 and r.messages[0]["role"] == "user":
        d["prompt"] = r.messages[0]["content"]
    else:
        d["messages"] = r.messages
    d["responses"], d["ranks"] = r.responses, r.ranks
    if r.ratings is not None:
        d["ratings"] = r.ratings
    if r.flags is not None:
        d["flags"] = r.flags
    if r.labeler is not None:
        d["labeler"] = r.labeler
    return d
