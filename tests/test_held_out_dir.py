"""A run's directory is written by one process at a time: a second run started on an out_dir that another process is
still writing (the same command twice, or workers a killed launcher left running) is refused instead of mixing its
checkpoints and logs into the first's; the hold ends with its process, however that ends."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from conftest import wait_for_checkpoint
from instructgpt.cli import main as cli
from instructgpt.files import hold_dir, release_dir
from instructgpt.runs import read_metrics

HOLD = ("import sys, time\n"  # another process: holds the directory argv[1], then sleeps argv[2] seconds
        "from instructgpt.files import hold_dir\n"
        "print(hold_dir(sys.argv[1]) or 'held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n")


def test_a_second_run_on_an_out_dir_another_process_is_writing_is_refused_and_the_first_ends_whole(
        tiny_model_dir, demos_file, tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", f"model.name_or_path={tiny_model_dir}", f"data.train={demos_file}", "train.batch_size=8",
            "train.max_steps=40", "train.save_every=1", "train.log_every=1", "data.eval_size=0", f"out_dir={out}"]
    first = subprocess.Popen([sys.executable, "-m", "instructgpt.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    assert wait_for_checkpoint(first, out, 1, timeout=180), f"no checkpoint of step 1 (exit status {first.poll()})"
    config = (out / "config.yaml").read_text()

    assert cli(args) == 2  # the same command again, while the first runs: it would resume from its checkpoint
    err = capsys.readouterr().err
    assert f"{out} is in use by another run (process {first.pid} on {socket.gethostname()})" in err, err
    assert (out / "config.yaml").read_text() == config

    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert [m["step"] for m in read_metrics(str(out))] == list(range(1, 41))  # each step logged once, in order
    assert (out / "DONE.json").exists() and not (out / "checkpoint").exists()
    assert cli(args) == 0 and "already finished" in capsys.readouterr().out  # the hold went with its process


def test_a_pipeline_run_directory_is_held_and_the_hold_ends_with_its_process_even_by_sigkill(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert hold_dir(str(run_dir)) == f"process {holder.pid} on {socket.gethostname()}"
        assert cli(["pipeline", "--out", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by another pipeline (process {holder.pid} on" in err, err
        assert not (run_dir / "recipe.yaml").exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert hold_dir(str(run_dir)) is None  # the system let go of the dead process's lock
    assert hold_dir(str(run_dir)) is None  # held by this process already: taken again
    release_dir(str(run_dir))


def test_a_stage_stopped_by_an_error_lets_go_of_its_out_dir_while_its_process_lives_on(tmp_path, capsys):
    """A notebook's kernel outlives a failed `sft.train(cfg)`: a run from a terminal on that out_dir is not refused."""
    out, data = tmp_path / "sft", tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "hi"}\n')
    assert cli(["sft", f"data.train={data}", f"out_dir={out}"]) == 2  # after its StageRun took the out_dir
    assert f"{data}, line 2" in capsys.readouterr().err and (out / ".lock").exists()
    other = subprocess.run([sys.executable, "-c", HOLD, str(out), "0"], capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == "held", other.stdout + other.stderr
