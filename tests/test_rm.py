import json
import math

import pytest
import torch

from conftest import fruit_over_animal_rankings, read_jsonl, saved_weights, write_jsonl
from instructgpt.config import ConfigError, load_config
from instructgpt.losses import ranking_accuracy, ranking_loss, ranking_pairs
from instructgpt.modeling import load_model
from instructgpt.reward import RewardModel, init_reward_head
from instructgpt.rm import Encoded, RMConfig, forward_rankings, train


def test_loss_is_log2_when_rewards_are_equal():
    assert float(ranking_loss(torch.zeros(5), [1, 2, 3, 4, 5])) == pytest.approx(math.log(2))


def test_kway_loss_is_the_mean_of_its_pairwise_losses():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, generator=g)
    ranks = [2, 1, 4, 2, 6, 5]  # with a tie (two rank-2 responses): that pair is dropped
    pairs = ranking_pairs(ranks)
    assert len(pairs) == math.comb(6, 2) - 1
    pairwise = [float(ranking_loss(r[[w, l]], [1, 2])) for w, l in pairs]
    assert float(ranking_loss(r, ranks)) == pytest.approx(sum(pairwise) / len(pairwise), rel=1e-6)
    assert len(ranking_pairs([1, 2, 3, 4])) == 6 and ranking_accuracy([3.0, 2.0, 1.0, 0.0], [1, 2, 3, 4]) == (6, 6)


def test_each_response_is_forwarded_exactly_once(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, model_class="sequence_classification")
    rows_seen = []
    h = model.base_model.register_forward_hook(lambda m, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]),
                                               with_kwargs=True)
    items = [Encoded([[5, 6, 7]] * k, list(range(1, k + 1))) for k in (4, 9, 2)]
    rewards = forward_rankings(model, items, tok.pad_token_id, "cpu")
    h.remove()
    assert rows_seen == [4 + 9 + 2]  # one pass, K rows per prompt, never C(K,2) pairs
    assert [r.shape[0] for r in rewards] == [4, 9, 2]


def test_length_groups_give_the_rewards_and_gradients_of_one_padded_forward(tiny_model_dir, tmp_path):
    """train.length_groups: a batch's responses forwarded in groups of similar length, each padded to its own
    longest, give every response the reward (and the loss its gradient) of one padded forward, in the rows' order;
    the RM stage trains the same with 1, 2 or 3 groups."""
    model, tok = load_model(tiny_model_dir, model_class="sequence_classification")
    init_reward_head(model.score)
    g = torch.Generator().manual_seed(0)
    items = [Encoded([torch.randint(5, 90, (int(n),), generator=g).tolist()
                      for n in torch.randint(3, 30, (k,), generator=g)], list(range(1, k + 1))) for k in (4, 6, 3)]
    grads, rewards = {}, {}
    for groups in (1, 2, 3):
        model.zero_grad()
        r = forward_rankings(model, items, tok.pad_token_id, "cpu", groups)
        sum(ranking_loss(x, it.ranks) for x, it in zip(r, items)).backward()
        rewards[groups] = torch.cat(r).detach()
        grads[groups] = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
    for groups in (2, 3):
        torch.testing.assert_close(rewards[groups], rewards[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[groups], grads[1], atol=1e-5, rtol=1e-4)
    rows = fruit_over_animal_rankings(24, 0)
    tr = write_jsonl(tmp_path / "train.jsonl", rows)
    base = [f"model.name_or_path={tiny_model_dir}", f"data.train={tr}", "train.batch_size=8", "train.lr=3e-3",
            "data.eval_size=0", "normalize.demonstrations=null", "train.log_every=1"]
    losses = {}
    for groups in (1, 3):
        out = tmp_path / f"g{groups}"
        train(load_config(RMConfig, None, base + [f"out_dir={out}", f"train.length_groups={groups}"]))
        losses[groups] = [json.loads(l)["train/loss"] for l in open(out / "metrics.jsonl")]
    assert losses[3] == pytest.approx(losses[1], rel=1e-5)


def test_raw_rewards_batch_pairs_of_similar_length_and_keep_the_pairs_order(tiny_model_dir):
    """reward.raw_rewards: batches of pairs sorted by length, each reward the one the pair gets scored alone, in
    the order of the pairs."""
    from instructgpt.reward import raw_rewards

    model, tok = load_model(tiny_model_dir, model_class="sequence_classification")
    init_reward_head(model.score)
    model.eval()
    prompts = [f"question {i}" for i in range(7)]
    answers = ["a b c d e f g h " * (i % 4) + str(i) for i in range(7)]
    with torch.no_grad():
        batched = raw_rewards(model, tok, prompts, answers, "cpu", batch_size=3)
        alone = torch.cat([raw_rewards(model, tok, [p], [a], "cpu") for p, a in zip(prompts, answers)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert len(set(batched.tolist())) == 7


def test_reward_model_scores_under_bf16_autocast_when_asked(tiny_model_dir, tmp_path):
    """RewardModel.mixed_precision "bf16" (eval.rm_mixed_precision): the same scores to bf16 rounding, and not the
    fp32 ones to the bit (the forwards did run in bf16)."""
    from instructgpt.reward import RewardNorm

    model, tok = load_model(tiny_model_dir, model_class="sequence_classification")
    init_reward_head(model.score)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    rm = RewardModel(model, tok, RewardNorm(bias=0.0, gain=1.0))
    prompts, answers = [f"question {i}" for i in range(6)], [f"answer {'x ' * i}" for i in range(6)]
    fp32 = torch.tensor(rm.score(prompts, answers))
    rm.mixed_precision = "bf16"
    bf16 = torch.tensor(rm.score(prompts, answers))
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, atol=0.05 * float(fp32.abs().max()), rtol=0)


def test_head_init_std():
    head = torch.nn.Linear(256, 1, bias=True)
    torch.manual_seed(0)
    init_reward_head(head)
    assert float(head.weight.detach().std()) == pytest.approx(1 / math.sqrt(257), rel=0.15) and float(head.bias.detach().abs().sum()) == 0


def test_rm_learns_heldout_order_and_demonstrations_have_mean_zero(tiny_model_dir, tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", fruit_over_animal_rankings(160, 0))
    ev = write_jsonl(tmp_path / "eval.jsonl", fruit_over_animal_rankings(40, 1))
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"what is {i}", "response": "pear one"} for i in range(20)]
                        + [{"prompt": f"what is {i}", "response": "dog two"} for i in range(20)])
    cfg = load_config(RMConfig, None, [f"model.name_or_path={tiny_model_dir}", f"data.train={tr}", f"data.eval={ev}",
                                       f"out_dir={tmp_path / 'rm'}", "train.batch_size=8", "epochs=2", "train.lr=3e-3",
                                       f"normalize.demonstrations={demos}"])
    train(cfg)
    done = json.load(open(tmp_path / "rm" / "DONE.json"))
    assert done["steps"] == 40 and done["eval_accuracy"] > 0.9
    rm = RewardModel.load(str(tmp_path / "rm"))
    s = rm.score([f"what is {i}" for i in range(20)] * 2, ["pear one"] * 20 + ["dog two"] * 20)
    assert sum(s) / len(s) == pytest.approx(0.0, abs=1e-4)
    # loadable by other tools as a plain sequence classifier with one label
    from transformers import AutoModelForSequenceClassification
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert m.config.num_labels == 1


def test_gradient_accumulation_equals_the_whole_batch(tiny_model_dir, tmp_path):
    """train.grad_accum: each prompt's ranking loss is divided by the whole batch's prompt count, so 1, 2 or 4
    micro-batches (rankings of 3 to 5 answers) take the same steps; a batch that does not split is refused."""
    rows = fruit_over_animal_rankings(32, 0)
    tr = write_jsonl(tmp_path / "train.jsonl", rows)
    base = [f"model.name_or_path={tiny_model_dir}", f"data.train={tr}", "train.batch_size=8", "train.lr=3e-3",
            "data.eval_size=0", "normalize.demonstrations=null", "train.log_every=1"]
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    answers = [a for r in rows for a in r["responses"]]
    rewards, losses = {}, {}
    for ga in (1, 2, 4):
        out = tmp_path / f"ga{ga}"
        train(load_config(RMConfig, None, base + [f"out_dir={out}", f"train.grad_accum={ga}"]))
        r = torch.tensor(RewardModel.load(str(out)).score(prompts, answers))
        # centred: a ranking loss has no gradient for a shift of every reward (the final layer norm's bias), so
        # Adam turns float noise there into a small shift; what the RM says about the answers is the same
        rewards[ga] = r - r.mean()
        losses[ga] = [json.loads(l)["train/loss"] for l in open(out / "metrics.jsonl")]
    assert len(losses[1]) == 4 and losses[1][-1] < losses[1][0]
    for ga in (2, 4):
        assert losses[ga] == pytest.approx(losses[1], rel=1e-5)
        torch.testing.assert_close(rewards[ga], rewards[1], atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="multiple of train.grad_accum"):
        load_config(RMConfig, None, base + ["train.grad_accum=3"])


@pytest.mark.parametrize("lora", [False, True])
def test_an_interrupted_rm_run_resumes_to_the_same_model_and_normalisation(tiny_model_dir, tmp_path, lora):
    """Stopped after 3 of 6 steps and rerun, the RM (LoRA adapters and head, as the SmolLM2 recipe's) ends with the
    weights and the reward normalisation of an uninterrupted run."""
    tr = write_jsonl(tmp_path / "train.jsonl", fruit_over_animal_rankings(48, 0))
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"what is {i}", "response": "pear one"} for i in range(8)])
    base = [f"model.name_or_path={tiny_model_dir}", f"data.train={tr}", "train.batch_size=8", "train.lr=3e-3",
            "data.eval_size=0", f"normalize.demonstrations={demos}", "train.save_every=1",
            *(["model.lora.enabled=true", "model.lora.target_modules=[c_attn]"] if lora else [])]
    train(load_config(RMConfig, None, base + [f"out_dir={tmp_path / 'whole'}"]))
    train(load_config(RMConfig, None, base + [f"out_dir={tmp_path / 'resumed'}", "train.stop_after=3"]))
    assert not (tmp_path / "resumed" / "DONE.json").exists()
    train(load_config(RMConfig, None, base + [f"out_dir={tmp_path / 'resumed'}"]))
    a, b = (saved_weights(tmp_path / n) for n in ("whole", "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    da, db = (json.load(open(tmp_path / n / "DONE.json")) for n in ("whole", "resumed"))
    assert da["steps"] == 6 and (db["bias"], db["gain"]) == pytest.approx((da["bias"], da["gain"]), rel=1e-5)


def test_best_of_n_keeps_the_highest_reward(tiny_model_dir, tmp_path):
    from instructgpt.generate_cli import main as generate_main
    tr = write_jsonl(tmp_path / "train.jsonl", fruit_over_animal_rankings(16, 0))
    cfg = load_config(RMConfig, None, [f"model.name_or_path={tiny_model_dir}", f"data.train={tr}",
                                       f"out_dir={tmp_path / 'rm'}", "train.batch_size=8", "data.eval_size=0",
                                       "normalize.demonstrations=null"])
    train(cfg)
    common = ["--model", tiny_model_dir, "--prompts", tr, "--max-new-tokens", "5", "--seed", "3"]
    assert generate_main(common + ["-n", "4", "--out", str(tmp_path / "all.jsonl")]) == 0
    assert generate_main(common + ["--best-of", "4", "-n", "1", "--reward-model", str(tmp_path / "rm"),
                                   "--out", str(tmp_path / "best.jsonl")]) == 0
    rm = RewardModel.load(str(tmp_path / "rm"))
    alls = read_jsonl(tmp_path / "all.jsonl")
    bests = read_jsonl(tmp_path / "best.jsonl")
    for a, b in zip(alls, bests):
        scores = rm.score([a["messages"]] * 4, [c["text"] for c in a["completions"]])
        assert len(b["completions"]) == 1 and b["completions"][0]["reward"] == pytest.approx(max(scores), abs=1e-3)


def test_rm_with_lora_trains_head_and_adapter_and_saves_merged(tiny_model_dir, tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", fruit_over_animal_rankings(64, 0))
    ev = write_jsonl(tmp_path / "eval.jsonl", fruit_over_animal_rankings(32, 1))
    cfg = load_config(RMConfig, None, [f"model.name_or_path={tiny_model_dir}", f"data.train={tr}", f"data.eval={ev}",
                                       f"out_dir={tmp_path / 'rm'}", "train.batch_size=8", "epochs=3",
                                       "train.lr=1e-2", "model.lora.enabled=true", "model.lora.r=8",
                                       "model.lora.target_modules=[c_attn]", "normalize.demonstrations=null"])
    train(cfg)
    done = json.load(open(tmp_path / "rm" / "DONE.json"))
    assert done["eval_accuracy"] > 0.8
    from transformers import AutoModelForSequenceClassification
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")  # merged, plain
    assert not any("lora" in k for k in m.state_dict())
    rm = RewardModel.load(str(tmp_path / "rm"))
    s = rm.score(["what is 1", "what is 1"], ["pear one", "dog two"])
    assert s[0] > s[1]


def test_policy_normalization_scales_rewards_of_the_policy_samples_to_std_one(tiny_model_dir):
    """normalize.policy: the gain makes the RM's rewards on that policy's own samples (temperature 1) have std 1."""
    from instructgpt.generation import SamplingParams, generate
    from instructgpt.prompting import render_prompt
    from instructgpt.reward import raw_rewards
    from instructgpt.rm import NormalizeConfig, fit_normalization

    model, tok = load_model(tiny_model_dir, model_class="sequence_classification")
    torch.manual_seed(0)
    init_reward_head(model.score)
    prompts = [[{"role": "user", "content": f"what is {i}"}] for i in range(24)]
    cfg = NormalizeConfig(demonstrations=None, policy=tiny_model_dir, policy_samples=16)
    norm = fit_normalization(model, tok, cfg, prompts, torch.device("cpu"))
    assert norm.bias == 0.0 and norm.gain != 1.0
    policy, ptok = load_model(tiny_model_dir)
    texts = [render_prompt(ptok, p) for p in prompts[:16]]
    outs = generate(policy, ptok, texts, SamplingParams(temperature=1.0, seed=0))  # the samples fit_normalization drew
    r = raw_rewards(model, tok, prompts[:16], [o[0].text for o in outs], torch.device("cpu"))
    assert float((r * norm.gain).std()) == pytest.approx(1.0, rel=1e-3)


def test_normalization_leaves_out_demonstrations_too_long_to_score(tiny_model_dir, tmp_path):
    """The bias is the mean raw reward of the demonstrations that fit data.max_length (a longer one would run past
    the model's positions); when none fits, a clear error names the source and the limit."""
    from instructgpt.reward import encode_pair, raw_rewards
    from instructgpt.rm import NormalizeConfig, fit_normalization

    model, tok = load_model(tiny_model_dir, model_class="sequence_classification")
    torch.manual_seed(0)
    init_reward_head(model.score)
    rows = [{"prompt": f"say {i}", "response": f"{i} it is"} for i in range(6)]
    rows += [{"prompt": "tell me a long story " * 40, "response": "once upon a time " * 40}]  # past 256 positions
    demos = write_jsonl(tmp_path / "d.jsonl", rows)
    short = [([{"role": "user", "content": r["prompt"]}], r["response"]) for r in rows[:6]]
    limit = max(len(encode_pair(tok, p, r)) for p, r in short)
    assert len(encode_pair(tok, [{"role": "user", "content": rows[-1]["prompt"]}], rows[-1]["response"])) > 256
    norm = fit_normalization(model, tok, NormalizeConfig(demonstrations=demos), [], torch.device("cpu"), limit)
    expect = raw_rewards(model, tok, [p for p, _ in short], [r for _, r in short], torch.device("cpu")).mean()
    assert norm.bias == pytest.approx(float(expect), abs=1e-6)
    with pytest.raises(ConfigError, match="fits data.max_length=3"):
        fit_normalization(model, tok, NormalizeConfig(demonstrations=demos), [], torch.device("cpu"), 3)
