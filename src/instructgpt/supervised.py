"""The supervised loop that SFT and pretraining share: next-token loss on the tokens an example marks trainable
(SFT: the response; pretraining: all of them), with an optional pretraining mix in the same step. An
encoder-decoder model's examples (`Seq2SeqExample`) take the decoder's loss on the response, the encoder fed the prompt.

Runs under `accelerate`, so the same loop serves 1 CPU, 1 GPU or many; checkpoints hold model, optimizer, scheduler
and RNG, and the data position is a pure function of the step, so resume is exact.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from instructgpt.batching import Example, Seq2SeqExample, collate, collate_seq2seq, length_groups
from instructgpt.config import StageConfig
from instructgpt.losses import label_loss_sum, token_loss_sum
from instructgpt.modeling import position_ids_from_mask
from instructgpt.progress import StageProgress
from instructgpt.runs import StageRun
from instructgpt.training import (batch_indices, checkpoint_or_stop, grouped_batch_indices, length_groups_for,
                                  make_optimizer, micro_batch_size, no_sync, optimizer_step, preemptible, resume_step,
                                  summed_over_processes)


def packed_attention_supported() -> bool:
    """Whether transformers builds per-example causal masks from packed position ids (4.53 and later)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def packing_isolates(model) -> bool:
    """Probe: does this model keep packed examples apart? The second example of a packed row must get the logits it
    gets alone (a model that builds its own masks, or ignores position ids, lets it see the first)."""
    first, second = [11, 12, 13], [14, 15, 16, 17]
    device = next(model.parameters()).device
    row = Example(first + second, [True] * 7, [0, 1, 2, 0, 1, 2, 3])
    b = {k: v.to(device) for k, v in collate([row], 0).items()}
    if not packed_attention_supported():
        return False
    was = model.training
    model.eval()
    packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0, 3:]
    alone = model(input_ids=b["input_ids"][:, 3:], use_cache=False).logits[0]
    model.train(was)
    return torch.allclose(packed.float(), alone.float(), atol=1e-4, rtol=1e-3)


def response_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`token_loss_sum` of a left-padded batch (`collate(..., left=True)`), with the LM head run only over the
    trailing positions that predict a label (`logits_to_keep`): on instruction data most positions are prompt or
    padding, and the head (vocabulary x width) is a large share of a small model's compute. Equals the loss of
    the full forward (tested); position ids ignore the left padding."""
    labels, mask = batch["labels"], batch["attention_mask"]
    has_label = (labels[:, 1:] != -100).any(0)  # (T-1,): position t+1 holds a label somewhere in the batch
    first = int(has_label.nonzero()[0]) if bool(has_label.any()) else labels.shape[1] - 2
    keep = labels.shape[1] - first  # logits at positions first .. T-1; the one at `first` predicts `first + 1`
    if "position_ids" in batch:
        # packed rows: no 2-D mask and positions that restart at each example, from which transformers builds a
        # causal mask per example (masking_utils.find_packed_sequence_indices): no example sees another. SFT checks
        # first that the model does (packing_isolates)
        mask, position_ids = None, batch["position_ids"]
    else:
        position_ids = position_ids_from_mask(mask)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=keep).logits
    return token_loss_sum(logits, labels[:, -keep:])


def decoder_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """An encoder-decoder model's `label_loss_sum` of a `collate_seq2seq` batch: the encoder reads the prompt, the
    decoder, fed the response shifted right behind its start token, predicts the response."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits  # (B, R, V)
    return label_loss_sum(logits, batch["labels"])


def loss_batch(examples: Sequence[Example | Seq2SeqExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The tensors of a micro-batch: left-padded rows for a causal LM, encoder and decoder rows for a seq2seq one."""
    if isinstance(examples[0], Seq2SeqExample):
        return collate_seq2seq(examples, pad_token_id)
    return collate(examples, pad_token_id, left=True)


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`response_loss_sum`, or `decoder_loss_sum` for a seq2seq batch."""
    if "decoder_input_ids" in batch:
        return decoder_loss_sum(model, batch)
    return response_loss_sum(model, batch)


@dataclass
class FitResult:
    step: int
    model: object = None  # the model as trained: prepared by accelerate, or sharded (training.full_model gathers it)
    eval_loss: Optional[float] = None
    tokens_per_s: float = 0.0
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def eval_loss(model, examples: Sequence[Example], pad_token_id: int, batch_size: int, device) -> float:
    if not examples:
        return float("nan")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in loss_batch(examples[s:s + batch_size], pad_token_id).items()}
        loss, n = loss_sum(model, b)
        total, count = total + float(loss), count + n
    model.train(was)
    return total / max(count, 1)


def fit(cfg: StageConfig, run: StageRun, acc, model, tokenizer, train_ex: list[Example], eval_ex: list[Example],
        ptx_ex: Optional[list[Example]] = None, desc: str = "sft") -> FitResult:
    """Train `model` on `train_ex` for cfg.train.max_steps optimizer steps, resuming from `run`'s checkpoint."""
    t = cfg.train
    model, opt, sched = make_optimizer(acc, model, t, t.max_steps)
    pad = tokenizer.pad_token_id
    world, rank = acc.num_processes, acc.process_index
    micro = micro_batch_size(t, world)
    ptx_bs = t.pretrain_batch_size or t.batch_size
    ptx_micro = micro_batch_size(t, world, ptx_bs, "train.pretrain_batch_size") if ptx_ex else 0

    start = resume_step(run, acc, desc)
    lengths = [len(e.input_ids) for e in train_ex]
    n_groups = length_groups_for(t, acc, model)
    if train_ex and isinstance(train_ex[0], Seq2SeqExample):
        n_groups = 1  # an encoder-decoder batch pads two sequences

    model.train()
    result = FitResult(step=start, model=model)
    tokens_seen, t0 = 0, time.time()
    with preemptible(run, acc, desc), StageProgress(desc, total=t.max_steps, start=start,
                                                    enabled=acc.is_main_process) as bar:
        for step in range(start, t.max_steps):
            # 1. this step's examples: the same global batch on every rank, each rank takes its share
            idx = grouped_batch_indices(lengths, t.batch_size, step, cfg.seed, t.group_by_length)
            batch = [train_ex[i] for i in idx]
            # normalise by the loss tokens of the whole global batch, so N ranks x M micro-batches == 1 big batch
            n_loss_tokens = sum(e.n_loss_tokens for e in batch)
            mine = batch[rank::world]
            ptx_batch = None
            if ptx_ex and t.pretrain_coef > 0:
                ptx_batch = [ptx_ex[i] for i in batch_indices(len(ptx_ex), ptx_bs, step, cfg.seed + 1)]
                n_ptx_tokens = sum(len(e.input_ids) - 1 for e in ptx_batch)
                ptx_mine = ptx_batch[rank::world]
            step_loss, step_tokens = 0.0, 0  # this process's share of the global batch's mean loss, its tokens
            for m in range(t.grad_accum):
                mb = mine[m * micro:(m + 1) * micro]
                # the micro-batch in groups of similar length, each padded to its own longest row
                parts = length_groups([len(e.input_ids) for e in mb], n_groups) if n_groups > 1 else [range(len(mb))]
                for j, part in enumerate(parts):
                    b = {k: v.to(acc.device) for k, v in loss_batch([mb[i] for i in part], pad).items()}
                    sync = m == t.grad_accum - 1 and j == len(parts) - 1
                    with (nullcontext() if sync else no_sync(acc, model)), acc.autocast():
                        # 2. loss on response tokens only (labels are -100 elsewhere)
                        mb_loss_sum, _ = loss_sum(model, b)
                        loss = mb_loss_sum * world / max(n_loss_tokens, 1)
                        # 3. optional pretraining mix: + pretrain_coef * L_LM, with the micro-batch's first group
                        if ptx_batch is not None and j == 0:
                            chunk = ptx_mine[m * ptx_micro:(m + 1) * ptx_micro]
                            pb = {k: v.to(acc.device) for k, v in collate(chunk, pad).items()}
                            plog = model(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"]).logits
                            p_sum, _ = token_loss_sum(plog, pb["labels"])
                            loss = loss + t.pretrain_coef * p_sum * world / max(n_ptx_tokens, 1)
                        acc.backward(loss)
                    step_loss += float(mb_loss_sum.detach()) / max(n_loss_tokens, 1)
                    step_tokens += int(b["attention_mask"].sum())
            # 4. clip, step, schedule
            optimizer_step(acc, model, opt, sched, t.max_grad_norm)
            step_loss, step_tokens = summed_over_processes(acc, step_loss, step_tokens)  # the global batch's
            tokens_seen += step_tokens
            done = step + 1
            tps = tokens_seen / max(time.time() - t0, 1e-9)
            bar.update(done, loss=step_loss, tok_s=tps)
            # 5. log / eval / checkpoint
            metrics = {}
            if done % t.log_every == 0 or done == t.max_steps:
                metrics.update({"train/loss": step_loss, "train/lr": sched.get_last_lr()[0], "train/tokens_per_s": tps})
            if eval_ex and (done % t.eval_every == 0 or done == t.max_steps):
                metrics["eval/loss"] = result.eval_loss = eval_loss(model, eval_ex, pad, micro * 2, acc.device)
            if metrics:
                run.log(done, metrics)
                result.history.append({"step": done, **metrics})
            result.step, result.tokens_per_s = done, tps
            if checkpoint_or_stop(run, acc, t, done, t.max_steps, desc):
                return result
    return result
