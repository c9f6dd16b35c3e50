"""Every command's typed config: the shipped config files validate, unknown keys and bad values are named, and the
command line reads defaults <- --config FILE <- flags <- dotted overrides."""

from __future__ import annotations

import glob
import os

import pytest

from instructgpt import evaluate, generate_cli, label_sim
from instructgpt.cli import main as cli_main
from instructgpt.config import ConfigError, config_from_args, load_config, parse_command_line
from instructgpt.evaluate import EvalConfig
from instructgpt.generate_cli import GenerateConfig
from instructgpt.label_sim import LabelSimConfig
from instructgpt.labeling import cli as label_cli
from instructgpt.labeling.cli import LabelConfig
from instructgpt.pipeline import DEFAULT_RECIPE, RecipeConfig, load_recipe, stage_configs
from instructgpt.pretrain import PretrainConfig
from instructgpt.serving import cli as serve_cli
from instructgpt.serving.config import ServeConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _config_class(name: str) -> tuple[type, list[str]]:
    """The class a file under configs/ is read as, and the overrides it needs to validate (what its comment says to
    give on the command line)."""
    if name.startswith("pretrain"):
        return PretrainConfig, []
    if name.startswith("serve"):
        return ServeConfig, ["model=builtin:base"]
    raise AssertionError(f"configs/{name}: which config class is it? (add it here)")


def test_every_shipped_config_and_recipe_validates(tmp_path):
    files = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert len(files) >= 3
    for path in files:
        cls, overrides = _config_class(os.path.basename(path))
        assert isinstance(load_config(cls, path, overrides), cls), path
    recipes = sorted(glob.glob(os.path.join(CONFIGS, "recipes", "*.yaml")))
    names = {os.path.basename(r) for r in recipes}
    assert {"default.yaml", "smollm2.yaml", "gpt2-hh.yaml", "pythia-tldr.yaml"} <= names
    for path in recipes:
        recipe = load_recipe(path, [])
        assert isinstance(recipe, RecipeConfig) and recipe.eval.heldout > 0, path
        cfgs = stage_configs(recipe, str(tmp_path / os.path.basename(path)))
        assert {"sft", "rm", "ppo"} <= set(cfgs), path
        for c in cfgs.values():
            c.validate()


def test_the_default_recipe_is_one_file_in_the_package_and_the_repository():
    """configs/recipes/default.yaml is the packaged recipes/default.yaml (a link), which `pipeline` reads with no
    --config: the two cannot differ."""
    repo_copy = os.path.join(CONFIGS, "recipes", "default.yaml")
    assert os.path.realpath(DEFAULT_RECIPE).startswith(os.path.realpath(os.path.dirname(evaluate.__file__)))
    with open(repo_copy, "rb") as a, open(DEFAULT_RECIPE, "rb") as b:
        assert a.read() == b.read()
    assert load_recipe(repo_copy, []) == load_recipe(None, [])


@pytest.mark.parametrize("cls", [EvalConfig, GenerateConfig, LabelSimConfig, ServeConfig, LabelConfig])
def test_unknown_keys_and_bad_values_are_named(cls):
    with pytest.raises(ConfigError, match="unknown config key 'max_new_tokenz'"):
        load_config(cls, None, ["max_new_tokenz=3"])
    field = "port" if cls in (ServeConfig, LabelConfig) else "max_new_tokens"
    with pytest.raises(ConfigError, match=f"^{field}: expected an integer, got 'many'"):
        load_config(cls, None, [f"{field}=many"])


@pytest.mark.parametrize("argv", [["eval", "--policy", "sft=x"], ["generate", "--model", "m"], ["label-sim"],
                                  ["serve"], ["label", "stats", "--db", "x.sqlite"], ["pipeline"]])
def test_every_command_names_an_unknown_key_and_exits_2(argv, capsys):
    assert cli_main([*argv, "nosuchkey.n=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"instructgpt {argv[0]}: error: ") and "unknown config key 'nosuchkey'" in err


def test_override_beats_file_beats_defaults(tmp_path):
    path = tmp_path / "generate.yaml"
    path.write_text("model: builtin:base\nprompt: hello\nmax_new_tokens: 10\ntemperature: 0.5\nstop: [END]\n")
    cfg = config_from_args(GenerateConfig, parse_command_line(generate_cli.build_parser(),
                                                              ["--config", str(path), "max_new_tokens=20"]))
    assert (cfg.max_new_tokens, cfg.temperature, cfg.stop, cfg.top_p) == (20, 0.5, ["END"], GenerateConfig().top_p)
    # a flag beats the file too, and a dotted override the flag
    cfg = config_from_args(GenerateConfig, parse_command_line(generate_cli.build_parser(),
                                                              ["temperature=0.9", "--config", str(path),
                                                               "--temperature", "0.7", "--max-new-tokens", "30"]))
    assert (cfg.max_new_tokens, cfg.temperature) == (30, 0.9)


def _eval(argv):
    return config_from_args(EvalConfig, parse_command_line(evaluate.build_parser(), argv))


def _serve(argv):
    return config_from_args(ServeConfig, parse_command_line(serve_cli.build_parser(), argv))


def _label_sim(argv):
    return config_from_args(LabelSimConfig, parse_command_line(label_sim.build_parser(), ["--policy", "m", "--out", "o",
                                                                                         *argv]))


def _generate(argv):
    return config_from_args(GenerateConfig, parse_command_line(generate_cli.build_parser(), ["--model", "m",
                                                                                            "--prompt", "p", *argv]))


def _label(argv):
    return config_from_args(LabelConfig, label_cli.parse(argv))


@pytest.mark.parametrize("load, flags, overrides", [
    (_eval, ["--policy", "sft=a", "--policy", "ppo=b", "--kl-prompts", "0"], ["policy.sft=a", "policy.ppo=b",
                                                                             "kl_prompts=0"]),
    (_eval, ["--ptx-text", "none", "--mixed-precision", "bf16"], ["ptx_text=none", "mixed_precision=bf16"]),
    (_serve, ["--model", "m", "--max-tokens", "8", "--no-audit-log", "--request-timeout", "2.5"],
     ["model=m", "limits.max_tokens=8", "audit_log=null", "request_timeout_s=2.5"]),
    (_label_sim, ["--agreement", "none", "--temperatures", "0.7,1.3", "--k", "8"],
     ["agreement=null", "temperatures=[0.7, 1.3]", "k=8"]),
    (_generate, ["--stop", "A", "--stop", "B", "-n", "2", "--raw"], ["stop=[A, B]", "n=2", "raw=true"]),
    (_label, ["serve", "--db", "x.sqlite", "--port", "9000", "--secure-cookies"],
     ["serve", "db=x.sqlite", "port=9000", "secure_cookies=true"]),
])
def test_a_flag_sets_the_same_key_as_its_dotted_override(load, flags, overrides):
    by_flag, by_key = load(flags), load(overrides)
    assert by_flag == by_key != type(by_key)()


def test_a_recipes_eval_and_label_sim_sections_are_the_commands_configs():
    recipe = load_recipe(None, [])
    assert isinstance(recipe.eval, EvalConfig) and isinstance(recipe.label_sim, LabelSimConfig)
    assert recipe.label_sim.temperatures == [0.7, 1.0, 1.3] and recipe.eval.bon_curve == 16
    with pytest.raises(ConfigError, match="eval.heldout: expected an integer"):
        load_recipe(None, ["eval.heldout=all"])


def test_a_file_given_without_its_flag_is_refused_with_a_hint(tmp_path, capsys):
    """`instructgpt data inspect demos.jsonl` (the file without --input) or `instructgpt sft sft.yaml` (without
    --config): the token is not key=value, and since it names a file the error says a file goes after its flag."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "hi", "response": "hello"}\n')
    assert cli_main(["data", "inspect", str(demos)]) == 2
    assert f"override '{demos}': expected key.sub=value (a file is given after its flag" in capsys.readouterr().err
    assert cli_main(["sft", "train.lr"]) == 2  # not a file: no hint
    assert capsys.readouterr().err.rstrip().endswith("override 'train.lr': expected key.sub=value")


def test_version_flag_prints_the_installed_version(capsys):
    from importlib.metadata import version

    assert cli_main(["--version"]) == 0 and cli_main(["-V"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"instructgpt {version('instructgpt')}"] * 2


@pytest.mark.parametrize("stage,extra", [("sft", []), ("rm", []), ("dpo", []),
                                         ("ppo", [f"reward_model.name_or_path={os.devnull}", "ppo.ptx_coef=0"])])
def test_a_missing_data_file_is_named_before_any_model_loads(stage, extra, tmp_path, monkeypatch, capsys):
    """A stage whose data.train names a file that is not there says so before it loads a model (minutes for a large
    one): no load_model is called."""
    import importlib

    mod = importlib.import_module(f"instructgpt.{stage}")

    def load_model(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mod, "load_model", load_model)
    missing = tmp_path / "missing.jsonl"
    assert cli_main([stage, f"data.train={missing}", f"out_dir={tmp_path / 'out'}", *extra]) == 2
    assert f"instructgpt {stage}: error: {missing}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("stage,good,bad", [("sft", {"prompt": "hi", "response": "hello"}, {"prompt": "hi"}),
                                            ("rm", {"prompt": "hi", "responses": ["a", "b"], "ranks": [1, 2]},
                                             {"prompt": "hi"}),
                                            ("dpo", {"prompt": "hi", "responses": ["a", "b"], "ranks": [1, 2]},
                                             {"prompt": "hi"}),
                                            ("ppo", {"prompt": "hi"}, {"prompt": ["hi"]})])  # a list for a string
def test_a_bad_training_line_is_named_before_the_model_loads(stage, good, bad, tmp_path, monkeypatch, capsys):
    """SFT's demonstrations, the RM's and DPO's rankings and PPO's prompts are read before the model loads (minutes
    for a large one; PPO loads four): a malformed line stops the stage first."""
    import importlib
    import json

    def load_model(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(importlib.import_module(f"instructgpt.{stage}"), "load_model", load_model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    extra = ["reward_model.name_or_path=builtin:base", "ppo.ptx_coef=0"] if stage == "ppo" else []  # never loaded
    assert cli_main([stage, f"data.train={data}", f"out_dir={tmp_path / 'out'}", *extra]) == 2
    assert f"{data}, line 2" in capsys.readouterr().err
