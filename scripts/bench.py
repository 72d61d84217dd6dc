#!/usr/bin/env python
"""Run the benchmarks (``make bench``): every ``benchmarks/bench_*.py``, each writing its JSON.

Each benchmark runs in its own process (so one that fails or runs out of memory does not take the
others down) with ``--out <folder>``; a failure is reported with its exit status and the run goes
on. Each waits for a quiet machine and records its load, wall and CPU time (``benchmarks/quiet.py``).
Exit status 0 when all ran, 1 when any failed.

    .venv/bin/python scripts/bench.py --out benchmarks [--only model decoding]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")


def available() -> dict[str, Path]:
    """Benchmark name (``bench_<name>.py``) → script path."""
    return {p.stem.removeprefix("bench_"): p for p in sorted((REPO / "benchmarks").glob("bench_*.py"))}


def main(argv: list[str] | None = None) -> int:
    benches = available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks"), help="folder the JSON results go to")
    p.add_argument("--only", nargs="+", choices=sorted(benches), help="run only these benchmarks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed = []
    for name in args.only or list(benches):
        t0 = time.perf_counter()
        log.info("running %s", benches[name].name)
        rc = subprocess.call([sys.executable, str(benches[name]), "--out", args.out], cwd=REPO)
        log.info("%s: %s in %.0f s", name, "ok" if rc == 0 else f"FAILED (exit {rc})", time.perf_counter() - t0)
        if rc != 0:
            failed.append(name)
    if failed:
        log.error("failed benchmarks: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
