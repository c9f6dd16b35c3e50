import json

import pytest

from conftest import write_jsonl
from instructgpt.data import (DataError, Demonstration, Ranking, load_comparisons, load_demonstrations,
                              load_pretrain_text, load_prompts)


def test_demonstration_schemas_give_the_same_record(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "Reverse 'cat'.", "response": "tac"},
        {"messages": [{"role": "user", "content": "Reverse 'cat'."}, {"role": "assistant", "content": "tac"}]},
        {"instruction": "Reverse 'cat'.", "output": "tac"},
        {"instruction": "Reverse 'cat'.", "input": "", "output": "tac"},
    ])
    recs = load_demonstrations(p)
    assert len(recs) == 4
    assert all(r == recs[0] for r in recs)
    assert recs[0] == Demonstration([{"role": "user", "content": "Reverse 'cat'."},
                                     {"role": "assistant", "content": "tac"}])
    assert [r.line for r in recs] == [1, 2, 3, 4] and recs[2].file == p


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


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_demonstrations(str(tmp_path / "nope.jsonl"))


# ---- comparisons (the reward-model issue's formats, in the same data layer)

def test_comparison_schemas_give_the_same_record(tmp_path):
    hh_prefix = "\n\nHuman: What is 2 plus 2?"
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "What is 2 plus 2?", "responses": ["4", "5"], "ranks": [1, 2]},
        {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},
        {"chosen": hh_prefix + "\n\nAssistant: 4", "rejected": hh_prefix + "\n\nAssistant: 5"},
        {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "responses": ["5", "4"], "ranks": [2, 1]},
    ])
    recs = load_comparisons(p)
    want = Ranking([{"role": "user", "content": "What is 2 plus 2?"}], ["4", "5"], [1, 2])
    assert recs[0] == recs[1] == recs[2] == want
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
])
def test_bad_rankings(tmp_path, row, fld):
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        load_comparisons(p)
    assert (e.value.file, e.value.line, e.value.field) == (p, 2, fld)
    recs = load_comparisons(p, skip_bad=True)
    assert len(recs) == 1 and recs.skipped == 1
