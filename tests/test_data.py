import json

import pytest
import torch

from conftest import write_jsonl
from instructgpt.data import (DataError, Demonstration, Ranking, iter_pretrain_text, load_comparisons,
                              load_demonstrations, load_pretrain_text, load_prompts)


def test_demonstration_schemas_give_the_same_record(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "Reverse 'cat'.", "response": "tac"},
        {"messages": [{"role": "user", "content": "Reverse 'cat'."}, {"role": "assistant", "content": "tac"}]},
        {"instruction": "Reverse 'cat'.", "output": "tac"},
        {"instruction": "Reverse 'cat'.", "input": "", "output": "tac"},
        {"conversations": [{"from": "human", "value": "Reverse 'cat'."}, {"from": "gpt", "value": "tac"}]},
    ])
    recs = load_demonstrations(p)
    assert len(recs) == 5
    assert all(r == recs[0] for r in recs)
    assert recs[0] == Demonstration([{"role": "user", "content": "Reverse 'cat'."},
                                     {"role": "assistant", "content": "tac"}])
    assert [r.line for r in recs] == [1, 2, 3, 4, 5] and recs[2].file == p


def test_sharegpt_conversations_keep_every_turn_and_serve_as_prompts(tmp_path):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Reverse 'cat'."},
            {"from": "gpt", "value": "tac"}]
    d = load_demonstrations(write_jsonl(tmp_path / "d.jsonl", [{"conversations": conv}]))[0]
    assert [(m["role"], m["content"]) for m in d.messages] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Reverse 'cat'."),
        ("assistant", "tac")]
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"conversations": conv[:4]}]))
    assert prompts[0].messages == d.messages[:4]


def test_alpaca_input_is_joined_to_the_instruction(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Sort these.", "input": "3 1 2", "output": "1 2 3"}])
    assert load_demonstrations(p)[0].messages[0]["content"] == "Sort these.\n\n3 1 2"


@pytest.mark.parametrize("row, line_field", [
    ('{"prompt": "x", "response": ', None),                       # malformed JSON
    ({"prompt": "x"}, "response"),                                # missing field
    ({"prompt": "x", "response": 3}, "response"),                 # wrong type
    ({"prompt": "x", "response": "   "}, "response"),             # empty response
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages"),  # no assistant turn
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, "conversations[1].from"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}]}, "conversations[1].value"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "conversations"),  # no assistant turn
    ({"foo": 1}, None),
])
def test_bad_demonstrations_name_file_line_and_field(tmp_path, row, line_field):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(DataError) as e:
        load_demonstrations(p)
    assert e.value.file == p and e.value.line == 2 and e.value.field == line_field
    assert f"{p}, line 2" in str(e.value)
    if line_field:
        assert f"'{line_field}'" in str(e.value)


def test_skip_bad_lines_counts_them(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "response": "b"}, "{oops", {"prompt": "c"},
                                           {"prompt": "d", "response": "e"}])
    recs = load_demonstrations(p, skip_bad=True)
    assert len(recs) == 2 and recs.skipped == 2


def test_a_byte_that_is_not_utf8_is_an_error_naming_file_line_and_column(tmp_path):
    """One Latin-1 byte (0xe9, "é") on line 2: the line's error, as any other malformed line's; skip_bad_lines skips
    it; in a .json file the error names the line too."""
    lines = [b'{"prompt": "a", "response": "b"}', b'{"prompt": "caf\xe9", "response": "x"}',
             b'{"prompt": "c", "response": "\xc3\xa9t\xc3\xa9"}']  # line 3: "été", good UTF-8
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as e:
        load_demonstrations(str(p))
    assert (e.value.file, e.value.line) == (str(p), 2)
    assert "not UTF-8 text (byte 0xe9 at column 16" in str(e.value)
    recs = load_demonstrations(str(p), skip_bad=True)
    assert len(recs) == 2 and recs.skipped == 1 and recs[1].messages[-1]["content"] == "\u00e9t\u00e9"
    j = tmp_path / "latin1.json"
    j.write_bytes(b'[\n{"prompt": "a", "response": "b"},\n{"prompt": "caf\xe9", "response": "x"}\n]')
    with pytest.raises(DataError) as e:
        load_demonstrations(str(j))
    assert (e.value.file, e.value.line) == (str(j), 3) and "byte 0xe9 at column 16" in str(e.value)


def test_json_parquet_and_jsonl_agree(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    a = load_demonstrations(write_jsonl(tmp_path / "x.jsonl", rows))
    (tmp_path / "x.json").write_text(json.dumps(rows))
    b = load_demonstrations(str(tmp_path / "x.json"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    c = load_demonstrations(str(tmp_path / "x.parquet"))
    assert a == b == c


def test_prompts_and_pretraining_text(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}])
    recs = load_prompts(p)
    assert recs[0] == recs[1] and recs[0].text == "hi"
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}, {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="line 2"):
        load_prompts(bad)
    (tmp_path / "t.txt").write_text("To be, or not to be.")
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "To be, or not to be."}])
    assert list(load_pretrain_text(str(tmp_path / "t.txt"))) == list(load_pretrain_text(t))


def test_pretraining_text_read_lazily_blank_documents_passed_over(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": ""}, {"text": " \n"}, {"text": "two"},
                                           {"title": "no text"}, {"text": "three"}])
    docs = iter_pretrain_text(p)
    assert next(docs) == "one" and next(docs) == "two"  # read as consumed: line 5 not reached yet
    with pytest.raises(DataError, match=r"t.jsonl.*line 5.*text.*missing"):
        next(docs)
    assert list(iter_pretrain_text(p, skip_bad=True)) == ["one", "two", "three"]


def test_a_hub_pretraining_corpus_is_streamed_when_read_only_so_far(tmp_path, monkeypatch):
    """The hub is out of reach: load_dataset is replaced by one that records its arguments and counts the rows read."""
    import datasets

    from instructgpt.batching import pretrain_blocks, text_blocks
    from instructgpt.config import DataConfig
    from instructgpt.modeling import load_tokenizer

    calls, read = [], [0]

    def fake_load_dataset(name, subset=None, split=None, streaming=False):
        calls.append((name, subset, split, streaming))

        def rows():
            for i in range(10_000):
                read[0] += 1
                yield {"text": f"document {i} says the cat sat on the mat."}
        return rows()
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tok = load_tokenizer("builtin:base")
    capped = pretrain_blocks(tok, DataConfig(pretrain="org/corpus:train", pretrain_max_tokens=64, max_length=16))
    assert calls == [("org/corpus", None, "train", True)] and len(capped) == 4 and read[0] < 20
    whole = text_blocks(tok, iter_pretrain_text("org/corpus:train"), 16)
    assert calls[-1][3] is False and read[0] > 10_000  # uncapped: every row, the dataset downloaded whole
    assert [b.input_ids for b in capped] == [b.input_ids for b in whole[:4]]
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "too short"}])
    with pytest.raises(DataError, match="short.jsonl.*less than one block of data.max_length=64"):
        pretrain_blocks(tok, DataConfig(pretrain=short, max_length=64))


def test_text_blocks_are_the_joined_documents_as_int32_read_at_most_twice_as_far_as_needed():
    """The blocks are the documents' own token ids joined by EOS (each document tokenised alone, as a reference), held
    in one int32 tensor; with max_tokens, fewer than twice the documents needed are read."""
    from instructgpt.modeling import load_tokenizer
    from instructgpt.batching import TokenBlocks, text_blocks

    tok = load_tokenizer("builtin:base")
    docs = [f"document {i} says" + " the cat sat" * (i % 13) + "." for i in range(600)]
    stream, reached = [], []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        reached.append(len(stream))
    whole = text_blocks(tok, docs, 16)
    assert isinstance(whole, TokenBlocks) and whole.ids.dtype == torch.int32
    assert whole.ids.shape == (len(stream) // 16, 16)
    assert whole.ids.tolist() == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    assert whole[3].input_ids == stream[48:64] and whole[3].loss_mask == [True] * 16
    assert isinstance(whole[2:5], TokenBlocks) and [b.input_ids for b in whole[2:5]] == whole.ids[2:5].tolist()
    for max_tokens in (16, 100, 1000, 5000, len(stream) - 5, len(stream) + 100):
        read = [0]

        def counted():
            for d in docs:
                read[0] += 1
                yield d
        capped = text_blocks(tok, counted(), 16, max_tokens)
        head = stream[:max_tokens]
        assert capped.ids.tolist() == [head[i:i + 16] for i in range(0, len(head) - 15, 16)], max_tokens
        needed = next((i + 1 for i, n in enumerate(reached) if n >= max_tokens), len(docs))
        assert read[0] < 2 * needed or read[0] == len(docs) == needed, (max_tokens, needed, read[0])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_demonstrations(str(tmp_path / "nope.jsonl"))
    for missing in ("nope.jsonl", "runs/x/rankings", "./data", "a/b/c", "data/train.JSON"):
        with pytest.raises(DataError, match="no such file"):
            load_demonstrations(missing)


def _fake_hub(monkeypatch, rows=({"prompt": "hi"},), fail=None):
    import datasets

    calls = []

    def load_dataset(name, subset=None, split=None, streaming=False):
        calls.append((name, subset, split))
        if fail:
            raise fail
        return list(rows)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_dataset_ids_go_to_the_hub(monkeypatch):
    """Every dataset the shipped recipes name is read from the hub, an owner/name id included (not taken for a
    missing local path); the hub is out of reach here, so load_dataset is replaced by one that records its arguments."""
    import os

    import yaml

    from instructgpt.config import flatten

    calls = _fake_hub(monkeypatch)
    recipes = os.path.join(os.path.dirname(__file__), "..", "configs", "recipes")
    sources = set()
    for f in ("gpt2-hh.yaml", "pythia-tldr.yaml"):
        flat = flatten(yaml.safe_load(open(os.path.join(recipes, f))))
        sources |= {v for k, v in flat.items() if k.split(".")[-1] in ("train", "eval", "pretrain", "prompts",
                                                                         "ptx_text", "demonstrations") and v}
    assert "openai/summarize_from_feedback@comparisons:validation" in sources and len(sources) >= 8
    for src in sorted(sources):
        assert list(load_prompts(src)) and calls[-1][0] == src.partition("@")[0].partition(":")[0], src
    assert ("openai/summarize_from_feedback", "comparisons", "validation") in calls
    assert ("Salesforce/wikitext", "wikitext-103-raw-v1", "test") in calls
    load_prompts("imdb")
    assert calls[-1] == ("imdb", None, "train")
    load_prompts("stanfordnlp/imdb:train[:10%]")  # datasets' split slicing
    assert calls[-1] == ("stanfordnlp/imdb", None, "train[:10%]")


def test_hub_failure_is_a_data_error_naming_the_source(monkeypatch):
    _fake_hub(monkeypatch, fail=ConnectionError("Couldn't reach 'someone/data' on the Hub (LocalEntryNotFoundError)"))
    with pytest.raises(DataError, match=r"someone/data:test: not a local file, and the Hugging Face hub could not "
                                        r"load it: ConnectionError: Couldn't reach"):
        load_prompts("someone/data:test")


# ---- comparisons: the ranking and preference-pair formats the reward model reads, in the same data layer

USER = {"role": "user", "content": "What is 2 plus 2?"}
SYSTEM = {"role": "system", "content": "Answer with a number."}


def test_comparison_schemas_give_the_same_record(tmp_path):
    hh_prefix = "\n\nHuman: What is 2 plus 2?"
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "What is 2 plus 2?", "responses": ["4", "5"], "ranks": [1, 2]},
        {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},
        {"chosen": hh_prefix + "\n\nAssistant: 4", "rejected": hh_prefix + "\n\nAssistant: 5"},
        {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "responses": ["5", "4"], "ranks": [2, 1]},
        # TRL's conversational forms: whole conversations (UltraFeedback-binarized, with its string prompt too),
        # implicit (no prompt), and an explicit prompt with the replies alone
        {"prompt": "What is 2 plus 2?", "chosen": [USER, {"role": "assistant", "content": "4"}],
         "rejected": [USER, {"role": "assistant", "content": "5"}]},
        {"chosen": [USER, {"role": "assistant", "content": "4"}],
         "rejected": [USER, {"role": "assistant", "content": "5"}]},
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"prompt": "What is 2 plus 2?", "chosen": [SYSTEM, USER, {"role": "assistant", "content": "4"}],
         "rejected": [SYSTEM, USER, {"role": "assistant", "content": "5"}]},  # a string prompt is not repeated
    ])
    recs = load_comparisons(p)
    want = Ranking([{"role": "user", "content": "What is 2 plus 2?"}], ["4", "5"], [1, 2])
    assert recs[0] == recs[1] == recs[2] == recs[4] == recs[5] == recs[6] == want
    assert recs[7] == Ranking([SYSTEM, USER], ["4", "5"], [1, 2])
    assert sorted(zip(recs[3].ranks, recs[3].responses)) == sorted(zip(want.ranks, want.responses))


def test_summarize_from_feedback(tmp_path):
    row = {"info": {"post": "My cat ate my homework.", "title": "Cat", "subreddit": "pets"},
           "summaries": [{"text": " cat ate homework"}, {"text": " dog"}], "choice": 0}
    r = load_comparisons(write_jsonl(tmp_path / "s.jsonl", [row]))[0]
    assert r.responses == [" cat ate homework", " dog"] and r.ranks == [1, 2]
    assert r.messages[0]["content"].endswith("TL;DR:") and "POST: My cat ate my homework." in r.messages[0]["content"]


def test_hh_multi_turn_prompt(tmp_path):
    pre = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: add 1 and 1"
    r = load_comparisons(write_jsonl(tmp_path / "h.jsonl", [
        {"chosen": pre + "\n\nAssistant: 2", "rejected": pre + "\n\nAssistant: 3"}]))[0]
    assert r.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "add 1 and 1"}]
    assert r.responses == ["2", "3"]


@pytest.mark.parametrize("row, fld", [
    ({"prompt": "x", "responses": ["a", "b", "c"], "ranks": [1, 2]}, "ranks"),
    ({"prompt": "x", "responses": ["a"], "ranks": [1]}, "responses"),
    ({"prompt": "x", "responses": ["a", "b"], "ranks": [1, "first"]}, "ranks[1]"),
    ({"prompt": "x", "responses": ["a", "b"], "ranks": [1.5, 2]}, "ranks[0]"),
    ({"prompt": "x", "responses": ["a", "b", "c"], "ranks": [2, 2, 2]}, "ranks"),
    ({"prompt": "x", "responses": ["a", ""], "ranks": [1, 2]}, "responses[1]"),
    ({"prompt": "x", "responses": ["a", "b"], "ranks": [1, 2], "ratings": [8, 1]}, "ratings[0]"),
    ({"prompt": "x", "responses": [str(i) for i in range(10)], "ranks": list(range(1, 11))}, "responses"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "rejected"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "b"}]}, "chosen"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "chosen"),  # no prompt anywhere
    ({"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "bot", "content": "b"}]},
     "rejected[0].role"),
])
def test_bad_rankings(tmp_path, row, fld):
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        load_comparisons(p)
    assert (e.value.file, e.value.line, e.value.field) == (p, 2, fld)
    recs = load_comparisons(p, skip_bad=True)
    assert len(recs) == 1 and recs.skipped == 1
