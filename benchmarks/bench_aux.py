#!/usr/bin/env python
"""Auxiliary tasks on real GRID -> ``<out>/aux.json``.

1. Data: GRID s1 (450 train / 50 test clips) and the unseen speakers of ``grid_lipnet_samples``
   (10 clips, 9 speakers; ``bbaf2n`` is s1 and in s1's train split, so it is left out) are
   preprocessed with ``avsr.data.preprocess`` into ``--work`` (kept as a cache: a second run skips
   this). ``grid_lipnet_samples`` is used for evaluation only: nothing is trained or tuned on it.
2. Audio → mouth opening (:mod:`avsr.lipsync.model`, recipe :mod:`avsr.lipsync.train`): the
   bidirectional model and the causal streaming variant (1 mel frame of look-ahead, 30 ms) trained on the
   s1 train split; Pearson r, MAE and R² on s1 test and on the unseen speakers, pooled over all
   frames and averaged per utterance, beside an energy-envelope baseline (per-frame mean log-mel).
   Targets (issue 10): r >= 0.85 on s1 test, >= 0.65 on unseen speakers; the report says which of
   pooled / per-utterance meets them.
3. Lip-to-speech on s1 test with the eigenlip recipe of :mod:`avsr.lip2speech` (STOI/ESTOI
   against the real audio, beside Griffin-Lim of the real mel).

Keep it under ~5 minutes on the 2-core machine once ``--work`` holds the preprocessed clips
(the first run adds ~1-2 minutes of preprocessing).

    .venv/bin/python benchmarks/bench_aux.py --out benchmarks [--work runs/bench_aux]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from avsr.config import PreprocessConfig
from avsr.data.corpora import discover
from avsr.data.preprocess import preprocess
from avsr.evaluation.aux_metrics import curve_metrics
from avsr.lip2speech import train_eval_lip2speech
from avsr.lipsync.train import (MOUTH_OPENING, MOUTH_OPENING_ARGS, LipSyncData, LipSyncTrainConfig,
                                energy_envelope_curves, evaluate_lipsync_model, load_lipsync_data, train_lipsync_model)
from avsr.utils import real_data_dir, set_num_threads
from quiet import BenchRun

log = logging.getLogger("bench_aux")

TARGETS = {"s1_test": 0.85, "unseen": 0.65}
S1_IN_LIPNET = "bbaf2n"  # GRID s1, in s1's train split: not an unseen speaker


def prepare(work: Path, data_dir: Path, workers: int) -> dict:
    """Preprocess GRID s1 and the unseen speakers into ``work`` (resumable); returns what was done."""
    t0 = time.perf_counter()
    unseen = [u for u in discover("grid", data_dir / "grid_lipnet_samples", split="unseen") if u.utt_id != S1_IN_LIPNET]
    s_unseen = preprocess(unseen, work / "unseen", PreprocessConfig(), workers=1, progress=False)
    s_grid = preprocess(discover("grid", data_dir / "grid_s1_tvr28"), work / "grid", PreprocessConfig(),
                        workers=workers, progress=False)
    return {"seconds": round(time.perf_counter() - t0, 1), "new_clips": s_grid.kept + s_unseen.kept,
            "cached_clips": s_grid.resumed + s_unseen.resumed,
            "failed": [f"{u.utt_id}: {why}" for u, why in s_grid.failures + s_unseen.failures],
            "excluded_from_unseen": [S1_IN_LIPNET]}


def _summary(metrics: dict) -> dict:
    return {"pooled": {k: round(v, 4) for k, v in metrics["pooled"].items()},
            "utterance_mean": {k: round(v, 4) for k, v in metrics["utterance_mean"].items()},
            "n_utterances": metrics["n_utterances"]}


def _masked(curves: list[np.ndarray], data: LipSyncData) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return ([c[m.numpy()] for c, m in zip(curves, data.masks)],
            [t[m.numpy()] for t, m in zip(data.curve(MOUTH_OPENING), data.masks)])


def bench_mouth(train: LipSyncData, evals: dict[str, LipSyncData], steps: int, causal_steps: int) -> dict:
    """Train the bidirectional and the causal model; metrics on every evaluation set."""
    out: dict = {"targets_pearson": TARGETS, "energy_baseline": {}}
    for name, data in evals.items():
        out["energy_baseline"][name] = _summary(curve_metrics(*_masked(energy_envelope_curves(data), data)))
    variants = {"bidirectional": (dict(MOUTH_OPENING_ARGS), steps),
                "causal_lookahead1": (dict(MOUTH_OPENING_ARGS, core="causal_gru", lookahead=1, stride=1), causal_steps)}
    for variant, (args, n_steps) in variants.items():
        if n_steps <= 0:
            continue
        t0 = time.perf_counter()
        model, history = train_lipsync_model(train, args, LipSyncTrainConfig(steps=n_steps))
        res = {"model_args": args, "parameters": sum(p.numel() for p in model.parameters()), "steps": n_steps,
               "train_seconds": round(time.perf_counter() - t0, 1),
               "step_time_median_s": round(history["step_time_median_s"], 4)}
        for name, data in evals.items():
            metrics = evaluate_lipsync_model(model, data)["curves"][MOUTH_OPENING]
            res[name] = _summary(metrics)
            if name == "unseen":
                res[name]["per_utterance_pearson"] = {u: round(m["pearson"], 3) for u, m in metrics["utterances"].items()}
            log.info("%s %s: r pooled %.3f, per-utterance mean %.3f", variant, name,
                     metrics["pooled"]["pearson"], metrics["utterance_mean"]["pearson"])
        res["meets_target"] = {f"{name}_{how}": bool(res[name][how]["pearson"] >= TARGETS[name])
                               for name in evals for how in ("pooled", "utterance_mean")}
        out[variant] = res
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="output folder (writes aux.json)")
    parser.add_argument("--work", default="runs/bench_aux", help="cache of the preprocessed clips")
    parser.add_argument("--data", default=None, help="folder holding grid_s1_tvr28/ (default: $AVSR_DATA)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    parser.add_argument("--mouth-steps", type=int, default=1000)
    parser.add_argument("--causal-steps", type=int, default=600, help="0 skips the causal model")
    parser.add_argument("--l2s-steps", type=int, default=250, help="0 skips lip-to-speech")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_num_threads()
    work = Path(args.work)
    data_dir = Path(args.data) if args.data else real_data_dir()
    run = BenchRun.start()
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "python": platform.python_version()}}
    report["data"] = prepare(work, data_dir, args.workers)
    train = load_lipsync_data(work / "grid", "train")
    evals = {"s1_test": load_lipsync_data(work / "grid", "test"), "unseen": load_lipsync_data(work / "unseen", "unseen")}
    report["data"].update(s1_train=len(train), s1_test=len(evals["s1_test"]), unseen=len(evals["unseen"]))
    report["mouth_opening"] = bench_mouth(train, evals, args.mouth_steps, args.causal_steps)
    if args.l2s_steps > 0:
        report["lip2speech"] = train_eval_lip2speech(work / "grid", args.l2s_steps)
        report["lip2speech"]["s1_test"] = report["lip2speech"].pop("test")
        log.info("lip-to-speech s1 test: STOI %.3f, ESTOI %.3f", report["lip2speech"]["s1_test"]["stoi"],
                 report["lip2speech"]["s1_test"]["estoi"])
    out = Path(args.out) / "aux.json"
    run.write(out, report)
    log.info("wrote %s (%.0f s)", out, report["run"]["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
