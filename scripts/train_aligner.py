#!/usr/bin/env python
"""Train the phone aligner of the lip-sync visemes and measure its timing (``make aligner``).

Trains :class:`avsr.lipsync.aligner.PhoneCTC` on a preprocessed split (``.wav`` + transcript)
less a validation hold-out of 25 clips, saves it, and writes ``benchmarks/lipsync_alignment.json``:
for the hold-out and the test split, the word-onset error of the forced alignment against the
corpus's own word alignments (GRID ``.align``, given with ``--grid-dir``), and the video check of
the visemes: the fraction of clips whose landmark mouth opening is smaller on frames labelled
closed (Rhubarb A; 15-viseme PP) than on frames labelled open (Rhubarb C or D; aa).

    .venv/bin/python scripts/train_aligner.py --data runs/grid/grid --grid-dir ../shared/data/real/grid_s1_tvr28
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_aligner")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessed corpus root")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--grid-dir", default=None, help="GRID folder with align/ (word timings for the onset error)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--holdout", type=int, default=25, help="training clips held out for validation")
    p.add_argument("--out", default=None, help="aligner checkpoint (default: <data>/../aligner.pt)")
    p.add_argument("--bench", default=str(REPO / "benchmarks" / "lipsync_alignment.json"))
    return p.parse_args(argv)


def onset_errors(spans: list[tuple[str, int, int]], words: list[tuple[float, float, str]]) -> list[float]:
    """Seconds from each word's reference onset to the start of its first phone's region (the
    same boundary rule as :func:`avsr.lipsync.aligner.phone_frames`)."""
    from avsr.lipsync.aligner import MEL_PER_VIDEO_FRAME, STRIDE, phone_starts
    from avsr.lipsync.visemes import pronounce

    rate = 100 / STRIDE
    bounds = phone_starts(spans)
    out, k = [], 0
    for start, _, w in words:
        out.append(bounds[k] / rate - start / (100 / MEL_PER_VIDEO_FRAME))
        k += len(pronounce(w))
    return out


def evaluate(model, data, root: Path, split: str, grid_dir: Path | None) -> dict:
    from avsr.data.corpora import read_align
    from avsr.lipsync.aligner import align, clip_visemes, opening_check
    from avsr.lipsync.visemes import RHUBARB, VISEME15

    opening = {u: np.load(root / split / f"{u}.npz")["mouth_opening"] for u in data.utt_ids}
    frames = {u: len(o) for u, o in opening.items()}
    rhubarb, v15 = clip_visemes(model, data, frames, RHUBARB), clip_visemes(model, data, frames, VISEME15)
    res: dict = {"clips": len(data.utt_ids)}
    res["video_check_rhubarb_A_vs_CD"], res["clips_rhubarb"] = opening_check(rhubarb, opening, ["A"], ["C", "D"])
    res["video_check_viseme15_PP_vs_aa"], res["clips_viseme15"] = opening_check(v15, opening, ["PP"], ["aa"])
    if grid_dir is not None:
        errs = []
        for utt, mel, text in zip(data.utt_ids, data.mels, data.texts):
            words = [w for w in read_align(grid_dir / "align" / f"{utt}.align") if w[2] not in ("sil", "sp")]
            errs += onset_errors(align(model, mel, text), words)
        e = np.abs(errs)
        res["word_onset_ms"] = {"mean": round(1000 * float(np.mean(errs)), 1), "mean_abs": round(1000 * float(e.mean()), 1),
                                "within_40ms": round(float((e <= 0.04).mean()), 3),
                                "within_80ms": round(float((e <= 0.08).mean()), 3), "words": len(errs)}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from avsr.config import load_config
    from avsr.data.dataset import hold_out
    from avsr.lipsync.aligner import AlignerData, load_aligner_data, save_aligner, train_phone_ctc
    from avsr.utils import atomic_write_text, set_num_threads, setup_logging

    setup_logging()
    set_num_threads()
    root = Path(args.data)
    grid_dir = Path(args.grid_dir) if args.grid_dir else None
    try:
        full = load_aligner_data(root, args.train_split)
        test = load_aligner_data(root, args.test_split)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    from avsr.data.manifest import read_manifest

    _, held = hold_out(read_manifest(root, args.train_split), args.holdout,
                       load_config([REPO / "configs/grid/audio.yaml"]).seed)  # the GRID recipe's hold-out
    held_ids = {r.utt_id for r in held}
    pick = [i for i, u in enumerate(full.utt_ids) if u not in held_ids]
    val_pick = [i for i, u in enumerate(full.utt_ids) if u in held_ids]

    def part(idx: list[int]) -> AlignerData:
        return AlignerData([full.utt_ids[i] for i in idx], [full.mels[i] for i in idx], [full.texts[i] for i in idx])

    t0 = time.perf_counter()
    model = train_phone_ctc(part(pick), steps=args.steps)
    minutes = (time.perf_counter() - t0) / 60
    out = Path(args.out) if args.out else root.parent / "aligner.pt"
    save_aligner(model, out)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "train_clips": len(pick), "steps": args.steps, "train_minutes": round(minutes, 2),
              "validation_holdout": evaluate(model, part(val_pick), root, args.train_split, grid_dir),
              args.test_split: evaluate(model, test, root, args.test_split, grid_dir)}
    atomic_write_text(Path(args.bench), json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
