
import contextlib
import copy

import pytest
import torch

from conftest import ARCHS, tiny_arch
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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_gradient_is_autograds(temperature):
    """The hand-written backward (one vocabulary-wide tensor, in place) gives autograd's gradient of
    gather(z) - logsumexp(z), z = logits / T: bitwise at T = 1, to rounding otherwise; through a sliced view and
    from bf16 logits (a bf16 gradient) as well."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 6, 50, generator=g) * 4
    labels = torch.randint(0, 50, (3, 5), generator=g)
    dy = torch.randn(3, 5, generator=g)

    def grads(fn, dtype):
        x = full.to(dtype).clone().requires_grad_(True)
        y = fn(x[:, 1:], labels)  # a non-contiguous view, as a model's sliced logits are
        y.backward(dy)
        return y.detach(), x.grad

    def reference(logits, labels):
        z = logits.float() / temperature
        return torch.gather(z, -1, labels[..., None])[..., 0] - torch.logsumexp(z, -1)

    for dtype in (torch.float32, torch.bfloat16):
        y, dx = grads(lambda x, lab: logprobs_from_logits(x, lab, temperature), dtype)
        y_ref, dx_ref = grads(reference, dtype)
        assert dx.dtype == dtype and float(dx[:, 0].abs().max()) == 0.0
        if temperature == 1.0 and dtype == torch.float32:
            assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(dx, dx_ref, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    # logits at one position more than the labels (a model's whole row): the last is left out, its gradient 0, the
    # rest bitwise as through the slice
    for dtype in (torch.float32, torch.bfloat16):
        x = full.to(dtype).clone().requires_grad_(True)
        y = logprobs_from_logits(x, labels, temperature)
        y.backward(dy)
        x2 = full.to(dtype).clone().requires_grad_(True)
        logprobs_from_logits(x2[:, :-1], labels, temperature).backward(dy)
        assert torch.equal(y, logprobs_from_logits(full.to(dtype)[:, :-1], labels, temperature))
        assert x.grad.dtype == dtype and torch.equal(x.grad, x2.grad) and float(x.grad[:, -1].abs().max()) == 0.0
    with pytest.raises(ValueError, match="logits at 6 positions for 4 labels"):
        logprobs_from_logits(full, labels[:, 1:])
    # and it is the log-softmax's gradient: the rows of d logits sum to zero, the label's entry is dy (1 - p)
    x = full[:, 1:].clone().requires_grad_(True)
    logprobs_from_logits(x, labels, temperature).backward(dy)
    p = torch.softmax(full[:, 1:] / temperature, -1)
    torch.testing.assert_close(x.grad.sum(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    want = dy * (1 - p.gather(-1, labels[..., None])[..., 0]) / temperature
    torch.testing.assert_close(x.grad.gather(-1, labels[..., None])[..., 0], want)


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


def tiny_llama(tmp_path, tok):
    """A random two-layer Llama with grouped-query attention (4 query heads sharing 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", *ARCHS])
def test_greedy_equals_model_generate_token_for_token(tiny, tmp_path, arch):
    """The sampler (preallocated KV cache, its own attention mask) decodes greedily exactly what transformers'
    `model.generate` does, on a left-padded batch, for GPT-2, a grouped-query Llama and the architectures of
    conftest.ARCHS (a sliding window shorter than the rows among them)."""
    model, tok = tiny
    if arch == "llama":
        model = tiny_llama(tmp_path, tok)
    elif arch != "gpt2":
        model = tiny_arch(arch, tok)
    x, m = left_pad([tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]
                     for p in ("add 1 plus 2", "hi", "spell the word cat please")], tok.pad_token_id)
    n = 24
    out = sample(model, x, m, SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False),
                 tok.eos_token_id, tok.pad_token_id)
    # no end of sequence on either side (min_new_tokens would forbid EOS to generate alone, not to the sampler)
    unstopped = copy.deepcopy(model.generation_config)
    unstopped.update(max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    kept, model.generation_config = model.generation_config, unstopped  # generate fills unset keys from the model's
    try:
        with torch.no_grad():
            ref = model.generate(input_ids=x, attention_mask=m)[:, x.shape[1]:]
    finally:
        model.generation_config = kept
    assert out.tokens.shape == (3, n)
    assert torch.equal(out.tokens, ref)


def test_the_kv_cache_is_allocated_once_for_the_whole_generation(tiny):
    """Every decode step hands the attention views of one buffer per layer (no concatenation into new tensors)."""
    from instructgpt.generation import PreallocatedLayer, preallocated_cache

    model, tok = tiny
    kw = preallocated_cache(model, 40)
    (cache,) = kw.values()
    assert len(cache.layers) == model.config.n_layer and all(isinstance(l, PreallocatedLayer) for l in cache.layers)
    x, m = left_pad([tok("add 1 plus 2", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    seen = []
    layer = cache.layers[0]
    real_update = layer.update

    def spy(k, v, *a, **kw_):
        keys, values = real_update(k, v, *a, **kw_)
        seen.append((keys.untyped_storage().data_ptr(), keys.shape[-2]))
        return keys, values

    layer.update = spy
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=m, use_cache=True, **kw)
        for t in range(3):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, attention_mask=torch.ones(1, x.shape[1] + t + 1, dtype=torch.long),
                        use_cache=True, **kw)
    assert len({ptr for ptr, _ in seen}) == 1  # one storage
    assert [n for _, n in seen] == [x.shape[1] + t for t in range(4)]  # growing views of it


def test_bf16_sampling_draws_the_fp32_models_distribution():
    """bf16 autocast changes the arithmetic, not the distribution: 1,000 seeded samples of a two-token continuation of
    a task prompt by the shipped base model under bf16 fit the fp32 model's first-token probabilities (chi-square goodness of fit), and the joint (first,
    second) token counts of bf16 and fp32 sampling are one distribution (chi-square test of homogeneity). The same
    tests reject a sampler at temperature 1.3: they can tell distributions apart at this sample size."""
    from collections import Counter

    from scipy.stats import chi2_contingency, chisquare

    from instructgpt.generation import autocast
    from instructgpt.modeling import load_model

    model, tok = load_model("builtin:base")
    model.eval()
    ids = tok(render_prompt(tok, "Name a fruit."), add_special_tokens=False)["input_ids"]
    n = 1000
    x, m = torch.tensor([ids] * n), torch.ones(n, len(ids), dtype=torch.long)
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)  # (V,) fp32 model, first token

    def draw(precision, temperature=1.0, seed=0):
        with autocast(model, precision):
            return sample(model, x, m, SamplingParams(max_new_tokens=2, temperature=temperature, stop_at_eos=False),
                          tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(seed)).tokens

    def fit(first):  # goodness of fit to p1, tokens with an expected count under 5 pooled into one bin
        counts = torch.bincount(first, minlength=p1.numel()).double()
        expected = p1 * n
        big = expected >= 5
        obs, exp = counts[big], expected[big]
        if expected[~big].sum() > 0:
            obs, exp = torch.cat([obs, counts[~big].sum()[None]]), torch.cat([exp, expected[~big].sum()[None]])
        exp = exp * obs.sum() / exp.sum()  # the float rounding of the probabilities' total
        return chisquare(obs.numpy(), exp.numpy()).pvalue

    def same(a, b):  # homogeneity of the joint counts, pairs seen fewer than 10 times in all pooled
        ca, cb = Counter(map(tuple, a.tolist())), Counter(map(tuple, b.tolist()))
        common = [k for k in ca | cb if ca[k] + cb[k] >= 10]
        table = [[c[k] for k in common] + [n - sum(c[k] for k in common)] for c in (ca, cb)]
        return chi2_contingency(table).pvalue

    fp32, bf16, hot = draw("no", seed=1), draw("bf16", seed=2), draw("no", temperature=1.3, seed=3)
    assert fit(fp32[:, 0]) > 1e-3 and fit(bf16[:, 0]) > 1e-3
    assert same(fp32, bf16) > 1e-3
    assert fit(hot[:, 0]) < 1e-6 and same(fp32, hot) < 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_matmul_attention_trains_as_sdpa_does(tiny, tmp_path, arch):
    """The attention bf16 training on a CPU switches to (`use_matmul_attention`): a whole forward and backward of a
    left-padded batch through it equals one through `sdpa` (fp32, to rounding): logits at the real positions and every
    gradient, with grouped-query heads (Llama) and without; fp32, or another device, keeps `sdpa`."""
    import copy

    from instructgpt.generation import MATMUL_ATTENTION, use_matmul_attention
    from instructgpt.modeling import position_ids_from_mask
    from instructgpt.losses import masked_mean

    model, tok = tiny
    if arch == "llama":
        model = tiny_llama(tmp_path, tok)
    model.config._attn_implementation = "sdpa"
    other = copy.deepcopy(model)
    assert not use_matmul_attention(other, "no", "cpu") and not use_matmul_attention(other, "bf16", "cuda")
    assert use_matmul_attention(other, "bf16", "cpu") and other.config._attn_implementation == MATMUL_ATTENTION
    x, m = left_pad([tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]
                     for p in ("add 1 plus 2", "hi", "spell the word cat please")], tok.pad_token_id)
    outs = []
    for net in (model, other):
        net.zero_grad()
        logits = net(input_ids=x, attention_mask=m, position_ids=position_ids_from_mask(m)).logits
        masked_mean(logits.float().logsumexp(-1), m.bool()).backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    assert torch.isfinite(b).all()  # the fully masked (padding) query rows too
    torch.testing.assert_close(a[m.bool()], b[m.bool()], atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys() and len(ga) > 4
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-4, msg=n)


def test_decode_attention_equals_sdpa_for_one_query_with_grouped_heads_and_padding():
    """The bf16 decode step's attention: softmax(q k^T / sqrt(d) + mask) v, with 6 query heads over 2 key/value
    heads and left padding masked out, equals PyTorch's SDPA on the repeated keys (fp32, to rounding)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from instructgpt.generation import decode_attention

    g = torch.Generator().manual_seed(0)
    B, H, KVH, T, D = 3, 6, 2, 9, 8
    q, k, v = (torch.randn(B, H, 1, D, generator=g), torch.randn(B, KVH, T, D, generator=g),
               torch.randn(B, KVH, T, D, generator=g))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    out, _ = decode_attention(SimpleNamespace(), q, k, v, mask, scaling=D ** -0.5)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1),
                                          attn_mask=mask)  # (B, H, 1, D)
    assert out.shape == (B, 1, H, D)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-6, rtol=1e-5)
    # the padded positions carry no weight: changing them changes nothing
    k2 = k.clone()
    k2[1, :, :4] = 100.0
    torch.testing.assert_close(decode_attention(SimpleNamespace(), q, k2, v, mask, scaling=D ** -0.5)[0], out)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_that_ended_leave_the_batch_and_the_others_sample_the_same_tokens(tiny, monkeypatch, temperature):
    """Once at most COMPACT_BELOW of the rows the model runs are still sampling, the ended ones are dropped from its
    batch and KV cache. Each row draws the random number it would in the whole batch, so the tokens, log-probs and
    lengths are those of a run that never drops a row (top-k log-probs too), with fewer rows forwarded."""
    from instructgpt import generation

    model, tok = tiny
    prompts = [f"{w} {i}" for i, w in enumerate(["add", "what is", "list the", "say", "count"] * 3)]
    x, m = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], tok.pad_token_id)
    params = SamplingParams(max_new_tokens=16, temperature=temperature, logprobs=3)
    # "EOS": tokens the same run samples without one, at a different step in each of ten rows, so rows end apart
    probe = sample(model, x, m, params, None, tok.pad_token_id, torch.Generator().manual_seed(0))
    eos = sorted({int(probe.tokens[r, 1 + r % 12]) for r in range(10)})
    rows_seen = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    runs = {}
    for below in (0.0, generation.COMPACT_BELOW):
        monkeypatch.setattr(generation, "COMPACT_BELOW", below)
        rows_seen.clear()
        runs[below] = (sample(model, x, m, params, eos, tok.pad_token_id, torch.Generator().manual_seed(0)),
                       list(rows_seen))
    hook.remove()
    (whole, whole_rows), (compact, compact_rows) = runs[0.0], runs[generation.COMPACT_BELOW]
    assert set(whole_rows) == {len(prompts)}  # never dropping a row: every forward runs the whole batch
    assert compact_rows[0] == len(prompts) and min(compact_rows) < len(prompts) // 2  # the ended rows left
    assert compact_rows == sorted(compact_rows, reverse=True) and len(compact_rows) == len(whole_rows)
    assert 0 < int(whole.ended.sum()) < len(prompts) and len(set(whole.lengths.tolist())) > 3
    assert torch.equal(compact.tokens, whole.tokens) and torch.equal(compact.lengths, whole.lengths)
    assert torch.equal(compact.ended, whole.ended)
    torch.testing.assert_close(compact.logprobs, whole.logprobs, atol=1e-5, rtol=0)
    n = compact.lengths
    for r in range(len(prompts)):
        assert torch.equal(compact.top_ids[r, :n[r]], whole.top_ids[r, :n[r]])


def test_frozen_linear_weights_sample_in_bf16_as_autocast_would_cast_them(tiny, tmp_path, monkeypatch):
    """generation.autocast(model, "bf16") holds a LoRA model's frozen linear weights in bf16 while it samples
    (autocast would cast them again at every token): the same tokens and log-probs, to the bit, as autocast casting
    them itself; the adapters, the embeddings and the tied LM head stay fp32, and every weight is back afterwards."""
    from peft import LoraConfig, get_peft_model

    from instructgpt import generation

    _, tok = tiny
    model = get_peft_model(tiny_llama(tmp_path, tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.eval()
    before = {n: (w.dtype, w.data_ptr()) for n, w in model.named_parameters()}
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    seen = []
    q.register_forward_hook(lambda mod, args, out: seen.append((mod.base_layer.weight.dtype,
                                                                mod.lora_A["default"].weight.dtype)))
    x, m = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in ("add 1 plus 2", "hi there")],
                    tok.pad_token_id)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_at_eos=False)
    with generation.autocast(model, "bf16"):
        held = sample(model, x, m, params, None, tok.pad_token_id, torch.Generator().manual_seed(0))
    assert set(seen) == {(torch.bfloat16, torch.float32)}  # the frozen base in bf16, the adapter in fp32
    assert {n: (w.dtype, w.data_ptr()) for n, w in model.named_parameters()} == before  # put back, as they were
    embed = model.get_base_model().model.embed_tokens.weight
    with generation.frozen_linears_in_bf16(model):
        assert embed.dtype == torch.float32 and q.base_layer.weight.dtype == torch.bfloat16
    seen.clear()
    monkeypatch.setattr(generation, "frozen_linears_in_bf16", lambda model: contextlib.nullcontext())
    with generation.autocast(model, "bf16"):
        cast = sample(model, x, m, params, None, tok.pad_token_id, torch.Generator().manual_seed(0))
    assert set(seen) == {(torch.float32, torch.float32)}
    assert torch.equal(held.tokens, cast.tokens) and torch.equal(held.logprobs, cast.logprobs)


def test_generate_cli_names_a_refused_conversation_and_takes_raw_prompts(tiny_model_dir, tmp_path, capsys):
    """`instructgpt generate --prompts`: a conversation the chat template refuses exits 2 naming its file and line;
    --raw continues each {"prompt"} row's text as it is, and refuses a conversation by its line."""
    import json

    from conftest import NO_SYSTEM_TEMPLATE, write_jsonl
    from instructgpt.generate_cli import main
    from instructgpt.modeling import load_model, save_model
    model, tok = load_model(tiny_model_dir)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    save_model(model, tok, str(tmp_path / "m"))
    greedy = ["--model", str(tmp_path / "m"), "--max-new-tokens", "5", "--temperature", "0"]
    system = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "add 1 plus 2"}, system])
    capsys.readouterr()
    assert main([*greedy, "--prompts", prompts]) == 2
    assert ("p.jsonl, line 2: field 'messages': the chat template refuses this conversation: System role not "
            "supported") in capsys.readouterr().err
    assert main([*greedy, "--prompts", prompts, "--raw"]) == 2
    assert "p.jsonl, line 2: field 'messages': --raw continues a prompt's text" in capsys.readouterr().err
    texts = ["add 1 plus 2", "Once upon a time"]
    write_jsonl(prompts, [{"prompt": t} for t in texts])
    for raw in (True, False):
        assert main([*greedy, "--prompts", prompts, *(["--raw"] if raw else [])]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        want = generate(model, tok, texts if raw else [render_prompt(tok, t) for t in texts],
                        SamplingParams(max_new_tokens=5, temperature=0))
        assert [r["completions"][0]["text"] for r in rows] == [w[0].text for w in want]
