"""Export of per-frame curves (mouth opening): CSV, JSON at any frame rate, and a PNG plot.

A curve of ``T`` values at ``fps`` has sample ``i`` at time ``i / fps`` seconds. Resampling to
another rate interpolates linearly between samples (the value is held after the last one), which
is what an animation rig sampling the curve at its own rate expects.

- CSV: header ``time_s,mouth_opening``, one row per output sample.
- JSON: ``{"fps": out_fps, "data": [v0, v1, ...]}``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np

from avsr.utils import atomic_path, atomic_write_text


def _check_curve(values: np.ndarray, fps: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"a curve must be a non-empty 1-D array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("a curve must not contain NaN or infinite values")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return values


def resample_curve(values: np.ndarray, fps: float, out_fps: float) -> np.ndarray:
    """``values`` ``(T,)`` at ``fps`` → ``(round(T * out_fps / fps),)`` float64 at ``out_fps`` (at least 1).

    Linear interpolation at times ``k / out_fps``. Raises ValueError for an empty or non-finite
    curve or a non-positive rate.
    """
    values = _check_curve(values, fps)
    if not out_fps > 0:
        raise ValueError(f"out_fps must be positive, got {out_fps}")
    n_out = max(1, int(round(values.size * out_fps / fps)))
    return np.interp(np.arange(n_out) / out_fps, np.arange(values.size) / fps, values)


def curve_csv(values: np.ndarray, fps: float, out_fps: Optional[float] = None, name: str = "mouth_opening") -> str:
    """CSV text ``time_s,<name>`` of the curve, resampled to ``out_fps`` when given."""
    rate = out_fps or fps
    out = resample_curve(values, fps, rate)
    buf = io.StringIO()
    buf.write(f"time_s,{name}\n")
    for k, v in enumerate(out):
        buf.write(f"{k / rate:.6f},{v:.6f}\n")
    return buf.getvalue()


def curve_json(values: np.ndarray, fps: float, out_fps: Optional[float] = None) -> dict:
    """``{"fps": rate, "data": [...]}`` of the curve, resampled to ``out_fps`` when given."""
    rate = out_fps or fps
    return {"fps": rate, "data": [round(float(v), 6) for v in resample_curve(values, fps, rate)]}


def write_curve(path: str | Path, values: np.ndarray, fps: float, out_fps: Optional[float] = None) -> Path:
    """Write a curve as CSV or JSON, chosen by the suffix of ``path`` (``.csv`` / ``.json``), atomically.

    Raises ValueError for another suffix or an invalid curve.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        atomic_write_text(path, curve_csv(values, fps, out_fps))
    elif suffix == ".json":
        atomic_write_text(path, json.dumps(curve_json(values, fps, out_fps)) + "\n")
    else:
        raise ValueError(f"{path}: curve files must end in .csv or .json")
    return path


def plot_curves(path: str | Path, predicted: np.ndarray, target: Optional[np.ndarray], fps: float,
                title: str = "", ylabel: str = "mouth opening (inner gap / width)") -> Path:
    """PNG plot of a predicted curve against the landmark curve (``target``, optional), written atomically.

    Raises ValueError for an invalid curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = _check_curve(predicted, fps)
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    if target is not None:
        target = _check_curve(target, fps)
        ax.plot(np.arange(target.size) / fps, target, label="landmarks", color="tab:green")
    ax.plot(np.arange(predicted.size) / fps, predicted, label="predicted", color="tab:blue")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
