"""Files written so a reader never sees half of one: JSONL rows and whole directories swapped in with renames; and
a run's directory held by one process at a time."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterable


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows atomically (a crash never leaves half a file behind)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: str, obj, indent: int = 2) -> None:
    """Write one JSON document atomically (a reader, or a resumed run, never sees half of it)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """Every row of a JSONL file our stages wrote ([] when it does not exist); blank lines are skipped."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def replace_dir(tmp: str, final: str) -> None:
    """Move a finished directory into place so a reader never sees half of it (old copy removed after the swap; a
    kill between the two renames leaves ``final.old``, which readers of checkpoints pick up)."""
    old = f"{final}.old"
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


_HELD: dict[str, int] = {}  # the directories this process holds (hold_dir): their lock files' descriptors


def hold_dir(path: str) -> str | None:
    """Hold `path`, a run's output directory, for this process: an exclusive lock on ``path/.lock``, which the
    system releases when the process ends however it ends (a SIGKILL too), or `release_dir`. Returns None once it is
    held (also when this process holds it already, and where the file system keeps no locks, as some network ones do,
    or the platform has no ``fcntl``: there the directory goes unguarded), else who holds it: "process N on HOST"."""
    try:
        import fcntl
    except ImportError:
        return None
    key = os.path.realpath(path)
    if key in _HELD:
        return None
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # nothing can be written there: the run's first write names the directory and the error
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        return holder or "another process"
    except OSError:
        os.close(fd)
        return None
    try:  # who holds it, for the message another run gets
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass
    _HELD[key] = fd
    return None


def release_dir(path: str) -> None:
    """Let go of a directory `hold_dir` took (nothing when this process does not hold it)."""
    fd = _HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its lock
