"""DPO on K-way rankings: the loss, the response log-probs, learning a preference, LoRA, exact resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import fruit_over_animal_rankings, read_jsonl, saved_weights, write_jsonl
from instructgpt.config import load_config
from instructgpt.dpo import DPOConfig, Item, summed_response_logprobs, train
from instructgpt.losses import dpo_loss
from instructgpt.losses import ranking_pairs
from instructgpt.modeling import load_model


def test_dpo_loss_is_the_sigmoid_loss_on_every_pair():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(4, generator=g), torch.randn(4, generator=g)
    beta = 0.3
    # K = 2: Rafailov et al.'s loss, written out
    want = -F.logsigmoid(beta * ((pol[0] - ref[0]) - (pol[1] - ref[1])))
    assert float(dpo_loss(pol[:2], ref[:2], [1, 2], beta)) == pytest.approx(float(want), rel=1e-6)
    # K = 4 with a tie: the mean of its non-tied pairs' losses
    ranks = [2, 1, 2, 3]
    pairs = ranking_pairs(ranks)
    each = [float(dpo_loss(pol[[w, l]], ref[[w, l]], [1, 2], beta)) for w, l in pairs]
    assert len(pairs) == 5 and float(dpo_loss(pol, ref, ranks, beta)) == pytest.approx(sum(each) / 5, rel=1e-6)
    assert float(dpo_loss(ref, ref, ranks, beta)) == pytest.approx(math.log(2))  # the policy at the reference


def test_summed_response_logprobs_sum_the_response_tokens_in_one_forward(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    items = [Item([[5, 6, 7, 8, 9], [5, 6, 7, 10]], [1, 2], 3), Item([[11, 12, 13], [11, 12, 14, 15, 16, 17]],
                                                                    [2, 1], 1)]
    rows_seen = []
    h = model.register_forward_hook(lambda m, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    got = summed_response_logprobs(model, items, tok.pad_token_id, "cpu")
    h.remove()
    assert rows_seen == [4]  # every response of every prompt once, padded together
    for it, lp in zip(items, got):
        for seq, value in zip(it.seqs, lp.tolist()):
            start = it.prompt_len
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)  # alone, no padding
            want = sum(float(logp[t - 1, seq[t]]) for t in range(start, len(seq)))
            assert value == pytest.approx(want, abs=1e-4)


def _config(tiny_model_dir, tmp_path, out, *extra):
    tr = write_jsonl(tmp_path / "train.jsonl", fruit_over_animal_rankings(96, 0))
    ev = write_jsonl(tmp_path / "eval.jsonl", fruit_over_animal_rankings(32, 1))
    return load_config(DPOConfig, None, [f"model.name_or_path={tiny_model_dir}", f"data.train={tr}",
                                         f"data.eval={ev}", f"out_dir={tmp_path / out}", "train.batch_size=8",
                                         "train.lr=3e-3", "beta=0.5", "train.eval_every=6", *extra])


def _response_logp(model_dir, prompt, response):
    from instructgpt.prompting import encode_prompt, encode_response

    model, tok = load_model(model_dir)
    p = encode_prompt(tok, prompt)
    with torch.no_grad():
        return float(summed_response_logprobs(model, [Item([p + encode_response(tok, response)], [1], len(p))],
                                       tok.pad_token_id, "cpu")[0][0])


def test_dpo_learns_the_labelers_preference_on_heldout_rankings(tiny_model_dir, tmp_path):
    train(_config(tiny_model_dir, tmp_path, "dpo", "epochs=2"))
    done = json.load(open(tmp_path / "dpo" / "DONE.json"))
    metrics = read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
    first = next(m for m in metrics if "eval/accuracy" in m)
    assert done["steps"] == 24 and done["eval_accuracy"] > 0.9 and done["eval_loss"] < math.log(2)
    assert done["eval_reward_best"] > 0 > done["eval_reward_worst"]
    assert first["step"] == 6 and first["eval/accuracy"] <= done["eval_accuracy"]
    # the saved policy moved toward the preferred kind of answer and away from the other, against the start
    gain = {r: _response_logp(str(tmp_path / "dpo" / "model"), "what is 7", r)
            - _response_logp(tiny_model_dir, "what is 7", r) for r in ("pear one", "dog one")}
    assert gain["pear one"] > 0 > gain["dog one"]


def test_dpo_with_lora_saves_a_merged_model(tiny_model_dir, tmp_path):
    train(_config(tiny_model_dir, tmp_path, "lora", "train.max_steps=6", "model.lora.enabled=true",
                  "model.lora.r=4", "model.lora.target_modules=[c_attn]"))
    weights = saved_weights(tmp_path / "lora")
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert weights.keys() == start.keys()  # a plain checkpoint, the adapter merged in
    changed = {k for k in start if not torch.equal(weights[k], start[k])}
    assert changed and all("c_attn.weight" in k for k in changed)  # only the adapted projections moved
    assert json.load(open(tmp_path / "lora" / "DONE.json"))["eval_accuracy"] > 0.5


def test_an_interrupted_dpo_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    train(_config(tiny_model_dir, tmp_path, "whole", "train.max_steps=6", "train.save_every=2"))
    cfg = _config(tiny_model_dir, tmp_path, "resumed", "train.max_steps=6", "train.save_every=2",
                  "train.stop_after=4")
    train(cfg)
    assert not (tmp_path / "resumed" / "DONE.json").exists()
    cfg.train.stop_after = None
    train(cfg)
    a, b = saved_weights(tmp_path / "whole"), saved_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_trains_in_train_mode_without_dropout_to_the_same_weights(tiny_model_dir, tmp_path,
                                                                                         mlp_forwards):
    """DPO keeps its policy in eval mode (no dropout: its log-probs and the reference's come from the same forward);
    with model.gradient_checkpointing it trains in train mode, every dropout at 0, blocks replayed in the backward."""
    for gc in ("false", "true"):
        train(_config(tiny_model_dir, tmp_path, gc, "train.max_steps=3", "model.dropout=0.1",
                      f"model.gradient_checkpointing={gc}"))
        assert (mlp_forwards["train"] > 0) == (gc == "true")
    a, b = (saved_weights(tmp_path / gc) for gc in ("false", "true"))
    assert any(not torch.allclose(a[k], w) for k, w in load_file(f"{tiny_model_dir}/model.safetensors").items())
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
