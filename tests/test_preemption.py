"""Preemption and failing disks. SIGTERM or SIGINT stops a stage at a step boundary with its checkpoint written and the
exit status a scheduler reads as "interrupted" (128 + the signal); a write the disk refuses (ENOSPC) is an error naming
it and leaves the last checkpoint good. Either way the same command, rerun, ends with an uninterrupted run's weights.

Run as a script under torchrun, this file is the worker of the two-rank test (see `_ddp_worker`)."""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ppo_inputs_in, saved_weights, write_jsonl
from instructgpt.config import load_config
from instructgpt.runs import Interrupted, StageError, StageRun, read_metrics

CLI = [sys.executable, "-m", "instructgpt.cli"]


def _sft_args(model_dir, demos, out, *extra) -> list[str]:
    # no periodic checkpoint: the one a signal leaves is the signal's own
    return [f"model.name_or_path={model_dir}", f"data.train={demos}", "train.batch_size=16", "train.max_steps=60",
            "train.save_every=1000", "train.log_every=1", "data.eval_size=0", "train.lr=1e-3", f"out_dir={out}",
            *extra]


def _sft(args):
    from instructgpt.sft import SFTConfig, train
    return train(load_config(SFTConfig, None, args))


def _assert_same_weights(a, b):
    wa, wb = saved_weights(a), saved_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def _signal_once_logged(cmd: list[str], out_dir, signum: int, log, timeout: float = 180.0) -> int:
    """Start `cmd`, send it `signum` as soon as its first step is in metrics.jsonl; its exit status."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        metrics = os.path.join(out_dir, "metrics.jsonl")
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline and not (
                os.path.exists(metrics) and os.path.getsize(metrics)):
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before a signal could be sent"
        proc.send_signal(signum)
        return proc.wait(timeout=timeout)


def _stopped_at(out_dir) -> int:
    """The step of the checkpoint a signal left; its files are whole and the metrics end at that very step."""
    ckpt = os.path.join(out_dir, "checkpoint")
    step = json.load(open(os.path.join(ckpt, "trainer_state.json")))["step"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(os.listdir(ckpt))
    assert read_metrics(str(out_dir))[-1]["step"] == step
    assert not os.path.exists(os.path.join(out_dir, "DONE.json"))
    return step


# --------------------------------------------------------------------------------------------------------------------
# SFT: SIGTERM and SIGINT through the command line


@pytest.fixture(scope="module")
def sft_reference(tiny_model_dir, tmp_path_factory):
    demos = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    rng = random.Random(0)
    write_jsonl(demos, [{"prompt": f"add {a} plus {b}", "response": str(a + b)}
                        for a, b in ((rng.randint(0, 20), rng.randint(0, 20)) for _ in range(120))])
    ref = tmp_path_factory.mktemp("sft") / "ref"
    _sft(_sft_args(tiny_model_dir, demos, ref))
    return {"model": tiny_model_dir, "demos": str(demos), "ref": ref}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_sft_at_a_step_boundary_with_a_checkpoint_and_the_rerun_resumes_exactly(
        sft_reference, tmp_path, signum):
    out = tmp_path / "run"
    cmd = CLI + ["sft"] + _sft_args(sft_reference["model"], sft_reference["demos"], out)
    rc = _signal_once_logged(cmd, out, signum, tmp_path / "log")
    text = open(tmp_path / "log").read()
    assert rc == 128 + signum, text[-2000:]  # 143 for SIGTERM, 130 for SIGINT: what a shell reports
    step = _stopped_at(out)
    assert 1 <= step < 60
    name = signal.Signals(signum).name
    assert f"[sft] {name}: checkpoint at step {step} written; rerun the same command to resume" in text
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and f"resuming from step {step}" in r.stdout, r.stderr[-2000:]
    _assert_same_weights(sft_reference["ref"], out)
    assert [m["step"] for m in read_metrics(str(out))] == list(range(1, 61))  # nothing lost, nothing logged twice


def test_a_second_ctrl_c_aborts_at_once_and_the_rerun_still_resumes_exactly(sft_reference, tmp_path):
    out = tmp_path / "run"
    cmd = CLI + ["sft"] + _sft_args(sft_reference["model"], sft_reference["demos"], out, "train.save_every=3")
    with open(tmp_path / "log", "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and not (metrics.exists() and metrics.stat().st_size):
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        # the second once the first is handled (two signals before Python runs its handler count as one)
        while proc.poll() is None and "Ctrl-C again" not in open(tmp_path / "log").read():
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    text = open(tmp_path / "log").read()
    if "checkpoint at step" in text:
        pytest.skip("the step and its checkpoint finished before the second Ctrl-C arrived")
    assert rc == 130 and "[sft] SIGINT again: stopped at once, mid-step" in text, text[-2000:]
    assert "Traceback" not in text and not (out / "DONE.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_weights(sft_reference["ref"], out)


def test_a_signal_during_the_last_step_lets_the_stage_finish_then_stops(sft_reference, tmp_path, monkeypatch):
    from instructgpt import supervised
    steps, step = [], supervised.optimizer_step

    def step_then_signal(*a, **kw):
        step(*a, **kw)
        steps.append(1)
        if len(steps) == 60:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(supervised, "optimizer_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        _sft(_sft_args(sft_reference["model"], sft_reference["demos"], out))
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before  # the handler is given back
    assert (out / "DONE.json").exists() and not (out / "checkpoint").exists()
    _assert_same_weights(sft_reference["ref"], out)


def test_handlers_are_installed_for_the_loop_only_and_a_repeated_sigterm_is_one_request():
    from instructgpt import training
    run, acc = SimpleNamespace(interrupted=0), SimpleNamespace(is_main_process=False, num_processes=1)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with training.preemptible(run, acc, "x"):
        assert training._signal_received(None) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's and the launcher's copy
        assert training._signal_received(None) == signal.SIGTERM
    assert run.interrupted == signal.SIGTERM  # not acted on in the loop: the stage stops once finished
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(Interrupted) as e:
        with training.preemptible(run, acc, "x"):
            os.kill(os.getpid(), signal.SIGINT)
            assert training._signal_received(None) == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises before this ends
    assert e.value.code == 130 and {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(KeyboardInterrupt):  # one that is not the second Ctrl-C goes on as it came
        with training.preemptible(run, acc, "x"):
            raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------------------------
# PPO: SIGTERM through the command line


@pytest.fixture(scope="module")
def ppo_inputs(tiny_model_dir, tmp_path_factory):
    return ppo_inputs_in(tmp_path_factory.mktemp("ppo"), tiny_model_dir, 64)


def _ppo_args(inp, out, *extra) -> list[str]:
    return [f"model.name_or_path={inp['policy']}", f"reward_model.name_or_path={inp['rm']}",
            f"data.train={inp['prompts']}", f"data.pretrain={inp['ptx']}", "data.max_length=32", "ppo.eval_prompts=0",
            "ppo.response_length=8", "train.batch_size=16", "ppo.num_minibatches=2", "ppo.ppo_epochs=2",
            "train.lr=1e-3", "train.warmup_steps=0", "ppo.ptx_coef=0.5", "ppo.ptx_token_ratio=1", "ppo.ema_decay=0.5",
            "train.log_every=1", f"out_dir={out}", *extra]


def _ppo(args):
    from instructgpt.ppo import PPOConfig, train
    return train(load_config(PPOConfig, None, args))


def test_sigterm_stops_ppo_after_the_current_update_and_the_rerun_resumes_exactly(ppo_inputs, tmp_path):
    extra = ("train.max_steps=16", "train.save_every=1000")
    ref, out = tmp_path / "ref", tmp_path / "run"
    _ppo(_ppo_args(ppo_inputs, ref, *extra))
    cmd = CLI + ["ppo"] + _ppo_args(ppo_inputs, out, *extra)
    rc = _signal_once_logged(cmd, out, signal.SIGTERM, tmp_path / "log")
    text = open(tmp_path / "log").read()
    assert rc == 143, text[-2000:]
    step = _stopped_at(out)
    assert 1 <= step < 16 and f"[ppo] SIGTERM: checkpoint at step {step} written" in text
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_weights(ref, out)  # the EMA, the optimizers, the KL controller and the RNG all resumed
    a, b = read_metrics(str(ref)), read_metrics(str(out))
    assert [m["step"] for m in b] == list(range(1, 17))
    assert [m["objective/scores"] for m in a] == pytest.approx([m["objective/scores"] for m in b], abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# A full disk: every write of a short SFT run refused in turn


class FullDisk:
    """Counts the writes under `root` through every writer a stage uses (nested ones each count); with `fail_at`,
    the fail_at-th fails as on a full disk: a file written through `open`, `torch.save` or `save_file` is left with
    half its bytes and the error each raises there (OSError ENOSPC; torch's and safetensors' own, as measured with
    RLIMIT_FSIZE), a directory writer or a rename fails with ENOSPC before it starts."""

    def __init__(self, monkeypatch, root, fail_at: int | None = None):
        import accelerate
        import accelerate.utils.other
        import transformers
        import transformers.modeling_utils
        self.root, self.fail_at, self.calls = os.path.realpath(root), fail_at, []
        targets = [(accelerate.Accelerator, "save_state", 1), (torch, "save", 1),
                   (accelerate.utils.other, "safe_save_file", 1), (transformers.modeling_utils, "safe_save_file", 1),
                   (transformers.PreTrainedModel, "save_pretrained", 1),
                   (transformers.PreTrainedTokenizerBase, "save_pretrained", 1), (json, "dump", 1),
                   (os, "replace", 1), (builtins, "open", 0)]
        for owner, name, path_arg in targets:
            label = f"{getattr(owner, '__name__', owner)}.{name}"
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), label, path_arg))

    def _path(self, path):
        path = getattr(path, "name", None) if hasattr(path, "write") else path  # json.dump's file object
        return os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else None

    def _wrap(self, fn, name, path_arg):
        def writer(*args, **kwargs):
            path = self._path(args[path_arg] if len(args) > path_arg else None)
            mode = (args[1] if len(args) > 1 else kwargs.get("mode", "r")) if name == "builtins.open" else "w"
            if path is None or not path.startswith(self.root) or not any(c in mode for c in "wax+"):
                return fn(*args, **kwargs)
            self.calls.append((name, os.path.relpath(path, self.root)))
            if len(self.calls) != self.fail_at:
                return fn(*args, **kwargs)
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            if name == "builtins.open":
                return _TornFile(fn(*args, **kwargs), full)
            if name == "torch.save":
                fn(*args, **kwargs)
                os.truncate(path, os.path.getsize(path) // 2)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                                   "file data/0: file write failed")
            if name.endswith("safe_save_file"):
                from safetensors import SafetensorError
                fn(*args, **kwargs)
                os.truncate(path, os.path.getsize(path) // 2)
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise full
        return writer


class _TornFile:
    """A file the disk fills up under: the first write lands half, then ENOSPC."""

    def __init__(self, fh, error: OSError):
        self._fh, self._error = fh, error

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise self._error

    def writelines(self, lines):
        self.write("".join(lines))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def test_every_write_of_a_stage_refused_in_turn_leaves_it_resumable(tiny_model_dir, demos_file, tmp_path):
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={demos_file}", "train.batch_size=8",
            "train.max_steps=5", "train.save_every=2", "train.log_every=2", "data.eval_size=0", "train.lr=1e-3"]
    ref = tmp_path / "ref"
    with pytest.MonkeyPatch.context() as mp:
        count = FullDisk(mp, ref)
        _sft(args + [f"out_dir={ref}"])
    kinds = {name for name, _ in count.calls}
    assert len(count.calls) == 32  # 2 for config.yaml, 3 log rows, 2 checkpoints of 8 and 9, 8 for model/, 3 for DONE
    assert {"Accelerator.save_state", "torch.save", "builtins.open", "json.dump", "os.replace"} <= kinds
    assert any(p.startswith("model") for _, p in count.calls)  # the final model's writes are among them
    failures = {}
    for k in range(1, len(count.calls) + 1):
        out = tmp_path / f"k{k}"
        with pytest.MonkeyPatch.context() as mp:
            disk = FullDisk(mp, out, fail_at=k)
            with pytest.raises(StageError) as e:
                _sft(args + [f"out_dir={out}"])
        what, path = disk.calls[-1]
        msg = str(e.value)
        assert "could not write" in msg and "rerun the same command" in msg, msg
        assert "No space left on device" in msg or "file write failed" in msg, msg
        failures[k] = msg
        # what is left is either nothing to resume from or a whole checkpoint of a save_every step
        run = StageRun(SimpleNamespace(out_dir=str(out)), "sft")
        d = run.checkpoint_dir()
        if d is not None:
            assert json.load(open(os.path.join(d, "trainer_state.json")))["step"] in (2, 4)
            assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= \
                set(os.listdir(d)), (k, what, path)
        assert not (out / "DONE.json").exists()
        _sft(args + [f"out_dir={out}"])
        _assert_same_weights(ref, out)
        assert [m["step"] for m in read_metrics(str(out))] == [2, 4, 5], (k, what, path)
        assert sorted(os.listdir(out)) == [".lock", "DONE.json", "config.yaml", "metrics.jsonl", "model"], \
            (k, what, path)
    # the message names what could not be written: the checkpoint, the model, the log, DONE.json, the config
    named = " ".join(failures.values())
    for what in ("checkpoint", "model", "metrics.jsonl", "DONE.json", "config.yaml"):
        assert f"{tmp_path}" in named and f"/{what}" in named, what


def test_what_each_serialiser_raises_when_the_file_system_refuses_a_write_is_taken_for_one(tmp_path):
    """Past RLIMIT_FSIZE a write fails as on a full disk: torch.save raises a RuntimeError, safetensors a
    SafetensorError, open().write an OSError; each is a failed write (a StageError naming it), nothing else is."""
    code = (
        "import os, resource, signal, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from instructgpt.runs import failed_write\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))\n"
        "d = sys.argv[1]\n"
        "def write():\n"
        "    with open(os.path.join(d, 'c'), 'w') as fh:\n"
        "        fh.write('x' * 100_000)\n"
        "for f in (lambda: torch.save(torch.zeros(100_000), os.path.join(d, 'a')),\n"
        "          lambda: save_file({'a': torch.zeros(100_000)}, os.path.join(d, 'b')), write):\n"
        "    try:\n"
        "        f()\n"
        "        print('no error')\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, failed_write(e))\n"
        "print(failed_write(RuntimeError('shape mismatch')), failed_write(ValueError('x')))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.stdout.split("\n")[:4] == ["RuntimeError True", "SafetensorError True", "OSError True", "False False"], \
        r.stdout + r.stderr[-2000:]


def test_a_refused_checkpoint_in_ppo_resumes_from_the_one_before_without_doubling_its_logs(ppo_inputs, tmp_path,
                                                                                           monkeypatch):
    import accelerate
    extra = ("train.max_steps=6", "train.save_every=2", "ppo.sample_every=1")
    ref, out = tmp_path / "ref", tmp_path / "run"
    _ppo(_ppo_args(ppo_inputs, ref, *extra))
    saves, save_state = [], accelerate.Accelerator.save_state

    def second_save_refused(self, *a, **kw):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save_state(self, *a, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", second_save_refused)
    with pytest.raises(StageError, match=r"could not write .*checkpoint \(step 4\).*the checkpoint of step 2 is intact"):
        _ppo(_ppo_args(ppo_inputs, out, *extra))
    assert json.load(open(out / "checkpoint" / "trainer_state.json"))["step"] == 2
    assert not (out / "checkpoint.tmp").exists()
    monkeypatch.undo()
    _ppo(_ppo_args(ppo_inputs, out, *extra))
    _assert_same_weights(ref, out)
    samples = [json.loads(line)["step"] for line in open(out / "samples.jsonl")]
    assert samples == [json.loads(line)["step"] for line in open(ref / "samples.jsonl")]  # steps 3, 4 not twice
    assert [m["step"] for m in read_metrics(str(out))] == list(range(1, 7))


# --------------------------------------------------------------------------------------------------------------------
# Two ranks: the signal reaches one, both stop at the same step


def _torchrun(*args, check=True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.abspath(__file__), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert not check or r.returncode == 0, r.stderr[-3000:]
    return r


def test_under_ddp_a_signal_to_one_rank_stops_both_at_the_same_step(sft_reference, tmp_path):
    m, d = sft_reference["model"], sft_reference["demos"]
    _torchrun(m, d, str(tmp_path / "ref"), "0")
    r = _torchrun(m, d, str(tmp_path / "run"), "3", check=False)  # rank 1 alone gets SIGTERM during step 3
    assert r.returncode != 0 and "exitcode  : 143" in r.stderr, r.stderr[-3000:]
    assert "[sft] SIGTERM: checkpoint at step 3 written" in r.stdout + r.stderr
    assert _stopped_at(tmp_path / "run") == 3
    assert os.path.exists(tmp_path / "run" / "checkpoint" / "random_states_1.pkl")  # rank 1 saved its part too
    _torchrun(m, d, str(tmp_path / "run"), "0")
    _assert_same_weights(tmp_path / "ref", tmp_path / "run")


def _ddp_worker(model_dir: str, demos: str, out: str, signal_rank1_at: str) -> int:
    """SFT over two ranks; rank 1 sends itself SIGTERM after optimizer step `signal_rank1_at` (0: never)."""
    from instructgpt import supervised
    from instructgpt.cli import main
    at, steps, step = int(signal_rank1_at), [], supervised.optimizer_step

    def step_then_signal(*a, **kw):
        step(*a, **kw)
        steps.append(1)
        if len(steps) == at and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGTERM)

    supervised.optimizer_step = step_then_signal
    return main(["sft", *_sft_args(model_dir, demos, out, "train.max_steps=8", "train.batch_size=8")])


if __name__ == "__main__":
    sys.exit(_ddp_worker(*sys.argv[1:5]))
