"""A stage's output directory: resolved config, metrics, atomic checkpoints with exact resume, the final model.

Layout of ``out_dir``::

    config.yaml        the fully resolved config (a rerun with a different one is refused)
    metrics.jsonl      one JSON object per logged step
    checkpoint/        the last good checkpoint (accelerate state: model, optimizer, scheduler, RNG) + trainer_state.json
    model/             the final model, Hugging Face format
    DONE.json          written last: the stage finished

A checkpoint is written to ``checkpoint.tmp`` and swapped in with renames, so a kill during a save leaves the last
good checkpoint intact (``checkpoint.old`` is picked up if the kill fell between the two renames).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import torch
import yaml

from instructgpt.config import config_differences, deep_merge, dump_yaml, flatten, to_dict
from instructgpt.files import read_jsonl, replace_dir


class StageError(RuntimeError):
    pass


class _DropTiedWeightsWarning(logging.Filter):
    """accelerate warns at every checkpoint that a tied tensor (GPT-2's lm_head = wte) is stored once; that is
    expected and reloads correctly (resume is tested), so this drops that one message and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


_DROP_TIED = _DropTiedWeightsWarning()


class StageRun:
    def __init__(self, cfg: Any, stage: str, accelerator=None):
        self.cfg, self.stage, self.acc = cfg, stage, accelerator
        self.out_dir = cfg.out_dir
        self.started = time.time()
        self.is_main = accelerator is None or accelerator.is_main_process

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
        """Check `out_dir` against the config: 'fresh', 'resume' or 'done'. Raises StageError on a config mismatch."""
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
            os.makedirs(self.out_dir, exist_ok=True)
            tmp = cfg_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(f"_stage: {self.stage}\n" + dump_yaml(self.cfg))
            os.replace(tmp, cfg_path)
        self._barrier()
        return "fresh"

    # metrics
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be logged again); with no checkpoint (step 0)
        drop them all, the step-0 rows (PPO's first held-out evaluation) included."""
        p = self.path("metrics.jsonl")
        if not self.is_main or not os.path.exists(p):
            return
        with open(p, encoding="utf-8") as fh:
            rows = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step] if step else []
        with open(p + ".tmp", "w", encoding="utf-8") as fh:
            fh.writelines(rows)
        os.replace(p + ".tmp", p)

    # checkpoints
    def save_checkpoint(self, state: dict[str, Any], extra_files: Optional[dict[str, Any]] = None) -> None:
        """Save the accelerate state (every registered model/optimizer/scheduler, RNG) plus `state`, atomically."""
        tmp = self.path("checkpoint.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        if self.acc is not None:
            logging.getLogger("accelerate.utils.other").addFilter(_DROP_TIED)  # added once: same object
            self.acc.save_state(tmp, safe_serialization=True)
        if self.is_main:
            os.makedirs(tmp, exist_ok=True)
            if extra_files:
                for name, obj in extra_files.items():
                    torch.save(obj, os.path.join(tmp, name))
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as fh:
                json.dump(state, fh)
            replace_dir(tmp, self.path("checkpoint"))  # a kill between its two renames leaves checkpoint.old
        self._barrier()

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
        if self.is_main:
            summary = {"stage": self.stage, "seconds": round(time.time() - self.started, 2), **summary}
            tmp = self.path("DONE.json.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({k: _jsonable(v) for k, v in summary.items()}, fh, indent=2)
            os.replace(tmp, self.path("DONE.json"))
            # the final model is saved; the resume checkpoint is no longer needed
            shutil.rmtree(self.path("checkpoint"), ignore_errors=True)
            shutil.rmtree(self.path("checkpoint.old"), ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()


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
