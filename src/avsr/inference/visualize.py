"""An overlay video of one transcription: the mouth crop with its curves drawn over time.

Each output frame is the mouth crop (scaled ``scale`` times, grayscale) with the tracked lip
landmarks as green dots and the word being spoken written under it, above two plot lanes that scroll with time (``span_s`` seconds, the
current frame marked by a vertical line in the middle): the mouth opening (from landmarks and,
when present, predicted by the model) and the audio/visual reliability scores in [0, 1]. Drawn
with OpenCV, encoded with PyAV as H.264 (yuv420p) at the clip's frame rate, with the input audio
as an AAC track when it is given.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import cv2
import numpy as np

from avsr.inference.result import TranscriptionResult
from avsr.utils import atomic_path

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# (label, BGR colour) of each curve
MOUTH_CURVES = {"mouth_opening": ("mouth (landmarks)", (80, 220, 80)),
                "mouth_opening_pred": ("mouth (model)", (60, 160, 255))}
RELIABILITY_CURVES = {"audio": ("audio reliability", (255, 170, 60)),
                      "video": ("video reliability", (200, 90, 255))}


def _lane(curves: list[tuple[np.ndarray, str, tuple[int, int, int]]], t: int, width: int, height: int,
          span: int, y_max: float, title: str) -> np.ndarray:
    """One ``(height, width, 3)`` plot lane of ``curves`` around frame ``t`` (``span`` frames wide)."""
    lane = np.full((height, width, 3), 24, np.uint8)
    top, bottom = 16, height - 6
    cv2.line(lane, (0, bottom), (width - 1, bottom), (70, 70, 70), 1)
    cv2.putText(lane, title, (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (200, 200, 200), 1, cv2.LINE_AA)
    first = t - span // 2
    xs = (np.arange(span) + 0.5) * width / span
    for k, (curve, label, colour) in enumerate(curves):
        idx = np.arange(first, first + span)
        ok = (idx >= 0) & (idx < len(curve))
        vals = np.full(span, np.nan, np.float32)
        vals[ok] = curve[idx[ok]]
        ys = bottom - np.clip(vals / y_max, 0.0, 1.0) * (bottom - top)
        finite = np.isfinite(ys)
        # draw each run of finite values as one polyline
        edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            pts = np.stack([xs[a:b], ys[a:b]], axis=1).round().astype(np.int32)
            cv2.polylines(lane, [pts], False, colour, 1, cv2.LINE_AA)
        cv2.putText(lane, label, (width - 130, 12 + 11 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.33, colour, 1, cv2.LINE_AA)
    cv2.line(lane, (width // 2, top - 2), (width // 2, bottom), (230, 230, 230), 1)
    return lane


def render_frames(result: TranscriptionResult, scale: int = 4, span_s: float = 4.0,
                  lane_height: int = 96) -> np.ndarray:
    """The overlay frames of ``result``: ``(T, 96 * scale + 2 * lane_height, 96 * scale, 3)`` uint8 BGR.

    Raises:
        ValueError: when ``result`` has no mouth crops (audio-only use) or an argument is not positive.
    """
    if result.crops is None:
        raise ValueError(f"{result.path}: no mouth crops to draw (audio-only input or mode)")
    if scale <= 0 or span_s <= 0 or lane_height < 32:
        raise ValueError(f"need scale > 0, span_s > 0, lane_height >= 32; got {scale}, {span_s}, {lane_height}")
    n, h, w = result.crops.shape
    width = w * scale
    span = max(2, int(round(span_s * result.fps)))
    mouth = [(c, lbl, col) for key, (lbl, col) in MOUTH_CURVES.items()
             if (c := getattr(result, key)) is not None]
    y_max = max([float(np.nanmax(c)) for c, _, _ in mouth if np.isfinite(c).any()] + [1e-3]) * 1.1
    rel = [(result.reliability[key], lbl, col) for key, (lbl, col) in RELIABILITY_CURVES.items()
           if key in result.reliability]
    out = np.empty((n, h * scale + 2 * lane_height, width, 3), np.uint8)
    for t in range(n):
        crop = cv2.resize(result.crops[t], (width, h * scale), interpolation=cv2.INTER_LINEAR)
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
        if result.landmarks is not None:
            for x, y in (result.landmarks[t] + 0.5) * scale:
                cv2.circle(crop, (int(x), int(y)), 2, (80, 220, 80), -1, cv2.LINE_AA)
        now = t / result.fps
        word = next((wd.word for wd in result.words if wd.start <= now < max(wd.end, wd.start + 1 / result.fps)), "")
        if word:
            cv2.putText(crop, word, (8, h * scale - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4, cv2.LINE_AA)
            cv2.putText(crop, word, (8, h * scale - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 1, cv2.LINE_AA)
        out[t, : h * scale] = crop
        out[t, h * scale: h * scale + lane_height] = _lane(
            mouth, t, width, lane_height, span, y_max,
            "mouth opening" if mouth else "mouth opening: not available")
        out[t, h * scale + lane_height:] = _lane(
            rel, t, width, lane_height, span, 1.0,
            "reliability (0-1)" if rel else "reliability: not scored by this model")
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: float, audio: Optional[np.ndarray] = None,
                crf: int = 20) -> None:
    """Write ``(T, H, W, 3)`` uint8 BGR frames (H, W even) as H.264 mp4 with PyAV, atomically.

    ``audio``: optional ``(S,)`` float32 16 kHz mono waveform, muxed as AAC.

    Raises:
        ValueError: on frames of the wrong shape or odd size.
    """
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    with atomic_path(path, suffix=".mp4") as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            vstream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            vstream.width, vstream.height = frames.shape[2], frames.shape[1]
            vstream.pix_fmt = "yuv420p"
            vstream.options = {"crf": str(crf)}
            astream = None
            if audio is not None and len(audio):
                astream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            for frame in frames:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")
                container.mux(vstream.encode(vf))
            container.mux(vstream.encode(None))
            if astream is not None:
                samples = np.ascontiguousarray(np.clip(audio, -1.0, 1.0).astype(np.float32)[None, :])
                af = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
                af.sample_rate = SAMPLE_RATE
                container.mux(astream.encode(af))
                container.mux(astream.encode(None))
    log.info("wrote %s (%d frames)", path, len(frames))


def write_overlay(result: TranscriptionResult, path: str | Path, **kwargs) -> None:
    """Render ``result`` (:func:`render_frames`) and write it to ``path`` with its input audio."""
    write_video(path, render_frames(result, **kwargs), result.fps, result.audio)
