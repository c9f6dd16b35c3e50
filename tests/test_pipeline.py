"""The whole loop through its real entry point on a tiny model, and the shipped recipes validated with stand-ins."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import write_jsonl

from instructgpt.cli import main as cli_main
from instructgpt.config import ConfigError
from instructgpt.pipeline import load_recipe, memory_report, peak_memory_gib, stage_configs
from instructgpt.report import time_and_memory_table

RECIPES = os.path.join(os.path.dirname(__file__), "..", "configs", "recipes")


def _tiny_overrides(model_dir):
    return [f"sft.model.name_or_path={model_dir}", "sft.train.max_steps=4", "sft.train.batch_size=8",
            "sft.data.train=builtin:task-demos?n=64&seed=0", "sft.data.eval_size=0", "sft.data.max_length=256",
            "sft.data.skip_bad_lines=true", "rm.data.skip_bad_lines=true",
            "rm.data.max_length=256",
            "label_sim.prompts=builtin:task-prompts?split=train&n=24&seed=1", "label_sim.k=3",
            "label_sim.max_new_tokens=8", "rm.train.batch_size=8", "rm.data.eval_size=0",
            "rm.normalize.max_demonstrations=16",
            "ppo.train.max_steps=2", "ppo.train.batch_size=8", "ppo.ppo.num_minibatches=2", "ppo.ppo.ppo_epochs=1",
            "ppo.ppo.response_length=8", "ppo.ppo.eval_prompts=8", "ppo.train.eval_every=2",
            "ppo.data.pretrain=builtin:shakespeare?split=train", "ppo.data.skip_bad_lines=true", "eval.heldout=26", "eval.best_of=2",
            "eval.max_new_tokens=8", "eval.bon_curve=4", "eval.bon_prompts=6"]


def test_pipeline_runs_every_stage_writes_the_report_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["pipeline", "--out", str(out), *_tiny_overrides(tiny_model_dir)]) == 0
    for stage in ("sft", "rm", "ppo", "ppo_noptx"):
        assert (out / stage / "DONE.json").exists() and (out / stage / "model" / "config.json").exists(), stage
    assert sum(1 for _ in open(out / "rankings.jsonl")) > 0
    report = json.load(open(out / "report.json"))
    for key in ("gold_score.base", "gold_score.sft", "gold_score.ppo", "win_rate.ppo_vs_sft",
                "win_rate_ci95.ppo_vs_sft", "win_rate_no_ties.ppo_vs_sft", "rm_accuracy_gold", "kl.ppo",
                "ptx_perplexity.sft", "ptx_perplexity.ppo", "seconds.total", "seconds.sft", "seconds.rm",
                "seconds.ppo", "seconds.eval"):
        assert key in report, key
    lo, hi = report["win_rate_ci95.ppo_vs_sft"]
    assert 0.0 <= lo <= report["win_rate.ppo_vs_sft"] <= hi <= 1.0
    # peak resident memory at the end of each stage: one process, so it never falls from stage to stage
    order = ("sft", "label_sim", "rm", "ppo", "ppo_noptx", "eval")
    rss = [report[f"peak_rss_gib.{s}"] for s in order]
    assert 0.1 < rss[0] and rss == sorted(rss) and report["peak_rss_gib.total"] == rss[-1] < 24
    assert "## Time and memory" in open(out / "report.md").read()
    assert report["kl.sft"] == 0.0 and report["heldout_prompts"] == 26
    assert (out / "report.md").exists() and any(p.suffix == ".png" for p in out.iterdir())
    # rerun on the same directory: every stage is finished, only the evaluation runs again
    before = {s: os.path.getmtime(out / s / "DONE.json") for s in ("sft", "rm", "ppo")}
    rankings_mtime = os.path.getmtime(out / "rankings.jsonl")
    # the default recipe's expected results, each checked against what this tiny run measured
    expected = [x for x in open(out / "report.md") if x.startswith("| `")]
    assert len(expected) == len(report["expectations"])
    assert "| `gold_gain.ppo_vs_sft` | ≥ 0.150 |" in "".join(expected)
    assert all(x.rstrip().endswith(("| ✅ met |", "| ❌ not met |", "| — missing |")) for x in expected)
    # ... and the recipe's own: one the report has, and one it cannot know (marked missing, not an error)
    assert cli_main(["pipeline", "--out", str(out), *_tiny_overrides(tiny_model_dir),
                     "expectations.heldout_prompts.min=20", "expectations.gold_score.dpo.min=0.5"]) == 0
    expected = [x for x in open(out / "report.md") if x.startswith("| `")]
    assert expected[-2:] == ["| `heldout_prompts` | ≥ 20 | 26 | ✅ met |\n",
                             "| `gold_score.dpo` | ≥ 0.500 | — | — missing |\n"]
    assert before == {s: os.path.getmtime(out / s / "DONE.json") for s in ("sft", "rm", "ppo")}
    first = json.load(open(out / "report.json"))
    assert first["seconds.sft"] == report["seconds.sft"] and first["seconds.ppo"] == report["seconds.ppo"]
    assert first["seconds.label_sim"] == report["seconds.label_sim"] > 0  # the rankings were not made again
    assert os.path.getmtime(out / "rankings.jsonl") == rankings_mtime
    assert first["peak_rss_gib.ppo"] == report["peak_rss_gib.ppo"]  # kept from memory.json, like the seconds
    # a pipeline killed before it recorded any time: finished stages take their DONE.json's seconds
    os.remove(out / "seconds.json")
    assert cli_main(["pipeline", "--out", str(out), *_tiny_overrides(tiny_model_dir)]) == 0
    again = json.load(open(out / "report.json"))
    for stage in ("sft", "rm", "ppo", "ppo_noptx"):
        assert again[f"seconds.{stage}"] == round(json.load(open(out / stage / "DONE.json"))["seconds"], 1) > 0


def _weights(model_dir) -> list[float]:
    from safetensors.torch import load_file

    return [float(v.float().sum()) for _, v in sorted(load_file(str(model_dir / "model.safetensors")).items())]


def test_dpo_and_rloo_sections_add_baselines_beside_ppo(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    overrides = [*_tiny_overrides(tiny_model_dir), "ppo_noptx=false", "eval.best_of=0", "dpo.train.batch_size=8",
                 "dpo.train.lr=1e-3", "dpo.data.eval_size=0", "rloo.train.lr=1e-4"]
    cfgs = stage_configs(load_recipe(None, overrides), str(out))
    assert cfgs["dpo"].data.train == cfgs["rm"].data.train == str(out / "rankings.jsonl")
    assert cfgs["dpo"].model.name_or_path == str(out / "sft" / "model") and cfgs["dpo"].beta == 0.1
    # RLOO: the ppo section's run (same SFT, RM, prompts, ptx) with critic-free advantages and its own overrides
    r, p = cfgs["rloo"], cfgs["ppo"]
    assert (r.ppo.advantage_estimator, r.ppo.samples_per_prompt, r.train.lr) == ("rloo", 4, 1e-4)
    assert (r.model.name_or_path, r.reward_model.name_or_path, r.data.train, r.ppo.ptx_coef, r.train.max_steps) == \
        (p.model.name_or_path, p.reward_model.name_or_path, p.data.train, p.ppo.ptx_coef, p.train.max_steps)
    assert p.ppo.advantage_estimator == "gae" and r.out_dir == str(out / "rloo")
    with pytest.raises(ConfigError, match="rloo.ppo.advantage_estimator"):
        stage_configs(load_recipe(None, [*overrides, "rloo.ppo.advantage_estimator=grpo"]), str(out))
    default = stage_configs(load_recipe(None, []), str(out))
    assert "dpo" not in default and "rloo" not in default  # off by default
    human = stage_configs(load_recipe(None, [*overrides, "rm.data.train=human.jsonl"]), str(out))
    assert human["dpo"].data.train == human["rm"].data.train == "human.jsonl"  # whatever the RM learns from
    assert cli_main(["pipeline", "--out", str(out), *overrides]) == 0
    done = json.load(open(out / "dpo" / "DONE.json"))
    assert done["prompts"] == sum(1 for _ in open(out / "rankings.jsonl"))  # every ranking (no held-out split)
    report = json.load(open(out / "report.json"))
    for name in ("dpo", "rloo"):
        keys = {f"gold_score.{name}", f"win_rate_no_ties.{name}_vs_sft", f"kl.{name}", f"seconds.{name}",
                f"peak_rss_gib.{name}"}
        assert keys <= set(report)
        assert report[f"kl.{name}"] != 0.0  # a policy that moved (a KL estimate from 26 samples), evaluated like PPO's
        assert _weights(out / name / "model") != _weights(out / "sft" / "model")
    rows = [json.loads(line) for line in open(out / "rloo" / "metrics.jsonl")]
    assert any("objective/scores" in r for r in rows) and not any("ppo/val/var_explained" in r for r in rows)
    md = open(out / "report.md").read()
    table = md[md.index("## Time and memory"):].split("\n\n")[1]
    stages = [ln.split("|")[1].strip() for ln in table.splitlines()[2:]]
    assert stages == ["sft", "label_sim", "rm", "ppo", "rloo", "dpo", "eval", "total"]  # the run's order


def test_unknown_recipe_section_and_key_are_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("sft: {}\nppo_ptx: {}\n")
    with pytest.raises(ConfigError, match="r.yaml: unknown config key 'ppo_ptx'"):
        load_recipe(str(bad), [])
    with pytest.raises(ConfigError, match="unknown config key 'label_sim.kk'"):
        load_recipe(None, ["label_sim.kk=3"])
    with pytest.raises(ConfigError, match="unknown config key 'expectations.seconds.ppo.minimum'"):
        load_recipe(None, ["expectations.seconds.ppo.minimum=60"])
    with pytest.raises(ConfigError, match="expectations.seconds.ppo: give min, max or both"):
        load_recipe(None, ["expectations.seconds.ppo={}"])
    with pytest.raises(ConfigError, match="label_sim.policy: set by the pipeline"):
        load_recipe(None, ["label_sim.policy=some/model"])


def test_a_missing_data_file_stops_the_pipeline_before_its_first_stage(tiny_model_dir, tmp_path, capsys):
    """A file the recipe names for a late stage (PPO's ptx text) that is not there: the pipeline exits 2 naming it
    before SFT runs, not after SFT, label-sim and the reward model; the run's own rankings.jsonl, which label-sim
    writes, is not asked for beforehand."""
    missing = tmp_path / "text.txt"
    out = tmp_path / "run"
    assert cli_main(["pipeline", "--out", str(out), *_tiny_overrides(tiny_model_dir),
                     f"ppo.data.pretrain={missing}"]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    assert not (out / "sft").exists()


def test_expectations_are_a_recipes_own_and_overrides_reach_nested_keys(tmp_path):
    default = load_recipe(None, []).expectations
    assert default["win_rate_no_ties.ppo_vs_sft"].min == 0.75 and default["gold_score.sft"].min == "gold_score.base"
    assert load_recipe(os.path.join(RECIPES, "gpt2-hh.yaml"), []).expectations == {}  # not the default run's
    moved = load_recipe(None, ["expectations.gold_gain.ppo_vs_sft.min=0.2", "expectations.best_of_n_gain=null",
                               "expectations.all_properties.sft.min=0.1"]).expectations
    assert moved["gold_gain.ppo_vs_sft"].min == 0.2 and "best_of_n_gain" not in moved
    assert (moved["all_properties.sft"].min, moved["all_properties.sft"].max) == (0.1, 0.7)  # bounds add up


def test_one_override_switches_every_stage_to_the_control_suite(tmp_path):
    """suite=puzzles: demonstrations, the prompts labelers rank, PPO's prompts and monitor, and the held-out prompts
    all come from the control suite; a source a recipe names itself is kept; an unknown suite is an error."""
    from instructgpt import gold
    from instructgpt.builtin import rows

    for suite in ("assistant", "puzzles"):
        recipe = load_recipe(None, [f"suite={suite}"])
        cfgs = stage_configs(recipe, str(tmp_path / suite))
        sources = [cfgs["sft"].data.train, recipe.label_sim.prompts, cfgs["ppo"].data.train, cfgs["ppo"].data.eval]
        assert recipe.eval.suite == suite and cfgs["ppo_noptx"].data.train == cfgs["ppo"].data.train
        for src in sources:  # every prompt of every stream belongs to the suite the recipe names (20 of each)
            prompts = [r["prompt"] for r in rows(re.sub(r"\bn=\d+", "n=20", src))]
            assert len(prompts) == 20
            assert {gold.suite_of(p) for p in prompts} == {suite}, src
    kept = load_recipe(None, ["suite=puzzles", "sft.data.train=demos.jsonl"])
    assert kept.sft["data"]["train"] == "demos.jsonl" and "puzzles" in kept.ppo["data"]["train"]
    with pytest.raises(ConfigError, match="unknown suite 'poems'"):
        load_recipe(None, ["suite=poems"])


@pytest.mark.parametrize("name", ["gpt2-hh.yaml", "pythia-tldr.yaml"])
def test_real_model_recipes_are_valid_with_tiny_stand_ins(name, tiny_model_dir, tmp_path):
    """The hub is out of reach here: the recipe's stage configs are checked as written, then with the model and
    data replaced by tiny local stand-ins of the same formats, which every stage's loader must read."""
    from instructgpt.data import load_comparisons, load_demonstrations, load_prompts
    path = os.path.join(RECIPES, name)
    cfgs = stage_configs(load_recipe(path, []), str(tmp_path / "run"))
    assert set(cfgs) == {"sft", "rm", "ppo", "ppo_noptx"} and cfgs["ppo_noptx"].ppo.ptx_coef == 0.0
    assert cfgs["ppo"].model.name_or_path.endswith(os.path.join("sft", "model"))
    if "hh" in name:
        rows = [{"chosen": f"\n\nHuman: say {i}\n\nAssistant: {i} it is",
                 "rejected": f"\n\nHuman: say {i}\n\nAssistant: no"} for i in range(8)]
        sft_rows = rows
    else:
        rows = [{"info": {"post": f"post number {i}", "title": "t"}, "summaries": [{"text": "a"}, {"text": "b"}],
                 "choice": i % 2} for i in range(8)]
        sft_rows = [{"prompt": f"POST: post {i}\nTL;DR:", "label": f"summary {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    assert len(load_demonstrations(sft_data)) == 8 and len(load_comparisons(data)) == 8 and len(load_prompts(data)) == 8
    stand_in = [f"sft.model.name_or_path={tiny_model_dir}", f"sft.data.train={sft_data}", "sft.data.eval=null",
                f"rm.data.train={data}", f"rm.data.eval={data}", f"rm.normalize.demonstrations={sft_data}",
                f"ppo.data.train={data}", f"ppo.data.eval={data}", "ppo.data.pretrain=builtin:shakespeare"]
    cfgs = stage_configs(load_recipe(path, stand_in), str(tmp_path / "run2"))
    assert cfgs["rm"].data.train == data and cfgs["ppo"].reward_model.name_or_path.endswith(os.path.join("rm", "model"))


@pytest.mark.parametrize("name", [None, "smollm2.yaml", "gpt2-hh.yaml", "pythia-tldr.yaml"])
def test_recipes_measure_the_alignment_tax_on_text_ppo_does_not_train_on(name, tmp_path):
    recipe = load_recipe(name and os.path.join(RECIPES, name), [])
    ppo_text = recipe.ppo["data"]["pretrain"]
    eval_text = recipe.eval.ptx_text  # a recipe's eval section replaces the default's
    assert eval_text and eval_text != ppo_text
    if not ppo_text.startswith("builtin:"):  # a hub corpus is read only as far as PPO needs, never whole
        assert 0 < stage_configs(recipe, str(tmp_path))["ppo"].data.pretrain_max_tokens <= 64_000_000


def test_pretrain_max_tokens_below_one_block_is_refused():
    from instructgpt.config import StageConfig, load_config

    with pytest.raises(ConfigError, match="data.pretrain_max_tokens: must be at least one block of "
                                          "data.max_length=128 tokens, got 100"):
        load_config(StageConfig, None, ["data.max_length=128", "data.pretrain_max_tokens=100"])


def test_smollm2_recipe_is_valid_and_uses_lora_everywhere(tiny_model_dir, tmp_path):
    path = os.path.join(RECIPES, "smollm2.yaml")
    cfgs = stage_configs(load_recipe(path, [f"sft.model.name_or_path={tiny_model_dir}"]), str(tmp_path / "run"))
    assert set(cfgs) == {"sft", "rm", "ppo"}
    assert cfgs["sft"].model.lora.enabled and cfgs["rm"].model.lora.enabled and cfgs["ppo"].model.lora.enabled
    assert cfgs["ppo"].ppo.value_lora and cfgs["ppo"].ppo.ptx_coef > 0
    recipe = load_recipe(path, [])
    assert recipe.sft["model"]["name_or_path"] == "builtin:smollm2"
    # the recipe runs on the default suite, with expected results of its own: a wider interval than the default's
    assert recipe.suite == "assistant" and "error_rate" not in recipe.sft["data"]["train"]
    default = load_recipe(None, []).expectations
    low = "win_rate_no_ties_ci95.ppo_vs_sft[0]"
    assert recipe.expectations[low].min < default[low].min
    assert "gold_gain.ppo_vs_sft" not in recipe.expectations


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_peak_memory_is_the_kernels_high_water_mark_in_gib():
    import numpy as np

    block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, touched: resident
    peak = peak_memory_gib()["rss"]
    hwm_kib = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    assert abs(peak - hwm_kib / 2**20) < 0.01 and peak > block.nbytes / 2**30


def test_peak_memory_without_the_resource_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: `import resource` raises ImportError
    assert "rss" not in peak_memory_gib() and not any(k.startswith("peak_rss") for k in
                                                      memory_report({"sft": peak_memory_gib()}))


def test_memory_report_keys_totals_and_table():
    memory = {"sft": {"rss": 1.234}, "rm": {"rss": 2.0, "cuda": 3.456}, "eval": {"rss": 1.5}}
    rep = memory_report(memory)
    assert rep == {"peak_rss_gib.sft": 1.23, "peak_rss_gib.rm": 2.0, "peak_rss_gib.eval": 1.5,
                   "peak_rss_gib.total": 2.0, "peak_cuda_gib.rm": 3.46, "peak_cuda_gib.total": 3.46}
    assert memory_report({}) == {}
    rows = time_and_memory_table({"seconds.total": 15.0, "seconds.rm": 5.0, "seconds.sft": 10.0, **rep})
    assert rows[0] == "| stage | seconds | peak resident memory so far (GiB) | peak GPU memory of the stage (GiB) |"
    assert rows[2:] == ["| sft | 10.0 | 1.23 | - |", "| rm | 5.0 | 2.00 | 3.46 |", "| eval | - | 1.50 | - |",
                        "| total | 15.0 | 2.00 | 3.46 |"]  # the pipeline's order, whatever the report's
    assert time_and_memory_table({"seconds.sft": 1.0})[0] == "| stage | seconds |"


@pytest.mark.parametrize("name", ["gpt2-hh.yaml", "pythia-tldr.yaml"])
def test_hub_recipe_runs_end_to_end_on_a_fake_hub(name, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The recipe's own data sources, through the real loaders, from a stand-in hub (load_dataset replaced; the hub is
    out of reach here) and the tiny model in the real one's place: every stage runs and the report is written."""
    import datasets

    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle"]
    pairs = [(f"{w} {i}", f"{w} {i}, as asked.") for i in range(6) for w in words]
    rows = {"hh-rlhf": [{"chosen": f"\n\nHuman: say {p}\n\nAssistant: {r}",
                         "rejected": f"\n\nHuman: say {p}\n\nAssistant: no"} for p, r in pairs],
            "openai_summarize_tldr": [{"prompt": f"POST: say {p}\nTL;DR:", "label": r} for p, r in pairs],
            "summarize_from_feedback": [{"info": {"post": f"say {p}", "title": p}, "choice": 0,
                                         "summaries": [{"text": r}, {"text": "no"}]} for p, r in pairs]}
    text = [{"text": " ".join(words[(i + j) % 8] for j in range(40)) + "."} for i in range(400)]
    calls, read = [], {"text": 0}

    def load_dataset(name, subset=None, split=None, streaming=False):
        calls.append((name, subset, split, streaming))
        for key, shaped in rows.items():
            if key in name:
                return list(shaped)

        def docs():
            for i, r in enumerate(text):
                read["text"] += streaming
                yield {"text": ""} if i % 3 == 0 else r  # WikiText-like blank lines
        return docs() if streaming else list(docs())
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "run"
    overrides = [f"sft.model.name_or_path={tiny_model_dir}", "sft.train.max_steps=2", "sft.train.batch_size=8",
                 "sft.train.warmup_steps=0", "sft.data.eval_size=8", "rm.train.batch_size=8", "rm.train.warmup_steps=0",
                 "rm.normalize.max_demonstrations=8", "rm.epochs=0.2", "ppo.train.max_steps=1",
                 "ppo.train.batch_size=8", "ppo.ppo.response_length=8", "ppo.ppo.num_minibatches=2",
                 "ppo.ppo.eval_prompts=4", "ppo.data.pretrain_max_tokens=2048", "eval.heldout=6", "eval.best_of=2",
                 "eval.max_new_tokens=8", "eval.bon_curve=4", "eval.bon_prompts=6"]
    # the tiny model has 256 positions, the recipes' SFT 512 or 640 tokens: a clear error before any step; the stage
    # had not checkpointed, so the corrected config runs in the same directory
    assert cli_main(["pipeline", "--config", os.path.join(RECIPES, name), "--out", str(out), *overrides]) == 2
    sft_length = load_recipe(os.path.join(RECIPES, name), []).sft["data"]["max_length"]
    assert (f"data.max_length={sft_length} is longer than the model's context (256 positions)"
            in capsys.readouterr().err)
    overrides += [f"{stage}.data.max_length=256" for stage in ("sft", "rm", "ppo")]
    assert cli_main(["pipeline", "--config", os.path.join(RECIPES, name), "--out", str(out), *overrides]) == 0
    report = json.load(open(out / "report.json"))
    assert report["heldout_prompts"] == 6 and report["judge"] == "reward_model" and "win_rate.ppo_vs_sft" in report
    assert report["ptx_perplexity.sft"] > 1 and report["peak_rss_gib.total"] > 0.1
    recipe = load_recipe(os.path.join(RECIPES, name), [])
    for src in (recipe.sft["data"]["train"], recipe.rm["data"]["train"], recipe.ppo["data"]["train"]):
        assert any(c[0] == src.partition("@")[0].partition(":")[0] for c in calls), src
    # PPO's ptx text streamed and read only as far as its 2,048 tokens; the perplexity text read whole
    ptx = recipe.ppo["data"]["pretrain"].partition(":")[0]
    assert (ptx, None, "train", True) in calls and 0 < read["text"] < len(text) / 2
    assert ("Salesforce/wikitext", "wikitext-103-raw-v1", "test", False) in calls
