#!/usr/bin/env python
"""Write the seeded corrupted-test protocol (JSON) of a preprocessed test split.

Every utterance of ``<data>/<split>.tsv`` gets, for every condition (clean, occlusion,
noise_blur, occlusion_noise_blur, babble_snr{-5..15}, occlusion+babble_snr{-5..15}), every
occluder, noise/blur segment and babble mix spelled out, so that every model is tested on
bit-identical inputs (see ``avsr.corruption.protocol``). The same arguments always write the same
bytes. The versioned GRID s1 protocol is made with::

    .venv/bin/python scripts/make_test_protocol.py --data <grid_root> --split test --seed 0 \\
        --out configs/protocol/grid_s1_test.json
"""

from __future__ import annotations

import argparse
import logging
import sys

from avsr.corruption import OccluderBank, make_protocol, save_protocol
from avsr.corruption.protocol import PROTOCOL_SNRS, Utterance
from avsr.data.manifest import ManifestError, read_manifest
from avsr.utils import setup_logging

logger = logging.getLogger("make_test_protocol")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessed corpus root (holds <split>.tsv)")
    p.add_argument("--split", default="test", help="split to corrupt (default: test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="protocol JSON to write")
    p.add_argument("--babble-split", default=None,
                   help="split whose utterances make the babble (default: --split; the utterance itself is "
                        "always excluded)")
    p.add_argument("--babble-speakers", type=int, default=6, help="utterances summed into one babble (default 6)")
    p.add_argument("--speaker-regex", default=None,
                   help="regex whose first group is the speaker in an utterance id: babble then excludes the "
                        "utterance's whole speaker (use on multi-speaker corpora)")
    p.add_argument("--snrs", type=float, nargs="+", default=list(PROTOCOL_SNRS), help="babble SNRs in dB")
    p.add_argument("--occluder-dir", default="", help="folder of RGBA PNG occluders (default: built-in bank)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    babble_split = args.babble_split or args.split
    try:
        rows = read_manifest(args.data, args.split)
        babble_ids = [r.utt_id for r in read_manifest(args.data, babble_split)]
        bank = OccluderBank.from_config(args.occluder_dir)
        protocol = make_protocol([Utterance(r.utt_id, r.n_frames, r.n_samples) for r in rows], args.seed, bank,
                                 babble_ids, split=args.split, babble_split=babble_split,
                                 babble_speakers=args.babble_speakers, speaker_regex=args.speaker_regex,
                                 snrs=args.snrs)
    except (ManifestError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    save_protocol(protocol, args.out)
    logger.info("wrote %s: %d utterances x %d conditions (seed %d, babble from '%s')", args.out, len(rows),
                len(protocol["conditions"]), args.seed, babble_split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
