"""Overlapping windows over a long clip and stitching of per-window outputs.

A clip of ``T`` frames is cut into windows of ``window`` frames that overlap by at least
``overlap`` frames (the last window is moved back to end exactly at ``T`` instead of being short).
Every frame is *owned* by exactly one window: the boundary between two neighbours is the middle
of their overlap, so each window contributes the part where it saw the most context on both
sides (as in buffered CTC inference). Stitching keeps, from each window, the frames it owns.

Frames are video frames at 25 fps; outputs at another rate (4 mel frames per video frame, say)
are stitched with ``rate`` = output frames per video frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Window:
    """Frames ``[start, end)`` of the clip go into the model; ``[keep_start, keep_end)`` are owned."""

    start: int
    end: int
    keep_start: int
    keep_end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_windows(n_frames: int, window: int, overlap: int) -> list[Window]:
    """Windows covering ``n_frames`` frames, in order; their owned ranges partition ``[0, n_frames)``.

    Args:
        n_frames: frames of the clip (> 0).
        window: frames per window (> 0); a clip of at most ``window`` frames is one window.
        overlap: least overlap of neighbouring windows, frames (``0 <= overlap < window``).

    Raises:
        ValueError: on a non-positive ``n_frames`` or ``window``, or ``overlap`` outside
            ``[0, window)``.
    """
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
    if n_frames <= window:
        return [Window(0, n_frames, 0, n_frames)]
    stride = window - overlap
    starts = list(range(0, n_frames - window, stride)) + [n_frames - window]
    bounds = [0] + [(starts[i + 1] + starts[i] + window) // 2 for i in range(len(starts) - 1)] + [n_frames]
    return [Window(s, s + window, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def stitch(parts: Sequence[np.ndarray], windows: Sequence[Window], rate: int = 1) -> np.ndarray:
    """Concatenate the owned frames of per-window arrays.

    Args:
        parts: one array per window, ``(rate * window.length, ...)`` (a part may be shorter when
            the model drops trailing frames; missing owned frames are an error).
        windows: the windows of :func:`plan_windows`, same order.
        rate: output frames per clip frame (1 for per-frame curves, 4 for 100 fps mel).

    Returns:
        ``(rate * n_frames, ...)`` array, dtype of the parts.

    Raises:
        ValueError: when the counts differ or a part is too short for the frames its window owns.
    """
    if len(parts) != len(windows):
        raise ValueError(f"got {len(parts)} parts for {len(windows)} windows")
    out = []
    for part, w in zip(parts, windows):
        a, b = rate * (w.keep_start - w.start), rate * (w.keep_end - w.start)
        if len(part) < b:
            raise ValueError(f"part of window [{w.start}, {w.end}) has {len(part)} frames, needs {b}")
        out.append(part[a:b])
    return np.concatenate(out, axis=0)
