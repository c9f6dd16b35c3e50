"""``instructgpt rm``: the reward model from K-way human rankings (the paper's step 2).

As the paper: the backbone starts from the SFT model with a scalar head; one batch element is one prompt with all
C(K,2) comparisons of its ranking, each of the K responses forwarded once (never the (K-1)/2-fold duplication of
expanding rankings to pairs); ``train.batch_size`` counts prompts (the paper: 64); one epoch by default (more
overfits); cosine decay to 10%. After training a bias makes the demonstrations' mean reward 0 (the paper), and an
optional gain makes SFT-policy samples' std 1 (lm-human-preferences); both are saved beside the model.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from instructgpt.config import ConfigError, StageConfig, TrainConfig
from instructgpt.data import Ranking, load_comparisons, load_demonstrations
from instructgpt.losses import ranking_accuracy, ranking_loss
from instructgpt.prompting import encode_prompt, encode_response
from instructgpt.reward import (RewardNorm, encode_pair, init_reward_head, last_token_rewards, raw_rewards,
                                right_pad)
from instructgpt.runs import StageRun
from instructgpt.sft import (batch_indices, checkpoint_or_stop, make_accelerator, make_optimizer,
                             micro_batch_size, optimizer_step, resume_step)


@dataclass
class NormalizeConfig:
    demonstrations: Optional[str] = "builtin:task-demos"  # bias: their mean reward becomes 0 (None: no bias)
    max_demonstrations: int = 1000
    policy: Optional[str] = None  # gain: sample this model (e.g. the SFT model) and scale rewards to std 1
    policy_samples: int = 256


def _rm_train() -> TrainConfig:
    return TrainConfig(max_steps=0, batch_size=16, lr=5e-4, log_every=10, eval_every=50, save_every=100)


@dataclass
class RankingStageConfig(StageConfig):
    """A stage that trains on comparisons, an epoch at a time: the reward model, and DPO."""

    epochs: float = 1.0  # with train.max_steps=0 (default): steps = ceil(epochs * prompts / batch_size)

    def validate(self) -> None:
        max_steps = self.train.max_steps
        self.train.max_steps = max(1, max_steps)
        try:
            super().validate()
        finally:
            self.train.max_steps = max_steps
        if max_steps < 0:
            raise ConfigError("train.max_steps: must be >= 0 (0: derived from epochs)")
        if self.epochs <= 0:
            raise ConfigError(f"epochs: must be > 0, got {self.epochs}")
        if self.data.train is None:
            raise ConfigError("data.train: a comparisons file (rankings, pairs, HH-RLHF or summarize-from-feedback) "
                              "is required")

    def total_steps(self, prompts: int) -> int:
        """train.max_steps, or with 0 (the default) as many as `epochs` passes over `prompts` rankings take."""
        return self.train.max_steps or math.ceil(self.epochs * prompts / self.train.batch_size)


@dataclass
class RMConfig(RankingStageConfig):
    train: TrainConfig = field(default_factory=_rm_train)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)


@dataclass
class Encoded:
    """One prompt's K responses, tokenized as prompt + response (the prompt's `prompt_len` tokens head every seq)."""

    seqs: list[list[int]]
    ranks: list[int]
    prompt_len: int = 0


def encode_rankings(tokenizer, rankings: Sequence[Ranking], max_length: int, skip_bad: bool,
                    cls: type[Encoded] = Encoded) -> tuple[list[Encoded], int]:
    """Each ranking as `cls` (Encoded or a subclass), the prompt encoded once; one longer than `max_length` is a
    DataError naming its file and line, or with `skip_bad` skipped and counted."""
    from instructgpt.data import DataError

    out, skipped = [], 0
    for r in rankings:
        prompt = encode_prompt(tokenizer, r.messages)
        seqs = [prompt + encode_response(tokenizer, resp) for resp in r.responses]  # as reward.encode_pair
        longest = max(len(s) for s in seqs)
        if longest > max_length:
            if skip_bad:
                skipped += 1
                continue
            raise DataError(r.file, r.line, "responses",
                            f"prompt + response is {longest} tokens, longer than data.max_length={max_length}")
        out.append(cls(seqs, r.ranks, len(prompt)))
    return out, skipped


def load_ranking_items(cfg: RankingStageConfig, tokenizer, cls: type[Encoded] = Encoded):
    """`data.train`'s rankings encoded, and the held-out ones: `data.eval`'s, or `data.eval_size` of the training
    rankings held out. -> (rankings read, train items, held-out items, skipped)."""
    from instructgpt.sft import split_eval

    rankings = load_comparisons(cfg.data.train, skip_bad=cfg.data.skip_bad_lines)
    items, skipped = encode_rankings(tokenizer, rankings, cfg.data.max_length, cfg.data.skip_bad_lines, cls)
    skipped += rankings.skipped
    if cfg.data.eval:
        eval_items, _ = encode_rankings(tokenizer, load_comparisons(cfg.data.eval, cfg.data.skip_bad_lines),
                                        cfg.data.max_length, True, cls)
    else:
        items, eval_items = split_eval(items, cfg.data.eval_size, cfg.seed)
    return rankings, items, eval_items, skipped


def forward_rankings(model, items: Sequence[Encoded], pad_token_id: int, device) -> list[torch.Tensor]:
    """Rewards of every response of every prompt in one forward pass: each response exactly once. -> [(K_i,)]."""
    rows = [s for it in items for s in it.seqs]
    ids, mask = right_pad(rows, pad_token_id, device)
    rewards = last_token_rewards(model, ids, mask)  # (sum K_i,)
    return list(torch.split(rewards, [len(it.seqs) for it in items]))


@torch.no_grad()
def evaluate(model, items: Sequence[Encoded], pad_token_id: int, device, batch_size: int = 16) -> dict:
    was = model.training
    model.eval()
    right = total = 0
    loss_sum = 0.0
    all_r: list[float] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        for it, r in zip(chunk, forward_rankings(model, chunk, pad_token_id, device)):
            a, n = ranking_accuracy(r.tolist(), it.ranks)
            right, total = right + a, total + n
            loss_sum += float(ranking_loss(r, it.ranks))
            all_r += r.tolist()
    model.train(was)
    t = torch.tensor(all_r)
    return {"eval/accuracy": right / max(total, 1), "eval/loss": loss_sum / max(len(items), 1),
            "eval/reward_mean": float(t.mean()), "eval/reward_std": float(t.std()) if len(t) > 1 else 0.0}


def fit_normalization(model, tokenizer, cfg: NormalizeConfig, prompts: Sequence, device,
                      max_length: Optional[int] = None) -> RewardNorm:
    """Bias: mean raw reward of the demonstrations (-> 0), those longer than `max_length` tokens (the RM's
    data.max_length) left out: the model could not score them. Gain (optional): 1 / std of SFT-policy samples."""
    norm = RewardNorm()
    model.eval()
    if cfg.demonstrations:
        demos = list(load_demonstrations(cfg.demonstrations))[: cfg.max_demonstrations]
        pairs = [(d.messages[:-1], d.messages[-1]["content"]) for d in demos if d.messages[-1]["role"] == "assistant"]
        fit = [(p, r) for p, r in pairs if max_length is None or len(encode_pair(tokenizer, p, r)) <= max_length]
        if not fit:
            raise ConfigError(f"normalize.demonstrations: none of the {len(pairs)} demonstrations of "
                              f"{cfg.demonstrations} fits data.max_length={max_length}")
        if len(fit) < len(pairs):
            print(f"rm: normalisation over {len(fit)} of {len(pairs)} demonstrations (the rest are longer than "
                  f"data.max_length={max_length})", file=sys.stderr)
        norm.bias = float(raw_rewards(model, tokenizer, [p for p, _ in fit], [r for _, r in fit], device).mean())
    if cfg.policy:
        from instructgpt.generation import SamplingParams, generate
        from instructgpt.modeling import load_model
        from instructgpt.prompting import render_prompt

        policy, ptok = load_model(cfg.policy)
        policy.to(device)  # sampled where the reward model is
        ps = list(prompts)[: cfg.policy_samples]
        outs = generate(policy, ptok, [render_prompt(ptok, p) for p in ps], SamplingParams(temperature=1.0, seed=0))
        r = raw_rewards(model, tokenizer, ps, [o[0].text for o in outs], device) - norm.bias
        norm.gain = float(1.0 / max(float(r.std()), 1e-6))
    return norm


def train(cfg: RMConfig) -> str:
    from instructgpt.modeling import check_context, load_model, save_model, set_seed

    acc = make_accelerator(cfg)
    run = StageRun(cfg, "rm", acc)
    if run.prepare() == "done":
        acc.print(f"[rm] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)
    # 1. backbone from the SFT model, a fresh scalar head
    model, tok = load_model(cfg.model, for_training=True, model_class="sequence_classification")
    check_context(model, cfg.data.max_length)
    init_reward_head(model.score)
    if cfg.model.lora.enabled:
        from instructgpt.modeling import apply_lora

        model = apply_lora(model, cfg.model.lora, task="seq_cls")  # the head trains in full, the trunk through LoRA
    # 2. rankings -> (K responses, ranks) per prompt
    rankings, items, eval_items, skipped = load_ranking_items(cfg, tok)
    steps = cfg.total_steps(len(items))
    # 3. train: a batch of prompts a step, each prompt's C(K,2) comparisons one element, each response forwarded once
    model.train()
    model, last_eval = fit_rankings(cfg, run, acc, model, items, eval_items, steps, "rm",
                                    lambda m, mb: forward_rankings(m, mb, tok.pad_token_id, acc.device),
                                    lambda m: evaluate(m, eval_items, tok.pad_token_id, acc.device))
    if last_eval is None:  # stopped early (train.stop_after): rerun to resume
        return cfg.out_dir
    # 4. normalise, save with the normalisation beside the model
    bare = acc.unwrap_model(model)
    norm = fit_normalization(bare, tok, cfg.normalize, [r.messages for r in rankings], acc.device,
                             cfg.data.max_length)
    if acc.is_main_process:
        save_model(bare, tok, run.path("model"), consume=True)
        norm.save(run.path("model"))
    run.finish({"steps": steps, "prompts": len(items), "skipped": skipped, "bias": norm.bias, "gain": norm.gain,
                **{k.replace("eval/", "eval_"): v for k, v in last_eval.items()}})
    return cfg.out_dir


def fit_rankings(cfg: RankingStageConfig, run: StageRun, acc, model, items: Sequence, eval_items: Sequence,
                 steps: int, desc: str, rewards_fn: Callable, eval_fn: Callable):
    """The loop of a stage that trains on rankings: `steps` optimizer steps of `train.batch_size` prompts, each
    prompt's C(K,2) comparisons one element, scored by `rewards_fn(model, items) -> [(K_i,)]` (each response once)
    and the ranking loss; resumes from `run`'s checkpoint. -> (the prepared model, the last `eval_fn(model)` metrics
    ({} without held-out items), or None when train.stop_after stopped it)."""
    from instructgpt.progress import StageProgress

    t = cfg.train
    model, opt, sched = make_optimizer(acc, model, t, steps)
    world, rank = acc.num_processes, acc.process_index
    micro = micro_batch_size(t, world)
    start = resume_step(run, acc, desc)
    last_eval: dict = {}
    t0, comparisons = time.time(), 0
    with StageProgress(desc, total=steps, start=start, enabled=acc.is_main_process) as bar:
        for step in range(start, steps):
            # a batch of prompts; each prompt's C(K,2) comparisons form one element
            batch = [items[i] for i in batch_indices(len(items), t.batch_size, step, cfg.seed)]
            mine = batch[rank::world]
            step_loss, right, total = 0.0, 0, 0
            for m in range(t.grad_accum):
                mb = mine[m * micro:(m + 1) * micro]
                sync = m == t.grad_accum - 1
                with (nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                    rewards = rewards_fn(model, mb)
                    losses = torch.stack([ranking_loss(r, it.ranks) for r, it in zip(rewards, mb)])
                    loss = losses.sum() * world / len(batch)  # the mean over the global batch of prompts
                    acc.backward(loss)
                step_loss += float(losses.detach().sum()) / len(batch) * world
                for r, it in zip(rewards, mb):
                    a, n = ranking_accuracy(r.detach().tolist(), it.ranks)
                    right, total = right + a, total + n
            comparisons += total * world
            optimizer_step(acc, model, opt, sched, t.max_grad_norm)
            done = step + 1
            cps = comparisons / max(time.time() - t0, 1e-9)
            bar.update(done, loss=step_loss, acc=right / max(total, 1), cmp_s=cps)
            metrics = {}
            if done % t.log_every == 0 or done == steps:
                metrics.update({"train/loss": step_loss, "train/accuracy": right / max(total, 1),
                                "train/lr": sched.get_last_lr()[0], "train/comparisons_per_s": cps})
            if eval_items and (done % t.eval_every == 0 or done == steps):
                last_eval = eval_fn(model)
                metrics.update(last_eval)
            if metrics:
                run.log(done, metrics)
            if checkpoint_or_stop(run, acc, t, done, steps, desc):
                return model, None
    return model, last_eval
