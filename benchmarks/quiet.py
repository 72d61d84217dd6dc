"""Benchmark hygiene shared by every ``benchmarks/bench_*.py`` (``make bench``).

A timing taken beside another job measures the other job. Each benchmark therefore starts with
:meth:`BenchRun.start`, which waits (bounded) until the 1-minute load average is at most
``max_load``, and ends with :meth:`BenchRun.write`, which adds a ``"run"`` block to its JSON::

    "run": {"valid": true, "invalid_reason": null,
            "max_start_load": 1.2, "waited_s": 12.0,
            "load_avg_1min_start": 0.64, "load_avg_1min_end": 1.91,
            "wall_s": 83.1, "cpu_s": 160.2, "threads": 2}

``cpu_s`` is the user + system time of the process and of the child processes it waited for
(``os.times``). A run whose machine never went quiet within ``wait_s`` is written with
``"valid": false`` and the reason: its figures are kept for inspection but are not a result.
``AVSR_BENCH_MAX_LOAD`` and ``AVSR_BENCH_WAIT_S`` override the defaults (1.2 and 600 s).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MAX_START_LOAD = 1.2
WAIT_S = 600.0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class BenchRun:
    """One benchmark run: the load it started at, how long it waited, its wall and CPU clocks."""

    max_load: float
    load_start: float
    waited_s: float
    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=_cpu_seconds)

    @classmethod
    def start(cls, max_load: Optional[float] = None, wait_s: Optional[float] = None, poll_s: float = 5.0,
              loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
              sleep: Callable[[float], None] = time.sleep) -> "BenchRun":
        """Wait until the 1-minute load average is at most ``max_load`` or ``wait_s`` seconds have
        passed, then start the clocks. ``loadavg`` and ``sleep`` are injectable for tests."""
        max_load = float(os.environ.get("AVSR_BENCH_MAX_LOAD", MAX_START_LOAD)) if max_load is None else max_load
        wait_s = float(os.environ.get("AVSR_BENCH_WAIT_S", WAIT_S)) if wait_s is None else wait_s
        waited = 0.0
        load = loadavg()[0]
        while load > max_load and waited < wait_s:
            step = min(poll_s, wait_s - waited)
            sleep(step)
            waited += step
            load = loadavg()[0]
        return cls(max_load=max_load, load_start=round(load, 2), waited_s=round(waited, 1))

    @property
    def valid(self) -> bool:
        return self.load_start <= self.max_load

    def record(self, threads: Optional[int] = None) -> dict:
        """The ``"run"`` block: validity, load before and after, wall and CPU seconds so far."""
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        return {"valid": self.valid,
                "invalid_reason": None if self.valid else (
                    f"1-minute load average {self.load_start} > {self.max_load} after waiting {self.waited_s} s: "
                    "other jobs shared the CPU, these timings are not a result"),
                "max_start_load": self.max_load, "waited_s": self.waited_s,
                "load_avg_1min_start": self.load_start, "load_avg_1min_end": round(os.getloadavg()[0], 2),
                "wall_s": round(time.perf_counter() - self.wall0, 2), "cpu_s": round(_cpu_seconds() - self.cpu0, 2),
                "threads": threads}

    def write(self, path: Path, report: dict, threads: Optional[int] = None) -> dict:
        """Add the ``"run"`` block to ``report`` and write it atomically as JSON to ``path``."""
        from avsr.utils import atomic_write_text

        report["run"] = self.record(threads)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        if not self.valid:
            print(f"{path}: INVALID: {report['run']['invalid_reason']}")
        return report
