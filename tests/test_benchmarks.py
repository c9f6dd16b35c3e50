"""The benchmark's own arithmetic (benchmarks/measure.py, benchmarks/run.py): FLOP counts and the PPO work summary."""

import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        import measure
        import run

        yield measure, run
    finally:
        sys.path.remove(BENCH)


def test_matmul_work_counts_2mnk_per_matmul_and_divides_by_updates(bench):
    measure, _ = bench
    a, b, c = torch.randn(64, 32), torch.randn(32, 16), torch.randn(5, 8, 12)
    d, bias = torch.randn(5, 12, 4), torch.randn(16)

    def three_updates():
        for _ in range(3):
            torch.mm(a, b)  # 2 * 64 * 32 * 16
            torch.addmm(bias, a, b)  # the same, the bias add not counted
            torch.bmm(c, d)  # 2 * 5 * 8 * 12 * 4
            torch.softmax(a, -1)  # not a matmul: time only
        return "done"

    result, work = measure.matmul_work(three_updates, updates=3)
    assert result == "done"
    per_update = 2 * (2 * 64 * 32 * 16) + 2 * 5 * 8 * 12 * 4
    assert work["matmul_gflop_per_update"] == pytest.approx(per_update / 1e9, rel=1e-9)
    assert 0 < work["matmul_s_per_update"] < work["op_s_per_update"]


def test_ppo_work_summary(bench):
    _, run = bench
    pair = {"ours": {"matmul_gflop_per_update": 400.0, "matmul_s_per_update": 4.0, "op_s_per_update": 5.0,
                     "matmul_gflops": 100.0},
            "trl": {"matmul_gflop_per_update": 500.0, "matmul_s_per_update": 5.5, "op_s_per_update": 9.0,
                    "matmul_gflops": 91.0}}
    # TRL's seconds an update in three repetitions, the first update of each left out (warm-up): median 7.0
    ppo = {"seconds_per_update": {"trl": [[20.0, 6.0, 7.0], [30.0, 8.0, 7.0], None]}}
    w = run.ppo_work(pair, ppo)
    assert w["flop_ratio"] == 1.25
    assert w["ours_matmul_share"] == 0.8
    assert w["ratio_if_only_matmuls"] == 1.75  # 7.0 / 4.0
    assert "ratio_if_only_matmuls" not in run.ppo_work(pair, None)
    failed = run.ppo_work({"ours": pair["ours"], "trl": {"error": "rc=1"}}, ppo)
    assert failed["trl"] == {"error": "rc=1"} and "flop_ratio" not in failed


def figure(ratio: float, rss: float) -> dict:
    return {"ratio": ratio, "rss_mb": {"ours": rss, "trl": 2 * rss}}


def test_only_re_measures_its_figures_and_keeps_the_others(bench):
    _, run = bench
    settings = {"mode": "full", "reps": 3, "threads": 1, "gen_batches": [1, 8], "ppo": "a note on the workload"}
    previous = {"mode": "full", "ratio.sft": 2.0, "ratio.ppo": 1.2, "ratio.rm_k9": 9.0,
                "raw": {"sft": figure(2.0, 900), "ppo": figure(1.2, 1000), "rm_k9": figure(9.0, 700)},
                "peak_rss_mb": {"sft": {"ours": 900}, "ppo": {"ours": 1000}, "rm_k9": {"ours": 700}},
                "scaling": {"ours": [1]}, "ppo_work": {"flop_ratio": 1.1}, "settings": settings,
                "versions": {"torch": "2.13.0", "trl (PPO)": "1.12.0"},
                "machine": {"cpus": 2, "wall_minutes": 19.6, "remeasured": [
                    {"figures": ["rm_k9", "ppo"], "command": "run.py --only rm_k9,ppo", "wall_minutes": 5.0,
                     "load_average_at_end": [1.0]},
                    {"figures": ["ppo_work"], "command": "run.py --only ppo_work", "wall_minutes": 1.0,
                     "load_average_at_end": [1.0]}]}}
    fresh = {"mode": "full", "ratio.sft": None, "ratio.ppo": 1.5, "raw": {"ppo": figure(1.5, 1100)},
             "peak_rss_mb": {"ppo": {"ours": 1100, "trl": 2200}}, "ppo_work": {"flop_ratio": 1.4},
             "settings": {**settings, "gen_batches": (1, 8), "ppo": "the note, reworded"},
             "versions": {"torch": "2.14.0"}, "machine": {"cpus": 2, "wall_minutes": 4.0, "load_average_at_end": [1.5]}}
    # a run's settings as a file holds them (tuples as lists); the notes that describe them may change
    assert run.same_workload(previous, fresh)
    m = run.merged(previous, fresh, "python benchmarks/run.py --only ppo,ppo_work")
    assert (m["ratio.ppo"], m["raw"]["ppo"]["ratio"]) == (1.5, 1.5)
    assert m["peak_rss_mb"]["ppo"] == {"ours": 1100, "trl": 2200}
    assert m["ppo_work"] == {"flop_ratio": 1.4}
    # what this run did not measure stays: the SFT ratio is not the fresh run's null
    assert (m["ratio.sft"], m["raw"]["sft"], m["ratio.rm_k9"], m["scaling"]) == (2.0, figure(2.0, 900), 9.0,
                                                                                   {"ours": [1]})
    assert m["versions"] == {"torch": "2.14.0", "trl (PPO)": "1.12.0"}
    assert m["machine"]["wall_minutes"] == 19.6 and m["machine"]["cpus"] == 2
    # each figure is credited to the run that measured it last; a record left with none is dropped
    assert [(r["figures"], r["command"]) for r in m["machine"]["remeasured"]] == [
        (["rm_k9"], "run.py --only rm_k9,ppo"), (["ppo", "ppo_work"], "python benchmarks/run.py --only ppo,ppo_work")]
    assert previous["ratio.ppo"] == 1.2 and len(previous["machine"]["remeasured"]) == 2  # not changed in place
    other = {**fresh, "settings": {**settings, "reps": 1}}
    assert not run.same_workload(previous, other) and not run.same_workload(previous, {**fresh, "mode": "quick"})
