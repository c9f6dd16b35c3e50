import random

import pytest

from conftest import NO_SYSTEM_TEMPLATE, write_jsonl
from instructgpt.data import load_comparisons
from instructgpt.label_sim import PAPER_AGREEMENT, agreement, calibrate, label, main, noisy_ranks


def test_no_noise_gives_the_gold_order_with_ties():
    rng = random.Random(0)
    assert noisy_ranks([0.2, 1.0, 0.2, 0.5], rng, flip_prob=0.0) == [3, 1, 3, 2]
    assert noisy_ranks([0.2, 1.0, 0.5], rng, noise="bt", bt_scale=0.0) == [3, 1, 2]


def test_rating_resolution_ties_answers_of_the_same_rating():
    rng = random.Random(0)
    # 0.13 and 0.16 are both rating 2 (round(6g) = 1): a person cannot tell them apart; 0.5 and 1.0 can be
    assert noisy_ranks([0.13, 0.16, 0.5, 1.0], rng, flip_prob=0.0, resolution="rating") == [3, 3, 2, 1]
    assert noisy_ranks([0.13, 0.16, 0.5, 1.0], rng, flip_prob=0.0) == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="resolution"):
        noisy_ranks([0.1, 0.9], rng, resolution="stars")


def test_pair_flip_rate():
    rng = random.Random(0)
    flips = sum(noisy_ranks([1.0, 0.0], rng, flip_prob=0.25) == [2, 1] for _ in range(4000))
    assert flips / 4000 == pytest.approx(0.25, abs=0.02)


def test_identical_responses_tie_and_distinct_ones_keep_the_flip_rate():
    rng = random.Random(0)
    flips = 0
    for _ in range(2000):
        ranks, ratings = label(["cat", "dog", "cat", "tac"], [0.2, 0.0, 0.2, 1.0], rng, flip_prob=0.25)
        assert ranks[0] == ranks[2] and ratings[0] == ratings[2]  # the same text, judged once
        flips += ranks[3] > ranks[1]  # "tac" (correct) ranked below "dog" (wrong)
    # the three distinct texts are ranked by Copeland over their three noisy pairs: tac ends below dog in 7 of the
    # 64 (flip 1/4) outcomes by exact enumeration, 0.109
    assert abs(flips / 2000 - 0.109) < 0.03


def test_answers_of_equal_gold_always_tie_whatever_the_noise():
    rng = random.Random(0)
    for _ in range(500):
        ranks = noisy_ranks([0.5, 1.0, 0.5, 0.0, 1.0], rng, flip_prob=0.4)
        assert ranks[0] == ranks[2] and ranks[1] == ranks[4]


def test_two_simulated_labelers_agree_as_often_as_the_paper_says():
    rng = random.Random(1)
    golds = [[rng.randint(1, 7) / 7 for _ in range(rng.choice((4, 8)))] for _ in range(1500)]
    level = calibrate(golds, PAPER_AGREEMENT, seed=0)
    measured, pairs = agreement(golds, random.Random(7), "flip", level)  # fresh draws, not the calibration's
    assert pairs > 10_000 and measured == pytest.approx(PAPER_AGREEMENT, abs=0.01)
    # less agreement takes more noise; Bradley-Terry noise is calibrated the same way
    assert calibrate(golds, 0.65, seed=0) > level > calibrate(golds, 0.85, seed=0)
    bt = calibrate(golds, PAPER_AGREEMENT, noise="bt", seed=0)
    assert agreement(golds, random.Random(7), "bt", bt)[0] == pytest.approx(PAPER_AGREEMENT, abs=0.01)
    assert agreement(golds, random.Random(7), "flip", 0.0)[0] == 1.0  # no noise: two labelers always agree
    with pytest.raises(ValueError, match="agreement"):
        calibrate(golds, 0.4)


def test_label_sim_writes_rankings_rm_reads(tiny_model_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    rc = main(["--policy", tiny_model_dir, "--prompts", "builtin:task-prompts?split=train&n=12&seed=3",
               "--out", str(out), "--k", "4", "--max-new-tokens", "6", "--seed", "1"])
    assert rc == 0
    recs = load_comparisons(str(out))
    assert len(recs) >= 1 and all(r.k == 4 and r.ratings and all(1 <= x <= 7 for x in r.ratings) for r in recs)
    assert all(r.flags is not None and len(r.flags) == 4 for r in recs)  # the rubric's flags, per response
    import json
    stats = json.loads((tmp_path / "r.jsonl.stats.json").read_text())
    assert stats["rankings"] == len(recs) and stats["agreement_target"] == PAPER_AGREEMENT
    assert stats["agreement"] is None or 0.0 <= stats["agreement"] <= 1.0  # a dozen prompts: only a few pairs
    bad = tmp_path / "bad.jsonl"
    assert main(["--policy", tiny_model_dir, "--out", str(bad), "--device", "gpu0"]) == 2 and not bad.exists()


def test_temperatures_cycle_over_the_k_responses(tiny_model_dir, tmp_path):
    """--temperatures 0,1.5 with K=4: two greedy responses per prompt (identical) and two sampled ones."""
    import json
    out = tmp_path / "r.jsonl"
    # the puzzles' partial credit tells a random tiny model's answers apart; the assistant suite's rubric ties them
    assert main(["--policy", tiny_model_dir, "--prompts", "builtin:task-prompts?split=train&n=12&seed=3&suite=puzzles",
                 "--out", str(out), "--k", "4", "--max-new-tokens", "6", "--seed", "1",
                 "--temperatures", "0,1.5", "--noise", "bt"]) == 0
    rows = [json.loads(x) for x in open(out)]
    assert rows and all(len(r["responses"]) == 4 for r in rows)
    assert all(r["responses"][0] == r["responses"][1] for r in rows)  # both greedy
    assert any(r["responses"][2] != r["responses"][3] for r in rows)  # sampled at 1.5


def test_bf16_label_sim_samples_under_autocast(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    import instructgpt.generation as generation

    seen, real = [], generation.generate
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where --device auto puts the policy
    monkeypatch.setattr(generation, "generate", lambda *a, **k: seen.append(torch.is_autocast_enabled(dev))
                        or real(*a, **k))
    out = tmp_path / "r.jsonl"
    args = ["--policy", tiny_model_dir, "--prompts", "builtin:task-prompts?split=train&n=12&seed=3", "--k", "4",
            "--max-new-tokens", "6", "--seed", "1", "--temperatures", "0.7,1.3"]
    assert main(args + ["--out", str(out), "--mixed-precision", "bf16"]) == 0
    assert seen == [True, True] and load_comparisons(str(out))  # one call per temperature, both in bf16
    assert main(args + ["--out", str(tmp_path / "f.jsonl")]) == 0 and seen[2:] == [False, False]


def test_a_prompt_the_chat_template_refuses_stops_label_sim_naming_file_and_line(tiny_model_dir, tmp_path, capsys):
    """A prompt file row whose conversation the policy's chat template refuses (a system turn where it has no system
    role): label-sim exits 2 naming the file and line, and writes no rankings."""
    from instructgpt.data import load_prompts
    from instructgpt.modeling import load_model, save_model
    model, tok = load_model(tiny_model_dir)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    save_model(model, tok, str(tmp_path / "policy"))
    first, second = load_prompts("builtin:task-prompts?split=train&n=2&seed=3")
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"messages": first.messages}, {"messages": [{"role": "system", "content": "be brief"}, *second.messages]}])
    out = tmp_path / "r.jsonl"
    assert main(["--policy", str(tmp_path / "policy"), "--prompts", prompts, "--out", str(out), "--k", "4",
                 "--max-new-tokens", "4"]) == 2
    assert ("p.jsonl, line 2: field 'messages': the chat template refuses this conversation: System role not "
            "supported") in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.jsonl.stats.json").exists()
    # without the system turn, the same file is sampled and ranked
    write_jsonl(prompts, [{"messages": first.messages}, {"messages": second.messages}])
    assert main(["--policy", str(tmp_path / "policy"), "--prompts", prompts, "--out", str(out), "--k", "4",
                 "--max-new-tokens", "4"]) == 0 and out.exists()
