"""Lip-sync tracks in the files animation tools read.

- Rhubarb Lip Sync's TSV (one ``time<TAB>shape`` line per cue start, the last line the end of the
  track with ``X``) and JSON (``{"metadata": {"soundFile", "duration"}, "mouthCues": [{"start",
  "end", "value"}]}``), so tools that import Rhubarb output read ours; times in seconds with two
  decimals, as Rhubarb writes them.
- CSV: a ``time`` column (seconds) and one column per ARKit blendshape, one row per output frame.

Tracks are made at 25 fps (the video rate); :func:`resample_curves` takes curves to 24, 30 or 60
fps by linear interpolation, and cue times are rate-free. Each function returns the file's text;
write it with :func:`avsr.utils.atomic_write_text`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Sequence

import numpy as np

Cue = tuple[float, float, str]  # (start s, end s, shape)
FORMATS = ("rhubarb-tsv", "rhubarb-json", "csv", "json")  #: the track files ``avsr lipsync`` writes


def cues_from_frames(labels: Sequence[str], fps: float = 25.0) -> list[Cue]:
    """Consecutive equal per-frame labels merged into ``(start, end, value)`` cues in seconds.
    Raises ``ValueError`` for an empty track or a non-positive ``fps``."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not labels:
        raise ValueError("empty track: no frames to turn into cues")
    cues, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            cues.append((start / fps, t / fps, labels[start]))
            start = t
    return cues


def rhubarb_tsv(cues: Sequence[Cue]) -> str:
    """Rhubarb's TSV: ``start<TAB>shape`` per cue, then the track's end with ``X``."""
    lines = [f"{s:.2f}\t{v}" for s, _, v in cues]
    return "\n".join(lines + [f"{cues[-1][1]:.2f}\tX"]) + "\n"


def rhubarb_json(cues: Sequence[Cue], sound_file: str) -> str:
    """Rhubarb's JSON: ``metadata`` (sound file, duration) and ``mouthCues``."""
    doc = {"metadata": {"soundFile": sound_file, "duration": round(cues[-1][1], 2)},
           "mouthCues": [{"start": round(s, 2), "end": round(e, 2), "value": v} for s, e, v in cues]}
    return json.dumps(doc, indent=2) + "\n"


def read_rhubarb_tsv(text: str) -> list[Cue]:
    """Cues from Rhubarb TSV text (the last line closes the track). Raises ``ValueError`` on a
    malformed line."""
    rows = []
    for n, line in enumerate(text.strip().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"line {n}: expected 'time<TAB>shape', got {line!r}")
        rows.append((float(parts[0]), parts[1]))
    return [(t, rows[i + 1][0], v) for i, (t, v) in enumerate(rows[:-1])]


def resample_curves(curves: np.ndarray, fps_in: float, fps_out: float) -> np.ndarray:
    """``(T, K)`` curves at ``fps_in`` -> ``(round(T * fps_out / fps_in), K)`` at ``fps_out``, linear
    interpolation between frame times (held at the ends)."""
    n_out = max(1, int(round(len(curves) * fps_out / fps_in)))
    t_in, t_out = np.arange(len(curves)) / fps_in, np.arange(n_out) / fps_out
    return np.stack([np.interp(t_out, t_in, curves[:, k]) for k in range(curves.shape[1])], axis=1)


def curves_csv(curves: np.ndarray, names: Sequence[str], fps: float) -> str:
    """CSV text: ``time`` then one column per name; one row per frame of ``(T, K)`` ``curves``."""
    if curves.ndim != 2 or curves.shape[1] != len(names):
        raise ValueError(f"curves must be (T, {len(names)}), got {curves.shape}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["time", *names])
    for t, row in enumerate(curves):
        w.writerow([f"{t / fps:.4f}", *(f"{v:.4f}" for v in row)])
    return buf.getvalue()


def read_curves_csv(text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(names, times (T,), curves (T, K))`` from :func:`curves_csv` text."""
    rows = list(csv.reader(io.StringIO(text)))
    data = np.array(rows[1:], dtype=np.float64)
    return rows[0][1:], data[:, 0], data[:, 1:]
