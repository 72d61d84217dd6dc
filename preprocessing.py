#!/usr/bin/env python
"""Preprocess a corpus into 96x96 mouth crops, 16 kHz audio, transcripts and manifests.

Usage::

    preprocessing.py --layout grid --input ../shared/data/real/grid_s1_tvr28 --output data/grid \\
        [--workers 2] [--shard-index 0 --num-shards 1] [--config cfg.yaml] [preprocess.max_gap_frames=20 ...]
    preprocessing.py --layout lrs3 --input /data/LRS3 --output data/lrs3 --landmarks-dir /data/LRS3_landmarks \\
        --trust-landmark-pickles
    preprocessing.py convert-pickles /data/LRS3_landmarks --trust-landmark-pickles   # once; then no flag needed

Layouts: grid | lrs2 | lrs3 | videos (see avsr.data.corpora). Output: <output>/<split>/<utt_id>.{mp4,wav,txt,npz},
<output>/<split>.tsv, <output>/failures.tsv. Reruns skip finished clips. Exit status 0, or 1 when no clip
could be processed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys

import numpy as np

from avsr.config import ConfigError, load_config
from avsr.data.corpora import LAYOUTS, CorpusError, discover
from avsr.data.landmarks import LandmarkError, convert_pickle_tree
from avsr.data.preprocess import preprocess
from avsr.utils import setup_logging

log = logging.getLogger("preprocessing")


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=LAYOUTS, required=True, help="input corpus layout")
    p.add_argument("--input", required=True, help="corpus root folder")
    p.add_argument("--output", required=True, help="preprocessed corpus root to write")
    p.add_argument("--split", default="train", help="split of clips the layout does not assign (default: train)")
    p.add_argument("--landmarks-dir", help="folder of precomputed 68-point landmarks (.npz/.pkl) mirroring the corpus")
    p.add_argument("--trust-landmark-pickles", action="store_true",
                   help="allow loading .pkl landmark files (unpickling can run code from the file)")
    p.add_argument("--config", help="YAML config file (section 'preprocess')")
    p.add_argument("--seed", type=int, help="random seed (config key 'seed')")
    p.add_argument("--workers", type=int, help="parallel clip processes (default: preprocess.workers)")
    p.add_argument("--shard-index", type=int, default=0, help="this job's shard (0-based)")
    p.add_argument("--num-shards", type=int, default=1, help="number of shards the corpus is split into")
    p.add_argument("--limit", type=int, help="only the first N clips (sorted by split/utt_id), e.g. for a quick look")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (one line per skipped clip)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocessing.py convert-pickles",
                                description="Convert LRS landmark pickles (*.pkl) once to .npz, which later runs "
                                            "read without --trust-landmark-pickles.")
    p.add_argument("root", help="folder searched recursively for *.pkl")
    p.add_argument("--output", help="write the .npz files under this folder (mirrored) instead of beside the pickles")
    p.add_argument("--trust-landmark-pickles", action="store_true", required=True,
                   help="required: the pickles are loaded, which can run code from them")
    return p


def convert_main(argv: list[str]) -> int:
    args = _convert_parser().parse_args(argv)
    setup_logging()
    try:
        done, errors = convert_pickle_tree(args.root, args.output)
    except LandmarkError as exc:
        log.error("%s", exc)
        return 2
    for err in errors:
        log.warning("%s", err)
    log.info("converted %d pickle(s) to .npz, %d failed", done, len(errors))
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert-pickles"]:
        return convert_main(argv[1:])
    parser = _run_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    random.seed(cfg.seed)  # the pipeline itself is deterministic; this pins any library randomness
    np.random.seed(cfg.seed % 2**32)
    try:
        utts = discover(args.layout, args.input, args.split, args.landmarks_dir)
    except CorpusError as exc:
        parser.error(str(exc))
    if args.limit is not None:
        utts = utts[: args.limit]
    log.info("%s corpus at %s: %d clips; writing to %s", args.layout, args.input, len(utts), args.output)
    try:
        summary = preprocess(utts, args.output, cfg.preprocess, workers=args.workers, shard_index=args.shard_index,
                             num_shards=args.num_shards, trust_pickles=args.trust_landmark_pickles,
                             progress=not args.no_progress)
    except (LandmarkError, ValueError) as exc:
        parser.error(str(exc))
    if summary.kept + summary.resumed == 0 and summary.failed > 0:
        log.error("no clip could be processed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
