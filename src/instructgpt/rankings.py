"""The part of a stage that trains on K-way rankings, shared by the reward model and DPO: its config, the rankings
tokenised once per prompt, and the loop (one batch element per prompt, all its C(K,2) comparisons, each response
scored once, the ranking loss of the paper's Eq. 1 over whatever rewards the stage computes).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from instructgpt.batching import split_eval
from instructgpt.config import ConfigError, StageConfig
from instructgpt.data import DataError, Ranking, encode_each, load_comparisons
from instructgpt.losses import ranking_accuracy, ranking_loss
from instructgpt.progress import StageProgress
from instructgpt.prompting import encode_prompt, encode_response
from instructgpt.runs import StageRun
from instructgpt.training import (batch_indices, checkpoint_or_stop, make_optimizer, micro_batch_size, no_sync,
                                  optimizer_step, preemptible, resume_step, summed_over_processes)


@dataclass
class RankingStageConfig(StageConfig):
    """A stage that trains on comparisons, an epoch at a time: the reward model, and DPO."""

    epochs: float = 1.0  # with train.max_steps=0 (default): steps = ceil(epochs * prompts / batch_size)

    min_steps = 0  # train.max_steps=0 (the default): as many steps as `epochs` take

    def validate(self) -> None:
        super().validate()
        if self.epochs <= 0:
            raise ConfigError(f"epochs: must be > 0, got {self.epochs}")
        if self.data.train is None:
            raise ConfigError("data.train: a comparisons file (rankings, pairs, HH-RLHF or summarize-from-feedback) "
                              "is required")

    def total_steps(self, prompts: int) -> int:
        """train.max_steps, or with 0 (the default) as many as `epochs` passes over `prompts` rankings take."""
        return self.train.max_steps or math.ceil(self.epochs * prompts / self.train.batch_size)


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
    def encode(r: Ranking) -> Encoded:
        prompt = encode_prompt(tokenizer, r.messages)
        seqs = [prompt + encode_response(tokenizer, resp) for resp in r.responses]  # as reward.encode_pair
        longest = max(len(s) for s in seqs)
        if longest > max_length:
            raise DataError(r.file, r.line, "responses",
                            f"prompt + response is {longest} tokens, longer than data.max_length={max_length}")
        return cls(seqs, r.ranks, len(prompt))

    encoded, skipped = encode_each(rankings, encode, skip_bad)
    return [item for _, item in encoded], skipped


def read_rankings(cfg: RankingStageConfig) -> tuple:
    """`data.train`'s rankings and `data.eval`'s (None without one), read and checked: what a stage reads before it
    loads its model (minutes for a large one), so a bad line is named first."""
    return (load_comparisons(cfg.data.train, skip_bad=cfg.data.skip_bad_lines),
            load_comparisons(cfg.data.eval, cfg.data.skip_bad_lines) if cfg.data.eval else None)


def load_ranking_items(cfg: RankingStageConfig, read: tuple, tokenizer, cls: type[Encoded] = Encoded):
    """`data.train`'s rankings encoded, and the held-out ones: `data.eval`'s, or `data.eval_size` of the training
    rankings held out; `read`: what `read_rankings(cfg)` read. -> (rankings read, train items, held-out items,
    skipped)."""
    rankings, held_out = read
    items, skipped = encode_rankings(tokenizer, rankings, cfg.data.max_length, cfg.data.skip_bad_lines, cls)
    skipped += rankings.skipped
    if held_out is not None:
        eval_items, _ = encode_rankings(tokenizer, held_out, cfg.data.max_length, True, cls)
    else:
        items, eval_items = split_eval(items, cfg.data.eval_size, cfg.seed)
    return rankings, items, eval_items, skipped


def fit_rankings(cfg: RankingStageConfig, run: StageRun, acc, model, items: Sequence, eval_items: Sequence,
                 steps: int, desc: str, rewards_fn: Callable, eval_fn: Callable, roots: Optional[Sequence] = None):
    """The loop of a stage that trains on rankings: `steps` optimizer steps of `train.batch_size` prompts, each
    prompt's C(K,2) comparisons one element, scored by `rewards_fn(model, items) -> [(K_i,)]` (each response once)
    and the ranking loss; resumes from `run`'s checkpoint. -> (the prepared model, the last `eval_fn(model)` metrics
    ({} without held-out items), or None when train.stop_after stopped it). `roots`: the parts `rewards_fn` calls
    instead of the model's forward (training.make_optimizer)."""
    t = cfg.train
    model, opt, sched = make_optimizer(acc, model, t, steps, roots)
    world, rank = acc.num_processes, acc.process_index
    micro = micro_batch_size(t, world)
    start = resume_step(run, acc, desc)
    last_eval: dict = {}
    t0, comparisons = time.time(), 0
    with preemptible(run, acc, desc), StageProgress(desc, total=steps, start=start, enabled=acc.is_main_process) as bar:
        for step in range(start, steps):
            # a batch of prompts; each prompt's C(K,2) comparisons form one element
            batch = [items[i] for i in batch_indices(len(items), t.batch_size, step, cfg.seed)]
            mine = batch[rank::world]
            step_loss, right, total = 0.0, 0, 0
            for m in range(t.grad_accum):
                mb = mine[m * micro:(m + 1) * micro]
                sync = m == t.grad_accum - 1
                with (nullcontext() if sync else no_sync(acc, model)), acc.autocast():
                    rewards = rewards_fn(model, mb)
                    losses = torch.stack([ranking_loss(r, it.ranks) for r, it in zip(rewards, mb)])
                    loss = losses.sum() * world / len(batch)  # the mean over the global batch of prompts
                    acc.backward(loss)
                step_loss += float(losses.detach().sum()) / len(batch)  # this process's share of the batch's mean
                for r, it in zip(rewards, mb):
                    a, n = ranking_accuracy(r.detach().tolist(), it.ranks)
                    right, total = right + a, total + n
            optimizer_step(acc, model, opt, sched, t.max_grad_norm)
            step_loss, right, total = summed_over_processes(acc, step_loss, right, total)  # the global batch's
            comparisons += total
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
