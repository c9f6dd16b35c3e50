"""``instructgpt data``: every subcommand on small files built here, checked by its numbers: each clean rule's count,
a known near-duplicate pair found and a distinct pair kept, mix proportions and provenance, seeds, inputs left
byte-for-byte as they were, errors naming file, line and field, and best-of-n answers that are the reward model's
best."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest

from conftest import read_jsonl, write_jsonl
from instructgpt.cli import main as cli_main
from instructgpt.data import DataError, load_comparisons, load_demonstrations, load_prompts
from instructgpt.dataprep.augment import instruction_variants, swap_letters
from instructgpt.dataprep.cleaning import is_echo, strip_control, tidy_whitespace
from instructgpt.dataprep.dedup import find_duplicates, shingles
from instructgpt.dataprep.mixing import largest_unrepeated_size, quotas
from instructgpt.dataprep.rows import kind_of, read_source, report_path
from instructgpt.dataprep.stats import percentiles, token_lengths
from instructgpt.modeling import load_tokenizer


def data(*argv) -> int:
    return cli_main(["data", *map(str, argv)])


def report_of(out) -> dict:
    with open(report_path(str(out)), encoding="utf-8") as fh:
        return json.load(fh)


def digest(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


# --------------------------------------------------------------------------------------------------------------------
# Rules as pure functions


def test_text_rules():
    assert strip_control("a\r\nb\rc\x0bd\x00e\u200bf\x7f\x9fg\th") == "a\nb\nc\nde" "f" "g\th"
    assert tidy_whitespace("  Hi  there,\tyou \n\n\n\n    indented   line  \n") == \
        "Hi there, you\n\n    indented line"
    assert is_echo("Write a poem about the sea", "WRITE a poem about the sea! The sea is blue.")
    assert is_echo("Say hi", "say hi.")  # a short prompt: only when the response is the prompt itself
    assert not is_echo("Say hi", "Hi! I will say hi to them.")
    assert not is_echo("Write a poem about the sea", "Waves roll in; the sea is wide.")


def test_percentiles_are_numpys_linear_ones():
    p = percentiles([1, 2, 3, 4, 100])
    assert p == {"min": 1, "p50": 3.0, "p90": 61.6, "p95": 80.8, "p99": 96.16, "max": 100, "mean": 22.0}
    assert percentiles([]) is None


def test_each_schema_is_told_its_kind():
    rows = {"demonstrations": [{"prompt": "p", "response": "r"}, {"prompt": "p", "completion": "r"},
                               {"instruction": "i", "output": "o"},
                               {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
                               {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
                               {"chosen": "\n\nHuman: hi\n\nAssistant: hello"}],
            "prompts": [{"prompt": "p"}, {"messages": [{"role": "user", "content": "u"}]},
                        {"instruction": "i"}, {"info": {"post": "x"}}],
            "comparisons": [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]},
                            {"prompt": "p", "chosen": "a", "rejected": "b"},
                            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
                            {"info": {"post": "x"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}],
            "text": [{"text": "t"}]}
    for kind, examples in rows.items():
        for row in examples:
            assert kind_of("f", 1, row) == kind, row
    with pytest.raises(DataError, match="f, line 3: cannot tell"):
        kind_of("f", 3, {"foo": 1})


def test_a_source_is_the_kind_most_of_its_rows_are_and_a_stray_row_is_named(tmp_path):
    # the first row alone would make this a prompts file and drop every answer
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b", "response": "c"},
                                             {"prompt": "d", "response": "e"}])
    with pytest.raises(DataError, match=r"d.jsonl, line 1: a row of prompts among demonstrations \(give kind="):
        read_source(src)
    read = read_source(src, skip_bad=True)
    assert (read.kind, len(read.items), [e.line for e in read.bad]) == ("demonstrations", 2, [1])
    assert [it.record.text for it in read_source(src, kind="prompts").items] == ["a", "b", "d"]


# --------------------------------------------------------------------------------------------------------------------
# clean


def test_clean_counts_each_rule_and_keeps_the_kind(tmp_path):
    src = write_jsonl(tmp_path / "noisy.jsonl", [
        {"prompt": "Say hi", "response": "Hi  there!"},                                   # 1 whitespace
        {"instruction": "Cafe\u0301?", "output": "Yes\r\nit is.\u200b"},                 # 2 unicode, control
        {"prompt": "Write a poem about the sea", "response": "Write a poem about the sea. Blue."},  # 3 echo
        {"prompt": "Email me", "response": "Sure: bob@example.com, or call +1 415 555 0100."},   # 4 PII
        {"prompt": "Blank", "response": "\u0000\u0001"},                                 # 5 control -> empty
        {"prompt": "Fine", "response": "All good."},                                     # 6 untouched
        {"prompt": " ".join(["Long"] * 80), "response": "x"},                             # 7 too long
    ])
    before = digest(src)
    out = tmp_path / "clean.jsonl"
    assert data("clean", "--input", src, "--out", out, "--redact-pii", "--max-length", 64) == 0
    assert digest(src) == before
    rows = read_jsonl(out)
    assert rows == [{"prompt": "Say hi", "response": "Hi there!"},
                    {"prompt": "Caf\u00e9?", "response": "Yes\nit is."},
                    {"prompt": "Email me", "response": "Sure: [EMAIL], or call [PHONE]."},
                    {"prompt": "Fine", "response": "All good."}]
    assert len(load_demonstrations(str(out))) == 4  # straight into `instructgpt sft`
    r = report_of(out)
    rules = r["rules"]
    assert (r["rows_in"], r["rows_out"], r["rows_dropped"], r["kind"]) == (7, 4, 3, "demonstrations")
    assert {k: v.get("rows_changed", v.get("rows_dropped")) for k, v in rules.items()} == {
        "unicode": 1, "control_chars": 2, "whitespace": 1, "redact_pii": 1,
        "empty": 1, "echo": 1, "too_long": 1, "too_short": 0}
    assert (rules["redact_pii"]["email"], rules["redact_pii"]["phone"], rules["redact_pii"]["card"]) == (1, 1, 0)
    assert [e["line"] for e in r["examples"]["control_chars"]] == [2, 5]
    assert r["examples"]["echo"] == [{"file": src, "line": 3}]


def test_clean_length_limits_count_tokens_as_the_stages_do(tmp_path):
    tok = load_tokenizer("builtin:base")
    demos = [{"prompt": "Name a colour.", "response": " ".join(["blue"] * n)} for n in (1, 5, 20, 40)]
    src = write_jsonl(tmp_path / "d.jsonl", demos)
    lengths = [token_lengths(tok, it.record) for it in read_source(src).items]
    assert all(n.example == n.prompt + n.responses[0] for n in lengths)
    example = [n.example for n in lengths]
    answer = [n.responses[0] for n in lengths]
    assert example == sorted(example) and len(set(example)) == 4
    out = tmp_path / "c.jsonl"
    # keep the rows of at most example[2] tokens and answers of at least answer[1] tokens: rows 2 and 3
    assert data("clean", "-i", src, "-o", out, f"max_length={example[2]}", f"min_response_tokens={answer[1]}") == 0
    assert read_jsonl(out) == demos[1:3]
    rules = report_of(out)["rules"]
    assert (rules["too_long"]["rows_dropped"], rules["too_short"]["rows_dropped"]) == (1, 1)


def test_rankings_stay_rankings(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Pick  one", "responses": ["a  b", "c", "d"], "ranks": [2, 1, 3], "labeler": "x"},
        {"prompt": "Pick one", "chosen": "c", "rejected": "a b"},
    ])
    out = tmp_path / "c.jsonl"
    assert data("clean", "-i", src, "-o", out) == 0
    rows = read_jsonl(out)
    assert rows[0] == {"prompt": "Pick one", "responses": ["a b", "c", "d"], "ranks": [2, 1, 3], "labeler": "x"}
    assert rows[1] == {"prompt": "Pick one", "responses": ["c", "a b"], "ranks": [1, 2]}
    assert len(load_comparisons(str(out))) == 2


# --------------------------------------------------------------------------------------------------------------------
# dedup


def _sentence(start: int, n: int = 20) -> str:
    return " ".join(WORDS[(start + 7 * i) % len(WORDS)] + str(i) for i in range(n))


def test_dedup_finds_a_known_near_duplicate_and_keeps_a_distinct_pair(tmp_path):
    a = _sentence(0)
    b = a.rsplit(" ", 1)[0] + " zebra"  # the last word changed: 17 of 19 shingles shared
    c = _sentence(3)
    d = " ".join(c.split()[:8] + _sentence(11).split()[8:])  # the first 8 words shared: 6 of 30 shingles
    def jaccard(x: str, y: str) -> float:
        return len(shingles(x, 3) & shingles(y, 3)) / len(shingles(x, 3) | shingles(y, 3))

    assert jaccard(a, b) == pytest.approx(17 / 19) and jaccard(c, d) == pytest.approx(6 / 30)
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in (a, c, b, d, a, a.upper())])
    out = tmp_path / "d.jsonl"
    assert data("dedup", "-i", src, "-o", out, "--threshold", 0.7) == 0
    assert [r["text"] for r in read_jsonl(out)] == [a, c, d]
    r = report_of(out)
    assert (r["rows_in"], r["kept"], r["dropped"], r["dropped_exact"], r["dropped_near"]) == (6, 3, 3, 1, 2)
    assert r["near_duplicates"]["threshold"] == 0.7
    assert r["near_duplicates"]["lsh_bands"] * r["near_duplicates"]["lsh_rows_per_band"] <= 128
    near = {e["line"]: e for e in r["examples"]["near"]}
    assert near[3]["duplicate_of"]["line"] == 1 and abs(near[3]["similarity"] - 17 / 19) < 0.1
    assert near[6]["duplicate_of"]["line"] == 1 and near[6]["similarity"] == 1.0  # upper case: the same words
    assert r["examples"]["exact"][0] == {"file": src, "line": 5, "exact": True, "similarity": 1.0,
                                         "duplicate_of": {"file": src, "line": 1}}
    # a threshold above the pair's similarity keeps it; exact duplicates alone are what `near=false` drops
    recs = [it.record for it in read_source(src).items]
    assert [d is None for d in find_duplicates(recs, threshold=0.99)] == [True, True, True, True, False, False]
    assert [d is None for d in find_duplicates(recs, near=False)] == [True] * 4 + [False, True]


def test_exact_duplicates_are_the_same_content_in_any_schema(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Reverse 'cat'.", "response": "tac"}, {"instruction": "Reverse 'cat'.", "output": "tac"},
        {"messages": [{"role": "user", "content": "Reverse 'cat'."}, {"role": "assistant", "content": "tac"}]},
        {"prompt": "Reverse 'cat'.", "response": "TAC"}])
    out = tmp_path / "o.jsonl"
    assert data("dedup", "-i", src, "-o", out, "near=false") == 0
    assert read_jsonl(out) == [{"prompt": "Reverse 'cat'.", "response": "tac"},
                               {"prompt": "Reverse 'cat'.", "response": "TAC"}]
    assert data("dedup", "-i", src, "-o", out, "--on", "prompt") == 0  # one prompt, four answers: one row
    assert report_of(out)["kept"] == 1


# --------------------------------------------------------------------------------------------------------------------
# mix


def test_mix_quotas_provenance_and_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "response": "x"} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(300)])
    out, again, other = tmp_path / "m.jsonl", tmp_path / "m2.jsonl", tmp_path / "m3.jsonl"
    for path, seed in ((out, 0), (again, 0), (other, 1)):
        assert data("mix", "--source", f"a={a}", "--source", f"b={b}", "--weight", "a=1", "--weight", "b=3",
                    "--size", 200, "--seed", seed, "--out", path) == 0
    rows = read_jsonl(out)
    counts = {s: sum(r["provenance"]["source"] == s for r in rows) for s in "ab"}
    assert counts == {"a": 50, "b": 150}  # 1:3 of 200, exactly
    sources = {"a": read_jsonl(a), "b": read_jsonl(b)}
    for r in rows:  # each row is the line its provenance names
        p = r.pop("provenance")
        raw = sources[p["source"]][p["line"] - 1]
        assert p["file"] == (a if p["source"] == "a" else b)
        assert r == ({"prompt": raw["prompt"], "response": raw["response"]} if "prompt" in raw else
                     {"prompt": raw["instruction"], "response": raw["output"]})
    assert len({json.dumps(r) for r in rows}) == 200  # no row twice: each source has enough
    assert digest(out) == digest(again) and digest(out) != digest(other)
    rep = report_of(out)
    assert rep["sources"]["b"]["share"] == 0.75 and rep["sources"]["a"]["rows_available"] == 100
    # no size: the most rows without repeating one (a's 100 rows are a quarter of 400); more than that with
    # repeat=false is refused, naming the source
    assert largest_unrepeated_size({"a": 100, "b": 300}, {"a": 1, "b": 3}) == 400
    assert data("mix", "sources.a=" + a, "sources.b=" + b, "weights.b=3", "out=" + str(out)) == 0
    assert report_of(out)["size"] == 400 and len(read_jsonl(out)) == 400
    assert data("mix", "sources.a=" + a, "sources.b=" + b, "weights.a=3", "size=400", "out=" + str(out)) == 0
    assert report_of(out)["sources"]["a"]["rows_taken"] == 300
    assert report_of(out)["sources"]["a"]["distinct_rows"] == 100  # every row of a three times
    assert data("mix", "sources.a=" + a, "sources.b=" + b, "weights.a=3", "size=400", "repeat=false",
                "out=" + str(out)) == 2


def test_quotas_add_up_by_largest_remainder():
    assert quotas({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    q = quotas({"a": 1, "b": 1}, {"a": 0.3, "b": 0.7}, 1001)
    assert sum(q.values()) == 1001 and q == {"a": 300, "b": 701}


# --------------------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_counts_schemas_lengths_duplicates_and_bad_lines(tmp_path):
    src = write_jsonl(tmp_path / "i.jsonl", [
        {"prompt": "Reverse 'cat'.", "response": "tac"},
        {"instruction": "Reverse 'cat'.", "output": "tac"},                      # exact duplicate of line 1
        {"prompt": "Say hi", "response": "   "},                                 # empty
        '{"prompt": "x", "response": ',                                          # malformed
        {"conversations": [{"from": "human", "value": "Spell dog."}, {"from": "gpt", "value": "d o g"}]},
        {"prompt": "Long " * 40, "response": "ok"},                              # over-long at max_length 32
    ])
    out = tmp_path / "lines.jsonl"
    assert data("inspect", "-i", src, "-o", out, "--max-length", 32) == 0
    lines = read_jsonl(out)
    assert [(r["line"], r["status"], r["schema"]) for r in lines] == [
        (1, "ok", "prompt+response"), (2, "ok", "alpaca"), (3, "empty", None), (4, "bad", None),
        (5, "ok", "sharegpt"), (6, "ok", "prompt+response")]
    assert lines[1]["duplicate"] == {"exact": True, "similarity": 1.0, "file": src, "line": 1}
    assert "line 4: malformed JSON" in lines[3]["error"]
    ok = [r for r in lines if r["status"] == "ok"]
    assert all(r["example_tokens"] == r["prompt_tokens"] + r["response_tokens"][0] for r in ok)
    assert [r["over_long"] for r in ok] == [False, False, False, True]
    r = report_of(out)
    assert (r["lines"], r["rows"], r["bad"], r["empty"], r["over_long"]) == (6, 4, 1, 1, 1)
    assert r["schemas"] == {"prompt+response": 2, "alpaca": 1, "sharegpt": 1}
    assert r["duplicates"]["exact"] == 1 and r["duplicates"]["rate"] == 0.25
    assert r["tokens"]["example"] == percentiles([x["example_tokens"] for x in ok])
    assert r["tokens"]["example"]["max"] > 32


def test_inspect_counts_rankings_by_response_and_documents_by_text(tmp_path):
    tok = load_tokenizer("builtin:base")
    ranks = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Pick one", "responses": ["a", "b c d e", "f g"],
                                                "ranks": [1, 2, 3]}])
    out = tmp_path / "r_lines.jsonl"
    assert data("inspect", "-i", ranks, "-o", out) == 0
    (row,) = read_jsonl(out)
    n = token_lengths(tok, read_source(ranks).items[0].record)
    assert row["response_tokens"] == n.responses and len(n.responses) == 3
    assert row["example_tokens"] == row["prompt_tokens"] + max(row["response_tokens"])
    assert report_of(out)["tokens"]["response"]["max"] == max(n.responses)
    (tmp_path / "doc.txt").write_text("one two three four", encoding="utf-8")
    assert data("inspect", "-i", tmp_path / "doc.txt", "-o", tmp_path / "d_lines.jsonl") == 0
    r = report_of(tmp_path / "d_lines.jsonl")
    assert r["kind"] == "text" and r["tokens"]["prompt"] is None
    assert r["tokens"]["example"]["max"] == len(tok("one two three four", add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------------------------
# inputs, outputs, errors


def test_no_command_writes_to_its_input_and_a_bad_line_is_named(tmp_path, capsys):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(5)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    before = digest(src)
    for cmd in (["inspect"], ["clean"], ["dedup"], ["augment"]):
        assert data(*cmd, "-i", src, "-o", tmp_path / f"{cmd[0]}.jsonl") == 0
    assert data("mix", "--source", f"s={src}", "-o", tmp_path / "mix.jsonl") == 0
    assert digest(src) == before and sorted(os.listdir(tmp_path)).count("in.jsonl") == 1
    # writing over the input (or into an input directory) is refused
    assert data("clean", "-i", src, "-o", src) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert data("dedup", "-i", tmp_path, "-o", tmp_path / "x.jsonl") == 2
    assert "inside the input directory" in capsys.readouterr().err
    assert digest(src) == before
    # a bad line: an error naming file, line and field; with skip_bad_lines, skipped and named in the report
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"prompt": "Q?", "response": 3}] + rows[2:])
    assert data("clean", "-i", bad, "-o", tmp_path / "c.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3: field 'response': expected a string, got int" in err
    assert not os.path.exists(tmp_path / "c.jsonl")
    assert data("dedup", "-i", bad, "-o", tmp_path / "c.jsonl", "--skip-bad-lines") == 0
    r = report_of(tmp_path / "c.jsonl")
    assert (r["bad_lines_skipped"], r["kept"]) == (1, 5) and "line 3: field 'response'" in r["bad_line_examples"][0]
    # an unknown key is named, as in every command
    assert data("dedup", "-i", src, "-o", tmp_path / "x.jsonl", "treshold=0.5") == 2
    assert "unknown config key 'treshold'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# augment


def test_instruction_filling_rewrites_prompts_and_keeps_answers(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Describe a {w} whale.", "response": f"A {w} whale."}
                                             for w in WORDS[:6]])
    out, again = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (out, again):
        assert data("augment", "-i", src, "-o", path, "--variants", 2, "noise=[]") == 0
    assert digest(out) == digest(again)
    rows = read_jsonl(out)
    assert len(rows) == 18 and len(load_demonstrations(str(out))) == 18
    for i, w in enumerate(WORDS[:6]):
        original, *variants = rows[3 * i: 3 * i + 3]
        assert original == {"prompt": f"Describe a {w} whale.", "response": f"A {w} whale."}
        assert len({v["prompt"] for v in variants}) == 2
        for v in variants:  # a template around the prompt, the answer as it was
            assert v["response"] == original["response"] and original["prompt"] in v["prompt"] != original["prompt"]
    assert report_of(out)["variants_written"] == 12
    # noise that keeps the meaning: with probability 1, every kind of it
    items = read_source(src).items
    noisy, _ = instruction_variants(items, ["{prompt}"], ["case", "punctuation", "whitespace"], 1.0, 1, False, 0)
    for r, w in zip(noisy, WORDS):
        assert r["prompt"].replace("  ", " ") == f"describe a {w} whale" and r["prompt"].count("  ") == 1
    for seed in range(5):  # a typo: two inner letters of a long word swapped, never in a quoted word
        typo = swap_letters("Spell 'banana' slowly", random.Random(seed))
        assert typo != "Spell 'banana' slowly" and sorted(typo) == sorted("Spell 'banana' slowly")
        assert typo.startswith("Spell 'banana' s") and typo.endswith("y")


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A reward model on the tiny model's trunk with a random head: arbitrary but fixed scores."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("rm") / "rm")
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_answer_diversity_keeps_the_answer_the_reward_model_scores_highest(tmp_path, tiny_model_dir, tiny_rm_dir):
    from instructgpt.generation import SamplingParams, generate
    from instructgpt.modeling import load_model
    from instructgpt.prompting import render_prompt
    from instructgpt.reward import RewardModel

    prompts = [f"what is {w}" for w in ("apple", "pear", "plum", "cat", "dog")]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "best.jsonl"
    assert data("augment", "-i", src, "-o", out, "mode=answers", "--model", tiny_model_dir, "--reward-model",
                tiny_rm_dir, "-n", 4, "--max-new-tokens", 6, "--seed", 3, "--device", "cpu") == 0
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == prompts and len(load_demonstrations(str(out))) == 5
    # the same samples, scored here: each row's answer is the best of its prompt's four
    model, tok = load_model(tiny_model_dir)
    samples = generate(model, tok, [render_prompt(tok, p) for p in prompts],
                       SamplingParams(max_new_tokens=6, temperature=1.0, n=4, seed=3), batch_size=32)
    rm = RewardModel.load(tiny_rm_dir)
    picked = []
    for p, comps, row in zip(prompts, samples, rows):
        texts = [c.text for c in comps if c.text.strip()]
        scores = rm.score([p] * len(texts), texts)
        best = int(np.argmax(scores))
        picked.append(best)
        assert row["response"] == texts[best] and row["reward"] == pytest.approx(max(scores), abs=1e-4)
    assert any(i != 0 for i in picked)  # not merely the first sample
    r = report_of(out)
    assert r["mean_best_reward"] >= r["mean_sample_reward"] and r["rows_out"] == 5
    # min_reward drops the prompts whose best answer scores below it
    cut = sorted(x["reward"] for x in rows)[2] - 1e-5  # written to 6 decimals
    assert data("augment", "-i", src, "-o", out, "mode=answers", f"model={tiny_model_dir}",
                f"reward_model={tiny_rm_dir}", "n=4", "max_new_tokens=6", "seed=3", "device=cpu",
                f"min_reward={cut}") == 0
    assert len(read_jsonl(out)) == 3 and report_of(out)["below_min_reward"] == 2


def test_prompts_stay_prompts(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi  you"}, {"prompt": "Hi you"}, {"prompt": "Other"}])
    out = tmp_path / "o.jsonl"
    assert data("clean", "-i", src, "-o", out) == 0 and data("dedup", "-i", out, "-o", tmp_path / "d.jsonl") == 0
    assert read_jsonl(tmp_path / "d.jsonl") == [{"prompt": "Hi you"}, {"prompt": "Other"}]
    assert len(load_prompts(str(tmp_path / "d.jsonl"))) == 2


# --------------------------------------------------------------------------------------------------------------------
# the command line


def test_flags_set_the_same_keys_as_overrides_and_bad_settings_are_named(tmp_path, capsys):
    from instructgpt.config import ConfigError, config_from_args, load_config, parse_command_line
    from instructgpt.dataprep.cli import build_parsers
    from instructgpt.dataprep.configs import AugmentConfig, DedupConfig, MixConfig

    def dedup(argv):
        return config_from_args(DedupConfig, parse_command_line(build_parsers()["dedup"], argv))

    assert dedup(["-i", "x", "-o", "y.jsonl", "--threshold", "0.7", "--on", "prompt", "--skip-bad-lines"]) == \
        dedup(["input=x", "out=y.jsonl", "threshold=0.7", "on=prompt", "skip_bad_lines=true"]) != \
        dedup(["input=x", "out=y.jsonl"])
    with pytest.raises(ConfigError, match="templates: each must hold {prompt} exactly once"):
        load_config(AugmentConfig, None, ["input=x", "templates=[Hello]"])
    with pytest.raises(ConfigError, match="weights.c: no such source"):
        load_config(MixConfig, None, ["sources.a=x", "weights.c=2"])
    with pytest.raises(ConfigError, match=r"threshold: must be in \(0, 1\]"):
        load_config(DedupConfig, None, ["input=x", "threshold=0"])
    assert data("--help") == 0 and "dedup" in capsys.readouterr().out
    assert data("shuffle") == 2 and "unknown command 'shuffle'" in capsys.readouterr().err
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    assert data("dedup", "-i", prompts, "-o", tmp_path / "o.jsonl", "on=response") == 2
    assert "prompts have no response" in capsys.readouterr().err
    assert data("clean", "-i", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl") == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
