"""The batch every model, loss and decoder consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch

IGNORE_ID = -1  # padding value of target token ids (ignored by the losses)


@dataclass
class Batch:
    """A padded mini-batch. Lengths give the valid prefix of each padded axis.

    - ``video``: ``(B, T, 1, H, W)`` float32, normalised grayscale mouth ROI at 25 fps (H = W = 88)
    - ``video_lengths``: ``(B,)`` int64 frames
    - ``audio``: ``(B, S)`` float32 waveform in [-1, 1] at 16 kHz, ``S = 640 * T`` for aligned clips
    - ``audio_lengths``: ``(B,)`` int64 samples
    - ``tokens``: ``(B, L)`` int64 token ids, padded with ``IGNORE_ID`` (-1)
    - ``token_lengths``: ``(B,)`` int64
    - ``mouth_opening``: ``(B, T)`` float32 inner-lip gap / mouth width per frame (0 on padding)
    - ``landmarks``: ``(B, T, 20, 2)`` float32 lip landmarks (x, y) in ROI pixels
    - ``utt_ids``, ``transcripts``: per-utterance strings
    """

    video: torch.Tensor
    video_lengths: torch.Tensor
    audio: torch.Tensor
    audio_lengths: torch.Tensor
    tokens: torch.Tensor
    token_lengths: torch.Tensor
    utt_ids: list[str] = field(default_factory=list)
    transcripts: list[str] = field(default_factory=list)
    mouth_opening: Optional[torch.Tensor] = None
    landmarks: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**moved)

    def __len__(self) -> int:
        return int(self.video_lengths.shape[0])

