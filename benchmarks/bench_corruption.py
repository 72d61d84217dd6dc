#!/usr/bin/env python
"""Cost of corruption per clip: visual kinds on a 75-frame 96x96 clip, audio noise on 3 s at 16 kHz.

Timing does not depend on pixel content, so the clip is synthetic (random frames, lip landmarks
on an ellipse around the ROI centre). Writes ``<out>/corruption.json`` with the median and 90th
percentile milliseconds per clip of each operation (spec sampling + rendering)::

    .venv/bin/python benchmarks/bench_corruption.py --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from avsr.corruption import (
    VISUAL_KINDS,
    OccluderBank,
    WaveBank,
    apply_audio_spec,
    apply_visual_spec,
    sample_audio_spec,
    sample_visual_spec,
)
from avsr.utils import set_num_threads
from quiet import BenchRun


def _clip(rng: np.random.Generator, T: int = 75) -> tuple[np.ndarray, np.ndarray]:
    frames = rng.integers(0, 256, (T, 96, 96), dtype=np.uint8)
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    ring = np.stack([48 + 18 * np.cos(angles), 58 + 8 * np.sin(angles)], axis=1)
    wobble = rng.normal(0, 1.0, (T, 1, 2))
    return frames, (ring[None] + wobble).astype(np.float32)


def _time(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up (lazy imports, caches)
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks", help="folder for corruption.json")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    set_num_threads()
    run = BenchRun.start()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    bank = OccluderBank.builtin()
    results: dict[str, dict] = {"builtin_bank_build": {"ms": round(1000 * (time.perf_counter() - t0), 1)}}
    frames, landmarks = _clip(rng)
    for kind in VISUAL_KINDS:
        results[f"visual_{kind}"] = _time(
            lambda k=kind: apply_visual_spec(frames, landmarks, sample_visual_spec(75, rng, bank, k), bank),
            args.repeats)
    speech = rng.normal(0, 0.1, 48000).astype(np.float32)
    source = WaveBank.from_arrays({f"u{i}": rng.normal(0, 0.1, 48000).astype(np.float32) for i in range(20)})
    for kind in ("babble", "white"):
        results[f"audio_{kind}"] = _time(
            lambda k=kind: apply_audio_spec(speech, sample_audio_spec(48000, rng, k, 0.0, babble_ids=source.ids),
                                            source), args.repeats)
    report = {"what": "corruption cost per clip (75 frames 96x96 / 48000 samples), spec sampling + rendering",
              "machine": platform.processor() or platform.machine(), "threads": 2,
              "results": results}
    run.write(Path(args.out) / "corruption.json", report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
