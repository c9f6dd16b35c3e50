"""What every benchmark worker shares, ours and TRL's alike: threads, step timing, peak RSS, the result file, and
the held-out ranking accuracy of a reward model.

Standard library only at import time (torch is imported inside the functions that need it), and nothing from
`instructgpt` or `trl`, so both sides load exactly the same helper code.
"""

from __future__ import annotations

import json
import os
import sys
import time


def setup(threads: int) -> None:
    """Same intra-op threads on both sides; offline; quiet TRL's 'experimental' banner."""
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """End-of-step timestamps and the work done in each step (tokens, comparisons ...).

    The rate is taken over steps `warmup`.. only: the first steps pay for lazy initialisation (allocator, kernels,
    the optimizer's state) on both sides, and neither side's steady state should carry that.
    """

    def __init__(self):
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # CPU seconds of this process (all threads) at each step end
        self.amounts: list[float] = []
        self.start()

    def start(self) -> None:
        self.t0, self.cpu_t0 = time.perf_counter(), time.process_time()

    def step_done(self, amount: float) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.amounts.append(amount)

    def step_seconds(self) -> list[float]:
        starts = [self.t0] + self.ends[:-1]
        return [round(e - s, 4) for s, e in zip(starts, self.ends)]

    def step_cpu_seconds(self) -> list[float]:
        starts = [self.cpu_t0] + self.cpu_ends[:-1]
        return [round(e - s, 4) for s, e in zip(starts, self.cpu_ends)]

    def rate(self, warmup: int) -> float:
        """Work per second over steps warmup..end (time from the end of step warmup-1 to the end of the last)."""
        if len(self.ends) <= warmup:
            raise RuntimeError(f"only {len(self.ends)} steps timed, need more than the {warmup} warm-up steps")
        start = self.ends[warmup - 1] if warmup else self.t0
        return sum(self.amounts[warmup:]) / (self.ends[-1] - start)

    def cpu_rate(self, warmup: int) -> float:
        """Work per CPU second of this process over the same steps: a cross-check that other load on a shared
        machine disturbs less than wall time (both sides' threads count, spin-waits included)."""
        warmup = max(warmup, 1)
        return sum(self.amounts[warmup:]) / (self.cpu_ends[-1] - self.cpu_ends[warmup - 1])

    def figures(self, warmup: int) -> dict:
        return {"throughput": self.rate(warmup), "cpu_throughput": self.cpu_rate(warmup),
                "step_seconds": self.step_seconds()}

    def update_callback(self, episodes: int):
        """A TrainerCallback for TRL's RL trainers: the clock starts at `on_train_begin` and stamps each update's
        end (`on_step_end`), `episodes` a stamp."""
        from transformers import TrainerCallback

        clock = self

        class UpdateClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.start()

            def on_step_end(self, args, state, control, **kwargs):
                clock.step_done(episodes)

        return UpdateClock()

    def update_figures(self, episodes: int) -> dict:
        """Seconds per update (wall, CPU) and episodes/s over the updates after the first (warm-up)."""
        secs, cpu = self.step_seconds(), self.step_cpu_seconds()
        timed, timed_cpu = secs[1:] or secs, cpu[1:] or cpu
        return {"seconds_per_update": secs, "cpu_seconds_per_update": cpu,
                "episodes_per_s": episodes * len(timed) / sum(timed),
                "episodes_per_cpu_s": episodes * len(timed_cpu) / sum(timed_cpu)}


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_work(fn, updates: int) -> tuple[object, dict]:
    """Run `fn()` (`updates` PPO updates) under the PyTorch profiler and count the work its operators did: (fn's result,
    {matmul_gflop_per_update, matmul_s_per_update, op_s_per_update, matmul_gflops}). Matmul FLOPs are the profiler's
    count for mm / addmm / bmm (2 m n k each); the seconds are operators' own CPU time (the profiler's "self CPU"),
    so `op_s_per_update` leaves out Python and the time between operators. Every update does the same work on
    both sides (fixed-length responses), so the first update's setup is spread over all of them alike."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        result = fn()
    events = prof.key_averages()
    flops = sum(e.flops for e in events if e.key in MATMULS)
    mm_s = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
    op_s = sum(e.self_cpu_time_total for e in events) / 1e6
    return result, {"matmul_gflop_per_update": flops / 1e9 / updates, "matmul_s_per_update": mm_s / updates,
                    "op_s_per_update": op_s / updates, "matmul_gflops": flops / 1e9 / mm_s if mm_s else None}


def read_spec() -> tuple[str, dict, str]:
    """Worker command line: TASK SPEC.json OUT.json -> (task, spec, out path)."""
    if len(sys.argv) != 4:
        raise SystemExit(f"usage: {sys.argv[0]} TASK SPEC.json OUT.json")
    with open(sys.argv[2], encoding="utf-8") as fh:
        return sys.argv[1], json.load(fh), sys.argv[3]


def run_worker(side: str, tasks: dict, versions) -> None:
    """A worker's main: read the command line, set threads, run `tasks[TASK](spec, out)`, write its result with the
    library versions (torch and transformers, plus `versions(task)`: the side's own)."""
    task, spec, out = read_spec()
    setup(spec["threads"])
    if task not in tasks:
        raise SystemExit(f"unknown task {task}")
    result = tasks[task](spec, out)
    import torch
    import transformers

    write_result(out, {"side": side, "task": task, **result,
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    **versions(task)}})


def write_result(path: str, result: dict) -> None:
    result = {**result, "rss_mb": round(peak_rss_mb(), 1)}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


def load_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def ranking_accuracy(model, heldout: list[dict], pad_token_id: int, batch_size: int = 64) -> float:
    """Share of held-out non-tied pairs (w better than l) with r(w) > r(l), for any *ForSequenceClassification model
    with num_labels=1. Each response is scored once, right-padded; the model reads its last non-pad token.

    heldout: [{"seqs": [[token ids] x K], "ranks": [K ints, 1 = best]}].
    """
    import torch

    rows = [s for item in heldout for s in item["seqs"]]
    scores: list[float] = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    model.train(was)
    right = total = pos = 0
    for item in heldout:
        r, ranks = scores[pos:pos + len(item["seqs"])], item["ranks"]
        pos += len(ranks)
        for w in range(len(ranks)):
            for l in range(len(ranks)):
                if ranks[w] < ranks[l]:
                    right, total = right + (r[w] > r[l]), total + 1
    return right / max(total, 1)
