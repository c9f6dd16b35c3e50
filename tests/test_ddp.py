"""SFT in two real CPU processes (gloo DDP via torchrun): the ranks end with identical weights, equal to one process
training on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc, model_dir, demos, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(HERE, "ddp_worker.py"), model_dir, demos, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.load(open(out / f"rank{i}-of-{nproc}.json")) for i in range(nproc)]


def test_two_rank_ddp_matches_and_equals_single_process(tiny_model_dir, demos_file, tmp_path):
    r0, r1 = _run(2, tiny_model_dir, demos_file, tmp_path / "ddp")
    assert r0 == r1  # bit-identical across ranks
    (single,) = _run(1, tiny_model_dir, demos_file, tmp_path / "one")
    assert single["head"] == pytest.approx(r0["head"], abs=1e-5)
    assert single["abs"] == pytest.approx(r0["abs"], rel=1e-5)
