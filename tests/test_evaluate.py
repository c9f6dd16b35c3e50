import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import NO_SYSTEM_TEMPLATE, read_jsonl, tiny_corpus, write_jsonl

from instructgpt import evaluate as ev
from instructgpt.data import DataError
from instructgpt.report import check_expectations, render_markdown, stage_kind
from instructgpt.batching import text_blocks


# ------------------------------------------------------------------------------------------------ pure math
def test_win_rates_by_hand():
    policy = [1.0, 0.5, 0.2, 0.7, 0.3]
    sft = [0.5, 0.5, 0.9, 0.7, 0.1]
    o = ev.pairwise_outcomes(policy, sft)
    assert o.tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]
    assert ev.win_rate(o) == pytest.approx(3 / 5)  # (1 + .5 + 0 + .5 + 1) / 5
    assert ev.win_rate_no_ties(o) == pytest.approx(2 / 3)  # 2 wins, 1 loss, 2 ties left out
    ties = ev.pairwise_outcomes([0.3, 0.3], [0.3, 0.3])
    assert ev.win_rate(ties) == 0.5 and math.isnan(ev.win_rate_no_ties(ties))


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data():
    small = np.array([1.0] * 35 + [0.0] * 15)  # win rate 0.7 on 50 prompts
    large = np.tile(small, 100)  # the same rate on 5000
    lo_s, hi_s = ev.bootstrap_ci(small, ev.win_rate, seed=0)
    lo_l, hi_l = ev.bootstrap_ci(large, ev.win_rate, seed=0)
    assert lo_s < 0.7 < hi_s and lo_l < 0.7 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 10x smaller in theory
    # the normal approximation: 2 * 1.96 * sqrt(p (1 - p) / n)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * math.sqrt(0.7 * 0.3 / 5000), rel=0.15)
    assert ev.bootstrap_ci(small, ev.win_rate, seed=0) == (lo_s, hi_s)  # seeded
    lo, hi = ev.bootstrap_ci(np.array([1.0, 0.5, 0.5, 0.0, 1.0, 1.0]), ev.win_rate_no_ties, seed=0)
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0


def test_rm_accuracy_against_gold_by_hand():
    rm = [[3.0, 1.0, 2.0], [0.1, 0.5], [1.0, 1.0]]
    gold = [[1.0, 0.0, 0.0], [0.9, 0.2], [0.0, 1.0]]
    # prompt 0: (0,1) agree, (0,2) agree, (1,2) gold tie -> dropped; prompt 1: disagree; prompt 2: RM tie -> 1/2
    acc, pairs = ev.rm_accuracy(rm, gold)
    assert pairs == 4 and acc == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert ev.rm_accuracy([[1.0, 2.0]], [[0.5, 0.5]]) == (None, 0)


def test_best_of_n_expectations_equal_every_subset_enumerated():
    import itertools

    rng = np.random.default_rng(0)
    rm = rng.normal(size=(3, 6))
    gold = rng.integers(1, 8, size=(3, 6)).astype(float)
    for n in (1, 2, 3, 6):
        got = ev.best_of_n_expectations(rm, gold, n)
        want = [np.mean([gold[i][max(sub, key=lambda k: rm[i][k])] for sub in itertools.combinations(range(6), n)])
                for i in range(3)]
        assert got == pytest.approx(want)
    assert ev.best_of_n_expectations(rm, gold, 1) == pytest.approx(gold.mean(1))  # n = 1: a random sample
    assert ev.best_of_n_expectations(rm, rm, 6) == pytest.approx(rm.max(1))  # n = N: the RM's best
    with pytest.raises(ValueError, match="1..6"):
        ev.best_of_n_expectations(rm, gold, 7)
    curve = ev.best_of_n_curve(rm, gold, [1, 2, 4])
    assert [c["n"] for c in curve] == [1, 2, 4] and curve[1]["kl"] == pytest.approx(math.log(2) - 0.5)
    assert all(c["gold_oracle"] >= c["gold"] - 1e-12 for c in curve)
    assert [c["rm"] for c in curve] == sorted(c["rm"] for c in curve)  # the proxy only rises with n


def test_flag_rates_and_the_rms_accuracy_by_flag():
    from instructgpt.assistant import Judgement

    ok = Judgement(7, ("satisfies_constraint",), has_constraints=True)
    rude = Judgement(4, ("inappropriate_for_customer_assistant", "satisfies_constraint"), has_constraints=True)
    plain, wrong = Judgement(7), Judgement(2, ("fails_instruction",))
    rates = ev.flag_rates([ok, rude, plain, wrong])
    assert rates["inappropriate_for_customer_assistant"] == 0.25 and rates["fails_instruction"] == 0.25
    assert rates["satisfies_constraint"] == 1.0  # of the two answers to prompts with constraints
    assert rates["all_properties"] == 0.5 and rates["hallucination"] == 0.0
    # prompt 0: ok > rude (RM right); prompt 1: plain > wrong (RM wrong), plain = plain (a gold tie: no pair)
    acc = ev.rm_accuracy_by_flag([[1.0, 0.0], [-1.0, 0.0, 5.0]], [[ok, rude], [plain, wrong, plain]])
    assert acc == {"inappropriate_for_customer_assistant": {"accuracy": 1.0, "pairs": 1},
                   "fails_instruction": {"accuracy": 0.5, "pairs": 2}}


def test_sequence_kl_and_best_of_n_kl_by_hand():
    lp = [[-1.0, -2.0], [-0.5]]
    ref = [[-1.5, -2.5], [-0.25]]
    assert ev.sequence_kl(lp, ref) == pytest.approx(((0.5 + 0.5) + (-0.25)) / 2)
    assert ev.best_of_n_kl(1) == 0.0
    assert ev.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_bleu_and_rouge_l():
    text = ["the small dog likes apples today", "three red apples and two pears"]
    assert ev.bleu(text, text) == pytest.approx(100.0)
    assert ev.rouge_l(text, text) == pytest.approx(1.0)
    assert ev.rouge_l(["cat"], ["dog"]) == 0.0
    # one word of two in common: P = R = 1/2
    assert ev.rouge_l(["red dog"], ["red cat"]) == pytest.approx(0.5)


def test_expectations_are_checked_and_keys_the_report_lacks_are_marked_missing():
    report = {"gold_score.ppo": 0.4, "gold_score.sft": 0.3, "win_rate_ci95.ppo_vs_sft": [0.45, 0.6],
              "expectations": {"gold_score.ppo": {"min": "gold_score.sft"}, "win_rate_ci95.ppo_vs_sft[0]": {"min": 0.5},
                               "rm_accuracy_gold": {"min": 0.5}, "gold_score.sft": {"min": 0.2, "max": 0.35},
                               "kl.ppo": {"max": "kl.best_of_4"}}}
    res = [(key, value, status) for key, _, value, status in check_expectations(report)]
    assert res == [("gold_score.ppo", 0.4, "met"), ("win_rate_ci95.ppo_vs_sft[0]", 0.45, "not met"),
                   ("rm_accuracy_gold", None, "missing"), ("gold_score.sft", 0.3, "met"), ("kl.ppo", None, "missing")]
    md = render_markdown("/nonexistent", dict(report, policies=[]), [])
    assert "## Expected results" in md
    for row in ("| `gold_score.ppo` | ≥ `gold_score.sft` (0.300) | 0.400 | ✅ met |",
                "| `win_rate_ci95.ppo_vs_sft[0]` | ≥ 0.500 | 0.450 | ❌ not met |",
                "| `rm_accuracy_gold` | ≥ 0.500 | — | — missing |",
                "| `gold_score.sft` | ≥ 0.200, ≤ 0.350 | 0.300 | ✅ met |"):
        assert row in md, row
    assert "## Expected results" not in render_markdown("/nonexistent", {"policies": []}, [])  # none given


def test_stage_kind_from_logged_keys():
    assert stage_kind([{"step": 1, "train/loss": 2.0}]) == "lm"
    assert stage_kind([{"step": 1, "train/loss": 0.6, "train/accuracy": 0.7}]) == "rm"
    assert stage_kind([{"step": 1, "objective/kl": 0.1}]) == "ppo"
    assert stage_kind([]) is None


def test_summarize_by_hand():
    from instructgpt import assistant
    from instructgpt import gold as gold_labeler

    held = ev.heldout_prompts(4, seed=0)
    gold = {"sft": [1.0, 0.5, 0.2, 0.0], "ppo": [1.0, 0.7, 0.1, 0.4]}
    rm = {"sft": [0.0, 1.0, 0.0, 0.0], "ppo": [1.0, 0.0, 0.0, 2.0]}
    responses = {"sft": [p.reference for p in held], "ppo": ["x"] * 4}
    r = ev.summarize(held, responses, "sft", gold, rm, rm_pool=["sft", "ppo"], n_resamples=200)
    assert r["gold_score.ppo"] == pytest.approx(2.2 / 4) and r["accuracy.sft"] == 0.25
    assert r["win_rate.ppo_vs_sft"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert r["win_rate_no_ties.ppo_vs_sft"] == pytest.approx(2 / 3)
    assert r["win_rate_rm.ppo_vs_sft"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    # gold pairs: prompt 0 tie (dropped); 1: gold sft < ppo, rm sft > ppo (wrong); 2: RM tie (1/2); 3: right
    assert r["rm_accuracy_gold"] == pytest.approx(1.5 / 3) and r["rm_accuracy_gold_pairs"] == 3
    assert r["bleu.sft"] == pytest.approx(100.0) and r["rouge_l.sft"] == pytest.approx(1.0)
    fams = [t.family for t in gold_labeler.make_tasks("heldout", 4, seed=0)]
    assert fams == [p.family for p in held] and set(fams) <= set(assistant.FAMILIES)
    per = {f: np.mean([g for g, f2 in zip(gold["ppo"], fams) if f2 == f]) for f in fams}
    assert r["per_family.ppo"] == pytest.approx(per)
    assert r["judge"] == "gold" and len(r["win_rate_ci95.ppo_vs_sft"]) == 2


def test_right_answers_gained_and_lost_and_the_partial_credit_win_rate():
    right = 0.5
    sft = [1.0, 0.7, 0.2, 0.1, 0.3, 0.45, 0.6]
    ppo = [0.3, 1.0, 0.6, 0.2, 0.1, 0.45, 0.0]  # lost, both right, gained, win, loss, tie, lost
    gained, lost, wrong = ev.right_answer_changes(ppo, sft, right)
    assert (gained, lost) == (1, 2)
    assert wrong.tolist() == [1.0, 0.0, 0.5]  # prompts 3, 4, 5: the only ones where both answers are wrong
    held = ev.heldout_prompts(len(sft), seed=0)
    r = ev.summarize(held, {"sft": ["x"] * 7, "ppo": ["y"] * 7}, "sft", {"sft": sft, "ppo": ppo}, n_resamples=20)
    assert (r["right_gained.ppo_vs_sft"], r["right_lost.ppo_vs_sft"]) == (1, 2)
    assert r["win_rate_no_ties_both_wrong.ppo_vs_sft"] == 0.5 and r["win_rate_no_ties_both_wrong_pairs.ppo_vs_sft"] == 2
    # pooled: wins on prompts 1 (both right, a better format), 2 and 3; losses on 0, 4 and 6
    assert r["win_rate_no_ties.ppo_vs_sft"] == pytest.approx(3 / 6)
    assert "ppo +1 / -2, 50.0% of 2" in render_markdown("/nonexistent", r, [])
    # judged by the RM alone (no gold): nothing to split
    r = ev.summarize(held, {"sft": ["x"] * 7, "ppo": ["y"] * 7}, "sft", None, {"sft": sft, "ppo": ppo}, n_resamples=20)
    assert not any(k.startswith("right_") for k in r)


def test_length_bias_of_the_rm_and_of_gold():
    held = ev.heldout_prompts(5, seed=0)
    responses = {"sft": ["ab", "abc", "a", "abcd", "xy"], "ppo": ["abcdef", "a", "abc", "abcd", "zw"]}  # 3 differ
    rm = {"sft": [0.0, 0.0, 0.0, 0.0, 0.0], "ppo": [1.0, 1.0, 0.0, 5.0, 5.0]}  # the RM favours: longer, shorter, tie
    gold = {"sft": [0.5, 0.1, 0.1, 0.1, 0.1], "ppo": [0.1, 0.1, 0.6, 0.1, 0.1]}  # gold: shorter, tie, longer
    lens = [len(r) for r in responses["ppo"]], [len(r) for r in responses["sft"]]
    a, n = ev.prefers_longer(rm["ppo"], rm["sft"], *lens)
    assert (a, n) == (pytest.approx(1.5 / 3), 3)  # prompts 3 and 4 (same length) left out whatever the scores
    r = ev.summarize(held, responses, "sft", gold, rm, n_resamples=20)
    assert r["rm_prefers_longer.ppo_vs_sft"] == pytest.approx(0.5) and r["prefers_longer_pairs.ppo_vs_sft"] == 3
    assert r["gold_prefers_longer.ppo_vs_sft"] == pytest.approx(1.5 / 3)
    rm["ppo"] = [1.0, -1.0, 1.0, 0.0, 0.0]  # now always the longer (sft's on prompt 1)
    r = ev.summarize(held, responses, "sft", None, rm, n_resamples=20)
    assert r["rm_prefers_longer.ppo_vs_sft"] == 1.0 and "gold_prefers_longer.ppo_vs_sft" not in r
    assert "the RM prefers the longer one 100.0% of 3 (ppo vs sft)." in render_markdown("/nonexistent", r, [])


def test_right_content_threshold_separates_right_answers_from_partial_credit():
    from instructgpt import tasks

    for t in tasks.make_tasks("heldout", 130, seed=3):  # ten of each family
        assert tasks.gold_score(t, t.answer) == 1.0
        assert tasks.gold_score(t, "The answer is " + t.answer + ".") >= tasks.RIGHT_CONTENT, t.prompt
        if t.family in ("add", "subtract", "count_letter", "largest"):
            assert tasks.gold_score(t, str(int(t.answer) + 1)) < tasks.RIGHT_CONTENT, t.prompt


def test_rm_accuracy_is_split_by_pair_of_policies_against_sft():
    held = ev.heldout_prompts(2, seed=0)
    gold = {"base": [0.0, 0.0], "sft": [0.5, 0.5], "ppo": [1.0, 0.2]}
    rm = {"base": [-2.0, -2.0], "sft": [0.0, 0.0], "ppo": [-1.0, -1.0]}  # right about base, wrong on ppo's gain
    r = ev.summarize(held, {n: ["x", "y"] for n in gold}, "sft", gold, rm, rm_pool=list(gold), n_resamples=50)
    assert r["rm_accuracy_gold.base_vs_sft"] == 1.0 and r["rm_accuracy_gold_pairs.base_vs_sft"] == 2
    assert r["rm_accuracy_gold.ppo_vs_sft"] == 0.5 and r["rm_accuracy_gold_pairs.ppo_vs_sft"] == 2
    # by family (the two prompts are of different families): wrong on the first prompt's gain, right on the second
    f0, f1 = (p.family for p in held)
    assert f0 != f1
    assert r["rm_accuracy_gold_per_family.ppo_vs_sft"] == {f0: {"accuracy": 0.0, "pairs": 1},
                                                            f1: {"accuracy": 1.0, "pairs": 1}}
    assert r["rm_accuracy_gold_per_family.base_vs_sft"] == {f0: {"accuracy": 1.0, "pairs": 1},
                                                             f1: {"accuracy": 1.0, "pairs": 1}}
    md = render_markdown("/nonexistent", r, [])
    assert f"By task family, ppo vs sft: {min(f0, f1)} {float(f0 > f1):.2f} (1), {max(f0, f1)} " in md
    # pooled: base-sft 2/2, base-ppo 2/2 (ppo above base both times), sft-ppo 1/2
    assert r["rm_accuracy_gold"] == pytest.approx(5 / 6) and "sft_vs_sft" not in str(r)


# ------------------------------------------------------------------------------------------- model passes
def test_kl_to_itself_is_zero_and_logprobs_match_the_sampler(tiny_model_dir):
    from instructgpt.generation import SamplingParams, generate
    from instructgpt.modeling import load_model
    from instructgpt.prompting import encode_prompt, render_prompt

    policy, tok = load_model(tiny_model_dir)
    sft, _ = load_model(tiny_model_dir)  # the SFT model: the same directory, loaded apart
    prompts = [f"add {i} plus {i + 3}" for i in range(6)]
    comps = [c[0] for c in generate(policy, tok, [render_prompt(tok, p) for p in prompts],
                                    SamplingParams(max_new_tokens=10, temperature=1.0, seed=0), batch_size=4)]
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    responses = [c.token_ids for c in comps]
    assert ev.kl_to_reference(policy, sft, prompt_ids, responses, tok.pad_token_id, batch_size=4) == \
        pytest.approx(0.0, abs=1e-6)
    # the recomputed log-probs are the sampler's, token for token (so the response positions are read right)
    lps = ev.response_logprobs(policy, prompt_ids, responses, tok.pad_token_id, batch_size=3)
    for lp, c in zip(lps, comps):
        assert lp == pytest.approx(c.logprobs, abs=1e-4)


def test_perplexity_is_exp_of_mean_token_nll(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (20, 13, 31)]  # ragged: padding ignored
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = model(torch.tensor([b])).logits[0]  # (T, V)
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(b[1:]), reduction="sum"))
            count += len(b) - 1
    assert ev.perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)
    fixed = ev.perplexity_blocks(tok, tiny_corpus(200), block_size=64, n_blocks=5)
    assert len(fixed) == 5 and all(len(b) == 64 for b in fixed)
    # spread through the first max_tokens tokens only, reading no further (a generator that fails past 40 documents)
    def forty_then_stop():
        for i, t in enumerate(tiny_corpus(200)):
            assert i < 40, "read past the tokens it needs"
            yield t
    first = [b.input_ids for b in text_blocks(tok, tiny_corpus(200), 64)][:4]
    assert ev.perplexity_blocks(tok, forty_then_stop(), block_size=64, n_blocks=2, max_tokens=256) == first[::2]


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def eval_models(tiny_model_dir, tmp_path_factory):
    """A second policy (the tiny model with perturbed weights, same tokenizer) and a tiny untrained reward model."""
    from instructgpt.modeling import load_model, save_model
    from instructgpt.reward import RewardNorm, init_reward_head

    root = tmp_path_factory.mktemp("eval_models")
    model, tok = load_model(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(model, tok, str(root / "ppo"))
    rm, rtok = load_model(tiny_model_dir, model_class="sequence_classification")
    init_reward_head(rm.score)
    save_model(rm, rtok, str(root / "rm"))
    RewardNorm(bias=0.1, gain=2.0).save(str(root / "rm"))
    return {"ppo": str(root / "ppo"), "rm": str(root / "rm")}


def _fake_stage(path, rows):
    os.makedirs(path, exist_ok=True)
    write_jsonl(os.path.join(path, "metrics.jsonl"), rows)
    return str(path)


def test_eval_cli_end_to_end(tiny_model_dir, eval_models, tmp_path):
    from instructgpt.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"seconds.sft": 12.5}))  # an earlier stage's keys survive
    ptx = write_jsonl(tmp_path / "ptx.jsonl", [{"text": t} for t in tiny_corpus(150, seed=3)])
    sft_dir = _fake_stage(tmp_path / "sft", [{"step": s, "train/loss": 3.0 / s} for s in range(1, 6)])
    rm_dir = _fake_stage(tmp_path / "rmstage", [{"step": s, "train/loss": 0.6, "train/accuracy": 0.5 + s / 20}
                                                for s in range(1, 6)])
    ppo_dir = _fake_stage(tmp_path / "ppo", [{"step": s, "objective/kl": s / 10, "objective/scores": s / 5,
                                              "objective/rlhf_reward": s / 6, "eval/kl": s / 10,
                                              "eval/gold_score": 0.1 * s, "eval/rm_score": 0.3 * s}
                                             for s in range(1, 6)])
    rc = main(["eval", "--policy", f"base={tiny_model_dir}", "--policy", f"sft={tiny_model_dir}",
               "--policy", f"ppo={eval_models['ppo']}", "--reward-model", eval_models["rm"], "--best-of", "2",
               "--heldout", "26", "--max-new-tokens", "8", "--ptx-text", ptx, "--out", str(out),
               "--stage", f"sft={sft_dir}", "--stage", f"rm={rm_dir}", "--stage", f"ppo={ppo_dir}"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    required = ["gold_score.base", "gold_score.sft", "gold_score.ppo", "win_rate.ppo_vs_sft",
                "win_rate_ci95.ppo_vs_sft", "win_rate_no_ties.ppo_vs_sft", "rm_accuracy_gold", "kl.ppo",
                "ptx_perplexity.sft", "ptx_perplexity.ppo", "seconds.total", "seconds.eval", "seconds.sft"]
    assert [k for k in required if k not in report] == []
    assert report["heldout_prompts"] == 26 and report["judge"] == "gold" and report["seconds.sft"] == 12.5
    assert report["policies"] == ["base", "sft", "ppo", "best_of_2"]
    # base and sft are the same model: identical greedy answers, every prompt a tie, KL 0
    assert report["win_rate.base_vs_sft"] == 0.5 and report["win_rate_no_ties.base_vs_sft"] is None
    assert report["kl.sft"] == 0.0 and report["kl.base"] == pytest.approx(0.0, abs=1e-6)
    assert report["kl.best_of_2"] == pytest.approx(math.log(2) - 0.5)
    assert report["ptx_perplexity.base"] == report["ptx_perplexity.sft"] != report["ptx_perplexity.ppo"]
    lo, hi = report["win_rate_ci95.ppo_vs_sft"]
    assert 0 <= lo <= report["win_rate.ppo_vs_sft"] <= hi <= 1
    assert set(report["per_family.ppo"]) == set(report["per_family.sft"]) == {
        p.family for p in ev.heldout_prompts(26)}
    samples = read_jsonl(out / "samples_ppo.jsonl")
    assert len(samples) == 26 and all({"prompt", "reference", "response", "gold", "rm"} <= set(s) for s in samples)
    assert report["gold_score.ppo"] == pytest.approx(sum(s["gold"] for s in samples) / 26, abs=1e-3)
    assert report["rm_score.ppo"] == pytest.approx(sum(s["rm"] for s in samples) / 26, abs=1e-3)
    best = read_jsonl(out / "samples_best_of_2.jsonl")
    assert len(best) == 26
    # the same candidates picked by gold (a perfect RM): never worse than the RM's pick or a random one
    oracle, rnd = report["gold_score.best_of_2_oracle"], report["gold_score.best_of_2_random"]
    assert oracle >= report["gold_score.best_of_2"] - 1e-9 and oracle >= rnd - 1e-9
    for png in ("training_curves.png", "overoptimisation.png", "per_family.png"):
        assert (out / png).stat().st_size > 5000
    md = (out / "report.md").read_text()
    for section in ("## Policies", "## Gold score per task family", "## Samples", "per_family.png"):
        assert section in md
    assert "## Expected results" not in md  # a recipe's, not the eval command's


def test_eval_without_gold_is_judged_by_the_reward_model(tiny_model_dir, eval_models, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"tell me about the {w}", "response": f"the {w} is red"}
                                                 for w in ("cat", "dog", "bird", "pear", "plum")])
    report = ev.evaluate({"sft": tiny_model_dir, "ppo": eval_models["ppo"]}, sft="sft",
                         reward_model=eval_models["rm"], heldout=4, prompts=prompts, ptx_text=None,
                         out_dir=str(tmp_path / "out"), max_new_tokens=6, n_resamples=100)
    assert report["judge"] == "reward_model" and report["heldout_prompts"] == 4
    assert "gold_score.sft" not in report and "rm_accuracy_gold" not in report
    rm_sft, rm_ppo = ([r["rm"] for r in read_jsonl(tmp_path / "out" / f"samples_{p}.jsonl")] for p in ("sft", "ppo"))
    assert report["win_rate.ppo_vs_sft"] == pytest.approx(float(ev.win_rate(ev.pairwise_outcomes(rm_ppo, rm_sft))),
                                                          abs=1e-3)
    assert 0.0 <= report["rouge_l.ppo"] <= 1.0 and "bleu.sft" in report



def test_a_prompt_the_chat_template_refuses_is_named_by_file_and_line(tiny_model_dir, tmp_path):
    """A prompt file row whose conversation the policy's chat template refuses (a system turn where it has no system
    role) stops the evaluation with a DataError naming the file and line, before any answer is generated."""
    from instructgpt.modeling import load_model, save_model
    model, tok = load_model(tiny_model_dir)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    save_model(model, tok, str(tmp_path / "sft"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "tell me about the cat"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"p.jsonl, line 2: field 'messages': the chat template refuses this "
                                        r"conversation: System role not supported"):
        ev.evaluate({"sft": str(tmp_path / "sft")}, sft="sft", reward_model=None, heldout=2, prompts=prompts,
                    ptx_text=None, out_dir=str(tmp_path / "out"), max_new_tokens=4, n_resamples=10)

def test_rm_scores_score_each_distinct_answer_once():
    class LengthScorer:  # a stand-in reward model: the response's length
        def __init__(self):
            self.calls = []

        def score(self, prompts, responses, batch_size):
            self.calls.append(list(responses))
            return [float(len(r)) for r in responses]

    held = ev.heldout_prompts(3, seed=0)
    responses = {"sft": ["a", "bb", "ccc"], "ppo": ["a", "bbbb", "ccc"], "base": ["zz", "bb", "ccc"]}
    scorer = LengthScorer()
    out = ev.rm_scores(scorer, held, responses, batch_size=8)
    assert out == {"sft": [1.0, 2.0, 3.0], "ppo": [1.0, 4.0, 3.0], "base": [2.0, 2.0, 3.0]}
    assert len(scorer.calls) == 1 and sorted(scorer.calls[0]) == ["a", "bb", "bbbb", "ccc", "zz"]


def test_bf16_evaluation_samples_under_autocast_and_scores_in_fp32(tiny_model_dir, eval_models, tmp_path, monkeypatch):
    """mixed_precision="bf16": every sampling call (greedy answers, KL samples, best-of-n candidates) runs under bf16
    autocast, the KL and reward-model passes do not, and the report says which precision sampled."""
    import instructgpt.generation as generation
    import instructgpt.reward as reward
    from instructgpt.evaluate import evaluate

    seen = {"generate": [], "rm": []}
    real_generate, real_raw = generation.generate, reward.raw_rewards
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where device="auto" puts the models

    def generate(*a, **k):
        seen["generate"].append(torch.is_autocast_enabled(dev))
        return real_generate(*a, **k)

    def raw_rewards(*a, **k):
        seen["rm"].append(torch.is_autocast_enabled(dev))
        return real_raw(*a, **k)

    monkeypatch.setattr(ev, "generate", generate)  # the evaluation's sampler
    monkeypatch.setattr(reward, "raw_rewards", raw_rewards)
    report = evaluate({"sft": tiny_model_dir, "ppo": eval_models["ppo"]}, reward_model=eval_models["rm"], heldout=13,
                      best_of=2, ptx_text=None, out_dir=str(tmp_path / "ev"), max_new_tokens=6, batch_size=8,
                      mixed_precision="bf16")
    # sft answers, ppo answers, ppo KL samples, best-of-2 candidates
    assert seen["generate"] == [True] * 4 and seen["rm"] and not any(seen["rm"])
    assert report["decoding"]["mixed_precision"] == "bf16" and 0 <= report["gold_score.ppo"] <= 1


def test_best_of_candidates_are_sampled_at_best_of_temperature(tiny_model_dir, eval_models, tmp_path):
    """At temperature 0 every candidate is the SFT model's greedy answer, so best-of-n answers as SFT does and a
    perfect pick gains nothing; at the default temperature 1 the candidates differ and the pick matters."""
    kw = dict(reward_model=eval_models["rm"], heldout=13, best_of=3, ptx_text=None, max_new_tokens=6, batch_size=8,
              kl_prompts=4)
    cold = ev.evaluate({"sft": tiny_model_dir}, best_of_temperature=0.0, out_dir=str(tmp_path / "cold"), **kw)
    assert cold["decoding"]["best_of_temperature"] == 0.0
    sft = [s["response"] for s in read_jsonl(tmp_path / "cold" / "samples_sft.jsonl")]
    assert [s["response"] for s in read_jsonl(tmp_path / "cold" / "samples_best_of_3.jsonl")] == sft
    assert cold["gold_score.best_of_3_oracle"] == pytest.approx(cold["gold_score.best_of_3_random"])
    assert cold["gold_score.best_of_3"] == pytest.approx(cold["gold_score.sft"])
    warm = ev.evaluate({"sft": tiny_model_dir}, out_dir=str(tmp_path / "warm"), **kw)
    assert warm["decoding"]["best_of_temperature"] == 1.0
    assert warm["gold_score.best_of_3_oracle"] > warm["gold_score.best_of_3_random"]
    with pytest.raises(ValueError, match="best_of_temperature"):
        ev.evaluate({"sft": tiny_model_dir}, best_of_temperature=-0.5, out_dir=str(tmp_path / "bad"), **kw)
    with pytest.raises(ValueError, match="^temperature: must be >= 0"):
        ev.evaluate({"sft": tiny_model_dir}, temperature=-1.0, out_dir=str(tmp_path / "bad"), **kw)
    with pytest.raises(ValueError, match="^device: "):
        ev.evaluate({"sft": tiny_model_dir}, device="gpu0", out_dir=str(tmp_path / "bad"), **kw)
    with pytest.raises(ValueError, match="^ptx_max_tokens: must be at least one block of 256 tokens, got 100"):
        ev.evaluate({"sft": tiny_model_dir}, ptx_max_tokens=100, out_dir=str(tmp_path / "bad"), **kw)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cold["decoding"]["device"] == warm["decoding"]["device"] == expected  # "auto"


def test_overoptimisation_plot_without_gold_draws_the_rm_axis_and_no_empty_legend(tmp_path):
    """A PPO run judged by its reward model alone (no gold labeler): its held-out rows have a KL and an RM score, so
    the RM axis gets the run's line and its legend, and the gold axis, with nothing labelled, none (matplotlib warns
    of an empty legend)."""
    import warnings

    from instructgpt.report import plot_overoptimisation
    rows = [{"step": s, "objective/kl": 0.1 * s} for s in range(1, 4)] + [
        {"step": s, "eval/kl": 0.1 * s, "eval/rm_score": 0.2 * s} for s in range(1, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_overoptimisation({"ppo": rows}, {"policies": []}, str(tmp_path / "o.png"))
    assert (tmp_path / "o.png").stat().st_size > 5000


def test_a_missing_ptx_text_is_named_before_any_answer_is_generated(tiny_model_dir, tmp_path, monkeypatch):
    """The held-out text is read after every policy has answered: a file that is not there is a DataError first."""
    def generate(*a, **kw):
        raise AssertionError("an answer was generated")

    monkeypatch.setattr(ev, "generate", generate)
    missing = str(tmp_path / "plays.txt")
    with pytest.raises(DataError, match=f"{missing}: no such file"):
        ev.evaluate({"sft": tiny_model_dir}, sft="sft", reward_model=None, heldout=2, ptx_text=missing,
                    out_dir=str(tmp_path / "out"), max_new_tokens=4, n_resamples=10)
