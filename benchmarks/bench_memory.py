#!/usr/bin/env python
"""Long-run memory health: resident memory over ~2500 tiny training steps -> ``<out>/memory.json``.

A small ``audiovisual_relscore`` model (both frontends, reliability scorers, Conformer, decoder)
with train-time visual corruption and babble is trained with :class:`avsr.training.loop.Trainer`
on a few real GRID s1 clips (preprocessed into ``--work``, kept as a cache), with DataLoader
workers, periodic validation and checkpoints — every code path of a long run. A sampling thread
reads the process's resident set size (``/proc/self/status`` VmRSS, MB) beside the trainer's step
count; the slope of RSS against step over the second half of the run (after allocator warm-up),
in MB per 1000 steps, is the figure: a leak shows as a steady positive slope.
Target: |slope| < 20 MB per 1000 steps. Workers' memory is not counted (they are recycled every
epoch by the DataLoader).

    .venv/bin/python benchmarks/bench_memory.py --out benchmarks [--steps 1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from avsr.config import PreprocessConfig, load_config
from avsr.data.corpora import discover
from avsr.data.preprocess import preprocess
from avsr.training.loop import Trainer
from avsr.utils import real_data_dir, set_num_threads
from quiet import BenchRun

REPO = Path(__file__).resolve().parents[1]
TARGET_MB_PER_1000 = 20.0
MICRO = ["model.mode=audiovisual_relscore", "model.visual_width=8", "model.visual_stem_kernel_t=3",
         "model.audio_frontend=logmel", "model.audio_width=16", "model.frontend_dim=64", "model.d_model=64",
         "model.num_heads=2", "model.ffn_dim=128", "model.num_layers=2", "model.conv_kernel=15",
         "model.decoder_layers=1", "model.decoder_ffn_dim=128", "model.relscore_layers=2", "text.kind=char"]
log = logging.getLogger("bench_memory")


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux ``/proc``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise OSError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--work", default=str(REPO / "runs" / "bench_memory"), help="cache of the preprocessed clips")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--clips", type=int, default=16, help="GRID s1 train clips")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_num_threads()
    work = Path(args.work)
    utts = [u for u in discover("grid", real_data_dir() / "grid_s1_tvr28") if u.split == "train"][: args.clips]
    preprocess(utts, work / "data", PreprocessConfig(), workers=1, progress=False)
    cfg = load_config(REPO / "configs" / "grid" / "audiovisual_relscore.yaml", [
        f"data.root={work / 'data'}", f"train.exp_dir={work / 'exp'}", *MICRO, "train.init_from=''",
        "train.init_visual_from=''", "train.init_visual_share=0", "data.val_holdout=4", "data.max_frames=300",
        "data.num_workers=2",
        f"train.max_steps={args.steps}", "train.epochs=100000", f"train.eval_step={max(args.steps // 4, 1)}",
        f"train.save_step={max(args.steps // 2, 1)}", "train.log_step=100", "train.warmup_steps=50"])
    shutil.rmtree(work / "exp", ignore_errors=True)  # a fresh run every time
    run = BenchRun.start()
    trainer = Trainer(cfg)
    samples: list[tuple[int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((trainer.step, rss_mb()))
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    try:
        trainer.fit()
    finally:
        stop.set()
        thread.join()
    seconds = time.perf_counter() - t0
    steps = np.array([s for s, _ in samples], dtype=float)
    rss = np.array([r for _, r in samples])
    late = steps >= steps.max() / 2
    slope = float(np.polyfit(steps[late], rss[late], 1)[0] * 1000) if late.sum() > 2 and np.ptp(steps[late]) > 0 else None
    result = {
        "what": "RSS of the training process over tiny audiovisual_relscore steps (corruption on, 2 workers)",
        "machine": {"cpus": os.cpu_count()},
        "steps": trainer.step, "seconds": round(seconds, 1), "samples": len(samples),
        "rss_mb": {"start": round(float(rss[0]), 1), "peak": round(float(rss.max()), 1),
                   "end": round(float(rss[-1]), 1)},
        "slope_mb_per_1000_steps_second_half": None if slope is None else round(slope, 2),
        # allocator growth comes in steps (arena fragmentation), a leak as a ramp: compare windows too
        "rss_median_mb_by_tenth": [round(float(np.median(rss[(steps >= lo) & (steps <= lo + steps.max() / 10)])), 1)
                                   for lo in np.linspace(0, steps.max() * 0.9, 10)],
        "target_abs_slope_mb_per_1000_steps": TARGET_MB_PER_1000,
        "meets_target": slope is not None and abs(slope) < TARGET_MB_PER_1000,
        "trace": [[int(s), round(float(r), 1)] for s, r in samples[:: max(len(samples) // 100, 1)]],
    }
    out = Path(args.out) / "memory.json"
    run.write(out, result)
    log.info("RSS %.0f -> %.0f MB (peak %.0f) over %d steps; slope %s MB/1000 steps; wrote %s", rss[0], rss[-1],
             rss.max(), trainer.step, result["slope_mb_per_1000_steps_second_half"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
