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
