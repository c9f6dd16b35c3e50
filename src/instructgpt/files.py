"""Files written so a reader never sees half of one: JSONL rows and whole directories swapped in with renames."""

from __future__ import annotations

import json
import os
import shutil
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
