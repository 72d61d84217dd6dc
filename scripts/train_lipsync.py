#!/usr/bin/env python
"""Train the audio → face-track lip-sync model on a preprocessed corpus.

Writes ``<out>/lipsync.pt`` (load with ``avsr.lipsync.model.load_lipsync_model``),
``<out>/metrics.json`` (per curve: Pearson r, MAE, R² pooled and per utterance; viseme frame
accuracy) for each evaluation split and, with ``--export N``, the first N predicted mouth-opening
(or first) curves of the first evaluation split as CSV, JSON and PNG under ``<out>/curves/``.

The visemes (``--aligner``) are forced-alignment labels from a phone aligner trained by
``scripts/train_aligner.py``; the split's transcripts must be in its manifest.

Example::

    .venv/bin/python scripts/train_lipsync.py --root data/grid --out runs/mouth --eval-split test --rdrop 1.0
    .venv/bin/python scripts/train_lipsync.py --root data/grid --out runs/lipsync --curves all \\
        --core causal_gru --lookahead 1 --aligner runs/aligner/aligner.pt --viseme-set rhubarb
    .venv/bin/python scripts/train_lipsync.py --root data/grid --out runs/lipsync_tts --curves all --tts-renditions 4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from avsr.evaluation.curves import plot_curves, write_curve
from avsr.lipsync.model import CORES
from avsr.data.manifest import read_manifest
from avsr.lipsync.train import (CURVES, LIPSYNC_SPEEDS, MOUTH_OPENING, LipSyncData, LipSyncTrainConfig,
                                evaluate_lipsync_model, load_lipsync_data, load_tts_pairs, predict,
                                save_lipsync_checkpoint, train_lipsync_model)
from avsr.lipsync.tts import TTSEngineMissing, synthesize_corpus
from avsr.lipsync.video import MouthFeatures
from avsr.utils import atomic_write_text, set_num_threads, setup_logging

log = logging.getLogger("train_lipsync")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="preprocessed corpus root (holds <split>.tsv)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", action="append", default=None,
                   help="split to evaluate on (repeatable; default: test)")
    p.add_argument("--unlabelled-split", default=None, help="split whose audio feeds the mean teacher")
    p.add_argument("--curves", default=MOUTH_OPENING,
                   help=f"comma-separated curves, or 'all' ({', '.join(CURVES)}); 'none' for visemes only")
    p.add_argument("--aligner", default=None, help="phone-aligner checkpoint: adds the viseme head")
    p.add_argument("--viseme-set", choices=("rhubarb", "viseme15"), default="rhubarb")
    p.add_argument("--video-frontend", default=None, metavar="AVSR_CHECKPOINT",
                   help="also feed the mouth video through this AVSR model's visual frontend (frozen; "
                        "stored in the lip-sync checkpoint; offline cores)")
    m = p.add_argument_group("model")
    m.add_argument("--core", choices=CORES, default="bigru")
    m.add_argument("--channels", type=int, default=64)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--num-layers", type=int, default=None, help="default: 2 for causal_gru, else 1")
    m.add_argument("--kernel", type=int, default=5)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--lookahead", type=int, default=0, help="mel frames (10 ms) the causal core sees ahead (0-3)")
    t = p.add_argument_group("training")
    d = LipSyncTrainConfig()
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--gain-db", type=float, default=d.gain_db)
    t.add_argument("--freq-warp", type=float, default=d.freq_warp,
                   help="vocal-tract-length warp of the mel axis by up to +-this fraction (0 = off)")
    t.add_argument("--speed-perturb", type=float, nargs="*", default=list(LIPSYNC_SPEEDS), metavar="FACTOR",
                   help="also train on each clip at these speeds (tempo and pitch together; default: "
                        f"{' '.join(map(str, LIPSYNC_SPEEDS))}; the flag alone turns it off)")
    t.add_argument("--viseme-weight", type=float, default=d.viseme_weight)
    t.add_argument("--rdrop", type=float, default=d.rdrop_weight, help="R-Drop consistency weight (0 = off)")
    t.add_argument("--mean-teacher", type=float, default=d.mean_teacher_weight,
                   help="mean-teacher consistency weight (0 = off)")
    t.add_argument("--ema-decay", type=float, default=d.ema_decay)
    t.add_argument("--rampup-steps", type=int, default=d.rampup_steps)
    t.add_argument("--tts-renditions", type=int, default=0,
                   help="also train on this many eSpeak NG renditions of each training transcript, paired "
                        "with the clip's tracks under a soft-DTW loss (after Chen et al. 2023; 0 = off)")
    t.add_argument("--tts-dir", default=None, help="TTS cache (default: <out>/tts; reused and resumed)")
    t.add_argument("--sdtw-weight", type=float, default=d.sdtw_weight)
    t.add_argument("--sdtw-gamma", type=float, default=d.sdtw_gamma)
    t.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--export", type=int, default=0, help="export this many evaluation curves (CSV, JSON, PNG)")
    p.add_argument("--export-fps", type=float, default=None, help="frame rate of exported CSV/JSON (default 25)")
    return p.parse_args(argv)


def _viseme_labels(args: argparse.Namespace, splits: list[str]) -> tuple[dict, tuple]:
    """Forced-alignment viseme labels of every clip of ``splits`` and the class names."""
    if not args.aligner:
        return {}, ()
    from avsr.lipsync.aligner import clip_visemes, load_aligner, load_aligner_data
    from avsr.lipsync.visemes import RHUBARB, RHUBARB_SHAPES, VISEME15, VISEMES15

    table, names = (RHUBARB, RHUBARB_SHAPES) if args.viseme_set == "rhubarb" else (VISEME15, VISEMES15)
    aligner = load_aligner(args.aligner)
    labels: dict = {}
    for split in splits:
        labels.update(clip_visemes(aligner, load_aligner_data(args.root, split), table=table))
    return labels, names


def _tts_pairs(args: argparse.Namespace, train: LipSyncData, out: Path) -> LipSyncData:
    """``--tts-renditions`` renditions of the training transcripts (training voices, seeded), paired
    with the recorded clips (their original speed)."""
    texts = {r.utt_id: r.transcript for r in read_manifest(args.root, args.train_split)}
    renditions = synthesize_corpus(texts, args.tts_dir or out / "tts", args.tts_renditions, seed=args.seed)
    return load_tts_pairs(renditions, train.subset([u in texts for u in train.utt_ids]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    set_num_threads()
    out = Path(args.out)
    curves = {"all": list(CURVES), "none": []}.get(args.curves, [c for c in args.curves.split(",") if c])
    eval_splits = args.eval_split or ["test"]
    try:
        labels, viseme_names = _viseme_labels(args, [args.train_split, *eval_splits])
        model_args = dict(curves=curves, visemes=list(viseme_names), core=args.core, channels=args.channels,
                          hidden=args.hidden, num_layers=args.num_layers, kernel=args.kernel, dropout=args.dropout,
                          lookahead=args.lookahead)
        cfg = LipSyncTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, gain_db=args.gain_db,
                                 freq_warp=args.freq_warp,
                                 viseme_weight=args.viseme_weight, rdrop_weight=args.rdrop,
                                 mean_teacher_weight=args.mean_teacher, ema_decay=args.ema_decay,
                                 rampup_steps=args.rampup_steps, sdtw_weight=args.sdtw_weight,
                                 sdtw_gamma=args.sdtw_gamma, seed=args.seed)
        video = MouthFeatures.from_avsr_checkpoint(args.video_frontend) if args.video_frontend else None
        model_args["video_dim"] = video.dim if video else 0
        load = dict(curves=curves, visemes=labels, viseme_names=viseme_names, video_features=video)
        train = load_lipsync_data(args.root, args.train_split, speed_perturb=args.speed_perturb, **load)
        unlabelled = (load_lipsync_data(args.root, args.unlabelled_split, curves, with_targets=False,
                                        video_features=video)
                      if args.unlabelled_split else None)
        evals = {s: load_lipsync_data(args.root, s, **load) for s in eval_splits}
        tts = _tts_pairs(args, train, out) if args.tts_renditions else None
        log.info("training on %d clips of '%s'%s", len(train), args.train_split,
                 f" and {len(tts)} TTS renditions" if tts else "")
        model, history = train_lipsync_model(train, model_args, cfg, unlabelled, tts=tts)
    except (ValueError, KeyError, TTSEngineMissing) as exc:
        log.error("%s", exc)
        return 2
    report = {"model_args": model_args, "steps": cfg.steps, "step_time_median_s": history["step_time_median_s"],
              "final_loss": history["loss"][-1], "lookahead_ms": model.lookahead_ms if model.causal else None,
              "splits": {}}
    for split, data in evals.items():
        metrics = evaluate_lipsync_model(model, data)
        report["splits"][split] = metrics
        for name, m in metrics["curves"].items():
            log.info("%s %s: Pearson r pooled %.3f, per-utterance mean %.3f (%d clips)", split, name,
                     m["pooled"]["pearson"], m["utterance_mean"]["pearson"], m["n_utterances"])
        if metrics["viseme_accuracy"] is not None:
            log.info("%s visemes: frame accuracy %.3f", split, metrics["viseme_accuracy"])
    summary = {s: {"curves": {n: {"pooled": m["pooled"], "utterance_mean": m["utterance_mean"]}
                              for n, m in r["curves"].items()}, "viseme_accuracy": r["viseme_accuracy"]}
               for s, r in report["splits"].items()}
    save_lipsync_checkpoint(out / "lipsync.pt", model, model_args, cfg, summary, video)
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    if args.export and curves:
        split, data = next(iter(evals.items()))
        for utt, pred, target in list(zip(data.utt_ids, predict(model, data), data.curves))[: args.export]:
            write_curve(out / "curves" / f"{utt}.csv", pred["curves"][:, 0], 25.0, args.export_fps)
            write_curve(out / "curves" / f"{utt}.json", pred["curves"][:, 0], 25.0, args.export_fps)
            plot_curves(out / "curves" / f"{utt}.png", pred["curves"][:, 0], target.numpy()[: len(pred["curves"]), 0],
                        25.0, title=f"{split}/{utt}", ylabel=curves[0])
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
