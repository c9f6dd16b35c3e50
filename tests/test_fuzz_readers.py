"""Property-based fuzzing of every reader: whatever bytes a data, prompts, config, recipe or API-key file holds, its
reader returns well-formed records or raises its own error naming the file (and for a record the line and the field):
DataError, ConfigError, KeySourceError. Any other exception (KeyError, TypeError, UnicodeDecodeError, RecursionError,
a yaml or pyarrow error) is a bug in the reader.

Examples are derandomized, so every run (and CI) tries the same inputs; a failure prints the input that causes it.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import fields

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from instructgpt.config import ConfigError, flatten, load_config, parse_overrides, to_dict
from instructgpt.data import (MAX_RANKED, ROLES, DataError, Demonstration, PromptRecord, Ranking, iter_pretrain_text,
                              load_comparisons, load_demonstrations, load_pretrain_text, load_prompts)
from instructgpt.dpo import DPOConfig
from instructgpt.evaluate import EvalConfig
from instructgpt.label_sim import LabelSimConfig
from instructgpt.labeling.formats import import_prompts, read_prompts
from instructgpt.labeling.store import Store
from instructgpt.pipeline import RecipeConfig, load_recipe
from instructgpt.ppo_config import PPOConfig
from instructgpt.rm import RMConfig
from instructgpt.serving.security import ENV_KEYS, KeySourceError, load_api_keys
from instructgpt.sft import SFTConfig

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                       HealthCheck.filter_too_much])
FEW = settings(FUZZ, max_examples=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz"))


def write(workdir: str, name: str, content: bytes) -> str:
    path = os.path.join(workdir, name)
    with open(path, "wb") as fh:
        fh.write(content)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Rows: a valid row of one of the accepted schemas, half of them broken in one to three places: a value replaced by
# anything, a key or list element removed or repeated, a stray key added. Reaching each check takes a row that passes
# every check before it, which arbitrary JSON almost never does.

ANY_CHAR = st.characters(exclude_categories=())  # every code point, lone surrogates included
# json.dumps writes a lone surrogate as a "\ud800" escape, which json.loads reads back as one
SPECIAL = ["hi", "", " ", "\n", "user", "assistant", "system", "human", "gpt", "bot", "\ufeff", "\ud800", "\udfff",
           "a\r\nb", "\x00", "x" * 300, "\n\nHuman: q\n\nAssistant: a", "\n\nAssistant:", "\n\nAssistant: x",
           "\n\nHuman: \n\nAssistant: \n\nAssistant: b", "Assistant:", "\u2028", "NaN"]
strings = st.one_of(st.sampled_from(SPECIAL), st.text(ANY_CHAR, max_size=10))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.integers(),
                    st.sampled_from([2 ** 63, -2 ** 63 - 1, 10 ** 300, 1.0, 2.0, 0.0, -0.0, 1e308, 1.5]), st.floats(),
                    strings)
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(strings, kids, max_size=3)), max_leaves=6)
words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Z")), min_size=1, max_size=8)
texts = st.one_of(words, words.map(lambda w: f" {w}\n"))  # valid rows hold nonempty strings; `broken` adds others
ROLE_NAMES = list(ROLES) + ["human", "gpt", "bot", "USER", ""]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}
FLAG_IDS = ["harmful", "hallucination", "", "x"]


@st.composite
def conversation(draw, end: str = "assistant", sharegpt: bool = False) -> list[dict]:
    turns = [("system", draw(texts))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns += [("user", draw(texts)), ("assistant", draw(texts))]
    if end == "user":
        turns.pop()
    if sharegpt:
        return [{"from": SHAREGPT[r], "value": t} for r, t in turns]
    return [{"role": r, "content": t} for r, t in turns]


@st.composite
def hh_transcripts(draw, n: int = 1) -> list[str]:
    """`n` HH-RLHF transcripts that share their prompt and differ in the last Assistant turn."""
    prompt = "".join(f"\n\nHuman: {draw(texts)}\n\nAssistant: {draw(texts)}" for _ in range(draw(st.integers(0, 2))))
    prompt += f"\n\nHuman: {draw(texts)}"
    return [f"{prompt}\n\nAssistant: {draw(texts)}" for _ in range(n)]


@st.composite
def ranking(draw, k: int | None = None) -> dict:
    """A valid K-way ranking: K = 2..9 responses (now and then the same text twice), ranks 1..K not all tied, ratings
    1..7, flags."""
    k = draw(st.integers(2, MAX_RANKED)) if k is None else k
    row = {"prompt": draw(texts)} if draw(st.booleans()) else {"messages": draw(conversation(end="user"))}
    row["responses"] = draw(st.lists(texts, min_size=k, max_size=k))
    if k > 1 and draw(st.integers(0, 4)) == 0:
        row["responses"][-1] = row["responses"][0]  # the same text twice: allowed, as sampling gives it
    ranks = draw(st.lists(st.integers(1, max(k, 1)), min_size=k, max_size=k))
    if k > 1 and len(set(ranks)) == 1:
        ranks[draw(st.integers(0, k - 1))] = 2 if ranks[0] == 1 else 1
    row["ranks"] = ranks
    if draw(st.booleans()):
        row["ratings"] = draw(st.lists(st.integers(1, 7), min_size=k, max_size=k))
    if draw(st.booleans()):
        row["flags"] = draw(st.lists(st.lists(st.sampled_from(FLAG_IDS), max_size=2), min_size=k, max_size=k))
    if draw(st.booleans()):
        row["labeler"] = draw(texts)
    return row


@st.composite
def conversational_pair(draw) -> dict:
    prefix = draw(conversation(end="user"))
    row = {"chosen": prefix + [{"role": "assistant", "content": draw(texts)}],
           "rejected": prefix + [{"role": "assistant", "content": draw(texts)}]}
    if draw(st.booleans()):  # TRL's split layout: the prompt apart, the replies alone
        row = {"prompt": prefix, "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
    return row


VALID_ROWS = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "response": texts}),
    st.fixed_dictionaries({"prompt": texts, "completion": texts}),
    st.fixed_dictionaries({"prompt": texts, "label": texts}),
    st.fixed_dictionaries({"messages": conversation()}),
    st.fixed_dictionaries({"conversations": conversation(sharegpt=True)}),
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": texts}),
    st.fixed_dictionaries({"instruction": texts}, optional={"input": texts}),
    hh_transcripts(1).map(lambda t: {"chosen": t[0]}),
    hh_transcripts(2).map(lambda t: {"chosen": t[0], "rejected": t[1]}),
    st.fixed_dictionaries({"prompt": texts}), st.fixed_dictionaries({"messages": conversation(end="user")}),
    st.fixed_dictionaries({"conversations": conversation(end="user", sharegpt=True)}),
    st.fixed_dictionaries({"prompt": texts, "chosen": texts, "rejected": texts}), conversational_pair(),
    st.fixed_dictionaries({"info": st.fixed_dictionaries({"post": texts},
                                                         optional={"title": texts, "subreddit": texts}),
                           "summaries": st.lists(st.fixed_dictionaries({"text": texts}), min_size=2, max_size=2),
                           "choice": st.sampled_from([0, 1])}),
    st.fixed_dictionaries({"info": st.fixed_dictionaries({"article": texts}, optional={"title": texts})}),
    ranking(), st.fixed_dictionaries({"text": texts}),
)
STRAY_KEYS = ["prompt", "response", "messages", "conversations", "instruction", "input", "output", "chosen",
              "rejected", "info", "summaries", "choice", "responses", "ranks", "ratings", "flags", "labeler", "text",
              "role", "content", "from", "value", "post", "title"]


def spots(row) -> list[tuple[object, object]]:
    """Every (container, key or index) inside a row, nested ones too."""
    out, stack = [], [row]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node))
        for k in keys:
            out.append((node, k))
            if isinstance(node[k], (dict, list)):
                stack.append(node[k])
    return out


@st.composite
def broken(draw, row: dict) -> dict:
    """`row` broken in one to three places."""
    row = json.loads(json.dumps(row))  # a copy
    for _ in range(draw(st.integers(1, 3))):
        where = spots(row)
        op = draw(st.sampled_from(["replace", "replace", "replace", "remove", "repeat", "stray"]))
        if op == "stray" or not where:
            node = draw(st.sampled_from([row] + [c[k] for c, k in where if isinstance(c[k], dict)]))
            node[draw(st.sampled_from(STRAY_KEYS))] = draw(values)
            continue
        node, key = draw(st.sampled_from(where))
        if op == "replace":
            node[key] = draw(values)
        elif op == "remove":
            del node[key]
        elif isinstance(node, list):
            node.insert(key, node[key])
    return row


@st.composite
def rows(draw, valid=VALID_ROWS):
    if draw(st.integers(0, 19)) == 0:
        return draw(values)  # not an object at all
    row = draw(valid)
    return draw(broken(row)) if draw(st.booleans()) else row


# Whole lines no json.dumps writes: malformed JSON, nesting deeper than the parser's recursion limit, a number too
# long for int(), JSON's non-standard constants, a BOM, escapes of lone surrogates
RAW_LINES = ["{", "}", "[", "null", "1", '"s"', "[]", "{}", "NaN", "-Infinity", "[" * 100_000, "{\"a\":" * 50_000,
             '{"prompt": ' + "9" * 5000 + "}", '{"text": ' + "1" * 5000 + "}", "\ufeff{\"text\": \"x\"}",
             '{"text": "\\ud800"}', '{"prompt": "a\\udc00b", "response": "r"}', '{"text": "\\ud83d\\ude00"}',
             '{"prompt": "p", "response": "r", "prompt": 3}', '{"text": "x"} trailing', "\x00", "\u2028"]
BAD_BYTES = [b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00", b"\r", b"\n"]


def encode(text: str, draw) -> bytes:
    """UTF-8, or with lone surrogates written as the three bytes a lax encoder writes (not UTF-8)."""
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text.encode("utf-8", "replace")


@st.composite
def mutated(draw, content: bytes) -> bytes:
    """A BOM in front, a byte that is not UTF-8 somewhere, or the file cut short."""
    if draw(st.integers(0, 5)) == 0:
        content = b"\xef\xbb\xbf" + content
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(content)))
        content = content[:at] + draw(st.sampled_from(BAD_BYTES)) + content[at:]
    if draw(st.integers(0, 9)) == 0:
        content = content[:draw(st.integers(0, len(content)))]
    return content


@st.composite
def data_files(draw, row_strategy=rows(), exts=(".jsonl", ".jsonl", ".jsonl", ".json", ".json", ".txt")):
    """(extension, bytes): rows as a .jsonl/.json file, text as a .txt file, or arbitrary bytes; one file in four
    with a BOM, a byte that is not UTF-8, or cut short."""
    ext = draw(st.sampled_from(exts))
    if draw(st.integers(0, 15)) == 0:
        return ext, draw(st.binary(min_size=1, max_size=200))  # mostly not JSON
    if ext == ".txt":
        return ext, draw(mutated(encode(draw(st.text(ANY_CHAR, max_size=40)), draw)))
    items = draw(st.lists(row_strategy, min_size=1, max_size=3))
    ascii_only = draw(st.booleans())
    dumped = [json.dumps(r, ensure_ascii=ascii_only) for r in items]
    if ext == ".json":
        shape = draw(st.sampled_from(["list"] * 6 + ["data", "data", "object"]))
        text = {"list": lambda: "[" + ",\n".join(dumped) + "]", "data": lambda: '{"data": [' + ", ".join(dumped) + "]}",
                "object": lambda: dumped[0] if dumped else draw(st.sampled_from(RAW_LINES))}[shape]()
    else:
        raw = draw(st.lists(st.sampled_from(RAW_LINES + ["", "   "]), max_size=1)) if draw(st.integers(0, 3)) == 0 \
            else []
        lines = draw(st.permutations(dumped + raw))
        text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))
    content = encode(text, draw)
    return ext, draw(mutated(content)) if draw(st.integers(0, 3)) == 0 else content


# --------------------------------------------------------------------------------------------------------------------
# What a reader may give back


def utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_messages(msgs) -> None:
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert set(m) == {"role", "content"} and m["role"] in ROLES
        assert isinstance(m["content"], str) and utf8(m["content"])


def check_record(rec) -> None:
    if isinstance(rec, str):  # pretraining text
        assert utf8(rec)
    elif isinstance(rec, Demonstration):
        check_messages(rec.messages)
        assert any(m["role"] == "assistant" for m in rec.messages)
    elif isinstance(rec, PromptRecord):
        check_messages(rec.messages)
        assert rec.messages[-1]["role"] != "assistant"
    else:
        assert isinstance(rec, Ranking)
        check_messages(rec.messages)
        k = rec.k
        assert 2 <= k <= MAX_RANKED and len(rec.ranks) == k
        assert all(isinstance(r, str) and r.strip() and utf8(r) for r in rec.responses)
        assert all(type(r) is int and 1 <= r <= k for r in rec.ranks) and len(set(rec.ranks)) > 1
        assert rec.ratings is None or (len(rec.ratings) == k and all(type(r) is int and 1 <= r <= 7
                                                                      for r in rec.ratings))
        assert rec.flags is None or (len(rec.flags) == k and all(isinstance(x, str) and utf8(x)
                                                                  for fl in rec.flags for x in fl))
        assert rec.labeler is None or (isinstance(rec.labeler, str) and utf8(rec.labeler))


def check_data_error(e: DataError, path: str, content: bytes) -> None:
    assert e.file == path and str(e).startswith(path) and utf8(str(e))  # printable wherever it is shown
    if e.line is not None:
        assert type(e.line) is int and e.line >= 1
        if path.endswith(".jsonl"):  # a line of the file (a .json file's "line" is the record number)
            assert e.line <= content.count(b"\n") + 1
        assert f", line {e.line}" in str(e)
    assert e.field is None or (isinstance(e.field, str) and f"field '{e.field}'" in str(e))


def read(load, path: str, content: bytes, **kw) -> list | None:
    """The reader's records, checked; None when it raised DataError (checked). Anything else propagates."""
    try:
        recs = list(load(path, **kw))
    except DataError as e:
        check_data_error(e, path, content)
        return None
    for rec in recs:
        check_record(rec)
    return recs


LOADERS = (load_demonstrations, load_prompts, load_comparisons, load_pretrain_text)


def read_with_every_loader(path: str, content: bytes) -> None:
    for load in LOADERS:
        strict = read(load, path, content)
        lenient = read(load, path, content, skip_bad=True)
        if strict is not None:
            assert lenient == strict  # nothing to skip
    read(iter_pretrain_text, path, content)
    read(iter_pretrain_text, path, content, skip_bad=True)


# --------------------------------------------------------------------------------------------------------------------
# 1. Data files of every format, through every loader


@FUZZ
@given(file=data_files())
# nesting deeper than json's recursion limit
@example(file=(".jsonl", b"[" * 100_000 + b"\n"))
@example(file=(".json", b'{"data": ' * 100_000))
# a number too long for int()
@example(file=(".jsonl", b'{"text": ' + b"1" * 5000 + b"}\n"))
@example(file=(".json", b"[" + b"7" * 5000 + b"]"))
# an escaped lone surrogate: valid JSON, but not text that UTF-8 (a tokenizer, the labeling store) can hold
@example(file=(".jsonl", b'{"prompt": "\\ud800", "response": "r"}\n'))
@example(file=(".json", b'[{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                        b'"content": "a\\udfffb"}]}]'))
# a UTF-8 byte order mark, as Windows editors write
@example(file=(".jsonl", b'\xef\xbb\xbf{"text": "x"}\r\n'))
@example(file=(".json", b'\xef\xbb\xbf[{"text": "x"}]'))
# an Alpaca "input" that is not a string
@example(file=(".jsonl", b'{"instruction": "do", "input": 3}\n'))
@example(file=(".jsonl", b'{"instruction": "do", "input": ["a"]}\n'))
# a summarize-from-feedback "info" that is not an object of strings
@example(file=(".jsonl", b'{"info": "a post"}\n'))
@example(file=(".jsonl", b'{"info": {"post": ["p"]}}\n'))
@example(file=(".jsonl", b'{"info": {"post": "p", "title": {"t": 1}}}\n'))
# a summarize-from-feedback choice written as a float
@example(file=(".jsonl", b'{"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 1.0}\n'))
# an HH-RLHF prompt whose transcript has two Assistant turns in a row: no user turn ends the prompt
@example(file=(".jsonl", b'{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a\\n\\nAssistant: b"}\n'))
def test_data_files_give_records_or_a_data_error(workdir, file):
    ext, content = file
    read_with_every_loader(write(workdir, "data" + ext, content), content)


PARQUET_COLUMNS = {
    "string": (pa.string(), st.none() | st.text(max_size=8) | st.sampled_from(["", " ", "hi", "\n\nAssistant: a"])),
    "int": (pa.int64(), st.none() | st.integers(-2 ** 63, 2 ** 63 - 1) | st.integers(-1, 10)),
    "float": (pa.float64(), st.none() | st.floats()),
    "bool": (pa.bool_(), st.none() | st.booleans()),
    "binary": (pa.binary(), st.none() | st.binary(max_size=4)),
    "list_string": (pa.list_(pa.string()), st.none() | st.lists(st.none() | st.text(max_size=4), max_size=10)),
    "list_int": (pa.list_(pa.int64()), st.none() | st.lists(st.none() | st.integers(-1, 10), max_size=10)),
    "messages": (pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
                 st.none() | st.lists(st.fixed_dictionaries({"role": st.none() | st.sampled_from(ROLE_NAMES),
                                                             "content": st.none() | st.text(max_size=4)}),
                                      max_size=3)),
    "info": (pa.struct([("post", pa.string()), ("title", pa.string())]),
             st.none() | st.fixed_dictionaries({"post": st.none() | st.text(max_size=4),
                                                "title": st.none() | st.text(max_size=4)})),
    "null": (pa.null(), st.none()),
}


@st.composite
def parquet_files(draw) -> bytes:
    """Rows as a Parquet table (Arrow infers the types), or columns of the readers' names each of some Arrow type;
    sometimes cut short or not Parquet at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=100))
    buf = io.BytesIO()
    if draw(st.booleans()):
        try:
            pq.write_table(pa.Table.from_pylist(draw(st.lists(rows().filter(lambda r: isinstance(r, dict)),
                                                              min_size=1, max_size=3))), buf)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            buf = io.BytesIO()  # rows Arrow cannot hold (mixed types, lone surrogates, an empty object): columns
    if not buf.getvalue():
        n = draw(st.integers(0, 3))
        columns = {}
        for name in draw(st.lists(st.sampled_from(STRAY_KEYS), unique=True, max_size=4)):
            tp, items = PARQUET_COLUMNS[draw(st.sampled_from(sorted(PARQUET_COLUMNS)))]
            columns[name] = pa.array(draw(st.lists(items, min_size=n, max_size=n)), type=tp)
        pq.write_table(pa.table(columns) if columns else pa.table({"empty": pa.array([None] * n, pa.null())}), buf)
    content = buf.getvalue()
    if draw(st.integers(0, 9)) == 0:
        content = content[:draw(st.integers(0, len(content)))]
    return content


@FEW
@given(content=parquet_files())
@example(content=b"PAR1 not a parquet file")  # pyarrow's own errors
@example(content=b"")
def test_parquet_files_give_records_or_a_data_error(workdir, content):
    read_with_every_loader(write(workdir, "data.parquet", content), content)


# --------------------------------------------------------------------------------------------------------------------
# 2. K-way rankings


# K = 2..9, or a K out of range (0, 1, 10, 12); broken as any row is
ranking_rows = rows(st.integers(0, 7).flatmap(
    lambda i: ranking() if i else st.sampled_from([0, 1, MAX_RANKED + 1, MAX_RANKED + 3]).flatmap(ranking)))


@FUZZ
@given(file=data_files(ranking_rows, exts=(".jsonl", ".jsonl", ".json")))
# ranks beyond K: with K responses the worst rank (ties counted or not) is K
@example(file=(".jsonl", b'{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 3]}\n'))
@example(file=(".jsonl", b'{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 18446744073709551616]}\n'))
@example(file=(".jsonl", b'{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1e300]}\n'))
# a response, flag or labeler with an escaped lone surrogate
@example(file=(".jsonl", b'{"prompt": "p", "responses": ["a", "\\udc00"], "ranks": [1, 2]}\n'))
@example(file=(".jsonl", b'{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2], "flags": [["\\ud800"], []]}\n'))
def test_rankings_give_records_or_a_data_error(workdir, file):
    ext, content = file
    path = write(workdir, "rankings" + ext, content)
    strict = read(load_comparisons, path, content)
    lenient = read(load_comparisons, path, content, skip_bad=True)
    if strict is not None:
        assert lenient == strict


# --------------------------------------------------------------------------------------------------------------------
# 3. Stage configs and pipeline recipes: YAML files and dotted overrides

def dotted_keys(cls, under: str = "") -> set[str]:
    """Every key of a config class, as dotted paths, with every section on the way (model, model.lora, ...)."""
    out = set()
    for leaf in flatten(to_dict(cls())):
        parts = leaf.split(".")
        out |= {under + ".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


SFT_KEYS = sorted(dotted_keys(SFTConfig))
WEIRD_KEYS = ["", ".", "..", "a..b", "train.", ".train", "train.lr.x", "model.lora.r.deeper", "_stage", "Train.LR",
              "ünï", "1", "null", "train.max_steps ", " seed", "a=b", "[x]", "&a", "!!python/object:os.system"]
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 300), st.integers(),
                         st.sampled_from([10 ** 400, -10 ** 400, 0.5, 1e-3, 1e308]), st.floats(), st.text(max_size=8),
                         st.sampled_from(["no", "on", "bf16", "1e-3", "builtin:base", "puzzles", "assistant", "rloo",
                                          "gae", "x.gguf", "sft", "gold_score.base"]))
yaml_values = st.recursive(yaml_scalars, lambda kids: st.lists(kids, max_size=3) |
                           st.dictionaries(st.text(max_size=4) | st.sampled_from(["min", "max", "train", "data"]), kids,
                                           max_size=3), max_leaves=5)
# YAML the fuzzer's dumped mappings never hold: tags safe_load refuses or builds odd types from, aliases (one that
# contains itself), documents, tabs, and text yaml cannot read
YAML_FRAGMENTS = ["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGk=",
                  "!!set {a, b}", "!!timestamp 2001-12-14", "!!float nan", "!!int 0x1f", "!!str", "!custom x",
                  "!!timestamp x", "!!timestamp 2001-13-45", "!!bool maybe", "!!int x", "!!int 0b", "!!float x",
                  "&a [*a]", "&b {k: *b}", "*undefined", "&c [1, 2]", "{? [1]: 2}", "[" * 1000, "{a: " * 600,
                  "1" * 5000, "--- a\n--- b", "%YAML 1.1\n---", "\t", "a:\n\t- b", "'unterminated", "- a\n- b",
                  "\x00", "\x07", "\ufeff", "\ud800", "<<: {a: 1}", "<<: *a", "? a", ": b", "null", "~"]


def laughs(levels: int = 9) -> str:
    """"Billion laughs": each alias a list of nine of the one before, 9**levels values once expanded."""
    out = ["x0: &x0 [a, a, a, a, a, a, a, a, a]"]
    out += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(out) + "\n"


def nested(pairs: list[tuple[str, object]]) -> dict:
    """{dotted key: value} as the nested mapping a YAML file writes (a key under a scalar replaces it)."""
    out: dict = {}
    for dotted, value in pairs:
        cur, parts = out, dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = value
    return out


@st.composite
def yaml_files(draw, keys: list[str]) -> bytes:
    """Mostly a mapping of the config's own keys (and a few others) to values of every type; sometimes with a YAML
    construct inserted, YAML fragments alone, or not a mapping; one file in four cut or given a bad byte."""
    mode = draw(st.sampled_from(["mapping"] * 5 + ["fragment", "fragments", "value"]))
    if mode in ("mapping", "fragment"):
        key = st.sampled_from(keys) if mode == "mapping" else st.sampled_from(keys) | st.sampled_from(WEIRD_KEYS)
        pairs = draw(st.lists(st.tuples(key, yaml_values), max_size=4))
        text = yaml.safe_dump(nested(pairs), allow_unicode=draw(st.booleans()), default_flow_style=draw(st.booleans()))
        if mode == "fragment":
            lines = text.splitlines()
            frag = draw(st.sampled_from(YAML_FRAGMENTS))
            section = draw(st.sampled_from(keys)).split(".")[0]
            lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from([frag, f"{section}: {frag}",
                                                                                  f"x: {frag}"])))
            text = "\n".join(lines)
    elif mode == "fragments":
        text = "\n".join(draw(st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(ANY_CHAR, max_size=6), max_size=4)))
    else:
        text = yaml.safe_dump(draw(yaml_values))
    content = encode(text, draw)
    return draw(mutated(content)) if draw(st.integers(0, 3)) == 0 else content


@st.composite
def override_lists(draw, keys: list[str]) -> list[str]:
    """Mostly `key=value` for the config's own keys, the value any YAML; sometimes a weird key, value or item."""
    odd_value = st.sampled_from(YAML_FRAGMENTS + ["", " ", "=", "a=b", "{% for m in messages %}", "[1,", "1e999",
                                                  ".nan", "0x10", "9" * 5000, "null", "[]", "{}"])
    value = st.one_of(yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                      yaml_scalars.map(str), odd_value, st.text(ANY_CHAR, max_size=8))
    good = st.tuples(st.sampled_from(keys), value).map(lambda kv: f"{kv[0]}={kv[1]}")
    odd = st.one_of(st.tuples(st.sampled_from(WEIRD_KEYS) | st.text(max_size=6), value).map(lambda kv: "=".join(kv)),
                    st.text(ANY_CHAR, max_size=8))
    return draw(st.lists(st.one_of(good, good, good, odd), max_size=3))


def check_config_error(e: ConfigError, path: str) -> None:
    assert str(e).strip()
    assert type(e) is ConfigError  # not a subclass a caller would not expect


@FUZZ
@given(content=yaml_files(SFT_KEYS), overrides=override_lists(SFT_KEYS))
# invalid UTF-8
@example(content=b"seed: 1\nout_dir: caf\xe9\n", overrides=[])
# nesting deeper than the YAML composer's recursion limit
@example(content=b"[" * 1000, overrides=[])
@example(content=b"seed: 1", overrides=["train.lr=" + "[" * 1000])
# an integer too long for int()
@example(content=b"seed: " + b"1" * 5000, overrides=[])
@example(content=b"", overrides=["seed=" + "1" * 5000])
# an integer too large for a float field
@example(content=b"train:\n  lr: 1" + b"0" * 400, overrides=[])
@example(content=b"", overrides=["train.lr=1" + "0" * 400])
# tagged values PyYAML's constructors fail on with their own exceptions
@example(content=b"seed: !!timestamp x\n", overrides=[])
@example(content=b"train: {lr: !!bool maybe}\n", overrides=[])
@example(content=b"seed: !!int x\n", overrides=["train.lr=!!float x"])
@example(content=b"!!timestamp 2001-12-14\n!!timestamp 2001-12-14\n", overrides=[])
@example(content=b"", overrides=["out_dir=!!timestamp x"])
# an alias that contains itself
@example(content=b"model: &m {lora: *m}\n", overrides=[])
@example(content=b"model: &m {dtype: *m}\n", overrides=[])
@example(content=b"", overrides=["model=&m {lora: *m}"])
# aliases of aliases that expand to billions of values
@example(content=(laughs() + "model: {lora: {target_modules: *x8}}\n").encode(), overrides=[])
def test_stage_config_files_and_overrides_give_a_config_or_a_config_error(workdir, content, overrides):
    path = write(workdir, "sft.yaml", content)
    try:
        cfg = load_config(SFTConfig, path, overrides)
    except ConfigError as e:
        check_config_error(e, path)
    else:
        assert isinstance(cfg, SFTConfig)


STAGE_CLASSES = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "rloo": PPOConfig, "dpo": DPOConfig,
                 "label_sim": LabelSimConfig, "eval": EvalConfig}
RECIPE_KEYS = sorted(set().union({f.name for f in fields(RecipeConfig)}, *(dotted_keys(cls, f"{section}.")
                                                                for section, cls in STAGE_CLASSES.items())) |
                     {"expectations.gold_score.sft", "expectations.gold_score.sft.min", "expectations.x.max",
                      "expectations.a.b.c"})


@FUZZ
@given(content=yaml_files(RECIPE_KEYS), overrides=override_lists(RECIPE_KEYS))
@example(content=b"sft: &s {data: *s}\n", overrides=[])
@example(content=b"expectations: &e {k: *e}\n", overrides=[])
@example(content=(laughs() + "expectations: {a: *x8}\n").encode(), overrides=[])
@example(content=b"seed: 1", overrides=["rm.train.lr=1" + "0" * 400])
# a section or value of a shape the pipeline's own filling-in does not expect
@example(content=b"suite: [assistant]\n", overrides=[])
@example(content=b"sft: {data: 3}\n", overrides=[])
@example(content=b"", overrides=["ppo.data=nan"])
@example(content=b"expectations: [1, 2]\n", overrides=[])
@example(content=b"rm: {data: train.jsonl}\n", overrides=[])
@example(content=b"dpo: {data: 3}\n", overrides=[])
@example(content=b"rloo: {ppo: 3}\n", overrides=[])
def test_recipes_and_overrides_give_a_recipe_or_a_config_error(workdir, content, overrides):
    path = write(workdir, "recipe.yaml", content)
    try:
        load_recipe(path, overrides)
    except ConfigError as e:
        check_config_error(e, path)


def test_overrides_that_yaml_cannot_read_are_strings_or_a_config_error():
    assert parse_overrides(["seed=" + "9" * 5000]) == {"seed": "9" * 5000}  # past int()'s 4300 digits
    assert parse_overrides(["x=" + "[" * 1000]) == {"x": "[" * 1000}  # nested deeper than the stack
    assert parse_overrides(["x=!!timestamp x", "y=!!bool maybe"]) == {"x": "!!timestamp x", "y": "!!bool maybe"}
    with pytest.raises(ConfigError, match=re.escape("override 'x=&a [*a]': x[0]: a YAML alias inside its own anchor")):
        parse_overrides(["x=&a [*a]"])


def test_a_config_path_that_cannot_be_read_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(SFTConfig, str(tmp_path))  # a directory


# --------------------------------------------------------------------------------------------------------------------
# 4. API key files

key_text = st.one_of(st.sampled_from(["k" * 16, "k" * 15, "x" * 40, "a:b" * 8, "", "#", "# comment", "  ", "\t"]),
                     st.text(ANY_CHAR, max_size=24))
key_names = st.sampled_from(["alice", "bob", "a b", "", "x" * 65, "é", "name.with-dots@x", "alice"]) | \
    st.text(ANY_CHAR, max_size=4)


@st.composite
def key_files(draw) -> bytes:
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=120))
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        key = draw(key_text)
        lines.append(f"{draw(key_names)}:{key}" if draw(st.booleans()) else key)
    newline = draw(st.sampled_from(["\n", "\r\n", "\r", "\x0c", "\u2028", "\x85"]))
    return draw(mutated(encode(newline.join(lines), draw)))


@FUZZ
@given(content=key_files(), env=st.none() | st.sampled_from(["", "carol:" + "c" * 20, "d" * 20, "k" * 16, ",,"]))
@example(content=b"alice:" + b"a" * 20 + b"\n" + b"\xff" * 20 + b"\n", env=None)  # invalid UTF-8
@example(content=b"\xef\xbb\xbfalice:" + b"a" * 20 + b"\n", env=None)  # a BOM before the first name
@example(content=b"# only a comment\n", env=None)  # no keys: the error names the file
def test_api_key_files_give_keys_or_a_key_source_error(workdir, content, env):
    path = write(workdir, "keys.txt", content)
    try:
        store = load_api_keys(path, env)
    except KeySourceError as e:
        assert str(e).startswith((path, ENV_KEYS)), str(e)
    else:
        assert store is not None and len(store) >= 1
        assert all(isinstance(k, str) and k.isprintable() and not k.startswith("\ufeff") for k in store.digests)


def test_a_bom_does_not_become_part_of_the_first_key_name(tmp_path):
    p = tmp_path / "keys.txt"
    p.write_bytes(b"\xef\xbb\xbfalice:" + b"a" * 20 + b"\r\n")
    store = load_api_keys(str(p), None)
    assert list(store.digests) == ["alice"] and store.identify("a" * 20) == "alice"


def test_a_key_file_that_is_not_utf8_names_the_line_and_the_byte(tmp_path):
    p = tmp_path / "keys.txt"
    p.write_bytes(b"\xef\xbb\xbfalice:" + b"a" * 20 + b"\r\nbob:" + b"b" * 10 + b"\xff" + b"b" * 10 + b"\n")
    with pytest.raises(KeySourceError, match=re.escape(f"{p}, line 2: not UTF-8 text (byte 0xff;")):
        load_api_keys(str(p), None)
    p.write_bytes(b"# no keys yet\n")
    with pytest.raises(KeySourceError, match=re.escape(f"{p}: an API key source was given but holds no keys")):
        load_api_keys(str(p), None)


# --------------------------------------------------------------------------------------------------------------------
# 5. `label import`


@st.composite
def prompt_file_row(draw) -> dict:
    """A valid line of a prompts file: a prompt, with K = 2..9 responses to rank or none."""
    row = draw(st.sampled_from([{"prompt": texts}, {"messages": conversation(end="user")},
                                {"conversations": conversation(end="user", sharegpt=True)}]).flatmap(
        st.fixed_dictionaries))
    if draw(st.booleans()):
        row["responses"] = draw(st.lists(texts, min_size=2, max_size=MAX_RANKED))
    return row


prompt_rows = rows(prompt_file_row() | VALID_ROWS)


@pytest.fixture(scope="module")
def label_store(workdir) -> Store:
    return Store(os.path.join(workdir, "labels.sqlite"))


@FUZZ
@given(file=data_files(prompt_rows, exts=(".jsonl", ".jsonl", ".jsonl", ".json", ".txt")),
       tasks=st.sampled_from(["auto", "auto", "demonstration", "ranking", "both"]))
# an escaped lone surrogate: it cannot go into the task's key (sha256 of UTF-8) or the SQLite store
@example(file=(".jsonl", b'{"prompt": "\\ud800"}\n'), tasks="auto")
@example(file=(".jsonl", b'{"prompt": "p", "responses": ["a", "\\udfff"]}\n'), tasks="auto")
@example(file=(".jsonl", b'{"info": ["not", "an", "object"]}\n'), tasks="auto")
def test_label_import_adds_tasks_or_raises_a_data_error(workdir, label_store, file, tasks):
    ext, content = file
    path = write(workdir, "prompts" + ext, content)
    try:
        items = read_prompts(path)
        summary = import_prompts(label_store, path, tasks=tasks)
    except DataError as e:
        check_data_error(e, path, content)
    else:
        assert summary.added + summary.already_present >= len(items)
        for it in items:
            check_messages(it.messages)
            assert it.responses is None or all(isinstance(r, str) and r.strip() and utf8(r) for r in it.responses)

