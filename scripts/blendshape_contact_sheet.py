#!/usr/bin/env python
"""Contact sheet of the mouth blendshape targets (``docs/blendshape_contact_sheet.png``).

One row per ARKit coefficient of :mod:`avsr.lipsync.targets`: the mouth crops of the frames
with the lowest values (left) and the highest (right) over a preprocessed split, each from a
different clip, with its clip and frame under each crop (the coefficients there are 0 and 1: the
extremes lie beyond the 5th and 95th percentiles the normalisation maps to 0 and 1). A person can check at a glance that each
coefficient measures what its name says.

    .venv/bin/python scripts/blendshape_contact_sheet.py --data runs/grid/grid --split test \\
        --out docs/blendshape_contact_sheet.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from avsr.data.manifest import ManifestError, read_manifest
from avsr.data.media import MediaError, read_gray_video
from avsr.lipsync.targets import BLENDSHAPES, corpus_blendshapes, load_clip_mesh
from avsr.utils import atomic_path, setup_logging

log = logging.getLogger("blendshape_contact_sheet")
LABEL_W = 190
CAPTION_H = 18


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessed corpus root (with face meshes)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--per-side", type=int, default=3, help="crops at each end of a row")
    return p.parse_args(argv)


def extremes(values: dict[str, np.ndarray], masks: dict[str, np.ndarray], k: int) -> tuple[list, list]:
    """The ``k`` lowest and ``k`` highest ``(utt_id, frame, value)``, one frame per clip (its own
    extreme), among face-detected frames."""
    lows, highs = [], []
    for utt, v in values.items():
        idx = np.flatnonzero(masks[utt])
        if len(idx):
            lo, hi = idx[np.argmin(v[idx])], idx[np.argmax(v[idx])]
            lows.append((utt, int(lo), float(v[lo])))
            highs.append((utt, int(hi), float(v[hi])))
    return sorted(lows, key=lambda x: x[2])[:k], sorted(highs, key=lambda x: -x[2])[:k][::-1]


def contact_sheet(root: Path, split: str, k: int) -> np.ndarray:
    coeffs = corpus_blendshapes(root, split)
    rows = {r.utt_id: r for r in read_manifest(root, split)}
    masks = {u: load_clip_mesh(rows[u].file(root, ".npz"))[1] for u in coeffs}
    videos: dict[str, np.ndarray] = {}
    lines = []
    for j, name in enumerate(BLENDSHAPES):
        low, high = extremes({u: c[:, j] for u, c in coeffs.items()}, masks, k)
        tiles = []
        for utt, t, _ in low + high:
            if utt not in videos:
                videos[utt] = read_gray_video(rows[utt].file(root, ".mp4"))
            crop = videos[utt][t]
            caption = np.full((CAPTION_H, crop.shape[1]), 255, np.uint8)
            cv2.putText(caption, f"{utt} {t}", (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, 0, 1, cv2.LINE_AA)
            tiles.append(np.vstack([crop, caption]))
        h = tiles[0].shape[0]
        label = np.full((h, LABEL_W), 255, np.uint8)
        cv2.putText(label, name, (6, h // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
        gap = np.full((h, 12), 200, np.uint8)
        lines.append(np.hstack([label, *tiles[:k], gap, *tiles[k:]]))
    header = np.full((26, lines[0].shape[1]), 255, np.uint8)
    cv2.putText(header, f"lowest {k} (one per clip)   |   highest {k}      {root.name}/{split}, {len(coeffs)} clips",
                (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
    return np.vstack([header, *lines])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        sheet = contact_sheet(Path(args.data), args.split, args.per_side)
    except (ManifestError, MediaError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        ok, png = cv2.imencode(".png", sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:
            log.error("cannot encode %s", out)
            return 1
        Path(tmp).write_bytes(png.tobytes())
    log.info("wrote %s (%dx%d)", out, sheet.shape[1], sheet.shape[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
