"""Experiment trackers (train.log_with): every row of metrics.jsonl reaches them, under the same keys, at the same
step, from the one place a stage logs (StageRun.log). TensorBoard's event files are read back."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys

import pytest

from instructgpt.config import ConfigError, load_config
from instructgpt.runs import read_metrics
from instructgpt.sft import SFTConfig, train
from instructgpt.training import make_accelerator


def _sft_args(model_dir, demos, out, *extra) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.train={demos}", f"out_dir={out}", "train.batch_size=8",
            "train.max_steps=4", "train.log_every=1", "train.eval_every=2", "data.eval_size=8", *extra]


def _accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return ea


def _scalars(logdir) -> dict[str, dict[int, float]]:
    ea = _accumulator(logdir)
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def test_tensorboard_gets_exactly_the_rows_of_metrics_jsonl(tiny_model_dir, demos_file, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "sft"
    train(load_config(SFTConfig, None, _sft_args(tiny_model_dir, demos_file, out, "train.log_with=tensorboard")))
    rows = read_metrics(str(out))
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step":
                expected.setdefault(k, {})[row["step"]] = v
    assert set(expected) == {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss"}
    logged = _scalars(out / "tensorboard" / "instructgpt")
    assert logged.keys() == expected.keys()
    for k in expected:
        assert logged[k].keys() == expected[k].keys(), k
        assert logged[k] == pytest.approx(expected[k], rel=1e-6), k  # TensorBoard keeps float32


def test_a_resumed_run_logs_each_step_once_and_may_change_its_trackers(tiny_model_dir, demos_file, tmp_path):
    """train.log_with does not change the result: a run may resume with other trackers (or none)."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "sft"
    train(load_config(SFTConfig, None, _sft_args(tiny_model_dir, demos_file, out, "train.stop_after=2",
                                                  "train.save_every=2")))
    assert not (out / "tensorboard").exists()
    train(load_config(SFTConfig, None, _sft_args(tiny_model_dir, demos_file, out, "train.log_with=tensorboard")))
    assert {k: list(v) for k, v in _scalars(out / "tensorboard" / "instructgpt").items()} == {
        "train/loss": [3, 4], "train/lr": [3, 4], "train/tokens_per_s": [3, 4], "eval/loss": [4]}
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3, 4]


def test_what_a_killed_run_logged_past_its_checkpoint_is_hidden_once_it_resumes(tiny_model_dir, demos_file,
                                                                                 tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "sft"
    args = _sft_args(tiny_model_dir, demos_file, out, "train.max_steps=12", "train.save_every=3", "data.eval_size=0",
                     "train.log_with=tensorboard")
    # the run kills itself (SIGKILL) right after it has logged step 4, whose checkpoint is step 3's: a poll from here
    # could miss that window on a busy machine and find the step-6 checkpoint already written
    child = ("import os, signal, sys\n"
             "from instructgpt import cli, runs\n"
             "log = runs.StageRun.log\n"
             "def log_then_die(self, step, metrics):\n"
             "    log(self, step, metrics)\n"
             "    if step == 4:\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "runs.StageRun.log = log_then_die\n"
             "sys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", child, "sft", *args], check=False, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert read_metrics(str(out))[-1]["step"] == 4
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert 4 in _scalars(out / "tensorboard" / "instructgpt")["train/loss"]  # TensorBoard has the step past it too
    train(load_config(SFTConfig, None, args))
    loss = _scalars(out / "tensorboard" / "instructgpt")["train/loss"]
    rows = read_metrics(str(out))
    steps = [e.step for e in _accumulator(out / "tensorboard" / "instructgpt").Scalars("train/loss")]
    assert steps == [r["step"] for r in rows] == list(range(1, 13))  # step 4 once: the killed run's is purged
    assert loss == pytest.approx({r["step"]: r["train/loss"] for r in rows}, rel=1e-6)


def test_a_missing_tracker_package_is_a_config_error_naming_it(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard",
                                                                                      "tensorboardX")
                        else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"train.log_with: wandb needs the wandb package: pip install wandb"):
        make_accelerator(load_config(SFTConfig, None, [f"out_dir={tmp_path}", "train.log_with=wandb"]))
    with pytest.raises(ConfigError, match=r"pip install tensorboard \(or pip install 'instructgpt\[trackers\]'\)"):
        make_accelerator(load_config(SFTConfig, None, [f"out_dir={tmp_path}", "train.log_with=[tensorboard]"]))


def test_log_with_takes_one_tracker_or_several_and_names_a_bad_one():
    assert load_config(SFTConfig, None, []).train.log_with is None
    assert load_config(SFTConfig, None, ["train.log_with=tensorboard,wandb"]).train.log_with == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"train.log_with\[0\]: must be one of"):
        load_config(SFTConfig, None, ["train.log_with=neptune"])
