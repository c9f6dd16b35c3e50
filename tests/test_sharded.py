"""Sharded training (FSDP2) in two real CPU processes, launched as a user would: `accelerate launch` with the shipped
configs/accelerate/fsdp2.yaml. SFT, the reward model, DPO and PPO each end where one process ends on the same global
batches; the final model is one plain Hugging Face checkpoint gathered from the shards; a sharded run killed with
SIGKILL and rerun ends bit-identical to an uninterrupted one (SFT, and PPO with its two sharded models)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import pytest
import torch

from conftest import fruit_over_animal_rankings, saved_weights, sigkill_after_checkpoint, write_jsonl
from instructgpt.cli import main as cli
from instructgpt.runs import read_metrics

HERE = os.path.dirname(__file__)
FSDP2 = os.path.join(HERE, os.pardir, "configs", "accelerate", "fsdp2.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(*specs: str) -> list[str]:
    """Two CPU processes sharded with FSDP2, running `specs` (one stage each) through the command line."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2, "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
            os.path.join(HERE, "fsdp_worker.py"), *specs]


# gloo on CPU even where a GPU is visible; one thread per process: the two share the machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _launch(*specs: str) -> None:
    r = subprocess.run(_launch_cmd(*specs), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def _spec(stage: str, args: list[str]) -> str:
    return shlex.join([stage, *args])


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """SFT, RM and DPO on the tiny model: sharded over two processes (one launch), and in this one process."""
    d = tmp_path_factory.mktemp("sharded")
    demos = write_jsonl(d / "demos.jsonl", [{"prompt": f"add {a} plus {b}", "response": str(a + b)}
                                            for a in range(11) for b in range(11)])
    rankings = write_jsonl(d / "rankings.jsonl", fruit_over_animal_rankings(32, 0))
    common = [f"model.name_or_path={tiny_model_dir}", "train.batch_size=8", "train.lr=3e-3", "train.log_every=1"]
    args = {
        "sft": common + [f"data.train={demos}", "train.max_steps=6", "data.eval_size=8", "train.eval_every=3",
                         "train.save_every=0", "train.log_with=tensorboard",
                         "train.length_groups=1"],  # sharded, a micro-batch is one forward: so here too
        # the normalisation's forwards run sharded too
        "rm": common + [f"data.train={rankings}", "train.max_steps=4", "data.eval_size=4", "train.eval_every=2",
                        "train.grad_accum=2",  # micro-batches: each one reduce-scattered
                        f"normalize.demonstrations={demos}", "normalize.max_demonstrations=16"],
        "dpo": common + [f"data.train={rankings}", "train.max_steps=4", "beta=0.5", "data.eval_size=4",
                         "train.eval_every=2"],
    }
    out = {}
    for stage, a in args.items():
        out[stage] = {"two": d / f"{stage}-fsdp", "one": d / f"{stage}-one", "args": a}
        assert cli([stage, *a, f"out_dir={out[stage]['one']}"]) == 0
    _launch(*(_spec(stage, a + [f"out_dir={out[stage]['two']}"]) for stage, a in args.items()))
    return out


def _assert_tensorboard_holds_the_metrics(out_dir):
    """Each row of metrics.jsonl in TensorBoard's event files, each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out_dir / "tensorboard" / "instructgpt"))
    ea.Reload()
    logged = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    expected: dict = {}
    for row in read_metrics(str(out_dir)):
        for k, v in row.items():
            if k != "step":
                expected.setdefault(k, []).append((row["step"], v))
    assert logged.keys() == expected.keys()
    for k in expected:
        assert [s for s, _ in logged[k]] == [s for s, _ in expected[k]], k
        assert [v for _, v in logged[k]] == pytest.approx([v for _, v in expected[k]], rel=1e-6), k


def _assert_logged_as_one_process(one, two, keys):
    """Every logged step's training figures (the global batch's, whichever process logs them) are one process's."""
    rows = [[m for m in read_metrics(str(d)) if keys[0] in m] for d in (one, two)]
    assert [m["step"] for m in rows[0]] == [m["step"] for m in rows[1]] and rows[0]
    for a, b in zip(*rows):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)


def _assert_close_weights(one, two, atol):
    a, b = saved_weights(one), saved_weights(two)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= atol, k


def test_two_process_fsdp2_sft_equals_one_process_and_saves_a_plain_checkpoint(runs, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    r = runs["sft"]
    _assert_close_weights(r["one"], r["two"], 1e-5)
    _assert_logged_as_one_process(r["one"], r["two"], ["train/loss"])
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(saved_weights(r["two"])[k], start[k]) for k in start)  # it trained
    model = AutoModelForCausalLM.from_pretrained(r["two"] / "model")  # plain from_pretrained, whole tensors
    assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stay tied
    assert [m["step"] for m in read_metrics(str(r["two"]))] == [1, 2, 3, 4, 5, 6]
    evals = [{m["step"]: m["eval/loss"] for m in read_metrics(str(d)) if "eval/loss" in m}
             for d in (r["two"], r["one"])]
    assert list(evals[0]) == [3, 6] and evals[0] == pytest.approx(evals[1], abs=1e-5)
    _assert_tensorboard_holds_the_metrics(r["two"])  # trackers work across processes


def test_two_process_fsdp2_reward_model_scores_as_one_process(runs):
    """The ranking loss sees reward differences only, so a shift of every reward (the final LayerNorm's bias through
    the head) and of every attention key (the key bias) leaves it unchanged: their gradients are rounding noise, which
    Adam scales up to steps of size lr. Those directions differ between any two summation orders (DDP's too) and say
    nothing of the model; the normalised rewards, what the reward model hands PPO, are compared."""
    from instructgpt.reward import RewardModel

    r = runs["rm"]
    rows = fruit_over_animal_rankings(32, 0)
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    responses = [x for row in rows for x in row["responses"]]
    one = RewardModel.load(str(r["one"])).score(prompts, responses)
    two = RewardModel.load(str(r["two"])).score(prompts, responses)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    assert max(one) - min(one) > 0.5  # it tells responses apart
    _assert_close_weights(r["one"], r["two"], 1e-3)
    _assert_logged_as_one_process(r["one"], r["two"], ["train/loss", "train/accuracy"])


def test_two_process_fsdp2_dpo_equals_one_process(runs):
    r = runs["dpo"]
    _assert_close_weights(r["one"], r["two"], 1e-5)
    _assert_logged_as_one_process(r["one"], r["two"], ["train/loss", "train/accuracy"])
    assert read_metrics(str(r["two"]))[-1]["eval/accuracy"] == read_metrics(str(r["one"]))[-1]["eval/accuracy"]


def test_a_sharded_run_killed_with_sigkill_and_rerun_ends_identical_to_an_uninterrupted_one(runs, tmp_path, capsys):
    out = tmp_path / "sft"
    args = runs["sft"]["args"] + [f"out_dir={out}", "train.save_every=1"]
    # the whole launch (launcher and both ranks, one process group) killed once a checkpoint of step 2 is written
    sigkill_after_checkpoint(_launch_cmd(_spec("sft", args)), out, 2, timeout=240, env=ENV, group=True)
    checkpoint = out / "checkpoint" if (out / "checkpoint").exists() else out / "checkpoint.old"
    assert len(list((checkpoint / "sharded_state").glob("*.distcp"))) == 2  # one shard file per process

    # without FSDP the sharded checkpoint is refused, and said to be one
    assert cli(["sft", *args]) == 2 and "was written sharded (FSDP2)" in capsys.readouterr().err
    _launch(_spec("sft", args))
    a, b = saved_weights(out), saved_weights(runs["sft"]["two"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _assert_tensorboard_holds_the_metrics(out)  # what the killed attempt logged past its checkpoint is hidden
    drop = "train/tokens_per_s"
    assert ([{k: v for k, v in m.items() if k != drop} for m in read_metrics(str(out))]
            == [{k: v for k, v in m.items() if k != drop} for m in read_metrics(str(runs["sft"]["two"]))])


@pytest.fixture(scope="module")
def ppo_runs(tiny_model_dir, tmp_path_factory):
    """PPO-ptx with its value model on the tiny model: policy and value model sharded over two processes, and in
    this one process."""
    from conftest import ppo_inputs_in

    d = tmp_path_factory.mktemp("sharded_ppo")
    inp = ppo_inputs_in(d, tiny_model_dir, 64)
    args = [f"model.name_or_path={inp['policy']}", f"reward_model.name_or_path={inp['rm']}",
            f"data.train={inp['prompts']}", f"data.pretrain={inp['ptx']}", "data.max_length=32", "ppo.eval_prompts=0",
            "ppo.response_length=8", "train.batch_size=16", "ppo.num_minibatches=2", "ppo.ppo_epochs=2",
            "train.lr=3e-4", "train.warmup_steps=0", "ppo.ptx_coef=0.5", "ppo.ptx_token_ratio=1", "train.max_steps=3",
            "train.save_every=1"]
    out = {"args": args, "one": d / "one", "two": d / "two"}
    assert cli(["ppo", *args, f"out_dir={out['one']}"]) == 0
    _launch(_spec("ppo", args + [f"out_dir={out['two']}"]))
    return out


def test_two_process_fsdp2_ppo_equals_one_process_and_resumes_exactly(ppo_runs, tmp_path):
    """PPO under FSDP2: the policy and the value model sharded (their optimizers over the shards), the frozen
    reference and reward models whole; the weights after 3 updates within 1e-5 of one process's, the final model one
    plain checkpoint; killed with SIGKILL after its second update's checkpoint and rerun, it ends bit-identical."""
    from transformers import AutoModelForCausalLM

    from instructgpt.ppo import PPOConfig, check_shardable
    from instructgpt.config import ConfigError, load_config

    r = ppo_runs
    _assert_close_weights(r["one"], r["two"], 1e-5)
    AutoModelForCausalLM.from_pretrained(r["two"] / "model")
    m1 = [m for m in read_metrics(str(r["one"])) if "ppo/loss/value" in m]
    m2 = [m for m in read_metrics(str(r["two"])) if "ppo/loss/value" in m]
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for k in ("objective/kl", "objective/scores", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/ptx"):
            assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-4), k
    out = tmp_path / "killed"
    args = r["args"] + [f"out_dir={out}"]
    sigkill_after_checkpoint(_launch_cmd(_spec("ppo", args)), out, 2, timeout=240, env=ENV, group=True)
    checkpoint = out / "checkpoint" if (out / "checkpoint").exists() else out / "checkpoint.old"
    for name in ("sharded_state", "sharded_state_value"):  # each trained model's shards, one file per process
        assert len(list((checkpoint / name).glob("*.distcp"))) == 2, name
    _launch(_spec("ppo", args))
    a, b = saved_weights(out), saved_weights(r["two"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # what PPO cannot do sharded is refused before it trains
    for bad in ("ppo.ema_decay=0.9", "ppo.keep_best=gold", "model.lora.enabled=true"):
        with pytest.raises(ConfigError, match="not supported with PPO under FSDP2"):
            check_shardable(load_config(PPOConfig, None, r["args"] + [bad]))
