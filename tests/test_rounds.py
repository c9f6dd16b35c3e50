"""Rounds of the pipeline (`rounds: N`): each round after the first ranks samples of the previous round's policy,
retrains the reward model on every ranking so far and continues PPO from that policy; simulated labelers or people."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import read_jsonl, write_jsonl
from safetensors.torch import load_file

from instructgpt import gold, label_sim, ppo, rm
from instructgpt.cli import main as cli_main
from instructgpt.config import ConfigError
from instructgpt.labeling.cli import main as label_main
from instructgpt.labeling.rubric import check_ranking
from instructgpt.labeling.store import Store
from instructgpt.pipeline import WAITING_FOR_RANKINGS, load_recipe, round_configs, stage_configs
from instructgpt.rounds import union_rankings
from instructgpt.runs import Interrupted


def _tiny(model_dir) -> list[str]:
    return [f"sft.model.name_or_path={model_dir}", "sft.train.max_steps=4", "sft.train.batch_size=8",
            "sft.data.train=builtin:task-demos?n=64&seed=0", "sft.data.eval_size=0", "sft.data.max_length=256",
            "sft.data.skip_bad_lines=true", "sft.data.pretrain=null", "sft.train.pretrain_coef=0",
            "rm.data.skip_bad_lines=true", "rm.data.max_length=256",
            "label_sim.prompts=builtin:task-prompts?split=train&n=24&seed=1", "label_sim.k=3",
            "label_sim.max_new_tokens=8", "rm.train.batch_size=8", "rm.data.eval_size=0",
            "rm.normalize.max_demonstrations=16", "ppo.train.max_steps=2", "ppo.train.batch_size=8",
            "ppo.ppo.num_minibatches=2", "ppo.ppo.response_length=8", "ppo.ppo.eval_prompts=0",
            "ppo.data.train=builtin:task-prompts?split=train&n=64&seed=2",
            "ppo.data.pretrain=builtin:shakespeare?split=train", "ppo.data.pretrain_max_tokens=4096",
            "ppo.data.skip_bad_lines=true", "ppo_noptx=false", "eval.heldout=12", "eval.best_of=0",
            "eval.bon_curve=0", "eval.max_new_tokens=8", "eval.kl_prompts=8", "eval.ptx_text=none"]


@pytest.fixture(scope="module")
def one_round(tiny_model_dir, tmp_path_factory):
    """A finished one-round run (the default rounds: 1), kept aside; :func:`_fresh` puts a copy back at the path it
    ran in (a stage's config names its out_dir) for each test to take on to round 2."""
    base = tmp_path_factory.mktemp("rounds")
    out = base / "run"
    assert cli_main(["pipeline", "--out", str(out), *_tiny(tiny_model_dir)]) == 0
    assert not any(p.name.startswith("round") for p in out.iterdir())  # a one-round run's layout
    assert "rounds" not in json.load(open(out / "report.json"))
    shutil.copytree(out, base / "pristine")
    return out


def _fresh(run):
    shutil.rmtree(run)
    shutil.copytree(run.parent / "pristine", run, copy_function=shutil.copy2)  # mtimes kept
    return run


def test_round_configs_link_each_round_to_the_last(tmp_path):
    recipe = load_recipe(None, ["rounds=3"])
    out = str(tmp_path)
    cfgs = stage_configs(recipe, out)
    r2, r3 = round_configs(recipe, out, 2, cfgs), round_configs(recipe, out, 3, cfgs)
    j = os.path.join
    assert (r2["label_sim"].policy, r2["label_sim"].out, r2["label_sim"].seed) == \
        (j(out, "ppo", "model"), j(out, "round2", "rankings.jsonl"), 1)
    assert r3["label_sim"].policy == j(out, "round2", "ppo", "model")
    # the RM trains from SFT on every ranking so far; PPO goes on from the last policy against the round's RM
    assert r2["rm"].model.name_or_path == cfgs["rm"].model.name_or_path == j(out, "sft", "model")
    assert (r2["rm"].data.train, r2["rm"].out_dir) == (j(out, "round2", "rankings_all.jsonl"), j(out, "round2", "rm"))
    assert (r3["ppo"].model.name_or_path, r3["ppo"].reward_model.name_or_path, r3["ppo"].out_dir, r3["ppo"].seed) == \
        (j(out, "round2", "ppo", "model"), j(out, "round3", "rm", "model"), j(out, "round3", "ppo"), 2)
    assert (r2["ppo"].ppo, r2["ppo"].train, r2["ppo"].data) == (cfgs["ppo"].ppo, cfgs["ppo"].train, cfgs["ppo"].data)
    # every round's KL penalty anchors at SFT, round 1's start
    assert cfgs["ppo"].reference_model.name_or_path is None
    assert r2["ppo"].reference_model.name_or_path == r3["ppo"].reference_model.name_or_path == j(out, "sft", "model")
    assert load_recipe(None, []).rounds == 1 and load_recipe(None, []).labelers == "simulated"
    for bad, msg in ((["rounds=0"], "rounds: must be >= 1"), (["rounds=2", "label_sim=null"], "a label_sim section"),
                     (["rounds=2", "ppo=null"], "the rm and ppo sections"),
                     (["labelers=robots"], "labelers")):
        with pytest.raises(ConfigError, match=msg):
            load_recipe(None, bad)


def test_union_keeps_each_sources_rankings_and_drops_an_earlier_sources_repeat(tmp_path):
    a = [{"prompt": f"p{i}", "responses": ["x", "y"], "ranks": [1, 2]} for i in range(3)]
    b = [a[1], {"prompt": "q", "responses": ["x", "y", "z"], "ranks": [2, 1, 1]}, a[1]]  # an export holds round 1's too
    src_a, src_b = write_jsonl(tmp_path / "a.jsonl", a + [a[0]]), write_jsonl(tmp_path / "b.jsonl", b)
    stats = union_rankings([src_a, src_b], str(tmp_path / "all.jsonl"))
    assert stats == {"rankings": 5, "per_source": [4, 1]}  # a's own repeat stays; b's copies of a's go
    assert read_jsonl(tmp_path / "all.jsonl") == a + [a[0], b[1]]
    assert json.load(open(tmp_path / "all.jsonl.stats.json")) == stats


def _interrupt(monkeypatch, module, attr: str, when: str) -> None:
    """`module.attr(cfg)` stops as SIGTERM would when the config's output path contains `when`."""
    real = getattr(module, attr)

    def stop(cfg):
        if when in (getattr(cfg, "out_dir", None) or getattr(cfg, "out", "")):
            raise Interrupted(15)
        return real(cfg)
    monkeypatch.setattr(module, attr, stop)


def test_two_rounds_rank_the_policy_retrain_on_the_union_continue_ppo_and_resume(one_round, tiny_model_dir,
                                                                                 tmp_path, monkeypatch):
    out = _fresh(one_round)
    argv = ["pipeline", "--out", str(out), *_tiny(tiny_model_dir), "rounds=2"]
    round1 = {p: os.path.getmtime(out / p) for p in ("sft/DONE.json", "rankings.jsonl", "rm/DONE.json",
                                                      "ppo/DONE.json")}
    # 1. stopped between the rounds (before round 2's labelers), then inside round 2 (before its PPO)
    with monkeypatch.context() as m:
        _interrupt(m, label_sim, "run", "round2")
        with pytest.raises(Interrupted):
            cli_main(argv)
    assert not (out / "round2").exists()
    with monkeypatch.context() as m:
        _interrupt(m, ppo, "train", "round2")
        with pytest.raises(Interrupted):
            cli_main(argv)
    round2 = {p: os.path.getmtime(out / p) for p in ("round2/rankings.jsonl", "round2/rankings_all.jsonl",
                                                      "round2/rm/DONE.json")}
    assert not (out / "round2" / "ppo").exists()
    # 2. the last invocation: PPO starts from round 1's final weights, its KL reference is the SFT model
    loaded = {}

    def spy(cfg):
        models = real_load(cfg)
        loaded[cfg.out_dir] = [{k: v.detach().clone() for k, v in m.state_dict().items()}
                               for m in (models.policy, models.ref)]
        return models
    real_load = ppo.load_models
    monkeypatch.setattr(ppo, "load_models", spy)
    trained = []
    real_rm = rm.train
    monkeypatch.setattr(rm, "train", lambda cfg: trained.append(cfg.out_dir) or real_rm(cfg))
    assert cli_main(argv) == 0
    assert trained == [str(out / "rm"), str(out / "round2" / "rm")]  # both asked; each finds its DONE.json
    assert round1 == {p: os.path.getmtime(out / p) for p in round1}  # nothing finished is run again
    assert round2 == {p: os.path.getmtime(out / p) for p in round2}
    assert list(loaded) == [str(out / "round2" / "ppo")]  # round 1's PPO was finished: never loaded again
    final1 = load_file(str(out / "ppo" / "model" / "model.safetensors"))
    sft_weights = load_file(str(out / "sft" / "model" / "model.safetensors"))
    policy, ref = loaded[str(out / "round2" / "ppo")]
    assert all(torch.equal(policy[k], v) for k, v in final1.items())
    assert all(torch.equal(ref[k], v) for k, v in sft_weights.items())
    assert any(not torch.equal(ref[k], v) for k, v in final1.items())
    final2 = load_file(str(out / "round2" / "ppo" / "model" / "model.safetensors"))
    assert any(not torch.equal(final2[k], v) for k, v in final1.items())  # and PPO moved it on
    # 3. round 2's RM trained on the union: round 1's rankings, then round 2's (samples of round 1's policy)
    r1, r2 = read_jsonl(out / "rankings.jsonl"), read_jsonl(out / "round2" / "rankings.jsonl")
    union = read_jsonl(out / "round2" / "rankings_all.jsonl")
    assert len(r1) > 0 and len(r2) > 0 and union == r1 + r2
    assert json.load(open(out / "round2" / "rm" / "DONE.json"))["prompts"] == len(r1) + len(r2)
    assert json.load(open(out / "rm" / "DONE.json"))["prompts"] == len(r1)
    # 4. the report: both rounds side by side
    report = json.load(open(out / "report.json"))
    assert report["rounds"] == 2 and report["round_policies"] == ["ppo", "ppo_round2"]
    assert (report["rankings.round1"], report["rankings_total.round2"]) == (len(r1), len(r1) + len(r2))
    for key in ("gold_score.ppo_round2", "win_rate_no_ties.ppo_round2_vs_sft", "kl.ppo_round2",
                "gold_gain.round2_vs_round1", "seconds.round2.label_sim", "seconds.round2.rm", "seconds.round2.ppo",
                "seconds.eval_rounds"):
        assert key in report, key
    # each round's RM on pairs of each policy's held-out samples (None where the tiny model's samples tie in gold)
    assert (report["rm_accuracy_samples_prompts"], report["rm_accuracy_samples_k"]) == (12, 3)
    for policy in ("sft", "ppo", "ppo_round2"):
        assert report[f"rm_accuracy_samples_pairs.{policy}"] >= 0
        for r in (1, 2):
            acc = report[f"rm_accuracy_samples.round{r}.{policy}"]
            assert (acc is None) == (report[f"rm_accuracy_samples_pairs.{policy}"] == 0) and (acc is None or
                                                                                              0 <= acc <= 1)
    assert report["gold_gain.round2_vs_round1"] == pytest.approx(report["gold_score.ppo_round2"] -
                                                                 report["gold_score.ppo"])
    md = open(out / "report.md").read()
    rows = md[md.index("## Rounds"):].split("\n\n")[2].splitlines()[2:]
    assert [r.split("|")[1:3] for r in rows] == [[" 1 ", " ppo "], [" 2 ", " ppo_round2 "]]
    assert f"| {len(r2)} / {len(r1) + len(r2)} |" in rows[1]
    stages = [ln.split("|")[1].strip() for ln in md[md.index("## Time and memory"):].split("\n\n")[1].splitlines()[2:]]
    assert stages == ["sft", "label_sim", "rm", "ppo", "round2.label_sim", "round2.rm", "round2.ppo", "eval",
                      "eval_rounds", "total"]


def test_people_rank_a_round_in_the_labeling_app(one_round, tiny_model_dir, tmp_path, capsys):
    """labelers: people: the round's samples go out for the labeling app and the pipeline stops; once the app's
    export is in the round's directory, the same command goes on."""
    out = _fresh(one_round)
    argv = ["pipeline", "--out", str(out), *_tiny(tiny_model_dir), "rounds=2", "labelers=people"]
    assert cli_main(argv) == WAITING_FOR_RANKINGS
    items = out / "round2" / "to_rank.jsonl"
    said = capsys.readouterr().out
    assert f"--prompts {items}" in said and f"--out-dir {out / 'round2'}" in said and f"--out {out}" in said
    rows = read_jsonl(items)
    assert rows and all(set(r) == {"prompt", "responses"} and len(r["responses"]) == 3 for r in rows)
    written = os.path.getmtime(items)
    assert cli_main(argv) == WAITING_FOR_RANKINGS and os.path.getmtime(items) == written  # sampled once
    assert not (out / "round2" / "rm").exists()
    # people rank them: import, rank in the app's store (by the gold labeler here), export into the round's directory
    db = str(tmp_path / "labels.sqlite")
    assert label_main(["import", "--db", db, "--prompts", str(items)]) == 0
    store = Store(db)
    user = store.add_user("ann", "a long enough password")
    while (task_id := store.claim_next(user.id)) is not None:
        task = store.task(task_id)
        scores = [gold.gold_score(task.messages[-1]["content"], r) for r in task.responses]
        ranks = [1 + sorted(set(scores), reverse=True).index(s) for s in scores]
        sub = check_ranking(len(ranks), ranks, [4] * len(ranks), [[] for _ in ranks])
        assert store.submit_ranking(task_id, user.id, sub).status == "ok"
    assert label_main(["export", "--db", db, "--out-dir", str(out / "round2")]) == 0
    people = read_jsonl(out / "round2" / "rankings.jsonl")
    assert people and all(r["labeler"] == "ann" for r in people)
    assert cli_main(argv) == 0
    union = read_jsonl(out / "round2" / "rankings_all.jsonl")
    assert union == read_jsonl(out / "rankings.jsonl") + people
    report = json.load(open(out / "report.json"))
    assert report["round_policies"] == ["ppo", "ppo_round2"] and report["rankings.round2"] == len(people)
