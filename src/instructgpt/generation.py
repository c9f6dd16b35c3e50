"""Batched sampling with a KV cache: our own small engine, used by ``generate``, PPO rollouts, evaluation and serving.

Prompts are left-padded with position ids that ignore the padding, so a prompt's output does not depend on what it
was batched with. The log-prob of every sampled token is returned, computed from ``logits / temperature`` before any
top-k/top-p filtering or penalty (what PPO needs, and what OpenAI's ``logprobs`` report).
Penalties follow OpenAI's definition: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``,
counting the tokens generated so far in that completion.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from instructgpt.batching import left_pad
from instructgpt.modeling import position_ids_from_mask


def autocast(model, mixed_precision: str = "no"):
    """bf16 autocast on the model's device for sampling (`mixed_precision` "bf16"), else a no-op. The sampler reads
    logits in fp32 either way. Faster where the CPU or GPU has bf16 units (a CPU with avx512_bf16)."""
    if mixed_precision in ("no", None):
        return contextlib.nullcontext()
    if mixed_precision != "bf16":
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', not {mixed_precision!r}")
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


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


def sample_from(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), by the inverse of its cumulative distribution: a uniform draw u in (0, 1]
    scaled to the row's total picks the first token whose cumulative probability reaches it, so token j comes with
    probability probs[j] (zero-probability tokens never). The same distribution as torch.multinomial, from B random
    numbers instead of B x V: at batch 64 over a 4,096-token vocabulary 0.13 ms a step against 4.2 ms. -> (B,)."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = (1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency_penalty: float,
                    presence_penalty: float) -> torch.Tensor:
    """OpenAI's frequency/presence penalties. logits, counts: (B, V)."""
    if frequency_penalty:
        logits = logits - counts * frequency_penalty
    if presence_penalty:
        logits = logits - (counts > 0).to(logits.dtype) * presence_penalty
    return logits


def cache_argument(model) -> str:
    """transformers >= 5 names the KV cache `cache`; earlier versions `past_key_values`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it through
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def keeps_last_logits(model) -> dict:
    """`{"logits_to_keep": 1}` where the model takes it (transformers' causal LMs do): the prefill then runs the LM
    head over the last prompt position only: a large vocabulary's head over a whole chat prompt is a large share of
    the prefill, for logits never read."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


def returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
           eos_token_id: int | Sequence[int] | None, pad_token_id: int,
           generator: Optional[torch.Generator] = None, stop_check=None, end_rows=None) -> SampleBatch:
    """Sample continuations of left-padded prompts `input_ids` (B, P). Stops early once every row has ended.

    `stop_check(row, new_token_ids) -> Optional[int]` may end a row on a stop string (returns chars to keep).
    `end_rows() -> rows`, asked once a step (no per-row cost), ends those rows where they are (a server's cancelled
    requests).
    """
    B = input_ids.shape[0]
    device = input_ids.device
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       device=device, dtype=torch.long)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    attention_mask = attention_mask.long()
    position_ids = position_ids_from_mask(attention_mask)
    cache_kw = cache_argument(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **keeps_last_logits(model))
    past = returned_cache(out)
    logits = out.logits[:, -1, :].float()  # (B, V)
    next_pos = position_ids[:, -1] + 1  # (B,)
    tokens, logps, tops_i, tops_l = [], [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    counts = torch.zeros(B, logits.shape[-1], device=device) if (params.frequency_penalty or params.presence_penalty) else None
    stop_cut: list[Optional[int]] = [None] * B
    for t in range(params.max_new_tokens):
        if vocab is not None and logits.shape[-1] > vocab:
            logits = logits[:, :vocab]
        greedy = is_greedy(params.temperature)
        scaled = logits if greedy else logits / params.temperature
        logp_all = torch.log_softmax(scaled, dim=-1)  # (B, V) the policy's distribution at this temperature
        work = scaled if counts is None else apply_penalties(scaled, counts, params.frequency_penalty,
                                                              params.presence_penalty)
        if greedy:
            nxt = work.argmax(-1)
        else:
            work = filter_logits(work, params.top_k, params.top_p)
            nxt = sample_from(torch.softmax(work, dim=-1), generator)  # (B,)
        lp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
        if params.logprobs:
            tl, ti = logp_all.topk(params.logprobs, dim=-1)
            tops_i.append(ti)
            tops_l.append(tl)
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
        attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=attention_mask.dtype, device=device)], 1)
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: past})
        past = returned_cache(out)
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
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
