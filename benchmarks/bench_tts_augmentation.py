#!/usr/bin/env python
"""Few-shot lip sync with TTS data augmentation (``make tts-study``) -> ``<out>/tts_augmentation.json``
and a plot (after Chen et al., "Improving Few-shot Learning for Talking Face System with TTS Data
Augmentation", ICASSP 2023).

The lip-sync model of ``make lipsync-bench`` (``avsr_bigru``: its core, size, step budget and
speed-perturbed copies; curves only, no viseme head) is trained on 25, 50, 100 and all real GRID s1
train clips (nested seeded subsets), each

- ``real_only``: on the real clips alone (frame-wise Huber);
- ``with_tts``: plus ``--renditions`` eSpeak NG renditions of the same clips' sentences in the
  training voices (:data:`avsr.lipsync.tts.TRAIN_VOICES`, seeded rate and pitch), paired with the
  recorded tracks and trained with the soft-DTW divergence (:func:`avsr.lipsync.train.load_tts_pairs`),

for the same number of steps. Scored (mouth opening and jawOpen, face-detected frames, pooled r
after per-speaker standardisation, as in ``lipsync.json``) on

- ``s1_test``: GRID s1 test (the trained speaker, other sentences);
- ``unseen``, ``s4_test``: real voices the model never heard (``grid_lipnet_samples``; the
  ``grid_s4_vid2speech`` test split);
- ``tts_heldout_voices``: one rendition of each s1 test sentence in each held-out voice
  (:data:`avsr.lipsync.tts.HELDOUT_VOICES`, never trained on); the predicted curve is carried onto
  s1's recorded track of the same sentence through the DTW path between the two audios' MFCCs
  (:func:`avsr.evaluation.aux_metrics.dtw_warp`) and scored against that track.

Models, TTS audio and preprocessed clips are cached under ``--work``: a rerun resumes.

    .venv/bin/python benchmarks/bench_tts_augmentation.py --out benchmarks [--plot docs/tts_augmentation.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from avsr.audio_features import N_MELS  # noqa: E402
from avsr.data.manifest import read_manifest  # noqa: E402
from avsr.evaluation.aux_metrics import dtw_warp  # noqa: E402
from avsr.lipsync.model import load_lipsync_model, to_video_rate  # noqa: E402
from avsr.lipsync.train import (CURVES, LIPSYNC_SPEEDS, MOUTH_OPENING, LipSyncTrainConfig, load_lipsync_data,  # noqa: E402
                                load_tts_pairs, predict, save_lipsync_checkpoint, train_lipsync_model)
from avsr.lipsync.tts import ENGINE, HELDOUT_VOICES, RATE_WPM, PITCH, TRAIN_VOICES, synthesize_corpus  # noqa: E402
from bench_lipsync import CORES, MODEL_ARGS, _r, start  # noqa: E402

log = logging.getLogger("bench_tts_augmentation")

SYSTEM = "avsr_bigru"  #: the core of ``lipsync.json`` the study trains
CONDITIONS = ("real_only", "with_tts")
TEST_SETS = ("s1_test", "unseen", "s4_test", "tts_heldout_voices")
N_MFCC = 13


def _mfcc(mel: torch.Tensor) -> np.ndarray:
    """25 fps MFCCs ``(T, 13)`` of a 100 fps log-mel ``(F, 80)``, mean and variance normalised."""
    c = to_video_rate(mel) @ AF.create_dct(N_MFCC, N_MELS, norm="ortho")
    return ((c - c.mean(0)) / c.std(0).clamp_min(1e-5)).numpy()


def _scores(model, data, speakers: list[str], recorded: dict | None = None) -> dict[str, float]:
    """Pooled mouth-opening and jawOpen r of ``model`` on ``data``. With ``recorded`` (``{utt_id:
    (log-mel, curves, mask)}`` of the real clips the TTS renditions in ``data`` say), each prediction
    is carried onto its recorded clip through the MFCC DTW path and scored against that clip's track."""
    preds = [p["curves"] for p in predict(model, data)]
    truth, masks = data.curves, data.masks
    if recorded is not None:
        rec = [recorded[u.rsplit("_tts", 1)[0]] for u in data.utt_ids]
        warped = []
        for p, mel, (real_mel, _, _) in zip(preds, data.mels, rec):
            q = _mfcc(mel)
            n = min(len(p), len(q))
            warped.append(dtw_warp(p[:n], q[:n], _mfcc(real_mel)))
        preds, truth, masks = warped, [c for _, c, _ in rec], [k for _, _, k in rec]
    return {name: _r([p[:, k] for p in preds], [t[:, k].numpy() for t in truth], [m.numpy() for m in masks],
                     speakers)["pooled"]
            for k, name in enumerate(model.curves) if name in (MOUTH_OPENING, "jawOpen")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="output folder (writes tts_augmentation.json)")
    parser.add_argument("--plot", default=str(REPO / "docs" / "tts_augmentation.png"), help="plot ('' skips it)")
    parser.add_argument("--work", default="runs/bench_lipsync", help="cache shared with make lipsync-bench")
    parser.add_argument("--data", default=None, help="folder holding the GRID folders (default: $AVSR_DATA)")
    parser.add_argument("--real-clips", type=int, nargs="+", default=[25, 50, 100, 0],
                        help="real s1 train clips per point (0: all)")
    parser.add_argument("--renditions", type=int, default=4, help="TTS renditions per training sentence")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of every model")
    parser.add_argument("--seed", type=int, default=0, help="clip subsets, TTS settings and training")
    args = parser.parse_args(argv)
    run, work, sets = start(args)
    load = dict(curves=list(CURVES))
    data = {name: load_lipsync_data(root, split, speaker_of=lambda u, s=spk: s.get(u, ""),
                                    speed_perturb=LIPSYNC_SPEEDS if name == "train" else (), **load)
            for name, (root, split, spk) in sets.items()}
    texts = {name: {r.utt_id: r.transcript for r in read_manifest(root, split)}
             for name, (root, split, _) in sets.items()}
    base = data["train"].subset([u in texts["train"] for u in data["train"].utt_ids])  # without the copies
    tts_train = load_tts_pairs(synthesize_corpus(texts["train"], work / "tts" / "train", args.renditions,
                                                 TRAIN_VOICES, args.seed), base)
    heldout = [dataclasses.replace(r, k=i) for i, v in enumerate(HELDOUT_VOICES)  # k: the voice's index
               for r in synthesize_corpus(texts["s1_test"], work / "tts" / "heldout", 1, (v,), args.seed)]
    voice_of = {f"{h.utt_id}_tts{h.k}": h.voice for h in heldout}
    tts_test = load_tts_pairs(heldout, data["s1_test"])
    s1 = data["s1_test"]
    recorded = {u: (m, c, k) for u, m, c, k in zip(s1.utt_ids, s1.mels, s1.curves, s1.masks)}

    order = np.random.default_rng(args.seed).permutation(sorted(texts["train"]))
    sizes = [n if 0 < n < len(order) else len(order) for n in args.real_clips]
    r = {c: {t: [] for t in TEST_SETS} for c in CONDITIONS}
    jaw = {c: {t: [] for t in TEST_SETS} for c in CONDITIONS}
    minutes = {c: [] for c in CONDITIONS}
    model_args = dict(curves=list(CURVES), **MODEL_ARGS, **CORES[SYSTEM])
    cfg = LipSyncTrainConfig(steps=args.steps, seed=args.seed)
    for n in sizes:
        chosen = set(order[:n])
        train = data["train"].subset([u.split("_sp")[0] in chosen for u in data["train"].utt_ids])
        tts = tts_train.subset([u.rsplit("_tts", 1)[0] in chosen for u in tts_train.utt_ids])
        for cond in CONDITIONS:
            path = work / "tts_study" / f"{cond}_{n}_{args.steps}_seed{args.seed}_r{args.renditions}.pt"
            if not path.is_file():
                t0 = time.perf_counter()
                model, _ = train_lipsync_model(train, model_args, cfg, tts=tts if cond == "with_tts" else None)
                save_lipsync_checkpoint(path, model, model_args, cfg,
                                        {"train_minutes": round((time.perf_counter() - t0) / 60, 2)})
            model, ckpt = load_lipsync_model(path)
            minutes[cond].append(ckpt["metrics"]["train_minutes"])
            for name in ("s1_test", "unseen", "s4_test"):
                d = data[name]
                got = _scores(model, d, [sets[name][2].get(u, "") for u in d.utt_ids])
                r[cond][name].append(got[MOUTH_OPENING])
                jaw[cond][name].append(got["jawOpen"])
            got = _scores(model, tts_test, [voice_of[u] for u in tts_test.utt_ids], recorded=recorded)
            r[cond]["tts_heldout_voices"].append(got[MOUTH_OPENING])
            jaw[cond]["tts_heldout_voices"].append(got["jawOpen"])
            log.info("%d clips, %s: r %s", n, cond, {t: v[-1] for t, v in r[cond].items()})
    report = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip(),
              "real_clips": sizes, "r": r, "jawOpen_r": jaw,
              "tts": {"engine": ENGINE, "voices_train": list(TRAIN_VOICES), "voices_heldout": list(HELDOUT_VOICES),
                      "renditions_per_sentence": args.renditions, "rate_wpm": list(RATE_WPM), "pitch": list(PITCH),
                      "heldout_renditions": len(tts_test)},
              "training": {"system": SYSTEM, "steps": args.steps, "seed": args.seed,
                           "speed_perturb": list(LIPSYNC_SPEEDS), "sdtw_weight": cfg.sdtw_weight,
                           "sdtw_gamma": cfg.sdtw_gamma, "tts_batch_size": cfg.tts_batch_size, "minutes": minutes},
              "notes": "r: pooled mouth-opening Pearson r after per-speaker standardisation (jawOpen_r: the "
                       "same for jawOpen); one value per entry of real_clips; tts_heldout_voices: DTW-aligned "
                       "to s1's recorded track of the same sentence through the audios' MFCCs"}
    out = Path(args.out) / "tts_augmentation.json"
    run.write(out, report)
    if args.plot:
        plot(report, Path(args.plot))
    log.info("wrote %s", out)
    return 0


def plot(report: dict, path: Path) -> Path:
    """r against the number of real clips, one panel per test set, one line per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from avsr.utils import atomic_path

    fig, axes = plt.subplots(1, len(TEST_SETS), figsize=(4 * len(TEST_SETS), 3.2), sharey=True)
    for ax, test in zip(axes, TEST_SETS):
        for cond, style in zip(CONDITIONS, ("o-", "s--")):
            ax.plot(report["real_clips"], report["r"][cond][test], style, label=cond.replace("_", " "))
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(report["real_clips"], [str(n) for n in report["real_clips"]])
        ax.set_title(test.replace("_", " "))
        ax.set_xlabel("real s1 training clips")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mouth-opening r (pooled)")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
