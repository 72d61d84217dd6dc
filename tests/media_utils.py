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
