"""Training mechanics every stage shares: the accelerator (with its experiment trackers), the optimizer and its
schedule, sharding (FSDP2) and the gathered final model, the data order as a pure function of the step (so resume is
exact), resume, periodic checkpoints, preemption (SIGTERM / SIGINT stop a loop at a step boundary with a checkpoint),
and an EMA of the weights.

No loop lives here: each stage writes its own, top to bottom, from these parts.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import signal
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration

from instructgpt.config import ConfigError, StageConfig, TrainConfig
from instructgpt.generation import use_matmul_attention
from instructgpt.runs import Interrupted, StageError, StageRun

# train.log_with's trackers -> (the modules any one of which serves it, the package to install)
TRACKER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
                    "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio")}


def make_accelerator(cfg: StageConfig) -> Accelerator:
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, cfg.train.mixed_precision):
        # one process runs several stages (the pipeline): accelerate keeps the first stage's precision process-wide
        # and refuses a second stage's own. Reset that state only; the distributed one (PartialState) stays.
        AcceleratorState._reset_state()
    fsdp_sharding(cfg.train)  # a launcher config this toolkit cannot honour is refused before anything loads
    trackers = {}
    if cfg.train.log_with:
        for name in cfg.train.log_with:
            modules, package = TRACKER_PACKAGES[name]
            if not any(importlib.util.find_spec(m) for m in modules):
                extra = " (or pip install 'instructgpt[trackers]')" if name == "tensorboard" else ""
                raise ConfigError(f"train.log_with: {name} needs the {package} package: pip install {package}{extra}")
        # TensorBoard writes its event files under out_dir/tensorboard/ (StageRun.start_trackers starts them)
        trackers = {"log_with": list(cfg.train.log_with),
                    "project_config": ProjectConfiguration(logging_dir=os.path.join(cfg.out_dir, "tensorboard"))}
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision, **trackers)


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


def make_optimizer(acc, model, t: TrainConfig, total_steps: int, roots: Optional[Sequence[torch.nn.Module]] = None):
    """AdamW + warmup/cosine schedule, model and optimizer prepared by `accelerate` (or, under FSDP, the model sharded
    by `shard_model` and the optimizer made over its shards); returns (model, opt, sched). `roots`: the parts of the
    model a stage calls instead of its own forward (the reward model: trunk and head), sharded as roots of their own.

    The scheduler stays ours: accelerate's wrapper would step it once per process (it assumes a sharded
    dataloader), while our global batch already spans all processes. It is registered so checkpoints hold it.

    Under bf16 autocast on a CPU the model attends with `generation.matmul_attention` (see MATMUL_ATTENTION).
    """
    use_matmul_attention(model, t.mixed_precision, acc.device)
    sharding = fsdp_sharding(t)
    if sharding is not None:
        model = shard_model(model, acc, sharding, roots)
    elif acc.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(acc, model, t)
    opt = adamw([p for p in model.parameters() if p.requires_grad], t, fused_adam_ok(model))
    sched = lr_schedule(opt, t, total_steps)
    if sharding is not None:
        checkpoint_sharded(acc, model, opt)
    else:
        skeleton = vars(model).get("_full_skeleton")
        model, opt = acc.prepare(model, opt)
        if skeleton is not None:  # DeepSpeed ZeRO-3: the engine is what the stage holds from here on
            vars(model)["_full_skeleton"] = skeleton
    acc.register_for_checkpointing(sched)
    return model, opt, sched


def length_groups_for(t: TrainConfig, acc, *models, one_process_only: bool = False) -> int:
    """`train.length_groups` as a stage runs it: None is 2 on a CPU and 1 on a GPU, where one larger forward costs
    little more than a smaller one. 1 where the backward of one of the stage's trained `models` is collective
    (`backward_is_collective`), and with `one_process_only` (a stage whose groups are not one backward each under
    DDP's no_sync) where several processes run."""
    if any(backward_is_collective(acc, m) for m in models) or (one_process_only and acc.num_processes > 1):
        return 1
    return t.length_groups if t.length_groups is not None else (1 if acc.device.type == "cuda" else 2)


def backward_is_collective(acc, model) -> bool:
    """Whether every backward of `model` does work all processes must do as often: DeepSpeed steps its optimizer at
    each, and a model `shard_model` sharded reduce-scatters at each. A stage may then not split a micro-batch's
    forward and backward into several on some processes only."""
    return acc.distributed_type == DistributedType.DEEPSPEED or "_full_skeleton" in vars(model)


def no_sync(acc, model):
    """The context of a micro-batch that is not the step's last: DDP keeps its gradients local until the last one
    (accelerate's no_sync). A model `shard_model` sharded reduce-scatters them at every micro-batch, which keeps each
    process's gradients at 1/N, on a CPU as on GPUs."""
    if "_full_skeleton" in vars(model) and acc.distributed_type != DistributedType.DEEPSPEED:
        return nullcontext()
    return acc.no_sync(model)


def optimizer_step(acc, model, opt, sched, max_grad_norm: float) -> None:
    if max_grad_norm:
        acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def summed_over_processes(acc, *values: float) -> list[float]:
    """Each of `values` (this process's share of a figure of the global batch: its part of the mean loss, its token
    count) summed over all processes, so that every process logs the global batch's figure, as one process would
    (HF Trainer gathers its logged loss likewise); one process: the values as they are. A collective: every process
    must call it."""
    if acc.num_processes == 1:
        return list(values)
    return acc.reduce(torch.tensor(values, dtype=torch.float64, device=acc.device), "sum").tolist()


def micro_batch_size(t: TrainConfig, world: int, batch_size: int | None = None, key: str = "train.batch_size") -> int:
    """Examples per forward on each rank: train.batch_size (or `batch_size`, named `key`) over processes x
    train.grad_accum, which must divide it (else the examples past the last whole micro-batch would never be seen)."""
    batch_size = t.batch_size if batch_size is None else batch_size
    if batch_size % (world * t.grad_accum):
        raise ValueError(f"{key}={batch_size} must be divisible by processes x grad_accum ({world} x {t.grad_accum})")
    return batch_size // (world * t.grad_accum)


# --------------------------------------------------------------------------------------------------------------------
# Sharding: FSDP2 (torch's fully_shard) for CPU and GPU alike, and the final model gathered whole. torch.distributed's
# FSDP, DTensor and checkpoint modules are imported where used: ~1.5 s of import that only sharded runs need

SHARDED_STATE = "sharded_state"  # in a sharded checkpoint: model and optimizer shards (torch.distributed.checkpoint)


@dataclass(frozen=True)
class Sharding:
    """FSDP2 as `accelerate launch --config_file configs/accelerate/fsdp2.yaml` asks for it: the launcher hands each
    process its config as ACCELERATE_USE_FSDP and FSDP_* variables. accelerate's own FSDP needs a GPU (on a CPU it
    falls back to DDP without a word), so the stages shard with torch's fully_shard themselves, one path for both."""

    reshard_after_forward: bool = True  # free gathered weights after each block's forward (ZeRO-3); false: ZeRO-2
    offload_params: bool = False  # keep the shards in CPU memory between uses (GPUs only; on a CPU they are there)
    # the block classes sharded one group each (None: the model's _no_split_modules; (): none, the root holds all)
    wrap: Optional[tuple[str, ...]] = None


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("true", "1", "yes")


def fsdp_sharding(t: TrainConfig) -> Optional[Sharding]:
    """The FSDP2 settings of this launch, or None when it does not shard (no FSDP in the accelerate config, or one
    process not started by a distributed launcher). Settings this toolkit would not honour are a ConfigError."""
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return None
    if os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise ConfigError("accelerate config: FSDP version 1 is not supported; set fsdp_version: 2 "
                          "(configs/accelerate/fsdp2.yaml)")
    if _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ConfigError("accelerate config: fsdp_cpu_ram_efficient_loading must be false (every process loads the "
                          "model, then fully_shard keeps its own shard)")
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError("accelerate config: fsdp_activation_checkpointing must be false; use "
                          "model.gradient_checkpointing=true instead")
    if t.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported under FSDP (its loss scaling would need a "
                          "sharded grad scaler): use bf16")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # one process on its own: nothing to shard over
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    names = tuple(n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip())
    return Sharding(reshard_after_forward=_env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                    offload_params=_env_flag("FSDP_OFFLOAD_PARAMS"),
                    wrap=() if policy == "NO_WRAP" else names or None)


def shard_model(model: torch.nn.Module, acc, sharding: Sharding,
                roots: Optional[Sequence[torch.nn.Module]] = None) -> torch.nn.Module:
    """Shard `model` in place over all processes with FSDP2: each transformer block its own group (gathered only
    while it runs), the rest (embeddings, final norm, heads; tied weights stay tied) the root's. Each process keeps
    1/N of every parameter, gradient and, once the optimizer is made over these shards, of Adam's state.

    FSDP gathers a group's weights in its module's forward, so a stage that calls parts of the model rather than its
    forward (the reward model: trunk, then head) names them in `roots`: each becomes a root with the parameters under
    it. A meta-device copy of the model (no memory) is kept for `full_model`, which loads the gathered weights into it.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    skeleton = _meta_copy(model)
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    kw = {"mesh": mesh, "reshard_after_forward": sharding.reshard_after_forward}
    if sharding.offload_params and acc.device.type != "cpu":
        kw["offload_policy"] = CPUOffloadPolicy()
    names = set(sharding.wrap if sharding.wrap is not None else getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, **kw)
    for root in roots or [model]:
        fully_shard(root, **kw)
    # a plain attribute, not a submodule: its (meta) parameters must stay out of model.parameters()
    vars(model)["_full_skeleton"] = skeleton
    return model


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model`'s structure with its parameters on the meta device (tied ones still tied); buffers are copied."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def checkpoint_sharded(acc, model: torch.nn.Module, opt: torch.optim.Optimizer, name: str = SHARDED_STATE) -> None:
    """Checkpoints of a sharded model: each process writes and reads its own shards of the model and of the
    optimizer (torch.distributed.checkpoint, into checkpoint/<name>/), through accelerate's save/load hooks, so that
    `StageRun.save_checkpoint` and `load_checkpoint` hold them beside the scheduler and the RNG states. A stage with
    two trained models (PPO's policy and value model) names each its own directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def state() -> dict:
        model_sd, optim_sd = get_state_dict(model, opt)
        return {"model": model_sd, "optimizer": optim_sd}

    def save(models, weights, output_dir: str) -> None:
        dcp.save(state(), checkpoint_id=os.path.join(output_dir, name))

    def load(models, input_dir: str) -> None:
        sd = state()
        dcp.load(sd, checkpoint_id=os.path.join(input_dir, name))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def _configure_deepspeed(acc, model: torch.nn.Module, t: TrainConfig) -> None:
    """DeepSpeed (ZeRO-2/3, GPUs, through accelerate's own integration): its batch and clipping from train.*. It runs
    its own gradient accumulation, which would scale the loss again, so the loop's is refused."""
    if t.grad_accum != 1:
        raise ConfigError("train.grad_accum: must be 1 under DeepSpeed (train.batch_size stays the global batch)")
    plugin = acc.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size(t, acc.num_processes)
    ds["train_batch_size"] = t.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = t.max_grad_norm
    if plugin.zero_stage == 3:  # parameters partitioned: `full_model` gathers them into this copy
        vars(model)["_full_skeleton"] = _meta_copy(model)


def full_model(acc, model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The trained model whole, as a plain module, on the main process (None on the others), for `save_model`:
    every process must call it. A sharded model (FSDP2, DeepSpeed ZeRO-3) is gathered onto the main process's CPU and
    loaded into its meta-device copy; any other is the model unwrapped."""
    skeleton = vars(model).get("_full_skeleton")
    if skeleton is None:
        return acc.unwrap_model(model) if acc.is_main_process else None
    if acc.distributed_type == DistributedType.DEEPSPEED:
        sd = acc.get_state_dict(model)  # ZeRO-3 (zero3_save_16bit_model: true)
    else:  # FSDP2: every DTensor gathered whole, onto the CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not acc.is_main_process:
        return None
    tied: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    skeleton.load_state_dict(sd, assign=True, strict=False)
    for names in tied.values():  # assign=True gave each name its own tensor: tie them again
        source = next((skeleton.get_parameter(n) for n in names if not skeleton.get_parameter(n).is_meta), None)
        if source is None:
            raise RuntimeError(f"the gathered state dict has no value for {names[0]}")
        for n in names:
            owner, _, attr = n.rpartition(".")
            setattr(skeleton.get_submodule(owner), attr, source)
    return skeleton


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
    d = run.checkpoint_dir()
    if d is not None:
        was = os.path.isdir(os.path.join(d, SHARDED_STATE))
        now = fsdp_sharding(run.cfg.train) is not None
        if was != now:
            how = ("sharded (FSDP2): resume it under FSDP, e.g. accelerate launch --config_file "
                   "configs/accelerate/fsdp2.yaml" if was else "unsharded: resume it without FSDP")
            raise StageError(f"{d} was written {how}")
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
        run.end_trackers()
        raise Interrupted(signum)
    if stop:
        acc.print(f"[{desc}] stopping after step {done} (train.stop_after); rerun to resume")
        run.end_trackers()
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
