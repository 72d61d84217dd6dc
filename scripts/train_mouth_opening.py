#!/usr/bin/env python
"""Train the stand-alone audio → mouth-opening model on a preprocessed corpus.

Writes ``<out>/mouth_opening.pt`` (load with ``avsr.models.mouth.load_mouth_model``),
``<out>/metrics.json`` (Pearson r, MAE, R² pooled and per utterance on each evaluation split) and,
with ``--export N``, the first N curves of the first evaluation split as CSV, JSON and PNG under
``<out>/curves/``.

Example::

    .venv/bin/python scripts/train_mouth_opening.py --root data/grid --out runs/mouth \\
        --eval-split test --steps 1500 --rdrop 1.0
    .venv/bin/python scripts/train_mouth_opening.py --root data/grid --out runs/mouth_causal \\
        --causal --lookahead 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from avsr.evaluation.curves import plot_curves, write_curve
from avsr.mouth_opening import (MouthTrainConfig, evaluate_mouth_model, load_mouth_data, predict_curves,
                                save_mouth_checkpoint, train_mouth_model)
from avsr.utils import atomic_write_text, set_num_threads, setup_logging

log = logging.getLogger("train_mouth_opening")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="preprocessed corpus root (holds <split>.tsv)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", action="append", default=None,
                   help="split to evaluate on (repeatable; default: test)")
    p.add_argument("--unlabelled-split", default=None, help="split whose audio feeds the mean teacher")
    m = p.add_argument_group("model")
    m.add_argument("--channels", type=int, default=64)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--rnn", choices=("gru", "lstm"), default="gru")
    m.add_argument("--num-layers", type=int, default=1)
    m.add_argument("--kernel", type=int, default=3)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--causal", action="store_true", help="unidirectional streaming variant")
    m.add_argument("--lookahead", type=int, default=0, help="future frames the causal model sees (0-3)")
    t = p.add_argument_group("training")
    d = MouthTrainConfig()
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--gain-db", type=float, default=d.gain_db)
    t.add_argument("--rdrop", type=float, default=d.rdrop_weight, help="R-Drop consistency weight (0 = off)")
    t.add_argument("--mean-teacher", type=float, default=d.mean_teacher_weight,
                   help="mean-teacher consistency weight (0 = off)")
    t.add_argument("--ema-decay", type=float, default=d.ema_decay)
    t.add_argument("--rampup-steps", type=int, default=d.rampup_steps)
    t.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--export", type=int, default=0, help="export this many evaluation curves (CSV, JSON, PNG)")
    p.add_argument("--export-fps", type=float, default=None, help="frame rate of exported CSV/JSON (default 25)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    set_num_threads()
    out = Path(args.out)
    model_args = dict(channels=args.channels, hidden=args.hidden, rnn=args.rnn, num_layers=args.num_layers,
                      kernel=args.kernel, dropout=args.dropout, causal=args.causal, lookahead=args.lookahead)
    try:
        cfg = MouthTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, gain_db=args.gain_db,
                               rdrop_weight=args.rdrop, mean_teacher_weight=args.mean_teacher,
                               ema_decay=args.ema_decay, rampup_steps=args.rampup_steps, seed=args.seed)
        train = load_mouth_data(args.root, args.train_split)
        unlabelled = load_mouth_data(args.root, args.unlabelled_split, with_targets=False) if args.unlabelled_split else None
        evals = {s: load_mouth_data(args.root, s) for s in (args.eval_split or ["test"])}
        log.info("training on %d clips of '%s'", len(train), args.train_split)
        model, history = train_mouth_model(train, model_args, cfg, unlabelled)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    report = {"model_args": model_args, "steps": cfg.steps, "step_time_median_s": history["step_time_median_s"],
              "final_loss": history["loss"][-1], "splits": {}}
    for split, data in evals.items():
        metrics = evaluate_mouth_model(model, data)
        report["splits"][split] = metrics
        log.info("%s: Pearson r pooled %.3f, per-utterance mean %.3f; MAE %.4f; R2 %.3f (%d clips)", split,
                 metrics["pooled"]["pearson"], metrics["utterance_mean"]["pearson"], metrics["pooled"]["mae"],
                 metrics["pooled"]["r2"], metrics["n_utterances"])
    summary = {s: {"pooled": m["pooled"], "utterance_mean": m["utterance_mean"]} for s, m in report["splits"].items()}
    save_mouth_checkpoint(out / "mouth_opening.pt", model, model_args, cfg, summary)
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    if args.export:
        split, data = next(iter(evals.items()))
        for utt, pred, target in list(zip(data.utt_ids, predict_curves(model, data), data.targets))[: args.export]:
            write_curve(out / "curves" / f"{utt}.csv", pred, 25.0, args.export_fps)
            write_curve(out / "curves" / f"{utt}.json", pred, 25.0, args.export_fps)
            plot_curves(out / "curves" / f"{utt}.png", pred, target.numpy()[: len(pred)], 25.0, title=f"{split}/{utt}")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
