"""A stage's output directory: resolved config, metrics, atomic checkpoints with exact resume, the final model.

Layout of ``out_dir``::

    config.yaml        the fully resolved config (a rerun with a different one is refused)
    metrics.jsonl      one JSON object per logged step (and the same rows to the trackers of train.log_with)
    tensorboard/       with train.log_with=tensorboard: its event files
    checkpoint/        the last good checkpoint (accelerate state: model, optimizer, scheduler, RNG) + trainer_state.json
    model/             the final model, Hugging Face format
    DONE.json          written last: the stage finished
    .lock              held by the run's process while it runs: a second run on the same out_dir is refused

A checkpoint is written to ``checkpoint.tmp`` and swapped in with renames, so a kill during a save leaves the last
good checkpoint intact (``checkpoint.old`` is picked up if the kill fell between the two renames). A write that fails
(a full disk) is a StageError naming what could not be written; what was written before it stays good, so the same
command resumes once there is room.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

from instructgpt.config import config_differences, deep_merge, dump_yaml, flatten, to_dict
from instructgpt.files import hold_dir, read_jsonl, release_dir, replace_dir


class StageError(RuntimeError):
    pass


class Interrupted(SystemExit):
    """SIGTERM or SIGINT stopped a stage at a step boundary with its checkpoint written (or, during the last step, once
    the stage finished). The process exits with 128 + the signal's number (SIGTERM 143, SIGINT 130): the status a
    shell, SLURM or Kubernetes reports for a process the signal stopped, and a rerun of the same command resumes."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class _DropTiedWeightsWarning(logging.Filter):
    """accelerate warns at every checkpoint that a tied tensor (GPT-2's lm_head = wte) is stored once; that is
    expected and reloads correctly (resume is tested), so this drops that one message and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


_DROP_TIED = _DropTiedWeightsWarning()


def releases_out_dir(train: Callable[..., str]) -> Callable[..., str]:
    """For a stage's ``train(cfg)``: the out_dir its StageRun holds (`prepare`) is let go when it returns or raises,
    so a run started later by another process is not refused while this one lives on (a notebook's kernel)."""
    @functools.wraps(train)
    def wrapper(cfg, *args, **kwargs):
        try:
            return train(cfg, *args, **kwargs)
        finally:
            release_dir(cfg.out_dir)
    return wrapper


class StageRun:
    def __init__(self, cfg: Any, stage: str, accelerator=None):
        self.cfg, self.stage, self.acc = cfg, stage, accelerator
        self.out_dir = cfg.out_dir
        self.started = time.time()
        self.is_main = accelerator is None or accelerator.is_main_process
        self.interrupted = 0  # a signal received during the last step: `finish` stops the process once it is done
        self.tracking = False  # the trackers of train.log_with (accelerate's) are started: at the first logged row
        self.resumed_at = 0  # the step metrics were truncated to: trackers hide what an earlier attempt logged past it

    # paths
    def path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, *parts)

    @property
    def done(self) -> bool:
        return os.path.exists(self.path("DONE.json"))

    def checkpoint_dir(self) -> Optional[str]:
        for name in ("checkpoint", "checkpoint.old"):
            p = self.path(name)
            if os.path.exists(os.path.join(p, "trainer_state.json")):
                return p
        return None

    def prepare(self) -> str:
        """Check `out_dir` against the config: 'fresh', 'resume' or 'done'. Raises StageError on a config mismatch, and
        when another run (another process) is writing `out_dir`: two runs would mix their checkpoints and logs."""
        # held until the stage's train returns or raises (`releases_out_dir`), or the process ends
        holder = hold_dir(self.out_dir) if self.is_main else None
        if not self._all_ok(holder is None):
            raise StageError(f"{self.out_dir} is in use by another run ({holder or 'seen by the main process'}): "
                             f"let it finish or stop it, or give this run another out_dir")
        cfg_path = self.path("config.yaml")
        self._barrier()  # every process looks at out_dir as it was before this run wrote anything
        existed = os.path.exists(cfg_path)
        self._barrier()
        if existed:
            with open(cfg_path, encoding="utf-8") as fh:
                old = yaml.safe_load(fh) or {}
            old_stage = old.pop("_stage", self.stage)
            if old_stage != self.stage:
                raise StageError(f"{self.out_dir} holds a '{old_stage}' run, not '{self.stage}'; use another out_dir")
            # a key added to the stage after this run started has its default there (old runs stay resumable)
            old = deep_merge(to_dict(type(self.cfg)()), old)
            diff = config_differences(old, to_dict(self.cfg))
            finished, checkpoint = self.done, self.checkpoint_dir()
            if diff and (finished or checkpoint):
                a = {k: v for k, v in _flat(old).items() if k in diff}
                b = {k: v for k, v in _flat(to_dict(self.cfg)).items() if k in diff}
                raise StageError(f"{self.out_dir} was started with a different config ({', '.join(diff)}: "
                                 f"{a} there, {b} now). Use a new out_dir, or the same config to resume.")
            if finished:
                return "done"
            if checkpoint:
                return "resume"
            if not diff:
                return "fresh"
            # a run that stopped before its first checkpoint (a bad setting, say) left nothing to resume: the new
            # config starts afresh in its place, and so do its logs
            self._barrier()
            if self.is_main:
                print(f"[{self.stage}] {self.out_dir}: no checkpoint of the earlier config ({', '.join(diff)}); "
                      f"starting afresh with this one")
                for log in ("metrics.jsonl", "samples.jsonl"):
                    if os.path.exists(self.path(log)):
                        os.remove(self.path(log))
        if self.is_main:
            with self.writing(cfg_path):
                os.makedirs(self.out_dir, exist_ok=True)
                tmp = cfg_path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(f"_stage: {self.stage}\n" + dump_yaml(self.cfg))
                os.replace(tmp, cfg_path)
        self._barrier()
        return "fresh"

    # metrics
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append a row to metrics.jsonl and hand the same values, under the same keys, to train.log_with's trackers."""
        if not self.is_main:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.append(self.path("metrics.jsonl"), [row])
        if self.acc is not None and self.acc.log_with:
            if not self.tracking:
                self.start_trackers()
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def start_trackers(self) -> None:
        """accelerate's trackers, project "instructgpt", this run named for its out_dir, with the resolved config.
        TensorBoard writes out_dir/tensorboard/; a resumed run tells it to drop what was logged past the checkpoint."""
        name = os.path.basename(os.path.normpath(self.out_dir)) or self.stage
        config = {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)
                  for k, v in flatten(to_dict(self.cfg)).items()}
        self._after_earlier_event_files()
        self.acc.init_trackers("instructgpt", config={"stage": self.stage, **config}, init_kwargs={
            "tensorboard": {"purge_step": self.resumed_at + 1 if self.resumed_at else 0},
            "wandb": {"name": name, "dir": self.out_dir}, "mlflow": {"run_name": name}, "trackio": {"name": name}})
        self.tracking = True

    def _after_earlier_event_files(self) -> None:
        """TensorBoard reads a run's event files in name order, and a name holds its creation time in whole seconds
        (then the host and pid): a run resumed within the second its killed attempt started could sort first, and its
        purge of the rows past the checkpoint would be read before those rows. Wait until the clock is past them."""
        newest = 0
        for root, _, files in os.walk(self.path("tensorboard")):
            for f in files:
                parts = f.split(".")
                if f.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
                    newest = max(newest, int(parts[3]))
        while newest and time.time() < newest + 1:
            time.sleep(0.05)

    def end_trackers(self) -> None:
        """Close the trackers (the stage finished or stopped); a later row starts them again. Not through
        accelerate's end_training, which also ends the process group the other processes (and later stages) use."""
        if self.tracking:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers = []
            self.tracking = False

    def append(self, path: str, rows: list[dict]) -> None:
        """Append rows to a log of the run (metrics.jsonl, samples.jsonl); on resume `truncate_metrics` drops those
        past the checkpoint, and a line a failed write left torn."""
        with self.writing(path), open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))  # one write: a row is whole or torn at the end

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be logged again); with no checkpoint (step 0)
        drop them all, the step-0 rows (PPO's first held-out evaluation) included. samples.jsonl likewise; a last line
        without its newline (a write the disk refused) goes too."""
        self.resumed_at = step
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            p = self.path(name)
            if not os.path.exists(p):
                continue
            with open(p, encoding="utf-8") as fh:
                rows = [line for line in fh if line.endswith("\n") and line.strip()
                        and json.loads(line).get("step", 0) <= step] if step else []
            with self.writing(p):
                with open(p + ".tmp", "w", encoding="utf-8") as fh:
                    fh.writelines(rows)
                os.replace(p + ".tmp", p)

    # checkpoints
    def save_checkpoint(self, state: dict[str, Any], extra_files: Optional[dict[str, Any]] = None) -> None:
        """Save the accelerate state (every registered model/optimizer/scheduler, RNG) plus `state`, atomically. A
        failed write (on any process) leaves the previous checkpoint in place and raises StageError on every one."""
        tmp = self.path("checkpoint.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        error = None
        try:
            if self.acc is not None:
                logging.getLogger("accelerate.utils.other").addFilter(_DROP_TIED)  # added once: same object
                self.acc.save_state(tmp, safe_serialization=True)
        except Exception as e:
            error = e
        # every process has written its part (its RNG state; its shards, when sharded) before the main one seals the
        # directory: a rank still writing into checkpoint.tmp once it is renamed would fail, or write nowhere
        all_written = self._all_ok(error is None)
        try:
            if self.is_main and all_written:
                os.makedirs(tmp, exist_ok=True)
                if extra_files:
                    for name, obj in extra_files.items():
                        torch.save(obj, os.path.join(tmp, name))
                # written last: a directory without it is never taken for a checkpoint (checkpoint_dir)
                with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as fh:
                    json.dump(state, fh)
                replace_dir(tmp, self.path("checkpoint"))  # a kill between its two renames leaves checkpoint.old
        except Exception as e:
            error = e
        if not self._all_ok(error is None):  # in place of the barrier: every process learns of a failed write
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None and not failed_write(error):
                raise error
            raise self._write_error(self.path("checkpoint") + f" (step {state.get('step')})",
                                    error or OSError("the write failed on another process")) from error

    def load_checkpoint(self) -> Optional[dict[str, Any]]:
        d = self.checkpoint_dir()
        if d is None:
            return None
        if self.acc is not None:
            self.acc.load_state(d)
        with open(os.path.join(d, "trainer_state.json"), encoding="utf-8") as fh:
            return json.load(fh)

    def load_extra(self, name: str) -> Any:
        d = self.checkpoint_dir()
        return torch.load(os.path.join(d, name), weights_only=False)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write DONE.json (the stage is complete) and drop the resume checkpoint. If a SIGTERM or SIGINT came during
        the last step, the process stops here (Interrupted), the stage finished."""
        if self.is_main:
            summary = {"stage": self.stage, "seconds": round(time.time() - self.started, 2), **summary}
            tmp = self.path("DONE.json.tmp")
            with self.writing(self.path("DONE.json")):
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump({k: _jsonable(v) for k, v in summary.items()}, fh, indent=2)
                os.replace(tmp, self.path("DONE.json"))
            # the final model is saved; the resume checkpoint is no longer needed
            shutil.rmtree(self.path("checkpoint"), ignore_errors=True)
            shutil.rmtree(self.path("checkpoint.old"), ignore_errors=True)
        self.end_trackers()
        self._barrier()
        if self.interrupted:
            if self.is_main:
                print(f"[{self.stage}] {signal.Signals(self.interrupted).name} during the last step: the stage "
                      f"finished ({self.out_dir}/DONE.json written); rerun the same command to go on", flush=True)
            raise Interrupted(self.interrupted)

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A write the file system refuses (a full disk, say) while writing `what` becomes a StageError that names it
        and says what is left to resume from."""
        try:
            yield
        except Exception as e:
            if not failed_write(e):
                raise
            raise self._write_error(what, e) from e

    def _write_error(self, what: str, error: Exception) -> StageError:
        state = None
        try:
            d = self.checkpoint_dir()
            if d is not None:
                with open(os.path.join(d, "trainer_state.json"), encoding="utf-8") as fh:
                    state = json.load(fh)
        except (OSError, ValueError):
            pass
        resume = (f"the checkpoint of step {state.get('step')} is intact" if state is not None
                  else "no checkpoint was written yet")
        return StageError(f"could not write {what}: {error}. Nothing written before is lost ({resume}): make room "
                          f"and rerun the same command to resume")

    def _all_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every process (a collective: every process calls it)."""
        if self.acc is None or self.acc.num_processes == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return not int(flag.item())

    def _barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()


def failed_write(e: BaseException) -> bool:
    """Whether `e` is a write the file system refused: an OSError, or how torch.save and safetensors report one
    (a RuntimeError from torch's archive writer, a SafetensorError "I/O error")."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        return "I/O error" in text
    return isinstance(e, RuntimeError) and any(m in text for m in ("PytorchStreamWriter", "inline_container",
                                                                     "file write failed"))


def _flat(d: dict, prefix: str = "") -> dict:
    return flatten(d, prefix)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def read_metrics(out_dir: str) -> list[dict]:
    return read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
