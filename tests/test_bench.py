"""Benchmark hygiene (benchmarks/quiet.py): a run waits for a quiet machine, and one that never
gets it is written as invalid, not as a result. The GPU check stands aside on a CPU machine."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quiet import BenchRun  # noqa: E402


def _loads(*values):
    seq = list(values)
    return lambda: (seq.pop(0) if len(seq) > 1 else seq[0], 0.0, 0.0)


def test_a_busy_machine_is_waited_for_until_it_goes_quiet(tmp_path):
    slept = []
    run = BenchRun.start(max_load=1.2, wait_s=60, poll_s=5, loadavg=_loads(3.0, 2.0, 1.0), sleep=slept.append)
    assert slept == [5, 5] and run.waited_s == 10 and run.load_start == 1.0 and run.valid
    report = run.write(tmp_path / "x.json", {"figure": 1.0}, threads=2)
    on_disk = json.loads((tmp_path / "x.json").read_text())
    assert on_disk == report and on_disk["figure"] == 1.0
    r = on_disk["run"]
    assert r["valid"] is True and r["invalid_reason"] is None and r["threads"] == 2
    assert r["wall_s"] >= 0 and r["cpu_s"] >= 0 and "load_avg_1min_end" in r


def test_a_machine_that_stays_busy_marks_the_run_invalid(tmp_path):
    slept = []
    run = BenchRun.start(max_load=1.2, wait_s=12, poll_s=5, loadavg=_loads(4.0), sleep=slept.append)
    assert slept == [5, 5, 2] and not run.valid
    r = run.write(tmp_path / "x.json", {}, threads=1)["run"]
    assert r["valid"] is False and "4.0 > 1.2" in r["invalid_reason"]
    assert json.loads((tmp_path / "x.json").read_text())["run"]["valid"] is False


def test_cpu_time_counts_the_work_done_between_start_and_write(tmp_path):
    run = BenchRun.start(max_load=100.0, wait_s=0)
    x = 0
    for i in range(3_000_000):
        x += i
    r = run.record(threads=1)
    assert r["cpu_s"] > 0.05 and r["wall_s"] >= r["cpu_s"] * 0.5


def test_gpu_check_without_cuda_says_so_and_writes_nothing(tmp_path):
    """scripts/gpu_check.sh on a machine without CUDA exits 0, says why, and writes no JSON."""
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real (minutes)")
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and not out.exists()
