"""A preview to judge lip sync by eye: the real mouth crop (when there is video) beside a simple
2-D mouth drawn from the predicted ARKit blendshapes, with the audio (``avsr lipsync --preview``).

The drawn mouth (:func:`draw_mouth`) is a front view on a ``size`` x ``size`` canvas: two lip
outlines meeting at the corners, the opening between them dark. Half-width ``w`` and opening ``h``
(in canvas units, ``s = size``), from the coefficients in [0, 1] (mean of the left/right pairs):

- ``w = 0.28 s (1 + 0.25 stretch + 0.15 smile - 0.35 max(pucker, funnel))``
- ``h = 0.30 s jawOpen (1 - 0.8 max(close, press)) + 0.06 s (upperUp + lowerDown) / 2``
- the corners rise by ``0.08 s smile``; the lips thin with ``rollUpper`` / ``rollLower``.

Only the shapes present in the track are used (missing ones count as 0); a track with the mouth
opening only drives ``h`` through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

CANVAS = 192
LIP = (70, 70, 200)  # BGR
DARK = (40, 20, 30)
SKIN = (170, 190, 225)


def _get(coeffs: dict[str, float], *names: str) -> float:
    return float(np.mean([coeffs.get(n, 0.0) for n in names]))


def draw_mouth(coeffs: dict[str, float], size: int = CANVAS, label: str = "") -> np.ndarray:
    """``(size, size, 3)`` uint8 BGR drawing of a mouth with ARKit ``coeffs`` (name -> value in [0, 1];
    ``mouth_opening`` stands in for ``jawOpen`` when that is missing). ``label`` is written at the top."""
    c = {k: float(np.clip(v, 0.0, 1.0)) for k, v in coeffs.items()}
    if "jawOpen" not in c and "mouth_opening" in c:
        c["jawOpen"] = c["mouth_opening"]
    smile = _get(c, "mouthSmileLeft", "mouthSmileRight")
    w = 0.28 * size * (1 + 0.25 * _get(c, "mouthStretchLeft", "mouthStretchRight") + 0.15 * smile
                       - 0.35 * max(c.get("mouthPucker", 0.0), c.get("mouthFunnel", 0.0)))
    closed = max(c.get("mouthClose", 0.0), _get(c, "mouthPressLeft", "mouthPressRight"))
    h = 0.30 * size * c.get("jawOpen", 0.0) * (1 - 0.8 * closed) + 0.06 * size * (
        _get(c, "mouthUpperUpLeft", "mouthUpperUpRight") + _get(c, "mouthLowerDownLeft", "mouthLowerDownRight")) / 2
    lip_up = 0.07 * size * (1 - 0.6 * c.get("mouthRollUpper", 0.0))
    lip_lo = 0.09 * size * (1 - 0.6 * c.get("mouthRollLower", 0.0))
    cx, cy, lift = size / 2, size * 0.55, 0.08 * size * smile
    xs = np.linspace(-1.0, 1.0, 41)
    bulge = np.sqrt(1 - xs ** 2)  # 0 at the corners, 1 in the middle
    corner_y = cy - lift * np.abs(xs) ** 2
    inner_top = corner_y - 0.5 * h * bulge
    inner_bot = corner_y + 0.5 * h * bulge
    x = cx + w * xs
    img = np.full((size, size, 3), SKIN, np.uint8)
    outer = np.concatenate([np.stack([x, inner_top - lip_up * bulge], 1),
                            np.stack([x[::-1], (inner_bot + lip_lo * bulge)[::-1]], 1)])
    cv2.fillPoly(img, [np.round(outer).astype(np.int32)], LIP, cv2.LINE_AA)
    if h > 0.5:
        inner = np.concatenate([np.stack([x, inner_top], 1), np.stack([x[::-1], inner_bot[::-1]], 1)])
        cv2.fillPoly(img, [np.round(inner).astype(np.int32)], DARK, cv2.LINE_AA)
    else:
        cv2.polylines(img, [np.round(np.stack([x, corner_y], 1)).astype(np.int32)], False, DARK, 2, cv2.LINE_AA)
    if label:
        cv2.putText(img, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (30, 30, 30), 1, cv2.LINE_AA)
    return img


def preview_frames(curves: np.ndarray, names: Sequence[str], labels: Optional[Sequence[str]] = None,
                   crops: Optional[np.ndarray] = None, size: int = CANVAS) -> np.ndarray:
    """``(T, size, W, 3)`` uint8 BGR frames: the mouth crop (``(T, H, W)`` uint8 grayscale, scaled to
    ``size``; optional) beside the mouth drawn from ``curves`` ``(T, K)`` named ``names``, with the
    frame's viseme ``labels`` (optional) written on it.

    Raises:
        ValueError: when ``curves``, ``labels`` or ``crops`` disagree in length or width.
    """
    if curves.ndim != 2 or curves.shape[1] != len(names):
        raise ValueError(f"curves must be (T, {len(names)}), got {curves.shape}")
    for what, other in (("labels", labels), ("crops", crops)):
        if other is not None and len(other) < len(curves):
            raise ValueError(f"{what} has {len(other)} frames, the curves {len(curves)}")
    frames = []
    for t, row in enumerate(curves):
        mouth = draw_mouth(dict(zip(names, row)), size, labels[t] if labels is not None else "")
        if crops is not None:
            crop = cv2.cvtColor(cv2.resize(crops[t], (size, size), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR)
            mouth = np.concatenate([crop, mouth], axis=1)
        frames.append(mouth)
    return np.stack(frames)


def write_preview(path: str | Path, curves: np.ndarray, names: Sequence[str], fps: float,
                  audio: Optional[np.ndarray] = None, labels: Optional[Sequence[str]] = None,
                  crops: Optional[np.ndarray] = None) -> None:
    """:func:`preview_frames` as an H.264 mp4 at ``fps`` with the ``(S,)`` 16 kHz ``audio`` as AAC, atomically."""
    from avsr.inference.visualize import write_video

    write_video(path, preview_frames(curves, names, labels, crops), fps, audio)


def preview_strip(path: str | Path, curves: np.ndarray, names: Sequence[str], frames: Sequence[int],
                  labels: Optional[Sequence[str]] = None, crops: Optional[np.ndarray] = None,
                  size: int = 128) -> Path:
    """A PNG of the preview at the chosen ``frames`` side by side (crop above the drawn mouth), atomically."""
    from avsr.utils import atomic_path

    picked = preview_frames(curves[list(frames)], names, None if labels is None else [labels[t] for t in frames],
                            None if crops is None else crops[list(frames)], size)
    if crops is not None:  # crop above mouth: (size, 2 size) -> (2 size, size)
        picked = np.stack([np.concatenate([f[:, :size], f[:, size:]], axis=0) for f in picked])
    strip = np.concatenate(list(picked), axis=1)
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), strip):
            raise OSError(f"could not write {path}")
    return Path(path)
