"""PPO-ptx: the math against hand-computed values and loops, then the stage end to end on a tiny model."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ARCHS, ppo_inputs_in, read_jsonl, saved_weights, sigkill_after_checkpoint, tiny_arch
from safetensors.torch import load_file

from instructgpt.advantages import gae, gae_loop, group_advantages, kl_per_token, token_rewards, whiten
from instructgpt.batching import length_groups
from instructgpt.config import ConfigError, load_config
from instructgpt.kl_control import AdaptiveKLController
from instructgpt.losses import lm_loss, policy_loss, value_loss
from instructgpt.modeling import (decoder_stack, disable_dropout, last_attention_only_at, last_layer_attention,
                                  last_layer_mlp, last_mlp_only_at, logprobs_from_logits, mlps_skip_padding,
                                  scaled_logits)
from instructgpt.policy import policy_forward
from instructgpt.ppo import PPOConfig, Rollout, load_models, rollout, train
from instructgpt.runs import read_metrics

# --------------------------------------------------------------------------------------------------------------------
# Math


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(r * mask, [1]), 1), [1])  # sum_{j >= t} r_j
    torch.testing.assert_close(adv, (rtg - v) * mask)
    torch.testing.assert_close(ret, rtg * mask)


def test_vectorised_gae_equals_the_loop():
    torch.manual_seed(1)
    r, v = torch.randn(5, 9), torch.randn(5, 9)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 1, 7, 2])[:, None]
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 0.0)):
        a1, r1 = gae(r, v, mask, gamma, lam)
        a2, r2 = gae_loop(r, v, mask, gamma, lam)
        torch.testing.assert_close(a1, a2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)


def test_same_policy_and_reference_give_zero_penalty_and_reward_equal_to_the_score():
    lp = torch.randn(3, 5)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 3])[:, None]
    scores = torch.tensor([0.5, -1.0, 2.0])
    for est in ("k1", "k3"):
        kl = kl_per_token(lp, lp, est) * mask
        assert float(kl.abs().max()) == 0.0
        rewards, non_score = token_rewards(scores, kl, 0.02, mask)
        assert float(non_score.abs().max()) == 0.0
        torch.testing.assert_close(rewards.sum(-1), scores)
        assert rewards[1, 1] == -1.0 and rewards[0, 4] == 0.5 and rewards[2, 2] == 2.0  # at the last token


def test_kl_estimators_and_token_rewards_by_hand():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_per_token(lp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 = (r - 1) - log r, r = pi_ref / pi
    k3 = [(math.exp(-0.5) - 1) + 0.5, (math.exp(1.0) - 1) - 1.0]
    torch.testing.assert_close(kl_per_token(lp, ref, "k3"), torch.tensor([k3]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    rewards, _ = token_rewards(torch.tensor([3.0]), torch.tensor([[0.5, -1.0]]), 0.1, mask)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1 + 3.0]]))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, st = policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 ; max(-0.5, -0.8) = -0.5 ; max(2.2, 2.2) = 2.2
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert float(st["clipfrac"]) == pytest.approx(1 / 3)  # only the first token is clipped
    lr = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    assert float(st["approxkl"]) == pytest.approx(float((0.5 * lr ** 2).mean()), abs=1e-6)
    # masked tokens do not count
    loss2, _ = policy_loss(new, old, adv, torch.tensor([[True, True, False]]), 0.2)
    assert float(loss2) == pytest.approx((-1.2 - 0.5) / 2, abs=1e-6)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, -0.1]])
    ret = torch.tensor([[1.0, 1.0]])
    loss, st = value_loss(new, old, ret, torch.ones(1, 2, dtype=torch.bool), cliprange_value=0.2)
    # token 1: max((0.5-1)^2, (0.2-1)^2) = 0.64 ; token 2: max((-0.1-1)^2, (-0.1-1)^2) = 1.21
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-6)
    assert float(st["clipfrac"]) == pytest.approx(0.5)


def test_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    w = whiten(x, m)
    assert float(w[0, :3].mean()) == pytest.approx(0.0, abs=1e-6) and float(w[0, 3]) == 0.0
    assert float(w[0, :3].pow(2).mean()) == pytest.approx(1.0, abs=1e-4)  # biased variance
    w2 = whiten(x, m, shift_mean=False)
    assert float(w2[0, :3].mean()) == pytest.approx(2.0, abs=1e-5)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 13.0, 11.0])  # two prompts, four responses each
    rloo = group_advantages(r, 4, "rloo")
    # leave-one-out: 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3
    torch.testing.assert_close(rloo[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    torch.testing.assert_close(rloo, 4 / 3 * (r - r.view(2, 4).mean(-1).repeat_interleave(4)))  # k/(k-1) (R - mean)
    assert torch.allclose(rloo.view(2, 4).sum(-1), torch.zeros(2), atol=1e-6)
    # groups are independent: shifting one prompt's returns leaves every advantage as it was
    torch.testing.assert_close(group_advantages(r + torch.tensor([0.0] * 4 + [100.0] * 4), 4, "rloo"), rloo)
    grpo = group_advantages(r, 4, "grpo")
    std = math.sqrt(((1 - 3) ** 2 + 1 + 0 + 9) / 3)  # the group's unbiased std
    torch.testing.assert_close(grpo[:4], (r[:4] - 3) / (std + 1e-4))
    for bad_k in (1, 3):
        with pytest.raises(ValueError, match="groups"):
            group_advantages(r, bad_k, "rloo")


def test_adaptive_kl_controller_follows_its_formula():
    c = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=64)  # error = clip(9/6 - 1, -.2, .2) = 0.2
    assert c.value == pytest.approx(0.15 * (1 + 0.2 * 64 / 10000))
    c.update(current_kl=5.4, n_steps=64)  # error = -0.1
    assert c.value == pytest.approx(0.15 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 64 / 10000))


def test_ptx_term_is_the_lm_loss_of_the_pretraining_batch(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("the word apple is red and the cat is blue")["input_ids"]] * 2)
    att = torch.ones_like(ids)
    ours = lm_loss(policy_forward(model, ids, att)[0], ids, att)
    theirs = model(input_ids=ids, attention_mask=att, labels=ids).loss  # Hugging Face's causal LM loss
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# The stage on a tiny model


@pytest.fixture(scope="module")
def ppo_inputs(tiny_model_dir, tmp_path_factory):
    return ppo_inputs_in(tmp_path_factory.mktemp("ppo"), tiny_model_dir, 200)


RUN_METRICS = ("objective/kl", "objective/scores", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/ptx",
               "ppo/policy/approxkl", "ppo/policy/clipfrac", "objective/entropy", "ppo/val/var_explained")


def assert_same_run(ppo_inputs, run, reference):
    """`run` and `reference` ((saved weights, logged metric rows) of two PPO runs from ppo_inputs' policy) both moved
    the policy, and `run` ends where `reference` does: its weights to 2e-5, its logged metrics to 1e-3."""
    first = load_file(os.path.join(ppo_inputs["policy"], "model.safetensors"))
    for weights in (run[0], reference[0]):
        assert any(not torch.allclose(weights[k], first[k], atol=1e-5) for k in first)  # the updates moved it
    for k, w in reference[0].items():
        torch.testing.assert_close(run[0][k], w, atol=2e-5, rtol=1e-4)
    for a, b in zip(run[1], reference[1]):
        for key in RUN_METRICS:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def _runs_off_and_on(ppo_inputs, tmp_path, flag: str, *overrides, seen=()) -> dict:
    """Two PPO runs from ppo_inputs with `overrides`, the boolean `flag` false, then true: {"false" | "true": (saved
    weights, logged metric rows, then a copy of each of `seen`, what a test's spies record, emptied before each run)},
    for `assert_same_run`."""
    runs = {}
    for value in ("false", "true"):
        for record in seen:
            record.clear()
        out = tmp_path / value
        train(load_config(PPOConfig, None, _args(ppo_inputs, out, *overrides, f"{flag}={value}")))
        runs[value] = (saved_weights(out), [r for r in read_metrics(str(out)) if "objective/scores" in r],
                       *(copy.copy(record) for record in seen))
    return runs


def _args(inp, out, *extra):
    return [f"model.name_or_path={inp['policy']}", f"reward_model.name_or_path={inp['rm']}",
            f"data.train={inp['prompts']}", f"data.pretrain={inp['ptx']}", "data.max_length=32", "ppo.eval_prompts=0",
            "ppo.response_length=8", "train.batch_size=16", "ppo.num_minibatches=2", "ppo.ppo_epochs=2",
            "train.lr=1e-3", "train.warmup_steps=0", "ppo.ptx_coef=0.5", "ppo.ptx_token_ratio=1",
            f"out_dir={out}", *extra]


def test_policy_equal_to_reference_gives_zero_kl_and_first_ratio_one(ppo_inputs, tmp_path):
    cfg = load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "x"))
    models = load_models(cfg)
    tok = models.tokenizer
    from instructgpt.generation import eos_ids
    from instructgpt.prompting import encode_prompt
    prompts = [[{"role": "user", "content": f"what is {i}"}] for i in range(8)]
    b = rollout(models, models.policy, [encode_prompt(tok, m) for m in prompts], prompts, cfg.ppo,
                eos_ids(models.policy, tok), torch.Generator().manual_seed(0), "cpu")
    # same weights: no penalty (to float rounding: the sampler's log-probs against a full forward's)
    assert float(kl_per_token(b.logprobs, b.ref_logprobs).abs().max()) < 1e-5
    # the first minibatch of the first epoch sees exactly the rollout's policy: ratio 1, nothing clipped
    with torch.no_grad():
        logits, _ = policy_forward(models.policy, b.input_ids, b.attention_mask, response_len=b.response.shape[1])
        new = logprobs_from_logits(scaled_logits(logits, cfg.ppo.temperature), b.response)
        # the same as slicing the full forward's logits at the response positions
        full, _ = policy_forward(models.policy, b.input_ids, b.attention_mask)
    P = b.query.shape[1]
    torch.testing.assert_close(logits, full[:, P - 1:])  # R + 1 positions, the last predicting past the row
    adv = whiten(torch.randn_like(new), b.mask)
    # the rollout keeps the sampler's log-probs: the full forward's, up to float rounding
    assert float(((new - b.logprobs) * b.mask).abs().max()) < 1e-4
    _, st = policy_loss(new, b.logprobs, adv, b.mask, 0.2)
    assert float(st["ratio"]) == pytest.approx(1.0, abs=1e-5)
    assert float(st["clipfrac"]) == 0.0 and float(st["approxkl"]) == pytest.approx(0.0, abs=1e-9)
    # ppo.recompute_logprobs: the old log-probs come from that same full forward, the ratio is exactly 1
    cfg.ppo.recompute_logprobs = True
    b2 = rollout(models, models.policy, [encode_prompt(tok, m) for m in prompts], prompts, cfg.ppo,
                 eos_ids(models.policy, tok), torch.Generator().manual_seed(0), "cpu")
    assert float(kl_per_token(b2.logprobs, b2.ref_logprobs).abs().max()) == 0.0  # exactly
    _, st = policy_loss(new, b2.logprobs, adv, b2.mask, 0.2)
    assert float(st["ratio"]) == 1.0 and float(st["approxkl"]) == 0.0
    # the reward is the reward model's score of the decoded response, as every other consumer computes it
    texts = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(b.response, b.mask)]
    expected = torch.tensor(models.reward.score(prompts, texts))
    expected = torch.where(b.ended, expected, torch.full_like(expected, cfg.ppo.missing_eos_penalty))
    torch.testing.assert_close(b.scores, expected, atol=1e-5, rtol=1e-5)
    # responses stop at EOS and pad (distinct from EOS) after it
    assert tok.pad_token_id not in tok.all_special_ids or tok.pad_token_id != tok.eos_token_id
    for row, n in zip(b.response, b.mask.sum(-1)):
        assert (row[int(n):] == tok.pad_token_id).all()


def test_bf16_mixed_precision_recomputes_old_logprobs_so_the_first_kl_is_zero(ppo_inputs, tmp_path, monkeypatch):
    from instructgpt import ppo
    switched = []  # on a CPU in bf16 the four models attend with generation.matmul_attention
    real = ppo.use_matmul_attention
    monkeypatch.setattr(ppo, "use_matmul_attention", lambda m, *a: switched.append(real(m, *a)) or switched[-1])
    with pytest.raises(ConfigError, match="needs ppo.recompute_logprobs=true"):
        load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "x", "train.mixed_precision=bf16"))
    cfg = load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "bf16", "train.mixed_precision=bf16",
                                             "ppo.recompute_logprobs=true", "train.max_steps=2", "train.save_every=0"))
    from accelerate import Accelerator
    # an earlier fp32 stage in the same process, as in the pipeline (on the device the stages pick: cuda where visible)
    Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    train(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "bf16")) if "objective/kl" in r]
    # the reference is the policy before its first update, run in the same precision: no penalty, exactly; a
    # reference left in fp32 against a bf16 policy reads bf16 rounding as KL (2.7e-4 per sequence here)
    assert rows[0]["objective/kl"] == 0.0
    assert rows[1]["objective/kl"] != 0.0 and all(math.isfinite(v) for r in rows for v in r.values()
                                                   if isinstance(v, float))
    assert switched == [not torch.cuda.is_available()] * 4


def test_bf16_rollouts_sample_in_bf16_and_keep_the_fp32_policys_logprobs(ppo_inputs, tmp_path):
    """ppo.rollout_mixed_precision=bf16: the sampler runs in bf16, the old log-probs and the reference's are the
    fp32 models' full forwards (policy == reference: no penalty, exactly), the training stays in fp32."""
    with pytest.raises(ConfigError, match="rollout_mixed_precision=bf16 needs ppo.recompute_logprobs=true"):
        load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "x", "ppo.rollout_mixed_precision=bf16"))
    cfg = load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "x", "ppo.rollout_mixed_precision=bf16",
                                             "ppo.recompute_logprobs=true"))
    models = load_models(cfg)
    tok = models.tokenizer
    from instructgpt.generation import eos_ids
    from instructgpt.prompting import encode_prompt
    prompts = [[{"role": "user", "content": f"what is {i}"}] for i in range(8)]
    dtypes = []
    hook = models.policy.lm_head.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    try:
        b = rollout(models, models.policy, [encode_prompt(tok, m) for m in prompts], prompts, cfg.ppo,
                    eos_ids(models.policy, tok), torch.Generator().manual_seed(0), "cpu")
    finally:
        hook.remove()
    assert dtypes[0] == torch.bfloat16 and dtypes[-1] == torch.float32  # sampled in bf16, recomputed in fp32
    assert float(kl_per_token(b.logprobs, b.ref_logprobs).abs().max()) == 0.0
    with torch.no_grad():
        logits, _ = policy_forward(models.policy, b.input_ids, b.attention_mask, response_len=b.response.shape[1])
    new = logprobs_from_logits(scaled_logits(logits, cfg.ppo.temperature), b.response)
    assert torch.equal(new * b.mask, b.logprobs)  # the first ratio is exactly 1


def test_config_requires_reward_model_and_ptx_text():
    with pytest.raises(ConfigError, match="reward_model.name_or_path"):
        load_config(PPOConfig, None, [])
    with pytest.raises(ConfigError, match="data.pretrain"):
        load_config(PPOConfig, None, ["reward_model.name_or_path=x", "data.pretrain=null"])


def test_short_run_raises_the_reward_and_logs_the_field_keys(ppo_inputs, tmp_path):
    out = tmp_path / "ppo"
    train(load_config(PPOConfig, None, _args(ppo_inputs, out, "train.max_steps=24", "ppo.kl_coef=0.01",
                                             "train.lr=3e-3", "ppo.missing_eos_penalty=null",
                                             f"data.eval={ppo_inputs['prompts']}", "ppo.eval_prompts=16",
                                             "train.eval_every=12")))
    rows = [r for r in read_metrics(str(out)) if "objective/scores" in r]
    assert len(rows) == 24
    for k in ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
              "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/var_explained", "ppo/val/clipfrac",
              "ppo/loss/ptx", "ppo/mean_response_length", "ppo/eos_rate"):
        assert k in rows[0], k
    first = sum(r["objective/scores"] for r in rows[:4]) / 4
    last = sum(r["objective/scores"] for r in rows[-4:]) / 4
    assert last > first + 0.5, (first, last)
    assert (out / "model" / "config.json").exists() and (out / "DONE.json").exists()
    assert (out / "samples.jsonl").exists()
    evals = [r for r in read_metrics(str(out)) if "eval/rm_score" in r]
    assert [r["step"] for r in evals] == [0, 12, 24] and evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert evals[-1]["eval/rm_score"] > evals[0]["eval/rm_score"]


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_estimators_raise_the_reward_without_a_value_model(ppo_inputs, tmp_path, estimator):
    out = tmp_path / estimator
    cfg = load_config(PPOConfig, None, _args(ppo_inputs, out, "train.max_steps=24", "ppo.kl_coef=0.01",
                                             "train.lr=3e-3", "ppo.missing_eos_penalty=null",
                                             f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=4",
                                             "ppo.sample_every=1"))
    models = load_models(cfg)
    assert models.critic is None  # no critic is even loaded
    train(cfg)
    rows = [r for r in read_metrics(str(out)) if "objective/scores" in r]
    assert len(rows) == 24 and not {"ppo/val/var_explained", "ppo/val/clipfrac", "ppo/loss/value"} & set(rows[0])
    first = sum(r["objective/scores"] for r in rows[:4]) / 4
    last = sum(r["objective/scores"] for r in rows[-4:]) / 4
    assert last > first + 0.5, (first, last)
    # each rollout batch holds 4 responses to each of its prompts, in consecutive rows (its first 4 rows are logged)
    samples = read_jsonl(out / "samples.jsonl")
    by_step = {}
    for row in samples:
        by_step.setdefault(row["step"], []).append(row["query"])
    assert len(by_step) == 24 and all(len(set(q)) == 1 for q in by_step.values())
    assert len({q[0] for q in by_step.values()}) > 12  # and different prompts from update to update


def test_kl_in_the_loss_leaves_the_reward_the_score_and_holds_the_policy_near_the_reference(ppo_inputs, tmp_path):
    def run(name, beta):
        train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / name, "train.max_steps=12", "train.lr=3e-3",
                                                 "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4",
                                                 "ppo.kl_in_loss=true", "ppo.kl_estimator=k3", f"ppo.kl_coef={beta}",
                                                 "ppo.missing_eos_penalty=null")))
        return [r for r in read_metrics(str(tmp_path / name)) if "objective/kl" in r]

    free, held = run("free", 0.0), run("held", 2.0)
    for rows in (free, held):  # the KL is not in the reward: the reward is the score
        assert all(r["objective/non_score_reward"] == 0.0 for r in rows)
        assert all(r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"], abs=1e-6) for r in rows)
    assert all("ppo/loss/kl" in r for r in held) and held[-1]["ppo/loss/kl"] > 0
    kl_free = sum(r["objective/kl"] for r in free[-4:]) / 4
    kl_held = sum(r["objective/kl"] for r in held[-4:]) / 4
    assert kl_held < 0.5 * kl_free, (kl_held, kl_free)  # the loss term pulls the policy back to the reference


def test_adaptive_kl_in_the_loop_sets_the_penalty_of_each_update_and_resumes(ppo_inputs, tmp_path):
    """ppo.adaptive_kl (Ziegler et al.'s controller; the paper kept beta fixed): each update's KL penalty uses the
    beta the controller reached after the previous update's KL, and the controller resumes with the run."""
    extra = ("train.max_steps=4", "ppo.adaptive_kl=true", "ppo.kl_coef=0.1", "ppo.kl_target=0.02",
             "ppo.kl_horizon=32")
    train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "a", *extra)))
    train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "b", *extra, "train.stop_after=2")))
    train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "b", *extra)))
    runs = {n: [r for r in read_metrics(str(tmp_path / n)) if "objective/kl" in r] for n in ("a", "b")}
    rows = runs["a"]
    ctl, betas = AdaptiveKLController(0.1, 0.02, 32), []
    for r in rows:
        # the reward's penalty is -beta * KL with the beta in force when the batch was scored
        assert r["objective/non_score_reward"] == pytest.approx(-ctl.value * r["objective/kl"], abs=2e-6)
        ctl.update(r["objective/kl"], 16)
        betas.append(ctl.value)
        assert r["ppo/kl_coef"] == pytest.approx(ctl.value, rel=1e-4)
    assert len(betas) == 4 and len(set(betas)) == 4  # it moved every update
    assert [r["ppo/kl_coef"] for r in runs["b"]] == pytest.approx([r["ppo/kl_coef"] for r in rows], rel=1e-5)


def test_critic_free_config_is_checked():
    base = ["reward_model.name_or_path=x", "ppo.advantage_estimator=rloo", "ppo.ptx_coef=0"]
    with pytest.raises(ConfigError, match="ppo.samples_per_prompt >= 2"):
        load_config(PPOConfig, None, base)
    with pytest.raises(ConfigError, match="multiple of ppo.samples_per_prompt"):
        load_config(PPOConfig, None, base + ["ppo.samples_per_prompt=3", "train.batch_size=64"])
    # the gold labeler needs no value model when there is none
    load_config(PPOConfig, None, ["reward_model.name_or_path=builtin:gold", "ppo.advantage_estimator=grpo",
                                  "ppo.samples_per_prompt=4", "ppo.ptx_coef=0"])


@pytest.mark.parametrize("estimator,lora", [("gae", False), ("rloo", False), ("gae", True)])
def test_resume_equals_uninterrupted(ppo_inputs, tmp_path, estimator, lora):
    """A run stopped after 2 updates and rerun ends where an uninterrupted one does (LoRA: the SmolLM2 recipe's
    policy and value model, adapters and heads restored from the checkpoint)."""
    extra = ("train.max_steps=4", f"ppo.advantage_estimator={estimator}",
             f"ppo.samples_per_prompt={1 if estimator == 'gae' else 4}",
             *(("model.lora.enabled=true", "model.lora.target_modules=[c_attn]", "ppo.value_lora=true") if lora else ()))
    train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "a", *extra)))
    train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "b", *extra, "train.stop_after=2")))
    assert not (tmp_path / "b" / "DONE.json").exists()
    train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "b", *extra)))
    wa, wb = saved_weights(tmp_path / "a"), saved_weights(tmp_path / "b")
    first = load_file(os.path.join(ppo_inputs["policy"], "model.safetensors"))
    assert any(not torch.allclose(wa[k], first[k], atol=1e-6) for k in first)  # the updates moved the policy
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    ma = [r for r in read_metrics(str(tmp_path / "a")) if "objective/scores" in r]
    mb = [r for r in read_metrics(str(tmp_path / "b")) if "objective/scores" in r]
    assert [r["objective/scores"] for r in ma] == pytest.approx([r["objective/scores"] for r in mb], abs=1e-5)


def test_length_groups_train_as_one_padded_batch(ppo_inputs, tmp_path, monkeypatch):
    """train.length_groups: the rollout's scoring forwards and each minibatch's forward and backward run over groups
    of rows of similar query and response length, each without its all-padding columns; every mean is over the whole
    minibatch's tokens and the ptx batch is the first group's, so 1, 2 or 3 groups train the same policy."""
    from instructgpt import ppo
    splits = []

    def spy(lengths, groups):
        out = length_groups(lengths, groups)
        splits.append(len(out))
        return out

    monkeypatch.setattr(ppo, "length_groups", spy)
    extra = ("train.max_steps=3", "model.dropout=0.0")
    runs = {}
    for groups in (1, 2, 3):
        out = tmp_path / f"g{groups}"
        train(load_config(PPOConfig, None, _args(ppo_inputs, out, *extra, f"train.length_groups={groups}")))
        runs[groups] = (saved_weights(out), [r for r in read_metrics(str(out)) if "objective/scores" in r])
    assert max(splits) == 3  # the rows did split
    for groups in (2, 3):
        assert_same_run(ppo_inputs, runs[groups], runs[1])


@pytest.mark.parametrize("extra", [(), ("ppo.recompute_logprobs=true", "ppo.num_minibatches=1"),
                                   ("ppo.value_model=policy", "train.length_groups=1")],
                         ids=["value-model", "recompute-one-minibatch", "value-head"])
def test_reused_rollout_forwards_train_as_forwards_run_again(ppo_inputs, tmp_path, monkeypatch, extra):
    """ppo.reuse_rollout_forwards: the first epoch's first minibatch trains through the graphs of its scoring forwards
    in the rollout (the value model's; the policy's too when it recomputes the old log-probs), one forward of each
    fewer per update, and the run is the one that forwards them again."""
    from instructgpt import policy as policy_module
    from instructgpt import ppo
    rows = Counter()
    real_forward, real_values = ppo.policy_forward, policy_module.token_values

    def count_policy(model, ids, *a, response_len=None, **kw):
        rows["policy"] += ids.shape[0] if response_len is not None else 0
        return real_forward(model, ids, *a, response_len=response_len, **kw)

    def count_values(model, ids, *a, **kw):
        rows["value"] += ids.shape[0]
        return real_values(model, ids, *a, **kw)

    monkeypatch.setattr(ppo, "policy_forward", count_policy)
    monkeypatch.setattr(policy_module, "token_values", count_values)
    steps, batch = 3, 16
    runs = _runs_off_and_on(ppo_inputs, tmp_path, "ppo.reuse_rollout_forwards", f"train.max_steps={steps}", *extra,
                           seen=(rows,))
    cfg = load_config(PPOConfig, None, _args(ppo_inputs, tmp_path, *extra))  # the runs' settings
    minibatch = batch // cfg.ppo.num_minibatches
    off, on = runs["false"][2], runs["true"][2]
    recomputed = cfg.ppo.recompute_logprobs or cfg.ppo.value_model == "policy"
    assert on["policy"] == off["policy"] - (steps * minibatch if recomputed else 0) > 0
    if cfg.ppo.value_model == "reward_model":
        assert on["value"] == off["value"] - steps * minibatch > 0
    assert_same_run(ppo_inputs, runs["true"], runs["false"])


def _tiny_model(arch: str, tok):
    """A random two-layer model of `arch`: GPT-2 (a Conv1D MLP), Llama (grouped-query attention, gated MLP), GPT-NeoX
    (attention and MLP in parallel off one residual), BLOOM (an MLP that adds the residual itself, called with it), or
    GPT-2's or BLOOM's sequence classifier (a value model, a reward model)."""
    from transformers import (BloomConfig, BloomForCausalLM, BloomForSequenceClassification, GPT2Config,
                              GPT2ForSequenceClassification, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                  eos_token_id=tok.eos_token_id)
    if arch in ("gpt2", "gpt2-value"):
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, num_labels=1, **common)
        return (GPT2LMHeadModel if arch == "gpt2" else GPT2ForSequenceClassification)(cfg)
    if arch in ("bloom", "bloom-value"):
        cfg = BloomConfig(hidden_size=32, n_layer=2, n_head=4, num_labels=1, **common)
        return (BloomForCausalLM if arch == "bloom" else BloomForSequenceClassification)(cfg)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, **common))
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, use_parallel_residual=True, **common))


def _training_model(arch: str, tok):
    """`_tiny_model` in train mode, as PPO's update runs it, without dropout's noise."""
    model = _tiny_model(arch, tok).train()
    disable_dropout(model)
    return model


def _param_grads(model, loss: torch.Tensor) -> list[torch.Tensor]:
    """d loss / d every parameter of `model`, zeros for those it does not reach."""
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt-neox", "bloom", "gpt2-value"])
def test_last_mlp_only_at_keeps_the_outputs_read_and_their_gradients(tiny, arch):
    """last_mlp_only_at: the last layer's MLP sees the last `keep` positions only, the outputs there (logits, or a
    value model's head) and every weight's gradient of a loss on them are the full forward's, the outputs elsewhere
    are not, and outside the context the model runs whole again."""
    from instructgpt.reward import token_values
    _, tok = tiny
    model = _training_model(arch, tok)
    torch.manual_seed(1)
    B, T, keep = 3, 12, 5
    ids = torch.randint(3, len(tok), (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    att[0, :4] = 0  # a left-padded row, as PPO's queries are
    mlp = last_layer_mlp(model)
    assert mlp is not None
    seen = []
    spy = mlp.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))  # before the context's own hook

    def outputs():
        if arch.endswith("-value"):
            return token_values(model, ids, att)  # (B, T)
        return policy_forward(model, ids, att)[0]  # (B, T, V)

    def loss_and_grads(out):
        return _param_grads(model, (out[:, -keep:].float() ** 2).mean())

    full = outputs()
    full_grads = loss_and_grads(full)
    with last_mlp_only_at(model, keep):
        part = outputs()
    part_grads = loss_and_grads(part)
    again = outputs()
    spy.remove()
    assert seen == [T, keep, T]
    torch.testing.assert_close(part[:, -keep:], full[:, -keep:], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(part[:, :-keep], full[:, :-keep], atol=1e-3)  # not the model's outputs there
    torch.testing.assert_close(again, full)
    for g_part, g_full in zip(part_grads, full_grads):
        torch.testing.assert_close(g_part, g_full, atol=1e-6, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in full_grads[-6:]) > 0  # the last layers' gradients were not all zero


def test_last_mlp_only_at_is_a_no_op_without_a_layer_list_or_keep(tiny):
    """No `keep`, or a model without one list of config.num_hidden_layers layers with an `mlp`: nothing changes."""
    model, _ = tiny
    ids = torch.randint(3, 50, (2, 6))
    att = torch.ones_like(ids)
    full = policy_forward(model, ids, att)[0]
    with last_mlp_only_at(model, None):
        torch.testing.assert_close(policy_forward(model, ids, att)[0], full, atol=0, rtol=0)
    with last_mlp_only_at(model, 6):  # every position kept
        torch.testing.assert_close(policy_forward(model, ids, att)[0], full, atol=0, rtol=0)
    assert last_layer_mlp(torch.nn.Linear(3, 3)) is None


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bloom"])
def test_reward_at_the_last_token_with_the_last_mlp_there_alone(tiny, arch):
    """last_mlp_only_at with a position per row, as the reward model reads right-padded rows: the last layer's MLP
    sees one position a row, and the rewards and every weight's gradient are the full forward's; raw_rewards in
    length groups gives the rewards of one padded batch."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from instructgpt.reward import last_token_rewards, raw_rewards
    _, tok = tiny
    if arch in ("gpt2", "bloom"):
        model = _tiny_model(f"{arch}-value", tok)
    else:
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id))
    model.eval()
    torch.manual_seed(1)
    ids = torch.randint(3, len(tok), (4, 10))
    att = torch.ones_like(ids)
    att[1, 6:] = att[2, 3:] = 0  # right-padded rows of 6 and 3 tokens
    seen = []
    spy = last_layer_mlp(model).register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape[:2])))

    def rewards_and_grads(trim):
        r = last_token_rewards(model, ids, att, trim_mlp=trim)
        return r, _param_grads(model, (r ** 2).sum())

    full, full_grads = rewards_and_grads(False)
    part, part_grads = rewards_and_grads(True)
    assert seen == [(4, 10), (4, 1)]
    torch.testing.assert_close(part, full, atol=1e-6, rtol=1e-5)
    for a, b in zip(part_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    prompts = ["a b c", "a", "b c d e f g h", "c d"]
    responses = ["x", "y z w v", "x y", "z"]
    one = raw_rewards(model, tok, prompts, responses, "cpu")
    for n_groups, trim in ((2, False), (3, True)):
        seen.clear()
        torch.testing.assert_close(raw_rewards(model, tok, prompts, responses, "cpu", n_groups=n_groups,
                                               trim_mlp=trim), one, atol=1e-6, rtol=1e-5)
        assert len(seen) == n_groups and sum(n for n, _ in seen) == 4  # a forward a group, every pair once
        assert all(width == 1 for _, width in seen) == trim
    spy.remove()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt-neox", "bloom", "gpt2-value"])
def test_mlps_skip_padding_keeps_every_real_token_and_its_gradients(tiny, arch):
    """mlps_skip_padding: each layer's MLP sees the real tokens alone (left padding and padding after a response's
    end dropped), every real token's output and every weight's gradient of a loss on them are the full forward's, the
    padding's outputs are not; `skip_last` leaves the last layer's MLP whole; a batch without padding runs as without
    the context, and outside it the model runs whole again."""
    from instructgpt.reward import token_values
    _, tok = tiny
    model = _training_model(arch, tok)
    torch.manual_seed(1)
    B, T = 3, 12
    ids = torch.randint(3, len(tok), (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    att[0, :4] = 0  # a left-padded query
    att[1, 9:] = 0  # a response that ended early
    att[2, :2] = att[2, 10:] = 0  # both
    real = att.bool()
    seen = []
    layers = decoder_stack(model)[1]
    spies = [layer.mlp.register_forward_hook(lambda m, a, out, i=i: seen.append((i, tuple(a[0].shape[:2]))))
             for i, layer in enumerate(layers)]  # registered first: they see what the MLP itself sees

    def outputs(mask):
        return token_values(model, ids, mask) if arch.endswith("-value") else policy_forward(model, ids, mask)[0]

    def grads(out):
        return _param_grads(model, (out[real].float() ** 2).mean())

    full = outputs(att)
    full_grads = grads(full)
    seen.clear()
    with mlps_skip_padding(model):
        part = outputs(att)
    assert seen == [(0, (1, int(att.sum()))), (1, (1, int(att.sum())))]
    torch.testing.assert_close(part[real], full[real], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(part[~real], full[~real], atol=1e-3)  # not the model's outputs at the padding
    for a, b in zip(grads(part), full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in full_grads) > 0
    seen.clear()
    with mlps_skip_padding(model, skip_last=True):
        torch.testing.assert_close(outputs(att)[real], full[real], atol=1e-6, rtol=1e-5)
        ones = torch.ones_like(att)
        no_padding = outputs(ones)
    assert seen == [(0, (1, int(att.sum()))), (1, (B, T)), (0, (B, T)), (1, (B, T))]
    torch.testing.assert_close(no_padding, outputs(ones), atol=0, rtol=0)
    seen.clear()
    torch.testing.assert_close(outputs(att), full, atol=0, rtol=0)
    assert seen == [(0, (B, T)), (1, (B, T))]
    for h in spies:
        h.remove()


def test_mlps_skip_padding_leaves_a_decode_step_and_a_model_without_layers_alone(tiny):
    """A KV-cached decode step (one new token against the whole mask) runs its MLPs whole, and sampling under the
    context draws what it draws without; a module with no decoder stack is left as it is."""
    from instructgpt.generation import SamplingParams, sample
    model, tok = tiny
    q = torch.tensor([[tok.pad_token_id, tok.pad_token_id, 5, 6], [7, 8, 9, 10]])
    qm = (torch.arange(4)[None, :] >= torch.tensor([[2], [0]])).long()
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    eos = [tok.eos_token_id]
    plain = sample(model, q, qm, params, eos, tok.pad_token_id, torch.Generator().manual_seed(3))
    widths = []
    spy = last_layer_mlp(model).register_forward_hook(lambda m, a, out: widths.append(tuple(a[0].shape[:2])))
    with mlps_skip_padding(model):
        out = sample(model, q, qm, params, eos, tok.pad_token_id, torch.Generator().manual_seed(3))
    spy.remove()
    assert widths[0] == (1, 6) and set(widths[1:]) == {(2, 1)}  # the prefill's real tokens, then one per row
    assert out.tokens.tolist() == plain.tokens.tolist()
    torch.testing.assert_close(out.logprobs, plain.logprobs, atol=1e-6, rtol=1e-5)
    lin = torch.nn.Linear(3, 3)
    with mlps_skip_padding(lin):
        assert decoder_stack(lin) is None and not lin._forward_pre_hooks



@pytest.mark.parametrize("arch", ARCHS)
def test_every_trim_keeps_the_logits_and_rewards_read_on_each_architecture(tiny, arch):
    """PPO's forwards with every trim on (the last layer's MLP and attention at the response positions, every MLP at
    the real tokens) give the full forward's logits at the response positions, and a reward model's forward with its
    last MLP at one position a row and its padding skipped gives the full rewards, on each architecture of
    conftest.ARCHS, with left-padded queries and right-padded reward rows (up to float rounding: a matrix product
    over fewer rows may round differently)."""
    from instructgpt.reward import last_token_rewards
    _, tok = tiny
    model = tiny_arch(arch, tok)
    torch.manual_seed(1)
    B, T, R = 3, 12, 5
    ids = torch.randint(3, len(tok), (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    att[0, :3] = att[1, :1] = 0  # left-padded queries
    tol = dict(atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        full = policy_forward(model, ids, att, response_len=R)[0]
        with mlps_skip_padding(model, skip_last=True):
            part = policy_forward(model, ids, att, response_len=R, trim_mlp=True, trim_attention=True)[0]
    assert part.shape == full.shape == (B, R + 1, len(tok))
    torch.testing.assert_close(part, full, **tol)
    rm = tiny_arch(arch, tok, head="seq_cls")
    right = torch.ones(B, T, dtype=torch.long)
    right[0, 7:] = right[2, 10:] = 0  # rows of 7, 12 and 10 tokens
    with torch.no_grad():
        rewards = last_token_rewards(rm, ids * right, right)
        with mlps_skip_padding(rm, skip_last=True):
            trimmed = last_token_rewards(rm, ids * right, right, trim_mlp=True)
    torch.testing.assert_close(trimmed, rewards, **tol)

@pytest.mark.parametrize("arch,impl", [("gpt2", "sdpa"), ("llama", "sdpa"), ("gpt-neox", "sdpa"),
                                       ("gpt2-value", "sdpa"), ("llama", "instructgpt_matmul")])
def test_last_attention_only_at_keeps_the_outputs_read_and_their_gradients(tiny, arch, impl):
    """last_attention_only_at: the last layer's attention takes queries at the last `keep` positions alone (its own
    query and output projections run there alone), to every position's keys; the outputs there and every weight's
    gradient of a loss on them are the full forward's, with a left-padded row (sdpa's mask) and without padding (no
    mask: causal), alone and with the last MLP trimmed too; the outputs elsewhere are not the model's; outside the
    context the model runs whole again, with its own config. `instructgpt_matmul`: the CPU's bf16 training attention."""
    import instructgpt.generation  # noqa: F401  (registers instructgpt_matmul)
    from instructgpt.reward import token_values
    _, tok = tiny
    model = _training_model(arch, tok)
    model.set_attn_implementation(impl)
    torch.manual_seed(1)
    B, T, keep = 3, 12, 5
    ids = torch.randint(3, len(tok), (B, T))
    padded = torch.ones(B, T, dtype=torch.long)
    padded[0, :4] = 0  # a left-padded row, as PPO's queries are
    attn = last_layer_attention(model)
    config = attn.config
    out_proj = next(getattr(attn, n) for n in ("o_proj", "c_proj", "dense") if hasattr(attn, n))
    projections = [out_proj] + ([attn.q_proj] if arch == "llama" else [])
    seen = []  # registered before the context's hooks: the rows each projection runs at
    spies = [m.register_forward_hook(lambda m, a, out: seen.append(out.shape[1])) for m in projections]

    def outputs(att):
        return token_values(model, ids, att) if arch == "gpt2-value" else policy_forward(model, ids, att)[0]

    def loss_and_grads(out):
        return _param_grads(model, (out[:, -keep:].float() ** 2).mean())

    for att in (padded, torch.ones_like(padded)):
        full = outputs(att)
        full_grads = loss_and_grads(full)
        for mlp_too in (False, True):
            seen.clear()
            with last_attention_only_at(model, keep), last_mlp_only_at(model, keep if mlp_too else None):
                assert attn.config is not config and attn.config._attn_implementation != impl
                part = outputs(att)
            assert seen == [keep] * len(projections)
            torch.testing.assert_close(part[:, -keep:], full[:, -keep:], atol=1e-6, rtol=1e-5)
            assert not torch.allclose(part[:, :-keep], full[:, :-keep], atol=1e-3)  # not the model's outputs there
            for g_part, g_full in zip(loss_and_grads(part), full_grads):
                torch.testing.assert_close(g_part, g_full, atol=1e-6, rtol=1e-4)
        assert sum(float(g.abs().sum()) for g in full_grads[-6:]) > 0
        assert attn.config is config
        seen.clear()
        torch.testing.assert_close(outputs(att), full, atol=0, rtol=0)
        assert seen == [T] * len(projections)
    for h in spies:
        h.remove()


def test_last_attention_only_at_leaves_eager_a_short_row_and_a_decode_step_alone(tiny):
    """No `keep`, `keep` >= the row's length, or eager attention (each model's own function): nothing changes. Sampling
    under the context (a prefill trimmed to its last positions, then one-token decode steps against the KV cache, which
    run whole) draws what it draws without."""
    from instructgpt.generation import SamplingParams, sample
    model, tok = tiny
    ids = torch.randint(3, 50, (2, 6))
    att = torch.ones_like(ids)
    full = policy_forward(model, ids, att)[0]
    for keep in (None, 6):
        with last_attention_only_at(model, keep):
            torch.testing.assert_close(policy_forward(model, ids, att)[0], full, atol=0, rtol=0)
    q = torch.tensor([[tok.pad_token_id, tok.pad_token_id, 5, 6, 7], [7, 8, 9, 10, 11]])
    qm = (torch.arange(5)[None, :] >= torch.tensor([[2], [0]])).long()
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    plain = sample(model, q, qm, params, [tok.eos_token_id], tok.pad_token_id, torch.Generator().manual_seed(3))
    widths = []
    spy = last_layer_attention(model).c_proj.register_forward_hook(lambda m, a, out: widths.append(out.shape[:2]))
    with last_attention_only_at(model, 2):
        out = sample(model, q, qm, params, [tok.eos_token_id], tok.pad_token_id, torch.Generator().manual_seed(3))
    spy.remove()
    assert widths[0] == (2, 2) and set(widths[1:]) == {(2, 1)}  # the prefill's last 2 positions, then one a row
    assert out.tokens.tolist() == plain.tokens.tolist()
    torch.testing.assert_close(out.logprobs, plain.logprobs, atol=1e-6, rtol=1e-5)
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager = policy_forward(model, ids, att)[0]
        with last_attention_only_at(model, 2):
            assert last_layer_attention(model).config._attn_implementation == "eager"
            torch.testing.assert_close(policy_forward(model, ids, att)[0], eager, atol=0, rtol=0)
    finally:
        model.set_attn_implementation(impl)
    assert last_layer_attention(torch.nn.Linear(3, 3)) is None


@pytest.mark.parametrize("extra", [(), ("ppo.value_model=policy", "ppo.trim_last_mlp=false")],
                         ids=["value-model", "value-head-whole-mlp"])
def test_trimmed_last_attention_trains_as_the_whole_model(ppo_inputs, tmp_path, monkeypatch, extra):
    """ppo.trim_last_attention: every forward of the policy, the reference and the value model on rollouts attends
    from the response positions alone in its last layer (R + 1 of them), and the run ends where the one attending from
    every position does (weights and metrics, to float rounding)."""
    from instructgpt import policy as policy_module
    keeps = []
    real = policy_module.last_attention_only_at

    def spy(model, keep):
        keeps.append((type(getattr(model, "module", model)).__name__, keep))
        return real(model, keep)

    monkeypatch.setattr(policy_module, "last_attention_only_at", spy)
    runs = _runs_off_and_on(ppo_inputs, tmp_path, "ppo.trim_last_attention", "train.max_steps=3", "ppo.ptx_coef=0",
                           *extra, seen=(keeps,))
    assert {k for _, k in runs["false"][2]} == {None}
    assert len(runs["true"][2]) == len(runs["false"][2]) > 0 and {k for _, k in runs["true"][2]} <= set(range(2, 10))
    models = {name for name, _ in runs["true"][2]}
    assert models == ({"GPT2LMHeadModel"} if extra else {"GPT2LMHeadModel", "GPT2ForSequenceClassification"})
    assert_same_run(ppo_inputs, runs["true"], runs["false"])


@pytest.mark.parametrize("extra", [(), ("ppo.trim_last_mlp=false", "ppo.value_model=policy")],
                         ids=["trimmed-last", "whole-last-value-head"])
def test_mlps_without_padding_train_as_the_whole_model(ppo_inputs, tmp_path, monkeypatch, extra):
    """ppo.skip_padding_in_mlps: the policy's, the reference's, the value model's and the reward model's MLPs run at
    the real tokens alone through the whole loop (the last layer's too where ppo.trim_last_mlp does not trim it), and
    the run ends where the one running them at every position does (weights and metrics, to float rounding)."""
    import instructgpt.ppo as ppo_module
    entered = []
    real = ppo_module.mlps_skip_padding

    def spy(model, skip_last=False):
        entered.append((type(getattr(model, "module", model)).__name__, skip_last))
        return real(model, skip_last)

    monkeypatch.setattr(ppo_module, "mlps_skip_padding", spy)
    runs = _runs_off_and_on(ppo_inputs, tmp_path, "ppo.skip_padding_in_mlps", "train.max_steps=3", *extra,
                           seen=(entered,))
    assert runs["false"][2] == []
    trim = "ppo.trim_last_mlp=false" not in extra
    models = [name for name, _ in runs["true"][2]]
    assert {s for _, s in runs["true"][2]} == {trim}
    assert models.count("GPT2LMHeadModel") == 2 and models.count("GPT2ForSequenceClassification") == (2 if trim else 1)
    assert_same_run(ppo_inputs, runs["true"], runs["false"])


@pytest.mark.parametrize("extra", [(), ("ppo.recompute_logprobs=true", "ppo.reuse_rollout_forwards=false"),
                                   ("ppo.value_model=policy",)],
                         ids=["value-model", "recompute-no-reuse", "value-head"])
def test_trimmed_last_mlp_trains_as_the_whole_model(ppo_inputs, tmp_path, monkeypatch, extra):
    """ppo.trim_last_mlp: every forward of the policy, the reference and the value model on rollouts runs its last MLP
    at the response positions only (R + 1 of them: the logits' and values' positions), the reward model's at each
    response's last token, and the run ends where the one running it at every position does (weights and metrics,
    to float rounding). (No ptx: its forward reads every position.)"""
    from instructgpt import policy as policy_module
    keeps = []
    real = policy_module.last_mlp_only_at

    def spy(model, keep):
        keeps.append(keep)
        return real(model, keep)

    monkeypatch.setattr(policy_module, "last_mlp_only_at", spy)
    from instructgpt import reward as reward_module
    rm_trims = []
    real_rm = reward_module.last_mlp_only_at

    def rm_spy(model, where):
        rm_trims.append(where is not None)
        return real_rm(model, where)

    monkeypatch.setattr(reward_module, "last_mlp_only_at", rm_spy)
    runs = _runs_off_and_on(ppo_inputs, tmp_path, "ppo.trim_last_mlp", "train.max_steps=3", "ppo.response_length=8",
                           "ppo.ptx_coef=0", *extra, seen=(keeps, rm_trims))
    assert set(runs["false"][2]) == {None} and set(runs["false"][3]) == {False}
    assert set(runs["true"][3]) == {True}  # the reward model's last MLP at each response's last token alone
    assert len(runs["true"][2]) == len(runs["false"][2]) > 0 and set(runs["true"][2]) <= set(range(2, 10))
    assert_same_run(ppo_inputs, runs["true"], runs["false"])


def test_rollout_trimmed_drops_only_columns_that_are_padding_in_every_row():
    """Rollout.trimmed: the query columns left of every row's prompt and the response columns right of every row's
    end go; every real token stays where it was."""
    q = torch.tensor([[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]])
    qm = (q != 0).long()
    resp = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    mask = resp != 0
    z = torch.arange(8.).reshape(2, 4)
    b = Rollout(q, qm, resp, mask, z, z + 1, z + 2, torch.zeros(2), torch.ones(2, dtype=torch.bool), ["a", "b"],
                ["x", "y"], z + 3, None)
    t = b.trimmed()
    assert t.query.tolist() == [[0, 5, 6], [7, 8, 9]] and t.query_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert t.response.tolist() == [[1, 2], [3, 0]] and t.mask.tolist() == [[True, True], [True, False]]
    assert t.logprobs.tolist() == z[:, :2].tolist() and t.advantages.tolist() == (z + 3)[:, :2].tolist()
    assert t.returns is None and t.prompts == ["a", "b"] and t.scores.shape == (2,)


def test_ema_of_the_policy_is_the_saved_model_and_resumes_exactly(ppo_inputs, tmp_path):
    """ppo.ema_decay (the paper's 0.992): the saved model is the EMA of the policy's weights after every optimizer
    step. Decay near 0 leaves the last weights, near 1 the first; in between it resumes like the rest of the state."""
    def run(name, *extra):
        train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / name, "train.max_steps=3", *extra)))

    run("last")
    run("ema0", "ppo.ema_decay=1e-9")
    run("ema1", "ppo.ema_decay=0.999999999")
    run("half", "ppo.ema_decay=0.5")
    run("half_resumed", "ppo.ema_decay=0.5", "train.stop_after=2")
    run("half_resumed", "ppo.ema_decay=0.5")
    first = load_file(os.path.join(ppo_inputs["policy"], "model.safetensors"))
    last, ema0, ema1, half = (saved_weights(tmp_path / n) for n in ("last", "ema0", "ema1", "half"))
    moved = [k for k in last if not torch.allclose(last[k], first[k], atol=1e-4)]
    assert moved  # the policy's weights changed
    for k in last:
        torch.testing.assert_close(ema0[k], last[k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ema1[k], first[k], atol=1e-6, rtol=1e-6)
    for k in moved:  # an average of the weights it went through: neither end
        assert not torch.allclose(half[k], last[k], atol=1e-5) and not torch.allclose(half[k], first[k], atol=1e-5)
    for k, v in saved_weights(tmp_path / "half_resumed").items():
        torch.testing.assert_close(v, half[k], atol=1e-6, rtol=1e-5)


def test_ema_of_a_lora_policy_averages_the_adapter_only(ppo_inputs, tmp_path):
    from instructgpt.config import LoraConfig
    from instructgpt.modeling import apply_lora, load_model
    from instructgpt.training import EMA
    lora = ("model.lora.enabled=true", "model.lora.target_modules=[c_attn]")
    model = apply_lora(load_model(ppo_inputs["policy"])[0], LoraConfig(enabled=True, target_modules=["c_attn"]))
    ema = EMA(model, 0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ema.shadow) == trainable and all("lora" in n for n in trainable)  # no copy of the frozen base
    before = {n: v.clone() for n, v in ema.shadow.items()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trainable:
                p.add_(1.0)
    ema.update(model)
    for n, v in ema.shadow.items():
        torch.testing.assert_close(v, before[n] + 0.5)
    ema.copy_to(model)
    for n, p in model.named_parameters():
        if n in trainable:
            torch.testing.assert_close(p, before[n] + 0.5)
    # in the loop: an EMA that forgets at once saves the last policy, as a run without one does
    for name, extra in (("plain", ()), ("ema0", ("ppo.ema_decay=1e-9",))):
        train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / name, "train.max_steps=2", *lora, *extra)))
    for k, v in saved_weights(tmp_path / "plain").items():
        torch.testing.assert_close(saved_weights(tmp_path / "ema0")[k], v, atol=1e-6, rtol=1e-6)


def test_sigkill_mid_update_then_rerun_matches_uninterrupted(ppo_inputs, tmp_path):
    args = _args(ppo_inputs, "X", "train.max_steps=20", "train.save_every=2")
    cli = [sys.executable, "-m", "instructgpt.cli", "ppo"]
    ref = tmp_path / "ref"
    subprocess.run(cli + [a if a != "out_dir=X" else f"out_dir={ref}" for a in args], check=True, capture_output=True)
    out = tmp_path / "killed"
    killed_args = [a if a != "out_dir=X" else f"out_dir={out}" for a in args]
    sigkill_after_checkpoint(cli + killed_args, out, step=4)  # during update 5 (or later): far from the end
    subprocess.run(cli + killed_args, check=True, capture_output=True)
    wa, wb = saved_weights(ref), saved_weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_lora_policy_shares_the_frozen_base_as_reference_and_lora_value(ppo_inputs, tmp_path):
    """With LoRA the reference is the policy with its adapter off (no second copy); before any update they agree."""
    args = _args(ppo_inputs, tmp_path / "lora", "train.max_steps=2", "model.lora.enabled=true",
                 "model.lora.target_modules=[c_attn]", "ppo.value_lora=true")
    cfg = load_config(PPOConfig, None, args)
    models = load_models(cfg)
    assert models.ref is None and hasattr(models.policy, "disable_adapter")
    trainable = [n for n, p in models.critic.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n or "score" in n for n in trainable)
    train(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "lora")) if "objective/kl" in r]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # adapter B starts at zero: policy == reference
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")  # merged: a plain checkpoint


def test_a_named_reference_model_is_the_kl_anchor(ppo_inputs, tmp_path):
    """reference_model.name_or_path: pi_ref is that model (also beside a LoRA policy), not the one PPO starts from;
    one whose embeddings differ from the policy's is refused."""
    from conftest import build_tiny
    other = build_tiny(str(tmp_path / "other"), seed=1)  # the policy's tokenizer, other weights
    expected = load_file(os.path.join(other, "model.safetensors"))
    from instructgpt.generation import eos_ids
    from instructgpt.prompting import encode_prompt
    prompts = [[{"role": "user", "content": f"what is {i}"}] for i in range(4)]
    for lora in ([], ["model.lora.enabled=true", "model.lora.target_modules=[c_attn]"]):
        cfg = load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "x", f"reference_model.name_or_path={other}",
                                                 "ppo.recompute_logprobs=true", *lora))
        models = load_models(cfg)
        assert models.ref is not None
        assert all(torch.equal(models.ref.state_dict()[k], v) for k, v in expected.items())
        tok = models.tokenizer
        b = rollout(models, models.policy, [encode_prompt(tok, m) for m in prompts], prompts, cfg.ppo,
                    eos_ids(models.policy, tok), torch.Generator().manual_seed(0), "cpu")
        with torch.no_grad():
            logits, _ = policy_forward(models.ref, b.input_ids, b.attention_mask, response_len=b.response.shape[1])
        torch.testing.assert_close(b.ref_logprobs, logprobs_from_logits(scaled_logits(logits, 1.0), b.response))
        assert float((kl_per_token(b.logprobs, b.ref_logprobs) * b.mask).abs().max()) > 1e-2  # not the policy
    narrow = build_tiny(str(tmp_path / "narrow"), n_embd=16)
    with pytest.raises(ConfigError, match="reference_model.name_or_path=.*is not the policy's"):
        load_models(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "y",
                                                       f"reference_model.name_or_path={narrow}")))


class StandInEngine:
    """vLLM's side of the rollout-engine contract, on CPU: a copy of the model of its own (loaded from the same
    files), weights replaced in place by `load_weights`, one response's token ids per query from `sample`."""

    made: list = []

    def __init__(self, model_path, gpu_memory_utilization, max_model_len, seed):
        from instructgpt.modeling import load_model
        self.model, self.tok = load_model(model_path)
        self.samples: list[dict] = []  # per call: the weights it sampled with
        StandInEngine.made.append(self)

    def load_weights(self, weights):
        own = self.model.state_dict()
        with torch.no_grad():
            for name, w in weights:
                own[name].copy_(w)

    def sample(self, queries, max_new_tokens, temperature, seeds, eos):
        from instructgpt.generation import SamplingParams, sample
        self.samples.append({k: v.clone() for k, v in self.model.state_dict().items()})
        out = []
        for q, seed in zip(queries, seeds):
            b = sample(self.model, torch.tensor([q]), torch.ones(1, len(q), dtype=torch.long),
                       SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature), eos,
                       self.tok.pad_token_id, torch.Generator().manual_seed(seed))
            out.append(b.tokens[0, :int(b.lengths[0])].tolist())
        return out


def test_a_rollout_engine_samples_from_the_weights_of_each_update_and_the_trainer_scores_them(ppo_inputs, tmp_path,
                                                                                                monkeypatch):
    """ppo.rollout_engine=vllm against a stand-in engine: before every rollout the policy's current weights are pushed
    into the engine's own copy, so after an update it samples from the updated policy; the rollout's log-probs are the
    training model's (full forward), and the engine's token ids are what the update learns from."""
    from instructgpt import ppo, rollout_engine
    monkeypatch.setitem(rollout_engine.ENGINES, "vllm", StandInEngine)
    StandInEngine.made.clear()
    policy_at_rollout, rollouts = [], []
    real = ppo.rollout

    def spy(models, policy, *args, **kw):
        policy_at_rollout.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        b = real(models, policy, *args, **kw)
        with torch.no_grad():
            logits, _ = policy_forward(policy, b.input_ids, b.attention_mask, response_len=b.response.shape[1])
        rollouts.append((b, logprobs_from_logits(scaled_logits(logits, 1.0), b.response) * b.mask))
        return b
    monkeypatch.setattr(ppo, "rollout", spy)
    out = tmp_path / "engine"
    # one length group: the rollout's log-probs from the same padded forward as the spy's, to the bit
    train(load_config(PPOConfig, None, _args(ppo_inputs, out, "train.max_steps=3", "ppo.rollout_engine=vllm",
                                             "ppo.recompute_logprobs=true", "train.length_groups=1")))
    (engine,) = StandInEngine.made
    assert len(engine.samples) == len(policy_at_rollout) == 3
    for engine_weights, policy_weights in zip(engine.samples, policy_at_rollout):
        assert all(torch.equal(engine_weights[k], v) for k, v in policy_weights.items())
    first, last = policy_at_rollout[0], policy_at_rollout[-1]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the updates moved it: the engine followed
    for b, logprobs in rollouts:
        assert b.response.shape[0] == 16 and int(b.mask.sum()) > 0
        assert torch.equal(b.logprobs, logprobs)  # the training model's, not the engine's
    # the engine is asked for token ids only, with a seed per response: rows sampled again from the pushed weights
    # with those seeds are the rollout's responses
    from instructgpt.generation import eos_ids
    b = rollouts[-1][0]  # the engine still holds the weights of the last rollout
    again = engine.sample([q[m.bool()].tolist() for q, m in zip(b.query, b.query_mask)], 8, 1.0,
                          [ppo.row_seed(PPOConfig().seed, 2, r) for r in range(16)], eos_ids(engine.model, engine.tok))
    assert [r[:int(n)] for r, n in zip(b.response.tolist(), b.mask.sum(-1))] == again
    # refused: no recomputed log-probs, or a LoRA policy; and without vLLM installed, an error that says how to get it
    for extra, msg in ((["ppo.rollout_engine=vllm"], "needs ppo.recompute_logprobs=true"),
                       (["ppo.rollout_engine=vllm", "ppo.recompute_logprobs=true", "model.lora.enabled=true"],
                        "with model.lora.enabled use ppo.rollout_engine=policy")):
        with pytest.raises(ConfigError, match=msg):
            load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / "bad", *extra)).validate()
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RuntimeError, match="pip install vllm"):
        rollout_engine.VLLMEngine(ppo_inputs["policy"], 0.3, 64, 0)


def test_keep_best_with_a_lora_policy_saves_mid_run_and_training_goes_on(ppo_inputs, tmp_path):
    """keep_best saves the policy at every evaluation that improves; with LoRA the save merges a copy, so the policy
    keeps its adapter to switch off for the reference in the updates that follow."""
    out = tmp_path / "best"
    train(load_config(PPOConfig, None, _args(ppo_inputs, out, "train.max_steps=3", "train.eval_every=1",
                                             "model.lora.enabled=true", "model.lora.target_modules=[c_attn]",
                                             "ppo.eval_prompts=8", "ppo.keep_best=reward", "ppo.kl_budget=100")))
    rows = read_metrics(str(out))
    kls = [r["objective/kl"] for r in rows if "objective/kl" in r]
    # the adapter moved it: the KL estimate (log pi - log pi_ref on the policy's own samples) leaves 0, either way
    assert len(kls) == 3 and kls[0] == pytest.approx(0.0, abs=1e-5) and min(abs(k) for k in kls[1:]) > 1e-4
    scores = {r["step"]: r["eval/rm_score"] for r in rows if "eval/rm_score" in r}
    assert sorted(scores) == [0, 1, 2, 3]
    with open(out / "DONE.json", encoding="utf-8") as fh:
        done = json.load(fh)
    best = max(scores, key=scores.get)
    assert done["best_step"] == best and done["best"] == pytest.approx(scores[best])
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "model")  # the kept checkpoint, merged: a plain one


def test_gradient_checkpointing_runs_the_updates_in_train_mode_without_dropout(ppo_inputs, tmp_path, mlp_forwards):
    """model.gradient_checkpointing: Hugging Face models checkpoint in train mode only, so PPO's updates run in train
    mode with every dropout at 0 (here the model asks for 0.1): the same run as in eval mode, to float rounding, with
    the policy's and the LoRA value model's blocks replayed in the backward passes."""
    extra = ("train.max_steps=2", "model.dropout=0.1", "model.lora.enabled=true",
             "model.lora.target_modules=[c_attn]", "ppo.value_lora=true")
    rows = {}
    for gc in ("false", "true"):
        mlp_forwards["train"] = 0
        train(load_config(PPOConfig, None, _args(ppo_inputs, tmp_path / gc, *extra,
                                                 f"model.gradient_checkpointing={gc}")))
        rows[gc] = [r for r in read_metrics(str(tmp_path / gc)) if "objective/kl" in r]
        assert (mlp_forwards["train"] > 0) == (gc == "true")
    for key in ("objective/kl", "objective/scores", "ppo/loss/policy", "ppo/loss/value"):
        assert [r[key] for r in rows["true"]] == pytest.approx([r[key] for r in rows["false"]], abs=1e-5)
    for k, w in saved_weights(tmp_path / "false").items():
        torch.testing.assert_close(saved_weights(tmp_path / "true")[k], w, atol=1e-5, rtol=1e-4)


def test_gold_labeler_as_the_reward_oracle(ppo_inputs, tmp_path):
    from instructgpt import gold, tasks
    from instructgpt.assistant import reference_answer
    from instructgpt.judges import GoldJudge, JudgeReward
    t = tasks.make_tasks("train", 1, seed=0)[0]
    assert JudgeReward(GoldJudge()).score([t.prompt, [{"role": "user", "content": t.prompt}]], [t.answer, ""]) == [1.0, -1.0]
    a = gold.make_tasks("train", 1, seed=0)[0]  # the default suite's prompt, its reference answer a perfect 7
    assert JudgeReward(GoldJudge()).score([a.prompt], [reference_answer(a.prompt)]) == [1.0]
    with pytest.raises(ConfigError, match="ppo.value_model=policy"):
        load_config(PPOConfig, None, ["reward_model.name_or_path=builtin:gold"])
    out = tmp_path / "gold"
    train(load_config(PPOConfig, None, _args(ppo_inputs, out, "train.max_steps=2",
                                             "reward_model.name_or_path=builtin:gold",
                                             "ppo.value_model=policy", "ppo.missing_eos_penalty=null",
                                             "data.train=builtin:task-prompts?split=train&n=64&seed=0&suite=puzzles",
                                             "data.max_length=96")))
    rows = [r for r in read_metrics(str(out)) if "objective/scores" in r]
    assert len(rows) == 2
    for r in rows:  # the reward is exactly the gold score of the rollouts, on [-1, 1]
        assert r["objective/scores"] == pytest.approx(2 * r["objective/gold_score"] - 1, abs=1e-4)


def test_a_temperature_too_small_to_divide_by_is_refused():
    """PPO's log-probs divide the logits by ppo.temperature; below generation.GREEDY_BELOW sampling is greedy, and
    the division overflows (1e-39), so the config is refused before any model loads."""
    for t in ("0", "1e-39", "9e-6"):
        with pytest.raises(ConfigError, match="ppo.temperature: must be at least 1e-05"):
            load_config(PPOConfig, None, ["reward_model.name_or_path=rm", f"ppo.temperature={t}"])
    ok = ["reward_model.name_or_path=rm", "ppo.ptx_coef=0", "ppo.temperature=1e-5"]
    assert load_config(PPOConfig, None, ok).ppo.temperature == 1e-5
