"""Training mechanics every stage shares: the accelerator, the optimizer and its schedule, the data order as a pure
function of the step (so resume is exact), resume, periodic checkpoints, preemption (SIGTERM / SIGINT stop a loop at a
step boundary with a checkpoint), and an EMA of the weights.

No loop lives here: each stage writes its own, top to bottom, from these parts.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from instructgpt.config import StageConfig, TrainConfig
from instructgpt.runs import Interrupted, StageRun


def make_accelerator(cfg: StageConfig) -> Accelerator:
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, cfg.train.mixed_precision):
        # one process runs several stages (the pipeline): accelerate keeps the first stage's precision process-wide
        # and refuses a second stage's own. Reset that state only; the distributed one (PartialState) stays.
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)


# --------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def cosine_lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps` (the paper decays to 10%)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(opt: torch.optim.Optimizer, t: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`cosine_lr_factor` as a scheduler stepped once per optimizer step (PPO: once per update)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr_factor(s, t.warmup_steps, total_steps, t.min_lr_ratio))


def fused_adam_ok(model) -> bool:
    """torch's fused AdamW (one kernel for all parameters) where it runs: fp32/bf16/fp16 on CPU or CUDA."""
    p = next(model.parameters())
    return p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)


def adamw(params, t: TrainConfig, fused: bool, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with train.*'s betas, eps and weight decay; `params` are tensors or parameter groups."""
    return torch.optim.AdamW(params, lr=t.lr if lr is None else lr, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_eps, weight_decay=t.weight_decay, fused=fused)


def make_optimizer(acc, model, t: TrainConfig, total_steps: int):
    """AdamW + warmup/cosine schedule, model and optimizer prepared by `accelerate`; returns (model, opt, sched).

    The scheduler stays ours: accelerate's wrapper would step it once per process (it assumes a sharded
    dataloader), while our global batch already spans all processes. It is registered so checkpoints hold it.
    """
    opt = adamw([p for p in model.parameters() if p.requires_grad], t, fused_adam_ok(model))
    sched = lr_schedule(opt, t, total_steps)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    return model, opt, sched


def optimizer_step(acc, model, opt, sched, max_grad_norm: float) -> None:
    if max_grad_norm:
        acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def micro_batch_size(t: TrainConfig, world: int, batch_size: int | None = None, key: str = "train.batch_size") -> int:
    """Examples per forward on each rank: train.batch_size (or `batch_size`, named `key`) over processes x
    train.grad_accum, which must divide it (else the examples past the last whole micro-batch would never be seen)."""
    batch_size = t.batch_size if batch_size is None else batch_size
    if batch_size % (world * t.grad_accum):
        raise ValueError(f"{key}={batch_size} must be divisible by processes x grad_accum ({world} x {t.grad_accum})")
    return batch_size // (world * t.grad_accum)


# --------------------------------------------------------------------------------------------------------------------
# Data order: a pure function of the step


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


# --------------------------------------------------------------------------------------------------------------------
# Resume and checkpoints


def resume_step(run: StageRun, acc, desc: str) -> int:
    """Load the last checkpoint if any (every registered state); metrics logged after it are dropped."""
    state = run.load_checkpoint()
    start = state["step"] if state is not None else 0
    run.truncate_metrics(start)
    if start:
        acc.print(f"[{desc}] resuming from step {start}")
    return start


def checkpoint_or_stop(run: StageRun, acc, t: TrainConfig, done: int, total_steps: int, desc: str,
                       state: Optional[dict] = None) -> bool:
    """Save every `train.save_every` steps (`state`, default {"step": done}, goes into trainer_state.json); True
    when `train.stop_after` says to stop here (after saving).

    Called at every step boundary inside `preemptible`: a SIGTERM or SIGINT that reached any process during the step
    writes the checkpoint here and raises Interrupted (exit status 128 + the signal) on every process. During the
    last step the stage finishes instead (its model and DONE.json), then stops (StageRun.finish)."""
    signum = _signal_received(acc)
    if done >= total_steps:
        return False
    stop = t.stop_after is not None and done >= t.stop_after
    if signum or stop or (t.save_every and done % t.save_every == 0):
        run.save_checkpoint(dict(state) if state is not None else {"step": done})
    if signum:
        if _active is not None:
            _active.acted = True
        acc.print(f"[{desc}] {signal.Signals(signum).name}: checkpoint at step {done} written; rerun the same command "
                  f"to resume")
        raise Interrupted(signum)
    if stop:
        acc.print(f"[{desc}] stopping after step {done} (train.stop_after); rerun to resume")
    return stop


# --------------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM (a scheduler reclaiming the machine: SLURM, Kubernetes, spot instances) or SIGINT (Ctrl-C)


class _Preemption:
    """The first SIGTERM or SIGINT received while a loop runs; acted on at the next step boundary."""

    def __init__(self, desc: str, main: bool):
        self.desc, self.main = desc, main
        self.signum = 0
        self.acted = self.aborted = False

    def handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            self.aborted = True
            raise KeyboardInterrupt  # Ctrl-C twice: stop now; the last checkpoint stays good (saves are atomic)
        if self.signum:
            return  # a repeated SIGTERM (the scheduler's, then the launcher's forwarded copy): already stopping
        self.signum = signum
        if self.main:
            again = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
            try:  # os.write, not print: the signal may have interrupted a write to the same stream
                os.write(2, f"\n[{self.desc}] {signal.Signals(signum).name}: stopping at the end of this step, "
                            f"once its checkpoint is written{again}\n".encode())
            except OSError:
                pass


_active: Optional[_Preemption] = None
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def preemptible(run: StageRun, acc, desc: str) -> Iterator[None]:
    """Around a stage's loop: SIGTERM and SIGINT no longer kill the process but are noted, and `checkpoint_or_stop`
    stops the loop at the next step boundary with a checkpoint. A second SIGINT stops it at once, mid-step (Interrupted
    all the same: the last checkpoint is intact). The previous handlers come back on the way out. Under torchrun every rank gets the signal (it forwards it), and
    `checkpoint_or_stop` takes the largest over the ranks, so all stop at the same step. Python handles signals in
    the main thread only: elsewhere this does nothing."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    p = _Preemption(desc, acc.is_main_process)
    previous = {s: signal.signal(s, p.handle) for s in _SIGNALS}
    outer, _active = _active, p
    try:
        yield
    except KeyboardInterrupt:
        if not p.aborted:
            raise
        if p.main:
            print(f"\n[{desc}] SIGINT again: stopped at once, mid-step; the last checkpoint is intact: rerun the same "
                  f"command to resume", flush=True)
        raise Interrupted(signal.SIGINT) from None
    finally:
        _active = outer
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if p.signum and not p.acted:  # it came during the last step: the stage finishes, then stops
        run.interrupted = p.signum


def _signal_received(acc) -> int:
    """The signal `preemptible` noted (0: none), the largest over all processes, so every rank stops at one step."""
    signum = _active.signum if _active is not None else 0
    if acc is not None and acc.num_processes > 1:
        flag = torch.tensor([signum], device=acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
        if _active is not None and signum and not _active.signum:
            _active.signum = signum
    return signum


# --------------------------------------------------------------------------------------------------------------------
# EMA of the weights (InstructGPT's PPO: 0.992)


class EMA:
    """The moving average, in fp32, of the parameters that train: with LoRA the adapters (and a value head on the
    policy), not a second full copy of the frozen base, which would cost as much memory as the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the averaged parameters into `model` (the one the EMA was made from)."""
        params = dict(model.named_parameters())
        for n, v in self.shadow.items():
            params[n].copy_(v.to(params[n].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.shadow = state["decay"], state["shadow"]
