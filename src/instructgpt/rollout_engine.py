"""Where PPO's rollouts are sampled (``ppo.rollout_engine``).

``policy`` (the default): the training process's own policy, with `generation.sample`, on any device.

``vllm``: a vLLM engine colocated in each training process (a CUDA machine with ``pip install vllm``), as TRL's
colocated GRPO and OpenRLHF run theirs. The engine keeps its own copy of the policy's weights; before every rollout the
trainer pushes the policy's current weights into it (:meth:`VLLMEngine.load_weights`), so each update's rollouts are
sampled from the policy as that update starts. The engine returns token ids only: the log-probs of the ratio, the KL
penalty and the values come from the training models' forwards (``ppo.recompute_logprobs`` is required), never from
vLLM, whose kernels and precision differ from training's. Each response samples with its own seed, a function of the
run's seed, the update and its place in the whole batch, so the rollouts do not depend on how the batch is split
across processes.

The contract an engine keeps (the tests hold a stand-in to it on CPU): `load_weights(named tensors)` replaces its
weights by the policy's (Hugging Face parameter names), `sample(queries, ...)` returns one response's token ids per
query, ending with the EOS token when one was sampled.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

INSTALL_HINT = "ppo.rollout_engine=vllm needs vLLM on a CUDA machine: pip install vllm"


class VLLMEngine:
    """A colocated ``vllm.LLM`` on this process's GPU, sharing it with training (`gpu_memory_utilization`)."""

    def __init__(self, model_path: str, gpu_memory_utilization: float, max_model_len: int, seed: int):
        # the engine runs inside this process (not a child process), so its model's weights can be replaced in place
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as e:
            raise RuntimeError(f"{INSTALL_HINT} ({e})") from e
        self.vllm = vllm
        self.llm = vllm.LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, enable_prefix_caching=False)

    def _model(self) -> torch.nn.Module:
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)  # vLLM V1 wraps the worker once more
        return worker.model_runner.model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._model().load_weights(weights)

    def sample(self, queries: Sequence[list[int]], max_new_tokens: int, temperature: float, seeds: Sequence[int],
               eos: Sequence[int]) -> list[list[int]]:
        params = [self.vllm.SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=-1,
                                           max_tokens=max_new_tokens, seed=s, stop_token_ids=list(eos),
                                           ignore_eos=False) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(q)} for q in queries], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


# ppo.rollout_engine -> the class that makes it: (model_path, gpu_memory_utilization, max_model_len, seed) -> engine
ENGINES = {"vllm": VLLMEngine}


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of the response in place `row` of update `step`'s whole rollout batch."""
    return (seed * 1_000_003 + step * 7919) * 100_003 + row


def pad_responses(responses: Sequence[list[int]], eos: Sequence[int], pad_token_id: int,
                  device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Engine responses as the sampler returns them: (tokens (B, R) padded with `pad_token_id`, lengths (B,),
    ended (B,): the response ends with an EOS token)."""
    width = max(1, max(len(r) for r in responses))
    tokens = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
    for i, r in enumerate(responses):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    stops = set(eos)
    ended = torch.tensor([bool(r) and r[-1] in stops for r in responses])
    return tokens.to(device), lengths.to(device), ended.to(device)
