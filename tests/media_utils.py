"""Writing test media (damaged or synthetic clips made from real GRID frames) with PyAV."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import av
import numpy as np


def write_av(path: Path, frames: Optional[np.ndarray], wave: Optional[np.ndarray], fps: float = 25,
             faststart: bool = False) -> None:
    """``(T, H, W, 3)`` uint8 RGB frames at ``fps`` and/or ``(S,)`` 16 kHz mono float audio as an
    H.264/AAC file (container from the extension: .mp4, .mkv, ...); ``None`` leaves that stream out."""
    opts = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as c:
        vs = None
        if frames is not None:
            vs = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "12"})
            vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        aus = c.add_stream("aac", rate=16000, layout="mono") if wave is not None else None
        if vs is not None:
            for f in frames:
                c.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            c.mux(vs.encode(None))
        if aus is not None:
            af = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="flt", layout="mono")
            af.sample_rate = 16000
            c.mux(aus.encode(af))
            c.mux(aus.encode(None))


def face_crop(frames: np.ndarray, size: int = 160) -> np.ndarray:
    """LRS-style face crops of ``(T, H, W, 3)`` uint8 RGB frames: one fixed square (1.6x the face-mesh
    landmarks' extent on the first frame with a face, edges replicated) scaled to ``(T, size, size, 3)``."""
    import cv2

    from avsr.data.landmarks import FaceMeshTracker

    with FaceMeshTracker() as tracker:
        pts = next(p for p in map(tracker, frames) if p is not None)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    half = 0.8 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    pad = int(half) + 1
    top, left, side = int(round(cy - half)) + pad, int(round(cx - half)) + pad, int(2 * half)
    out = []
    for rgb in frames:
        big = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        out.append(cv2.resize(big[top: top + side, left: left + side], (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out)
