
import pytest
import torch

from instructgpt.generation import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    generate,
    sample,
    sample_from,
)
from instructgpt.batching import left_pad
from instructgpt.modeling import logprobs_from_logits, sequence_logprobs
from instructgpt.prompting import render_prompt


def test_sequence_logprobs_ignore_left_padding_and_equal_minus_cross_entropy(tiny):
    model, tok = tiny
    model.eval()
    ids = tok("the cat sees one apple and two pears", add_special_tokens=False)["input_ids"]
    results = []
    for pad in (0, 3, 11):
        x, m = left_pad([ids], tok.pad_token_id) if pad == 0 else left_pad([ids, ids + [1] * pad], tok.pad_token_id)
        lp = sequence_logprobs(model, x, m)[0]  # (T-1,)
        results.append(lp[-(len(ids) - 1):])
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=1e-5)
    x = torch.tensor([ids])
    logits = model(x).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
    torch.testing.assert_close(results[0], -ce, atol=1e-5, rtol=1e-5)


def test_sampled_logprobs_match_a_fresh_forward_pass(tiny):
    """What the KV-cached sampler reports equals the log-probs of the same tokens recomputed (temperature-scaled)."""
    model, tok = tiny
    prompts = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in ("add 1 plus 2", "hi")]
    x, m = left_pad(prompts, tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    out = sample(model, x, m, SamplingParams(max_new_tokens=12, temperature=0.7, stop_at_eos=False),
                 tok.eos_token_id, tok.pad_token_id, g)
    full = torch.cat([x, out.tokens], 1)
    fm = torch.cat([m, torch.ones_like(out.tokens)], 1)
    lp = sequence_logprobs(model, full, fm, temperature=0.7)[:, x.shape[1] - 1:]
    torch.testing.assert_close(lp, out.logprobs, atol=1e-4, rtol=1e-4)


def test_same_seed_same_text_and_batching_does_not_change_greedy(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, p) for p in ("add 3 plus 4", "spell the word cat", "what is one")]
    p = SamplingParams(max_new_tokens=10, temperature=0.0)
    alone = [generate(model, tok, [q], p)[0][0].text for q in prompts]
    together = [c[0].text for c in generate(model, tok, prompts, p)]
    assert alone == together
    s = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, n=3)
    a = [[c.text for c in cs] for cs in generate(model, tok, prompts, s)]
    b = [[c.text for c in cs] for cs in generate(model, tok, prompts, s)]
    assert a == b and all(len(x) == 3 for x in a)


def test_finish_reason_and_stop_sequences(tiny):
    model, tok = tiny
    p = render_prompt(tok, "count the letters")
    long = generate(model, tok, [p], SamplingParams(max_new_tokens=6, temperature=1.0, seed=1, stop_at_eos=False))[0][0]
    assert long.finish_reason == "length" and len(long.token_ids) == 6 and len(long.logprobs) == 6
    assert all(lp <= 0 for lp in long.logprobs)
    # a stop string taken from the sampled text itself must cut the text there
    text = long.text
    stop = text[2:4] if len(text) >= 4 else text
    cut = generate(model, tok, [p], SamplingParams(max_new_tokens=6, temperature=1.0, seed=1, stop_at_eos=False,
                                                    stop=(stop,)))[0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text and text.startswith(cut.text)


def test_inverse_cdf_sampling_draws_each_token_with_its_probability():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(50_000, 1)  # (100k, 4)
    g = torch.Generator().manual_seed(0)
    x = sample_from(probs, g).view(-1, 2)
    freq = torch.bincount(x[:, 0], minlength=4).double() / x.shape[0]
    # within 4 binomial standard errors (50k draws: about 0.009 at p = 0.6)
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.double), atol=4 * (0.25 / 50_000) ** 0.5)
    assert freq[1] == 0.0 and bool((x[:, 1] == 3).all())  # a zero-probability token never comes
    assert torch.equal(sample_from(probs[:100], torch.Generator().manual_seed(1)),
                       sample_from(probs[:100], torch.Generator().manual_seed(1)))  # seeded
    # unnormalised rows (a filtered distribution's mass) are scaled by their own total
    assert set(sample_from(torch.tensor([[0.0, 0.2, 0.0, 0.2]]).repeat(1000, 1), g).tolist()) == {1, 3}


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k = filter_logits(logits, top_k=2)
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all()
    p = filter_logits(logits, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: keep two
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    p = filter_logits(logits, top_p=0.1)  # the top token always stays
    assert torch.isfinite(p[0, 0]) and torch.isinf(p[0, 1:]).all()


def test_penalties_follow_openai_definition():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_penalties(logits, counts, frequency_penalty=0.5, presence_penalty=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.75, 0.0]]


def test_frequency_penalty_reduces_repetition(tiny):
    model, tok = tiny
    p = [render_prompt(tok, "say one one one")]
    def repeats(fp):
        cs = generate(model, tok, p, SamplingParams(max_new_tokens=24, temperature=0.0, frequency_penalty=fp,
                                                   stop_at_eos=False))[0][0]
        return len(cs.token_ids) - len(set(cs.token_ids))
    assert repeats(2.0) < repeats(0.0)


def test_logprobs_from_logits_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, labels), want)


def test_a_lora_model_uses_the_same_cache_argument_and_greedy_text(tiny):
    """A peft model passes the KV cache through to the base model under the name the base model takes."""
    import copy

    from instructgpt.config import LoraConfig
    from instructgpt.generation import cache_argument
    from instructgpt.modeling import apply_lora
    model, tok = tiny
    lora = apply_lora(copy.deepcopy(model), LoraConfig(enabled=True, r=4, alpha=8))
    assert cache_argument(lora) == cache_argument(model)
    prompts = [render_prompt(tok, "add 2 and 3"), render_prompt(tok, "hi")]
    p = SamplingParams(max_new_tokens=6, temperature=0.0)
    # LoRA's B starts at zero: the adapted model is the base model, so greedy text is identical
    assert [o[0].text for o in generate(lora, tok, prompts, p)] == [o[0].text for o in generate(model, tok, prompts, p)]


def test_the_prefill_runs_the_lm_head_on_the_last_prompt_position_only(tiny):
    """The sampler asks for one position's logits in the prefill, a plain or a LoRA model alike, and its first token's
    log-prob still equals a full forward's (covered for every token by the fresh-forward test above)."""
    import copy

    from instructgpt.config import LoraConfig
    from instructgpt.modeling import apply_lora
    model, tok = tiny
    lora = apply_lora(copy.deepcopy(model), LoraConfig(enabled=True, r=4, alpha=8))
    x, m = left_pad([tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in ("add 1 plus 2", "hi")],
                    tok.pad_token_id)
    for mdl in (model, lora):
        shapes = []
        hook = (mdl.get_base_model() if hasattr(mdl, "get_base_model") else mdl).register_forward_hook(
            lambda mod, args, out: shapes.append(tuple(out.logits.shape)))
        try:
            sample(mdl, x, m, SamplingParams(max_new_tokens=3, temperature=0.0, stop_at_eos=False),
                   tok.eos_token_id, tok.pad_token_id)
        finally:
            hook.remove()
        assert shapes[0] == (2, 1, model.config.vocab_size)  # not (2, P, V)
        assert len(shapes) == 3  # the prefill and two single-token steps


def test_bf16_autocast_samples_in_bf16_with_fp32_logprobs_close_to_fp32s(tiny):
    """`autocast(model, "bf16")`: the matmuls run in bf16, the sampler still reports fp32 log-probs, and those are
    the fp32 model's for the same tokens to within bf16's rounding; "no" leaves everything in fp32."""
    from instructgpt.generation import autocast

    model, tok = tiny
    x, m = left_pad([tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in ("add 1 plus 2", "hi")],
                    tok.pad_token_id)
    dtypes = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    p = SamplingParams(max_new_tokens=8, temperature=0.7, stop_at_eos=False)
    try:
        with autocast(model, "bf16"):
            out = sample(model, x, m, p, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(0))
        assert set(dtypes) == {torch.bfloat16} and out.logprobs.dtype == torch.float32
        dtypes.clear()
        with autocast(model, "no"):
            sample(model, x, m, p, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(0))
        assert set(dtypes) == {torch.float32}
    finally:
        hook.remove()
    full = torch.cat([x, out.tokens], 1)
    with torch.no_grad():
        lp = sequence_logprobs(model, full, torch.cat([m, torch.ones_like(out.tokens)], 1), temperature=0.7)
    err = (lp[:, x.shape[1] - 1:] - out.logprobs).abs()
    assert 0 < float(err.max()) < 0.15  # bf16 rounding, not another distribution (and not fp32: err > 0)
    with pytest.raises(ValueError, match="mixed_precision"):
        autocast(model, "fp16")


def test_pick_device(monkeypatch):
    from instructgpt.modeling import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda" and pick_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu" and pick_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="^device: "):
        pick_device("gpu0")
