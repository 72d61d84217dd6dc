#!/usr/bin/env python
"""Show what the model sees: a PNG contact sheet and an MP4 of one corrupted preprocessed clip.

Rows are the visual test conditions (clean, occlusion, noise_blur, occlusion_noise_blur), columns
evenly spaced frames of the 96x96 mouth ROI, enlarged. On the clean row the 20 lip landmarks are
dotted; on corrupted rows each visible occluder has its outline (alpha 0.5) drawn in its own colour
and the lip landmark it follows marked with a cross of the same colour. The MP4 plays the four
conditions side by side in grey, unmarked, at 25 fps. Corruptions come from ``--protocol`` when
given, else they are the ones ``make_test_protocol.py --seed SEED`` would give this clip.

    .venv/bin/python scripts/show_corruption.py --data <grid_root> --split test --utt bbaf2n \\
        --png docs/corruption_contact_sheet.png --mp4 /tmp/corruption.mp4
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from avsr.corruption import OccluderBank, apply_visual_spec, load_protocol, occluder_alpha
from avsr.corruption.protocol import VISUAL_CONDITIONS, visual_specs
from avsr.data.manifest import ManifestError, read_manifest
from avsr.data.media import MediaError, load_clip, write_gray_video
from avsr.utils import atomic_path, setup_logging

logger = logging.getLogger("show_corruption")

COLOURS = ((255, 64, 64), (64, 220, 64), (64, 160, 255))  # RGB, one per occluder
LABEL_W, HEADER_H, FOOTER_H = 190, 26, 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessed corpus root (holds <split>.tsv)")
    p.add_argument("--split", default="test")
    p.add_argument("--utt", default=None, help="utterance id (default: the first of the manifest)")
    p.add_argument("--protocol", default=None, help="protocol JSON to take the corruptions from")
    p.add_argument("--seed", type=int, default=0, help="protocol seed when no --protocol is given")
    p.add_argument("--occluder-dir", default="", help="folder of RGBA PNG occluders (default: built-in bank)")
    p.add_argument("--columns", type=int, default=8, help="frames shown per row")
    p.add_argument("--scale", type=int, default=2, help="enlargement of each 96x96 frame")
    p.add_argument("--png", required=True, help="contact sheet to write")
    p.add_argument("--mp4", default=None, help="side-by-side video to write (optional)")
    return p.parse_args(argv)


def _tile(frame: np.ndarray, scale: int) -> np.ndarray:
    big = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(big, cv2.COLOR_GRAY2RGB)


def _cross(img: np.ndarray, xy: np.ndarray, scale: int, colour: tuple[int, int, int]) -> None:
    # pixel centre (x, y) of the 96x96 frame -> centre of the enlarged pixel block
    c = tuple(int(round((v + 0.5) * scale - 0.5)) for v in xy)
    cv2.drawMarker(img, c, (0, 0, 0), cv2.MARKER_CROSS, 6 * scale + 2, 4, cv2.LINE_AA)
    cv2.drawMarker(img, c, colour, cv2.MARKER_CROSS, 6 * scale, 2, cv2.LINE_AA)


def contact_sheet(frames: np.ndarray, landmarks: np.ndarray, specs: dict, bank: OccluderBank,
                  columns: int, scale: int, title: str) -> np.ndarray:
    """RGB uint8 image: one row per condition of ``specs`` (None = clean), ``columns`` frames each."""
    T = frames.shape[0]
    picks = np.linspace(0, T - 1, columns).round().astype(int)
    size = frames.shape[1] * scale
    rows = []
    header = np.full((HEADER_H, LABEL_W + columns * size, 3), 255, np.uint8)
    for j, t in enumerate(picks):
        cv2.putText(header, f"frame {t}", (LABEL_W + j * size + 4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    rows.append(header)
    for name, spec in specs.items():
        out = apply_visual_spec(frames, landmarks, spec, bank)
        alphas = [occluder_alpha(o, landmarks, bank, frames.shape[1:]) for o in (spec or {}).get("occluders", [])]
        label = np.full((size, LABEL_W, 3), 255, np.uint8)
        cv2.putText(label, name, (6, size // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        tiles = [label]
        for t in picks:
            tile = _tile(out[t], scale)
            if spec is None:
                for x, y in landmarks[t]:
                    cv2.circle(tile, (int(round((x + 0.5) * scale - 0.5)), int(round((y + 0.5) * scale - 0.5))),
                               2, (255, 220, 0), -1, cv2.LINE_AA)
            for k, occ in enumerate(spec["occluders"] if spec else []):
                if not occ["start"] <= t < occ["end"]:
                    continue
                colour = COLOURS[k % len(COLOURS)]
                mask = (alphas[k][t - occ["start"]] >= 0.5).astype(np.uint8)
                mask = cv2.resize(mask, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(tile, contours, -1, colour, 1, cv2.LINE_AA)
                _cross(tile, landmarks[t, occ["landmark"]], scale, colour)
            tiles.append(tile)
        rows.append(np.hstack(tiles))
    footer = np.full((FOOTER_H, header.shape[1], 3), 255, np.uint8)
    cv2.putText(footer, f"{title}   clean: lip landmarks (yellow)   corrupted: occluder outline (alpha 0.5) and the "
                        f"landmark it follows (cross), one colour per occluder", (6, 20), cv2.FONT_HERSHEY_SIMPLEX,
                0.42, (0, 0, 0), 1, cv2.LINE_AA)
    rows.append(footer)
    return np.vstack(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.columns < 1 or args.scale < 1:
        logger.error("--columns and --scale must be >= 1")
        return 1
    try:
        rows = read_manifest(args.data, args.split)
        row = next((r for r in rows if r.utt_id == args.utt), None) if args.utt else (rows[0] if rows else None)
        if row is None:
            raise ValueError(f"utterance '{args.utt}' not in {args.data}/{args.split}.tsv")
        frames, _, meta = load_clip(args.data, row)
        landmarks = meta["landmarks"]
        bank = OccluderBank.from_config(args.occluder_dir)
        if args.protocol:
            protocol = load_protocol(args.protocol)
            protocol.check_bank(bank)
            specs = {c: protocol.entry(row.utt_id, c)["visual"] for c in VISUAL_CONDITIONS}
            source = f"protocol {Path(args.protocol).name}"
        else:
            specs = {"clean": None, **visual_specs(row.utt_id, frames.shape[0], args.seed, bank)}
            source = f"seed {args.seed}"
    except (ManifestError, MediaError, ValueError, KeyError) as exc:
        logger.error("%s", exc)
        return 1
    sheet = contact_sheet(frames, landmarks, specs, bank, args.columns, args.scale,
                          f"{row.utt_id} ({source})")
    with atomic_path(args.png) as tmp:
        bgr = cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(tmp), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            logger.error("could not write %s", args.png)
            return 1
    logger.info("wrote %s", args.png)
    if args.mp4:
        video = np.concatenate([apply_visual_spec(frames, landmarks, s, bank) for s in specs.values()], axis=2)
        video = np.repeat(np.repeat(video, args.scale, axis=1), args.scale, axis=2)
        with atomic_path(args.mp4) as tmp:
            write_gray_video(tmp, video)
        logger.info("wrote %s (%s, left to right)", args.mp4, ", ".join(specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
