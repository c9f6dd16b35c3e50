"""SFT in two real CPU processes (gloo DDP via torchrun): the ranks end with identical weights, equal to one process
training on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(HERE, "ddp_worker.py"), *args]
    # gloo on CPU even where a GPU is visible: two ranks on a one-GPU machine would both want a device of their own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]


def _run(nproc, model_dir, demos, out):
    _launch(nproc, model_dir, demos, str(out))
    return [json.load(open(out / f"rank{i}-of-{nproc}.json")) for i in range(nproc)]


def test_two_rank_ddp_matches_and_equals_single_process(tiny_model_dir, demos_file, tmp_path):
    r0, r1 = _run(2, tiny_model_dir, demos_file, tmp_path / "ddp")
    assert r0 == r1  # bit-identical across ranks
    (single,) = _run(1, tiny_model_dir, demos_file, tmp_path / "one")
    assert single["head"] == pytest.approx(r0["head"], abs=1e-5)
    assert single["abs"] == pytest.approx(r0["abs"], rel=1e-5)


def test_two_rank_dpo_equals_one_process_on_the_same_global_batches(tiny_model_dir, tmp_path):
    """The ranking loop (DPO's, and the reward model's) under DDP: each rank takes half of a step's prompts, the loss
    is scaled so the averaged gradient is the global batch's, and the saved policy equals one process's."""
    from safetensors.torch import load_file

    from conftest import fruit_over_animal_rankings, saved_weights, write_jsonl

    rankings = write_jsonl(tmp_path / "r.jsonl", fruit_over_animal_rankings(32, 0))
    _launch(2, "dpo", tiny_model_dir, rankings, str(tmp_path / "two"))
    _launch(1, "dpo", tiny_model_dir, rankings, str(tmp_path / "one"))
    two, one = saved_weights(tmp_path / "two"), saved_weights(tmp_path / "one")
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not (one[k] == start[k]).all() for k in one)  # it trained
    for k in one:
        assert (one[k] - two[k]).abs().max() < 1e-5, k


def test_two_rank_rloo_keeps_each_prompts_responses_on_one_rank(tiny_model_dir, tmp_path):
    """RLOO under DDP: a rank takes whole prompts (4 responses each), so its leave-one-out baselines need nothing
    from the other rank; the policy alone is prepared (no critic) and the run finishes and saves a moved policy."""
    from safetensors.torch import load_file

    from conftest import fruit_pairs_over_other_pairs_rankings, saved_weights, write_jsonl
    from instructgpt.config import load_config
    from instructgpt.rm import RMConfig
    from instructgpt.rm import train as rm_train
    from instructgpt.runs import read_metrics

    rankings = write_jsonl(tmp_path / "r.jsonl", fruit_pairs_over_other_pairs_rankings(64, 0))
    rm_train(load_config(RMConfig, None, [f"model.name_or_path={tiny_model_dir}", f"out_dir={tmp_path / 'rm'}",
                                          f"data.train={rankings}", "train.batch_size=8", "train.lr=3e-3",
                                          "data.eval_size=0", "normalize.demonstrations=null"]))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i}"} for i in range(32)])
    out = tmp_path / "rloo"
    _launch(2, "rloo", tiny_model_dir, str(tmp_path / "rm"), prompts, str(out))
    rows = [r for r in read_metrics(str(out)) if "objective/scores" in r]
    assert [r["step"] for r in rows] == [1, 2] and not any("ppo/val/var_explained" in r for r in rows)
    saved = saved_weights(out)
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not (saved[k] == start[k]).all() for k in saved if k in start)
