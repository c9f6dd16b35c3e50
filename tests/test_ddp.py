"""SFT in two real CPU processes (gloo DDP via torchrun): the ranks end with identical weights, equal to one process
training on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gloo on CPU even where a GPU is visible: two ranks on a one-GPU machine would both want a device of their own
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _torchrun(port: int, *args: str) -> list[str]:
    """torchrun's command for the worker: its launcher options, then `--` and the worker's arguments."""
    launcher, worker = args[:args.index("--")], args[args.index("--") + 1:]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--master_addr", "127.0.0.1",
            "--master_port", str(port), os.path.join(HERE, "ddp_worker.py"), *worker]


def _launch(nproc, *args):
    r = subprocess.run(_torchrun(_free_port(), "--nproc_per_node", str(nproc), "--", *args), capture_output=True,
                       text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]


def _launch_two_nodes(*args):
    """Two "machines" on this one: two torchrun launches of one process each (--nnodes 2, --node_rank 0 and 1), their
    rendezvous on 127.0.0.1, as a two-node cluster starts (the README's launch lines)."""
    port = _free_port()
    nodes = [subprocess.Popen(_torchrun(port, "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1", "--",
                                        *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for i in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=180)
        assert node.returncode == 0, err[-3000:]


def _run(nproc, model_dir, demos, out):
    _launch(nproc, model_dir, demos, str(out))
    return [json.load(open(out / f"rank{i}-of-{nproc}.json")) for i in range(nproc)]


def test_two_rank_ddp_matches_and_equals_single_process(tiny_model_dir, demos_file, tmp_path):
    r0, r1 = _run(2, tiny_model_dir, demos_file, tmp_path / "ddp")
    assert r0 == r1  # bit-identical across ranks
    (single,) = _run(1, tiny_model_dir, demos_file, tmp_path / "one")
    assert single["head"] == pytest.approx(r0["head"], abs=1e-5)
    assert single["abs"] == pytest.approx(r0["abs"], rel=1e-5)
    # the same SFT on two "nodes" of one process each, started as two launches
    out = tmp_path / "nodes"
    _launch_two_nodes(tiny_model_dir, demos_file, str(out))
    n0, n1 = (json.load(open(out / f"rank{i}-of-2.json")) for i in (0, 1))
    assert n0 == n1 and n0["head"] == pytest.approx(single["head"], abs=1e-5)
    assert n0["abs"] == pytest.approx(single["abs"], rel=1e-5)


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
    # the loss and accuracy logged are the global batch's, as one process logs them
    from instructgpt.runs import read_metrics
    logged = [[v for m in read_metrics(str(tmp_path / d)) if "train/loss" in m
               for v in (m["train/loss"], m["train/accuracy"])] for d in ("one", "two")]
    assert len(logged[0]) == 8 and logged[1] == pytest.approx(logged[0], rel=1e-5)


def test_two_ranks_on_an_out_dir_another_process_holds_both_stop_with_its_name(tiny_model_dir, tmp_path):
    """The main rank finds the out_dir held and every rank stops at once (none waits at a barrier for it)."""
    from conftest import fruit_over_animal_rankings, write_jsonl
    from instructgpt.files import hold_dir, release_dir

    rankings, out = write_jsonl(tmp_path / "r.jsonl", fruit_over_animal_rankings(8, 0)), tmp_path / "two"
    assert hold_dir(str(out)) is None
    try:
        r = subprocess.run(_torchrun(_free_port(), "--nproc_per_node", "2", "--", "dpo", tiny_model_dir, rankings,
                                     str(out)), capture_output=True, text=True, env=ENV, timeout=180)
    finally:
        release_dir(str(out))
    assert r.returncode != 0
    assert f"{out} is in use by another run (process {os.getpid()} on {socket.gethostname()})" in r.stderr
    assert f"{out} is in use by another run (seen by the main process)" in r.stderr  # rank 1's
    assert not (out / "config.yaml").exists()


def test_two_rank_reward_model_scores_as_one_process(tiny_model_dir, tmp_path):
    """The reward model under DDP: its per-token head reads the last hidden states of the wrapper's own forward, so
    DDP averages its gradients; the normalised rewards it gives equal one process's (compared as normalised rewards:
    the ranking loss is blind to a shift of every reward, a direction along which Adam turns rounding noise into
    steps, and which the normalisation takes out)."""
    from conftest import fruit_over_animal_rankings, write_jsonl
    from instructgpt.reward import RewardModel

    rows = fruit_over_animal_rankings(32, 0)
    rankings = write_jsonl(tmp_path / "r.jsonl", rows)
    demos = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"add {a} plus {b}", "response": str(a + b)}
                                               for a in range(5) for b in range(5)])
    _launch(2, "rm", tiny_model_dir, rankings, demos, str(tmp_path / "two"))
    _launch(1, "rm", tiny_model_dir, rankings, demos, str(tmp_path / "one"))
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    responses = [x for row in rows for x in row["responses"]]
    one = RewardModel.load(str(tmp_path / "one")).score(prompts, responses)
    two = RewardModel.load(str(tmp_path / "two")).score(prompts, responses)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    assert max(one) - min(one) > 0.5  # it trained: it tells responses apart


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


def _global(seen: list[dict], key: str, rollouts: list[dict]) -> list:
    """Per update, `key` of every row of the whole batch, put back in the batch's order from the ranks' rollouts."""
    out = []
    for u in range(len(rollouts[0])):
        rows = {}
        for rank_rollouts, rank_values in zip(rollouts, seen):
            for row, v in zip(rank_rollouts[u]["rows"], rank_values[u]):
                rows[row] = v
        out.append([rows[i] for i in sorted(rows)])
    return out


@pytest.mark.parametrize("extra,nodes", [([], False), (["ppo.value_model=policy", "ppo.whiten_rewards=true"], False),
                                         (["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4"], False),
                                         ([], True)], ids=["value_model", "value_head", "grpo", "two_nodes"])
def test_two_rank_ppo_equals_one_process_on_the_same_global_batch(tiny_model_dir, tmp_path_factory, tmp_path, extra,
                                                                   nodes):
    """PPO-ptx split over two processes computes what one process does with the whole batch: the same rollouts
    (each row draws its place's random numbers), advantages whitened over the whole batch, minibatches of the same
    rows (a rank may hold more or fewer of one), losses over the whole minibatch's tokens; so the logged losses, the
    adaptive KL controller's coefficient and the weights after 3 updates agree to fp32 rounding."""
    from conftest import ppo_inputs_in, saved_weights
    from safetensors.torch import load_file

    from instructgpt.runs import read_metrics

    inp = ppo_inputs_in(tmp_path_factory.mktemp("ddp_ppo"), tiny_model_dir, 64)
    args = [inp["policy"], inp["rm"], inp["prompts"], inp["ptx"]]
    if nodes:  # two "machines" of one process each
        _launch_two_nodes("ppo", *args, str(tmp_path / "two"), *extra)
    else:
        _launch(2, "ppo", *args, str(tmp_path / "two"), *extra)
    _launch(1, "ppo", *args, str(tmp_path / "one"), *extra)
    one = json.load(open(tmp_path / "one" / "seen-rank0.json"))
    two = [json.load(open(tmp_path / "two" / f"seen-rank{r}.json")) for r in (0, 1)]
    assert [len(r["rows"]) for r in two[0]["rollouts"]] == [8, 8, 8]
    for key in ("response", "logprobs", "ref_logprobs", "values", "scores"):
        split = _global([[u[key] for u in t["rollouts"]] for t in two], key, [t["rollouts"] for t in two])
        whole = [u[key] for u in one["rollouts"]]
        if key == "response":  # the same tokens (the ranks pad to their own longest response)
            width = [max(len(r) for r in u) for u in whole]
            assert [[r[:w] for r in u] for u, w in zip(split, width)] == [[r[:w] for r in u]
                                                                          for u, w in zip(whole, width)]
        else:
            for a, b in zip(split, whole):
                w = min(len(a[0]), len(b[0])) if isinstance(a[0], list) else None
                ta, tb = torch.tensor([r[:w] for r in a] if w else a), torch.tensor([r[:w] for r in b] if w else b)
                assert (ta - tb).abs().max() < 1e-5, key
    # advantages (and, with whiten_rewards, the rewards) whitened with the whole batch's moments
    n = len(one["advantages"])
    assert n == len(two[0]["advantages"]) == len(two[1]["advantages"]) >= 3
    for i in range(n):
        split = _global([[t["advantages"][i]] for t in two], "adv", [[t["rollouts"][i * 3 // n]] for t in two])[0]
        whole = one["advantages"][i]
        w = min(len(split[0]), len(whole[0]))
        assert (torch.tensor([r[:w] for r in split]) - torch.tensor([r[:w] for r in whole])).abs().max() < 1e-4
    # the logged losses and statistics of every update, the KL controller, the weights
    m1 = [r for r in read_metrics(str(tmp_path / "one")) if "ppo/loss/policy" in r]
    m2 = [r for r in read_metrics(str(tmp_path / "two")) if "ppo/loss/policy" in r]
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for key in ("objective/kl", "objective/scores", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/ptx",
                    "ppo/policy/clipfrac", "ppo/val/ratio", "objective/entropy", "ppo/kl_coef", "ppo/val/var_explained",
                    "ppo/mean_response_length", "ppo/eos_rate"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-4), key
    d1, d2 = (json.load(open(tmp_path / d / "DONE.json")) for d in ("one", "two"))
    assert d2["kl_coef"] == pytest.approx(d1["kl_coef"], rel=1e-6) and d1["kl_coef"] != 0.02
    w1, w2 = saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two")
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any((w1[k] - start[k]).abs().max() > 1e-3 for k in w1 if k in start)  # it trained
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() < 1e-5, k
