"""``--engine vllm``: the same API with vLLM generating (a CUDA machine with ``pip install vllm``).

Our batching front stays (queue, limits, streaming hooks); each batch of jobs becomes one offline
``vllm.LLM.generate`` call with per-request ``SamplingParams``, which vLLM schedules with its own continuous
batching and PagedAttention. Differences from our engine, honestly: the text of a streamed response arrives in one
piece when its batch finishes (the offline API has no token callback); seeds are vLLM's own per-request seeds; and
log-probs are what vLLM reports. vLLM is imported only here, only when asked for.
"""

from __future__ import annotations

from typing import Sequence

from instructgpt.generation import Completion, SamplingParams
from instructgpt.serving.engine import Job

INSTALL_HINT = "--engine vllm needs vLLM on a CUDA machine: pip install vllm"


def require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from e
    return vllm


def one_batch_key(params: SamplingParams) -> str:
    """vLLM takes per-request sampling parameters (and seeds), so any jobs may share a call."""
    return "any"


def vllm_sampling_params(vllm, p: SamplingParams):
    kw = dict(n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens,
              frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty, seed=p.seed,
              logprobs=p.logprobs)  # 0: only the sampled token's log-prob (best_of ranks by it)
    if p.stop:
        kw["stop"] = list(p.stop)
    if p.top_k:
        kw["top_k"] = p.top_k
    return vllm.SamplingParams(**kw)


def completion_from_vllm(out, k: int, prompt_tokens: int) -> Completion:
    """One vLLM ``CompletionOutput`` as our `Completion` (log-probs per token, top-k alternatives if asked)."""
    token_ids = list(out.token_ids)
    steps = out.logprobs or []
    logprobs = [float(d[t].logprob) if t in d else 0.0 for d, t in zip(steps, token_ids)]
    logprobs += [0.0] * (len(token_ids) - len(logprobs))
    tops = None
    if k:
        tops = [dict(sorted(((tid, float(lp.logprob)) for tid, lp in d.items()), key=lambda x: -x[1])[:k])
                for d in steps]
    finish = "stop" if out.finish_reason == "stop" else "length"
    return Completion(out.text, token_ids, logprobs, finish, prompt_tokens, tops)


class VLLMRunner:
    def __init__(self, model_path: str, **llm_kwargs):
        self.vllm = require_vllm()
        self.llm = self.vllm.LLM(model=model_path, **llm_kwargs)

    def run(self, jobs: Sequence[Job]) -> None:
        outs = self.llm.generate([{"prompt_token_ids": job.prompt_ids} for job in jobs],
                                 [vllm_sampling_params(self.vllm, job.params) for job in jobs], use_tqdm=False)
        for job, out in zip(jobs, outs):
            comps = [completion_from_vllm(o, job.params.logprobs, len(job.prompt_ids)) for o in out.outputs]
            if job.on_text is not None:
                for j, c in enumerate(comps):
                    if c.text:
                        job.on_text(j, c.text)
            job.future.set_result(comps)
