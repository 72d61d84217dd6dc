"""What one transcription returns, and its JSON form (``docs/transcribe_schema.json``).

The JSON document written by ``avsr transcribe --json`` is::

    {"schema_version": 1, "checkpoint": "...", "mode": "...",
     "results": [<result>, ...], "errors": [{"path": "...", "error": "..."}, ...]}

with one ``<result>`` per input that worked (:meth:`TranscriptionResult.to_dict`) and one error
entry per input that did not. Times are seconds from the start of the input; per-frame curves
have one value per 25 fps frame of the mouth crop (``n_frames`` values) or are ``null`` where the
checkpoint or the input does not give them.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from avsr.inference.alignment import TimedToken, TimedWord
from avsr.utils import atomic_write_text

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parents[3] / "docs" / "transcribe_schema.json"


@dataclass
class TranscriptionResult:
    """One input's transcript and per-frame outputs.

    - ``text``: transcript (tokenizer's decode of the stitched tokens)
    - ``tokens`` / ``words``: timed tokens and words (seconds), from CTC forced alignment
    - ``fps``: frame rate of every per-frame array (25.0); ``n_frames`` frames, ``duration`` s
    - ``windows``: ``(start, end)`` seconds of each model window (one for clips up to the window)
    - ``face_detected``: ``(T,)`` bool, False where landmarks were interpolated (None: no video used)
    - ``mouth_opening``: ``(T,)`` float32 inner-lip gap / mouth width from the landmarks
    - ``mouth_opening_pred``: ``(T,)`` float32 from the model's mouth-opening head (None: no head)
    - ``reliability``: ``{"audio": (T,), "video": (T,)}`` float32 per-frame reliability in (0, 1),
      mean over channels (empty unless the checkpoint scores reliability)
    - ``speech``: ``(S,)`` float32 16 kHz waveform from the lip-to-speech head (None: no head)
    - ``crops``: ``(T, 96, 96)`` uint8 grayscale mouth crops (None in audio-only use)
    - ``landmarks``: ``(T, 20, 2)`` float32 lip landmarks (x, y) in crop pixels, iBUG-68 mouth order
    - ``audio``: ``(S,)`` float32 16 kHz input waveform, ``640 * T`` samples (None: no audio track)
    """

    path: str
    mode: str
    text: str
    tokens: list[TimedToken]
    words: list[TimedWord]
    n_frames: int
    fps: float = 25.0
    windows: list[tuple[float, float]] = field(default_factory=list)
    face_detected: Optional[np.ndarray] = None
    mouth_opening: Optional[np.ndarray] = None
    mouth_opening_pred: Optional[np.ndarray] = None
    reliability: dict[str, np.ndarray] = field(default_factory=dict)
    speech: Optional[np.ndarray] = None
    crops: Optional[np.ndarray] = None
    landmarks: Optional[np.ndarray] = None
    audio: Optional[np.ndarray] = None

    @property
    def duration(self) -> float:
        """Seconds covered by the frames."""
        return self.n_frames / self.fps

    def to_dict(self) -> dict:
        """JSON-ready dict (the ``result`` of the schema); arrays become lists, NaN becomes null."""

        def curve(x: Optional[np.ndarray]) -> Optional[list]:
            if x is None:
                return None
            if x.dtype == bool:
                return [bool(v) for v in x]
            return [None if not math.isfinite(v) else round(float(v), 5) for v in x]

        return {
            "path": self.path,
            "mode": self.mode,
            "text": self.text,
            "fps": self.fps,
            "n_frames": self.n_frames,
            "duration": round(self.duration, 5),
            "tokens": [{"id": t.id, "text": t.text, "start": round(t.start, 4), "end": round(t.end, 4),
                        "score": round(t.score, 5)} for t in self.tokens],
            "words": [{"word": w.word, "start": round(w.start, 4), "end": round(w.end, 4)} for w in self.words],
            "windows": [{"start": round(a, 4), "end": round(b, 4)} for a, b in self.windows],
            "face_detected": curve(self.face_detected),
            "mouth_opening": {"landmarks": curve(self.mouth_opening), "predicted": curve(self.mouth_opening_pred)},
            "reliability": {"audio": curve(self.reliability.get("audio")),
                            "video": curve(self.reliability.get("video"))},
        }


def mouth_curve(result: TranscriptionResult) -> tuple[Optional[np.ndarray], str]:
    """The mouth-opening curve to export and where it comes from: the model's prediction when the
    checkpoint has a mouth-opening head, else the landmark measurement; ``(None, "")`` if neither."""
    if result.mouth_opening_pred is not None:
        return result.mouth_opening_pred, "predicted"
    if result.mouth_opening is not None:
        return result.mouth_opening, "landmarks"
    return None, ""


def results_document(results: list[TranscriptionResult], errors: list[tuple[str, str]],
                     checkpoint: str, mode: str) -> dict:
    """The whole JSON document of one run (see the module docstring)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "checkpoint": checkpoint,
        "mode": mode,
        "results": [r.to_dict() for r in results],
        "errors": [{"path": p, "error": e} for p, e in errors],
    }


def write_json(doc: dict, path: str | Path) -> None:
    """Write ``doc`` as indented UTF-8 JSON to ``path`` atomically (``"-"`` = standard output)."""
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(path, text)
