"""A rich progress bar per stage, showing the figures that matter (loss, tokens/s ...); silent off the main process."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageProgress:
    def __init__(self, desc: str, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.desc = desc
        self.total, self.start = total, start
        self._p = None

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                               console=Console(file=sys.stderr), transient=False)
            self._p.__enter__()
            self._task = self._p.add_task(self.desc, total=self.total, completed=self.start, info="")
        return self

    def update(self, completed: int, **figures: float) -> None:
        if self._p is not None:
            info = "  ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
            self._p.update(self._task, completed=completed, info=info)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)


def _fmt(v: float) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)
