"""Batched sampling with a KV cache: our own small engine, used by ``generate``, PPO rollouts, evaluation and serving.

Prompts are left-padded with position ids that ignore the padding, so a prompt's output does not depend on what it
was batched with. The log-prob of every sampled token is returned, computed from ``logits / temperature`` before any
top-k/top-p filtering or penalty (what PPO needs, and what OpenAI's ``logprobs`` report).
Penalties follow OpenAI's definition: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``,
counting the tokens generated so far in that completion.

Speed: the KV cache and the attention mask are allocated once for the whole generation (transformers' own cache
concatenates, copying every layer's cache at every step), with the same numbers as ``model.generate``; rows that have
ended leave the model's batch (``COMPACT_BELOW``), drawing the same random numbers, so the same tokens; under bf16
(``autocast(model, "bf16")``) a decode step on CPU attends with two small matmuls instead of PyTorch's CPU
flash-attention kernel, which is slow for one bf16 query. ``benchmarks/sampler.py`` measures both against
``model.generate`` and against the machine's roofline.

An encoder-decoder model (BART, T5) takes its own path (`_sample_seq2seq`): the encoder reads each prompt once, the
decoder samples from its start token with transformers' cache, with the same parameters and the same `SampleBatch`.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from instructgpt.batching import left_pad
from instructgpt.modeling import is_encoder_decoder, position_ids_from_mask

try:  # transformers >= 4.56: a cache is a list of layers, which we can give buffers of our own
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # older: the model's own growing cache
    DynamicCache = DynamicLayer = None
try:  # transformers >= 4.53: attention functions (and their masks) registered by name
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:
    AttentionInterface = None


def autocast(model, mixed_precision: str = "no"):
    """bf16 autocast on the model's device for sampling (`mixed_precision` "bf16"), else a no-op. The sampler reads
    logits in fp32 either way. Faster where the CPU or GPU has bf16 units (a CPU with avx512_bf16). Frozen linear
    weights are held in bf16 meanwhile (`frozen_linears_in_bf16`)."""
    if mixed_precision in ("no", None):
        return contextlib.nullcontext()
    if mixed_precision != "bf16":
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', not {mixed_precision!r}")
    return _bf16(model)


@contextlib.contextmanager
def _bf16(model):
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16), frozen_linears_in_bf16(model):
        yield


@contextlib.contextmanager
def frozen_linears_in_bf16(model):
    """Within (under bf16 autocast): the fp32 weights and biases of `model`'s linear layers that take no gradient
    (a LoRA model's frozen base) held in bf16, put back after. Autocast caches its bf16 copy of a weight only for one
    that takes a gradient, so it casts a frozen one again at every forward: at every token of a sampler, about as
    long as the step's products for a 135M model. The numbers are autocast's own: it casts to bf16 the same way.
    Embedding weights (and output layers tied to them) stay as they are: autocast does not cast those."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    held = []
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        for w in (m.weight, m.bias):
            if (w is not None and not w.requires_grad and w.dtype == torch.float32 and id(w) not in embeddings
                    and type(w.data) is torch.Tensor):  # not a sharded (DTensor) parameter
                held.append((w, w.data))
                w.data = w.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for w, data in held:
            w.data = data


# Below this temperature, sampling is greedy decoding (vLLM's _SAMPLING_EPS): the distribution is the argmax's to
# float precision long before 0, and logits / 1e-39 overflow to inf (softmax of inf - inf is NaN)
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1  # completions per prompt
    stop: Sequence[str] = ()  # stop strings (not included in the returned text)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    logprobs: int = 0  # also return this many most likely alternatives per generated token
    stop_at_eos: bool = True


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated tokens, including the EOS that ended it (if any), excluding stop strings
    logprobs: list[float]  # log p(token) per generated token, from logits / temperature
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    top_logprobs: Optional[list[dict[int, float]]] = None  # per token: {token_id: logprob} of the top alternatives


@dataclass
class SampleBatch:
    """What `sample` returns, as tensors; R is the longest response in the batch."""

    tokens: torch.Tensor  # (B, R) sampled ids; pad_token_id after the end
    logprobs: torch.Tensor  # (B, R) log p of each sampled token (0 after the end)
    lengths: torch.Tensor  # (B,) number of generated tokens, EOS included
    ended: torch.Tensor  # (B,) bool: stopped at EOS (False: ran out of max_new_tokens)
    top_ids: Optional[torch.Tensor] = None  # (B, R, k)
    top_logprobs: Optional[torch.Tensor] = None  # (B, R, k)
    stop_cut: list[Optional[int]] = field(default_factory=list)  # per row: chars of text kept before a stop string


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: excluded logits become -inf; the most likely token always stays."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass of the tokens before it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample_from(probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                draw_rows: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), by the inverse of its cumulative distribution: a uniform draw u in (0, 1]
    scaled to the row's total picks the first token whose cumulative probability reaches it, so token j comes with
    probability probs[j] (zero-probability tokens never). The same distribution as torch.multinomial, from B random
    numbers instead of B x V: at batch 64 over a 4,096-token vocabulary 0.13 ms a step against 4.2 ms. -> (B,).

    `draw_rows` = (rows (B,), N): these B rows are rows `rows` of a batch of N split across processes; the N draws a
    single process would make are made and each row takes its own, so the split samples what one process would."""
    cdf = probs.cumsum(-1)  # (B, V)
    if draw_rows is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    else:
        u = torch.rand(draw_rows[1], 1, generator=generator, device=probs.device)[draw_rows[0]]
    u = (1.0 - u) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency_penalty: float,
                    presence_penalty: float) -> torch.Tensor:
    """OpenAI's frequency/presence penalties. logits, counts: (B, V)."""
    if frequency_penalty:
        logits = logits - counts * frequency_penalty
    if presence_penalty:
        logits = logits - (counts > 0).to(logits.dtype) * presence_penalty
    return logits


def _base(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """transformers >= 5 names the KV cache `cache`; earlier versions `past_key_values`."""
    inner = _base(model)  # a peft model passes it through
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def keeps_last_logits(model) -> dict:
    """`{"logits_to_keep": 1}` where the model takes it (transformers' causal LMs do): the prefill then runs the LM
    head over the last prompt position only: a large vocabulary's head over a whole chat prompt is a large share of
    the prefill, for logits never read."""
    inner = _base(model)
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


def returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


if DynamicLayer is not None:
    class PreallocatedLayer(DynamicLayer):
        """One attention layer's KV cache in buffers sized for the whole generation, (B, H, capacity, D), allocated at
        the prefill. Each step writes its keys and values into the next slot and returns views of the filled part, so
        the attention sees the same tensors as with transformers' growing cache (which concatenates, copying the whole
        cache into a new allocation at every step and layer) and computes the same numbers."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            B, H, _, D = key_states.shape
            self.device = key_states.device
            self.key_buffer = key_states.new_empty(B, H, self.capacity, D)  # (B, H, capacity, D)
            self.value_buffer = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache of {self.capacity} positions is full")
            self.key_buffer[:, :, self.length:end].copy_(key_states)
            self.value_buffer[:, :, self.length:end].copy_(value_states)
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep the rows `indices` only (the sampler drops rows that have ended): new buffers of those rows."""
            if not self.is_initialized:
                return
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


# The attention the sampler gives a bf16 model on CPU: PyTorch's flash-attention kernel for CPU, which `sdpa` picks,
# takes ~10x longer for the single query position of a decode step in bf16 than two small matmuls (in fp32 it is as
# fast, and fp32 sampling keeps it: the same numbers as `model.generate`)
DECODE_ATTENTION = "instructgpt_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' `sdpa` attention, except for one query position: softmax(q k^T * scaling + mask) v as two
    matmuls, the softmax in fp32, grouped-query heads without repeating the keys. query (B, H, 1, D), key/value
    (B, KVH, T, D), attention_mask (B, 1, 1, T) bool (True: attend) -> (B, 1, H, D)."""
    if query.shape[2] != 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, _, D = query.shape
    KVH = key.shape[1]
    q = query.reshape(B, KVH, H // KVH, D)  # (B, KVH, G, D): the G query heads that share a key/value head
    scores = torch.matmul(q, key.transpose(-1, -2)).float()  # (B, KVH, G, T)
    scores.mul_(scaling if scaling is not None else D ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores.add_(attention_mask)
    out = torch.matmul(torch.softmax(scores, -1).to(value.dtype), value)  # (B, KVH, G, D)
    return out.reshape(B, 1, H, value.shape[-1]), None


# Training forwards in bf16 on a CPU: PyTorch's CPU flash-attention kernel, which `sdpa` picks, takes ~31 ms for the
# backward of one layer of PPO's minibatch (32 x 80 tokens, 4 heads) in bf16, against ~2 ms for two matmuls
MATMUL_ATTENTION = "instructgpt_matmul"


def matmul_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    """softmax(q k^T * scaling + mask) v as two matmuls, for any number of query positions, the scores and softmax
    in fp32, grouped-query heads without repeating the keys; a fully masked query row (left padding) gets a finite,
    uniform softmax instead of NaN, so its (unused) output cannot poison the gradients. query (B, H, Tq, D),
    key/value (B, KVH, Tk, D), attention_mask (B, 1, Tq, Tk) bool (True: attend) or additive, or None with
    `is_causal` -> (B, Tq, H, D)."""
    if (dropout and module.training) or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, Tq, D = query.shape
    KVH, Tk = key.shape[1], key.shape[2]
    q = query.reshape(B, KVH, H // KVH, Tq, D)  # the query heads that share a key/value head
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).float()  # (B, KVH, G, Tq, Tk)
    scores = scores * (scaling if scaling is not None else D ** -0.5)
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, :Tk]  # (B, 1, 1, Tq, Tk)
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else (scores + mask).clamp(min=lowest)
    elif Tq > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
        scores = scores.masked_fill(~causal, lowest)
    out = torch.matmul(torch.softmax(scores, -1).to(value.dtype), value.unsqueeze(2))  # (B, KVH, G, Tq, D)
    return out.reshape(B, H, Tq, value.shape[-1]).transpose(1, 2).contiguous(), None


if AttentionInterface is not None:
    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    AttentionInterface.register(MATMUL_ATTENTION, matmul_attention)
    AttentionMaskInterface.register(MATMUL_ATTENTION, sdpa_mask)


def use_matmul_attention(model, mixed_precision: str, device) -> bool:
    """Train `model` with `matmul_attention` where it would use `sdpa` in bf16 mixed precision on a CPU (see
    MATMUL_ATTENTION); fp32 and GPUs keep `sdpa`. Returns whether it switched."""
    inner = _base(model)
    if (AttentionInterface is None or mixed_precision != "bf16" or torch.device(device).type != "cpu"
            or getattr(inner.config, "_attn_implementation", None) != "sdpa"):
        return False
    inner.set_attn_implementation(MATMUL_ATTENTION)
    return True


@contextlib.contextmanager
def bf16_decode_attention(model):
    """Within: `model` uses `decode_attention` where it would use `sdpa` on CPU in bf16 (its weights in bf16, or bf16
    autocast on)."""
    inner = _base(model)
    impl = getattr(inner.config, "_attn_implementation", None)
    param = next(inner.parameters())
    bf16 = param.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
    if AttentionInterface is None or impl != "sdpa" or param.device.type != "cpu" or not bf16:
        yield
        return
    inner.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        inner.set_attn_implementation(impl)


def preallocated_cache(model, capacity: int) -> dict:
    """The cache keyword for `model`'s prefill: a cache whose full-attention layers hold `capacity` positions in
    buffers allocated once (PreallocatedLayer). {} (the model's own cache) where transformers predates cache layers,
    or where the model has other kinds of layer (sliding-window, linear attention) or no DynamicCache of its own."""
    if DynamicLayer is None:
        return {}
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config DynamicCache cannot read: the model keeps its own cache
        return {}
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return {}
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return {cache_argument(model): cache}


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
           eos_token_id: int | Sequence[int] | None, pad_token_id: int,
           generator: Optional[torch.Generator] = None, stop_check=None, end_rows=None,
           draw_rows: Optional[tuple[torch.Tensor, int]] = None) -> SampleBatch:
    """Sample continuations of left-padded prompts `input_ids` (B, P). Stops early once every row has ended.

    `stop_check(row, new_token_ids) -> Optional[int]` may end a row on a stop string (returns chars to keep).
    `end_rows() -> rows`, asked once a step (no per-row cost), ends those rows where they are (a server's cancelled
    requests). `draw_rows` = (rows, N): the rows are those of a batch of N split across processes, and each samples
    as it would in one process with the whole batch (:func:`sample_from`).
    """
    if is_encoder_decoder(model):
        with torch.no_grad():
            return _sample_seq2seq(model, input_ids, attention_mask, params, eos_token_id, pad_token_id, generator,
                                   stop_check, end_rows, draw_rows)
    with torch.no_grad(), bf16_decode_attention(model):
        return _sample(model, input_ids, attention_mask, params, eos_token_id, pad_token_id, generator, stop_check,
                       end_rows, draw_rows)


def _sample(model, input_ids, attention_mask, params, eos_token_id, pad_token_id, generator, stop_check,
            end_rows, draw_rows=None) -> SampleBatch:
    """A causal LM: the prefill over the left-padded prompts, then `_decode` with one cached forward a step."""
    B, P = input_ids.shape
    device = input_ids.device
    # the attention mask of the whole generation, allocated once: step t passes a view of its first P + t columns
    full_mask = torch.ones(B, P + params.max_new_tokens, dtype=torch.long, device=device)  # (B, P + max_new_tokens)
    full_mask[:, :P] = attention_mask
    position_ids = position_ids_from_mask(full_mask[:, :P])
    cache_kw = cache_argument(model)
    cache = preallocated_cache(model, P + params.max_new_tokens)
    out = model(input_ids=input_ids, attention_mask=full_mask[:, :P], position_ids=position_ids, use_cache=True,
                **keeps_last_logits(model), **cache)
    state = {"past": returned_cache(out), "next_pos": position_ids[:, -1] + 1, "mask": full_mask}  # next_pos: (B,)

    def step(nxt: torch.Tensor, t: int) -> torch.Tensor:
        out = model(input_ids=nxt[:, None], attention_mask=state["mask"][:, : P + t + 1],
                    position_ids=state["next_pos"][:, None], use_cache=True, **{cache_kw: state["past"]})
        state["past"] = returned_cache(out)
        state["next_pos"] = state["next_pos"] + 1
        return out.logits[:, -1, :].float()

    def keep_rows(rows: torch.Tensor) -> None:  # the model's batch from now on: these of its rows
        state["past"].batch_select_indices(rows)
        state["next_pos"], state["mask"] = state["next_pos"][rows], state["mask"][rows]

    return _decode(model, out.logits[:, -1, :].float(), step, params, eos_token_id, pad_token_id, generator,
                   stop_check, end_rows, draw_rows, keep_rows if cache else None)


def _sample_seq2seq(model, input_ids, attention_mask, params, eos_token_id, pad_token_id, generator, stop_check,
                    end_rows, draw_rows=None) -> SampleBatch:
    """`_sample` for an encoder-decoder model: the prompts (left-padded, as `sample` takes them) are moved to the
    right of their rows, since an encoder with learned absolute positions (BART) takes no position ids; the encoder
    runs once; the decoder starts from `config.decoder_start_token_id` in every row (so no decoder padding) and
    decodes one token a step with its KV cache (self-attention grown, cross-attention computed once). Token choice,
    penalties, stops and outputs are `_decode`'s, as for a causal LM."""
    B, P = input_ids.shape
    device = input_ids.device
    # 1. left padding -> right padding: row b's k pads move from its start to its end
    pads = (attention_mask == 0).sum(1, keepdim=True)  # (B, 1)
    order = (torch.arange(P, device=device)[None] + pads) % P  # (B, P)
    enc_ids, enc_mask = input_ids.gather(1, order), attention_mask.gather(1, order)  # (B, P)
    # 2. the encoder, once
    encoder_outputs = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask, return_dict=True)
    config = _base(model).config
    start = config.decoder_start_token_id
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError("an encoder-decoder model without a decoder_start_token_id")
    cache_kw = cache_argument(model)
    nxt_in = torch.full((B, 1), int(start), dtype=torch.long, device=device)  # (B, 1)
    out = model(encoder_outputs=encoder_outputs, attention_mask=enc_mask, decoder_input_ids=nxt_in, use_cache=True)
    state = {"past": returned_cache(out)}

    def step(nxt: torch.Tensor, t: int) -> torch.Tensor:
        out = model(encoder_outputs=encoder_outputs, attention_mask=enc_mask, decoder_input_ids=nxt[:, None],
                    use_cache=True, **{cache_kw: state["past"]})
        state["past"] = returned_cache(out)
        return out.logits[:, -1, :].float()

    # 3. decode
    return _decode(model, out.logits[:, -1, :].float(), step, params, eos_token_id, pad_token_id, generator,
                   stop_check, end_rows, draw_rows)


# The sampler stops running a row through the model once it has ended, when at most this share of the rows the model
# still runs has not: its KV cache rows are dropped (one copy of the cache), and the steps after cost what the rows
# still sampling cost. Each row draws the random number it would in the whole batch, so the same tokens come out
COMPACT_BELOW = 0.75


def _decode(model, logits: torch.Tensor, step, params: SamplingParams, eos_token_id, pad_token_id: int, generator,
            stop_check, end_rows, draw_rows=None, keep_rows=None) -> SampleBatch:
    """The decode loop both model kinds share: from the prefill's next-token `logits` (B, V), choose a token per row
    (penalties, top-k/top-p, greedy or sampled), record its log-prob, end rows at EOS, stop strings or `end_rows`,
    and get the next logits from `step(tokens, t)`, a cached forward of the model over the rows it still runs.
    `keep_rows(rows)`, where the model's state can drop rows, keeps only those of its rows (see COMPACT_BELOW)."""
    B = logits.shape[0]
    device = logits.device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       device=device, dtype=torch.long)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    tokens, logps, tops_i, tops_l = [], [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    penalised = params.frequency_penalty or params.presence_penalty
    counts = torch.zeros(B, logits.shape[-1], device=device) if penalised else None  # (B, V)
    stop_cut: list[Optional[int]] = [None] * B
    live = torch.arange(B, device=device)  # the rows the model still runs (`logits` are theirs), by batch index
    draw_from, n_draws = draw_rows if draw_rows is not None else (torch.arange(B, device=device), B)
    for t in range(params.max_new_tokens):
        if vocab is not None and logits.shape[-1] > vocab:
            logits = logits[:, :vocab]
        greedy = is_greedy(params.temperature)
        scaled = logits if greedy else logits / params.temperature
        logp_all = torch.log_softmax(scaled, dim=-1)  # (L, V) the policy's distribution at this temperature
        work = scaled if counts is None else apply_penalties(scaled, counts[live], params.frequency_penalty,
                                                              params.presence_penalty)
        if greedy:
            chosen = work.argmax(-1)
        else:
            work = filter_logits(work, params.top_k, params.top_p)
            chosen = sample_from(torch.softmax(work, dim=-1), generator, (draw_from[live], n_draws))  # (L,)
        nxt = torch.full((B,), pad_token_id, dtype=torch.long, device=device)
        lp = torch.zeros(B, device=device)
        nxt[live], lp[live] = chosen, logp_all.gather(-1, chosen[:, None]).squeeze(-1)
        if params.logprobs:
            tl, ti = logp_all.topk(params.logprobs, dim=-1)
            tops_i.append(torch.zeros(B, params.logprobs, dtype=ti.dtype, device=device).index_copy_(0, live, ti))
            tops_l.append(torch.zeros(B, params.logprobs, dtype=tl.dtype, device=device).index_copy_(0, live, tl))
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        lp = torch.where(done, torch.zeros_like(lp), lp)
        tokens.append(nxt)
        logps.append(lp)
        lengths += (~done).long()
        if counts is not None:
            counts[torch.arange(B), nxt] += (~done).float()
        is_eos = torch.isin(nxt, eos) & ~done if params.stop_at_eos and eos.numel() else torch.zeros_like(done)
        ended |= is_eos
        done |= is_eos
        if stop_check is not None:
            cur = torch.stack(tokens, 1)
            for b in range(B):
                if not done[b]:
                    cut = stop_check(b, cur[b, : lengths[b]].tolist())
                    if cut is not None:
                        stop_cut[b] = cut
                        done[b] = True
        if end_rows is not None:
            for b in end_rows():
                done[b] = True
        if bool(done.all()) or t == params.max_new_tokens - 1:  # no forward for a token that will not be sampled
            break
        running = ~done[live]
        if keep_rows is not None and int(running.sum()) <= COMPACT_BELOW * len(live):
            keep = running.nonzero().squeeze(1)
            keep_rows(keep)
            live = live[keep]
        logits = step(nxt[live], t)
    batch = SampleBatch(torch.stack(tokens, 1), torch.stack(logps, 1), lengths, ended, stop_cut=stop_cut)
    if params.logprobs:
        batch.top_ids, batch.top_logprobs = torch.stack(tops_i, 1), torch.stack(tops_l, 1)
    return batch


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the generation config's (e.g. <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gc = getattr(model, "generation_config", None)
    g = getattr(gc, "eos_token_id", None)
    if isinstance(g, int):
        ids.add(g)
    elif g:
        ids.update(g)
    return sorted(ids)


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def generate(model, tokenizer, prompts: Sequence[str], params: SamplingParams,
             batch_size: int = 32) -> list[list[Completion]]:
    """Sample `params.n` completions for each already-rendered prompt string (see prompting.render_prompt)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed() % 2**63)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(params.n)]
    results: list[list[Completion]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s: s + batch_size]
            ids, mask = left_pad([j[1] for j in chunk], pad, device)
            stop_check = None
            if params.stop:
                def stop_check(row, new_ids, _stops=tuple(params.stop)):
                    return _first_stop(tokenizer.decode(new_ids, skip_special_tokens=True), _stops)
            out = sample(model, ids, mask, params, eos, pad, gen, stop_check)
            for r, (pi, p_ids) in enumerate(chunk):
                n = int(out.lengths[r])
                toks = out.tokens[r, :n].tolist()
                lps = out.logprobs[r, :n].tolist()
                text = tokenizer.decode(toks, skip_special_tokens=True)
                finish = "stop" if bool(out.ended[r]) else "length"
                cut = out.stop_cut[r]
                if cut is not None:
                    text, finish = text[:cut], "stop"
                tops = None
                if params.logprobs:
                    tops = [dict(zip(out.top_ids[r, t].tolist(), out.top_logprobs[r, t].tolist())) for t in range(n)]
                results[pi].append(Completion(text, toks, lps, finish, len(p_ids), tops))
    finally:
        model.train(was_training)
    return results
