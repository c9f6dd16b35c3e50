"""Supervised fine-tuning on demonstrations: ``instructgpt sft`` (the paper's step 1).

Loss on response (assistant) tokens only; optional packing; cosine decay to 10% of the peak (the paper); optional
LoRA (merged on save); optional pretraining mix L = L_CE + pretrain_coef * L_LM (the paper's PPO starting point was an
SFT run with 10% pretraining data). Runs under `accelerate`, so the same loop serves 1 CPU, 1 GPU or many; checkpoints
hold model, optimizer, scheduler and RNG, and the data position is a pure function of the step, so resume is exact.

`fit` is the loop shared with `instructgpt pretrain` (which is SFT with every token trainable).
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from instructgpt.config import ConfigError, DataConfig, StageConfig
from instructgpt.data import DataError, Demonstration, iter_pretrain_text, load_demonstrations
from instructgpt.prompting import encode_conversation
from instructgpt.runs import StageRun

DEFAULT_DEMOS = "builtin:task-demos"


@dataclass
class SFTConfig(StageConfig):
    def __post_init__(self):
        if self.data.train is None:
            self.data.train = DEFAULT_DEMOS


@dataclass
class Example:
    """One training row: token ids and which of them carry loss; a packed row also has each token's position within
    its own example (`pack`)."""

    input_ids: list[int]
    loss_mask: list[bool]
    position_ids: Optional[list[int]] = None


# --------------------------------------------------------------------------------------------------------------------
# Data -> examples


def demonstration_example(tokenizer, demo: Demonstration, max_length: int) -> Example:
    ids, mask = encode_conversation(tokenizer, demo.messages)
    if not any(mask):
        raise DataError(demo.file, demo.line, "response", "empty response (no tokens to learn from)")
    if len(ids) > max_length:
        # Never cut the response away silently: the example is an error (or a counted skip).
        raise DataError(demo.file, demo.line, "response",
                        f"example is {len(ids)} tokens, longer than data.max_length={max_length}")
    return Example(ids, mask)


def build_examples(tokenizer, demos: Sequence[Demonstration], max_length: int,
                   skip_bad: bool = False) -> tuple[list[Example], int]:
    out, skipped = [], 0
    for d in demos:
        try:
            out.append(demonstration_example(tokenizer, d, max_length))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    return out, skipped


class TokenBlocks(Sequence[Example]):
    """Blocks of pretraining text held as one (N, block_size) int32 tensor, `ids`: 4 bytes a token where lists of
    Python ints take about 39 (32M tokens of ptx text: 128 MB instead of 1.25 GB, on every rank). Indexing gives an
    `Example` with every token trainable; slicing gives `TokenBlocks`."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenBlocks(self.ids[i])
        row = self.ids[i].tolist()
        return Example(row, [True] * len(row))


DOCS_PER_BATCH = 256  # documents tokenised per call: 1.3x faster than one at a time on Shakespeare's plays


def text_blocks(tokenizer, texts: Iterable[str], block_size: int, max_tokens: int | None = None) -> TokenBlocks:
    """Pretraining text -> documents joined by EOS, cut into full blocks (every token trainable). With `max_tokens`,
    the blocks of the first max_tokens tokens: documents are read (and tokenised) only until there are that many; a
    batch is the documents still wanted at the mean length so far, at most as many as read so far (the first is one
    document), so at most twice the documents needed are read."""
    tail = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    docs, parts, n_tokens, n_docs = iter(texts), [], 0, 0
    while max_tokens is None or n_tokens < max_tokens:
        size = DOCS_PER_BATCH
        if max_tokens is not None:
            wanted = math.ceil((max_tokens - n_tokens) * n_docs / n_tokens) if n_tokens else 1
            size = max(1, min(size, n_docs, wanted))  # at most doubling: never more than twice the documents needed
        batch = list(itertools.islice(docs, size))
        if not batch:
            break
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor([t for ids in encoded for t in ids + tail], dtype=torch.int32))
        n_tokens, n_docs = n_tokens + len(parts[-1]), n_docs + len(batch)
    stream = torch.cat(parts)[:max_tokens] if parts else torch.zeros(0, dtype=torch.int32)
    n = len(stream) // block_size
    return TokenBlocks(stream[: n * block_size].reshape(n, block_size))


def pretrain_blocks(tokenizer, data: DataConfig) -> TokenBlocks:
    """`data.pretrain` in blocks of `data.max_length` tokens, of its first `data.pretrain_max_tokens` tokens where
    that is set (a Hugging Face dataset is then streamed, so a corpus like OpenWebText is read only that far)."""
    capped = data.pretrain_max_tokens is not None
    blocks = text_blocks(tokenizer, iter_pretrain_text(data.pretrain, streaming=capped), data.max_length,
                         data.pretrain_max_tokens)
    if not blocks:
        raise DataError(data.pretrain, None, None, f"less than one block of data.max_length={data.max_length} tokens")
    return blocks


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate examples into rows of at most `max_length` tokens (greedy, in order); masks travel along, and the
    positions restart at each example, which is what keeps the examples of a row apart (`response_loss_sum`)."""
    rows, ids, mask, pos = [], [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(Example(ids, mask, pos))
            ids, mask, pos = [], [], []
        ids, mask, pos = ids + ex.input_ids, mask + ex.loss_mask, pos + list(range(len(ex.input_ids)))
    if ids:
        rows.append(Example(ids, mask, pos))
    return rows


def collate(examples: Sequence[Example], pad_token_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded (or `left`-padded) (B, T) input_ids, attention_mask and labels (-100 where no loss); for packed
    rows also position_ids, the padding numbered as a sequence of its own."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    pos = torch.arange(width).repeat(len(examples), 1) if packed else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span] = torch.tensor(e.input_ids)
        att[i, span] = 1
        labels[i, span] = torch.where(torch.tensor(e.loss_mask), ids[i, span], torch.tensor(-100))
        if packed:
            pos[i] = torch.arange(width) - (0 if left else n)  # the padding: 0, 1, ... a sequence of its own
            pos[i, span] = torch.tensor(e.position_ids if e.position_ids is not None else list(range(n)))
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
    if packed:
        batch["position_ids"] = pos
    return batch


# --------------------------------------------------------------------------------------------------------------------
# Math


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose label is not -100, and their count.

    logits (B, T, V) predict labels shifted by one: position t predicts token t+1.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((shift_labels != -100).sum())


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
    from instructgpt.modeling import position_ids_from_mask

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


def cosine_lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps` (the paper decays to 10%)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a fresh seeded permutation per epoch, read in order.

    A pure function of the step, so resuming at step k reads exactly what an uninterrupted run would.
    """
    return stream_indices(n, step * batch_size, batch_size, seed)


def grouped_batch_indices(lengths: Sequence[int], batch_size: int, step: int, seed: int, group: int) -> list[int]:
    """`batch_indices` with batches of similar length (``train.group_by_length``, as HF's LengthGroupedSampler).

    Mega-batch m holds the examples of steps [m * group, (m + 1) * group) of the ungrouped stream, sorted by length
    and cut into `group` batches, which its steps take in a seeded random order. Still a pure function of the step.
    """
    if group <= 1:
        return batch_indices(len(lengths), batch_size, step, seed)
    mega, pos = divmod(step, group)
    idx = sorted(stream_indices(len(lengths), mega * group * batch_size, group * batch_size, seed),
                 key=lambda i: lengths[i])
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (mega + 1))
    b = torch.randperm(group, generator=g).tolist()[pos]
    return idx[b * batch_size:(b + 1) * batch_size]


def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """`count` indices from position `start` of an endless stream of seeded per-epoch permutations of range(n)."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        take = perm[offset: offset + count - len(out)]
        out += take
        pos += len(take)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    step: int
    eval_loss: Optional[float] = None
    tokens_per_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def make_accelerator(cfg: StageConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, cfg.train.mixed_precision):
        # one process runs several stages (the pipeline): accelerate keeps the first stage's precision process-wide
        # and refuses a second stage's own. Reset that state only; the distributed one (PartialState) stays.
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)


@torch.no_grad()
def eval_loss(model, examples: Sequence[Example], pad_token_id: int, batch_size: int, device) -> float:
    if not examples:
        return float("nan")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[s:s + batch_size], pad_token_id, left=True).items()}
        loss, n = response_loss_sum(model, b)
        total, count = total + float(loss), count + n
    model.train(was)
    return total / max(count, 1)


def fused_adam_ok(model) -> bool:
    """torch's fused AdamW (one kernel for all parameters) where it runs: fp32/bf16/fp16 on CPU or CUDA."""
    p = next(model.parameters())
    return p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)


def make_optimizer(acc, model, t, total_steps: int):
    """AdamW + warmup/cosine schedule, model and optimizer prepared by `accelerate`; returns (model, opt, sched).

    The scheduler stays ours: accelerate's wrapper would step it once per process (it assumes a sharded
    dataloader), while our global batch already spans all processes. It is registered so checkpoints hold it.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                            betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
                            fused=fused_adam_ok(model))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr_factor(s, t.warmup_steps, total_steps, t.min_lr_ratio))
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    return model, opt, sched


def resume_step(run: StageRun, acc, desc: str) -> int:
    """Load the last checkpoint if any (every registered state); metrics logged after it are dropped."""
    state = run.load_checkpoint()
    start = state["step"] if state is not None else 0
    run.truncate_metrics(start)
    if start:
        acc.print(f"[{desc}] resuming from step {start}")
    return start


def micro_batch_size(t, world: int, batch_size: int | None = None, key: str = "train.batch_size") -> int:
    """Examples per forward on each rank: train.batch_size (or `batch_size`, named `key`) over processes x
    train.grad_accum, which must divide it (else the examples past the last whole micro-batch would never be seen)."""
    batch_size = t.batch_size if batch_size is None else batch_size
    if batch_size % (world * t.grad_accum):
        raise ValueError(f"{key}={batch_size} must be divisible by processes x grad_accum ({world} x {t.grad_accum})")
    return batch_size // (world * t.grad_accum)


def optimizer_step(acc, model, opt, sched, max_grad_norm: float) -> None:
    if max_grad_norm:
        acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def checkpoint_or_stop(run: StageRun, acc, t, done: int, total_steps: int, desc: str,
                       state: Optional[dict] = None) -> bool:
    """Save every `train.save_every` steps (`state`, default {"step": done}, goes into trainer_state.json); True
    when `train.stop_after` says to stop here (after saving)."""
    if done >= total_steps:
        return False
    stop = t.stop_after is not None and done >= t.stop_after
    if stop or (t.save_every and done % t.save_every == 0):
        run.save_checkpoint(dict(state) if state is not None else {"step": done})
    if stop:
        acc.print(f"[{desc}] stopping after step {done} (train.stop_after); rerun to resume")
    return stop


def fit(cfg: StageConfig, run: StageRun, acc, model, tokenizer, train_ex: list[Example], eval_ex: list[Example],
        ptx_ex: Optional[list[Example]] = None, desc: str = "sft") -> FitResult:
    """Train `model` on `train_ex` for cfg.train.max_steps optimizer steps, resuming from `run`'s checkpoint."""
    from instructgpt.progress import StageProgress

    t = cfg.train
    model, opt, sched = make_optimizer(acc, model, t, t.max_steps)
    pad = tokenizer.pad_token_id
    world, rank = acc.num_processes, acc.process_index
    micro = micro_batch_size(t, world)
    ptx_bs = t.pretrain_batch_size or t.batch_size
    ptx_micro = micro_batch_size(t, world, ptx_bs, "train.pretrain_batch_size") if ptx_ex else 0

    start = resume_step(run, acc, desc)
    lengths = [len(e.input_ids) for e in train_ex]

    model.train()
    result = FitResult(step=start)
    tokens_seen, t0 = 0, time.time()
    with StageProgress(desc, total=t.max_steps, start=start, enabled=acc.is_main_process) as bar:
        for step in range(start, t.max_steps):
            # 1. this step's examples: the same global batch on every rank, each rank takes its share
            idx = grouped_batch_indices(lengths, t.batch_size, step, cfg.seed, t.group_by_length)
            batch = [train_ex[i] for i in idx]
            # normalise by the loss tokens of the whole global batch, so N ranks x M micro-batches == 1 big batch
            n_loss_tokens = sum(sum(e.loss_mask[1:]) for e in batch)
            mine = batch[rank::world]
            ptx_batch = None
            if ptx_ex and t.pretrain_coef > 0:
                ptx_batch = [ptx_ex[i] for i in batch_indices(len(ptx_ex), ptx_bs, step, cfg.seed + 1)]
                n_ptx_tokens = sum(len(e.input_ids) - 1 for e in ptx_batch)
                ptx_mine = ptx_batch[rank::world]
            step_loss = 0.0
            for m in range(t.grad_accum):
                mb = mine[m * micro:(m + 1) * micro]
                b = {k: v.to(acc.device) for k, v in collate(mb, pad, left=True).items()}
                sync = m == t.grad_accum - 1
                with (nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                    # 2. loss on response tokens only (labels are -100 elsewhere)
                    loss_sum, _ = response_loss_sum(model, b)
                    loss = loss_sum * world / max(n_loss_tokens, 1)
                    # 3. optional pretraining mix: + pretrain_coef * L_LM
                    if ptx_batch is not None:
                        chunk = ptx_mine[m * ptx_micro:(m + 1) * ptx_micro]
                        pb = {k: v.to(acc.device) for k, v in collate(chunk, pad).items()}
                        plog = model(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"]).logits
                        p_sum, _ = token_loss_sum(plog, pb["labels"])
                        loss = loss + t.pretrain_coef * p_sum * world / max(n_ptx_tokens, 1)
                    acc.backward(loss)
                step_loss += float(loss_sum.detach()) / max(n_loss_tokens, 1) * world
                tokens_seen += int(b["attention_mask"].sum()) * world
            # 4. clip, step, schedule
            optimizer_step(acc, model, opt, sched, t.max_grad_norm)
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


def split_eval(examples: list[Example], eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold `eval_size` examples out of training (seeded), when no separate eval set is given."""
    if eval_size <= 0 or len(examples) <= eval_size * 2:
        return examples, []
    g = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(len(examples), generator=g).tolist()
    held = set(perm[:eval_size])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def train(cfg: SFTConfig) -> str:
    """Run SFT; returns the out_dir. Rerun on the same out_dir to resume; a finished run says so and exits."""
    from instructgpt.modeling import apply_lora, check_context, load_model, save_model, set_seed

    acc = make_accelerator(cfg)
    run = StageRun(cfg, "sft", acc)
    status = run.prepare()
    if status == "done":
        acc.print(f"[sft] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)

    model, tokenizer = load_model(cfg.model, for_training=True)
    check_context(model, cfg.data.max_length)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)

    demos = load_demonstrations(cfg.data.train, skip_bad=cfg.data.skip_bad_lines)
    train_ex, skipped = build_examples(tokenizer, demos, cfg.data.max_length, cfg.data.skip_bad_lines)
    skipped += demos.skipped
    if cfg.data.eval:
        eval_demos = load_demonstrations(cfg.data.eval, skip_bad=cfg.data.skip_bad_lines)
        eval_ex, _ = build_examples(tokenizer, eval_demos, cfg.data.max_length, cfg.data.skip_bad_lines)
    else:
        train_ex, eval_ex = split_eval(train_ex, cfg.data.eval_size, cfg.seed)
    if skipped:
        acc.print(f"[sft] skipped {skipped} bad examples (data.skip_bad_lines)")
    if cfg.data.packing:
        if not packing_isolates(model):
            raise ConfigError("data.packing: this model's attention does not keep packed examples apart (a packed "
                              "example's logits differ from its own; transformers >= 4.53 and a model that builds its "
                              "masks through it are needed); set data.packing=false")
        train_ex = pack(train_ex, cfg.data.max_length)
    ptx_ex = None
    if cfg.data.pretrain and cfg.train.pretrain_coef > 0:
        ptx_ex = pretrain_blocks(tokenizer, cfg.data)

    res = fit(cfg, run, acc, model, tokenizer, train_ex, eval_ex, ptx_ex, desc="sft")
    if res.step < cfg.train.max_steps:
        return cfg.out_dir
    if acc.is_main_process:
        save_model(acc.unwrap_model(model), tokenizer, run.path("model"), consume=True)
    run.finish({"steps": res.step, "eval_loss": res.eval_loss, "tokens_per_s": res.tokens_per_s,
                "train_examples": len(train_ex), "skipped": skipped})
    return cfg.out_dir
