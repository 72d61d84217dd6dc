"""Tensorboard output of a training run (rank 0 only): scalars, mouth crops, reliability curves.

Scalars: every loss term under ``train/``, ``train/lr``, ``train/grad_norm``,
``train/frames_per_s``, and ``val/loss``, ``val/wer``. Images: the first clips of a training
batch as a strip of mouth crops (as the model sees them, corruption included), and the
per-frame reliability scores (mean over channels) of each modality when the model has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from avsr.data.batch import Batch


def crop_strip(batch: Batch, mean: float, std: float, clips: int = 4, frames: int = 8) -> np.ndarray:
    """``(clips*H, frames*W)`` uint8 image: ``frames`` evenly spaced crops of the first clips."""
    rows = []
    for b in range(min(clips, len(batch))):
        t = int(batch.video_lengths[b])
        idx = np.linspace(0, t - 1, num=min(frames, t)).round().astype(int)
        video = batch.video[b, idx, 0].float().cpu().numpy() * std + mean  # (k, H, W) in [0, 1]
        row = np.concatenate(list(video), axis=1)
        if len(idx) < frames:
            row = np.pad(row, ((0, 0), (0, (frames - len(idx)) * video.shape[2])))
        rows.append(row)
    return (np.clip(np.concatenate(rows, axis=0), 0.0, 1.0) * 255).astype(np.uint8)


def reliability_figure(reliability: Mapping[str, torch.Tensor], lengths: torch.Tensor, utt_id: str):
    """Matplotlib figure of the first clip's per-frame mean reliability score per modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    t = int(lengths[0])
    for name, scores in reliability.items():
        curve = scores[0, :t].float().mean(-1).detach().cpu().numpy()
        ax.plot(np.arange(len(curve)) / 25.0, curve, label=name)
    ax.set(xlabel="time (s)", ylabel="mean score", ylim=(0, 1), title=f"reliability: {utt_id}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


class Monitor:
    """Writes tensorboard events under ``<log_dir>``; every method is a no-op when disabled."""

    def __init__(self, log_dir: str | Path, enabled: bool = True) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def images(self, batch: Batch, reliability: Optional[Mapping[str, torch.Tensor]],
               enc_lengths: Optional[torch.Tensor], step: int, mean: float, std: float) -> None:
        """Mouth-crop strip of ``batch`` and, if given, reliability ``(B, T, C)`` over ``enc_lengths``."""
        if self.writer is None:
            return
        self.writer.add_image("train/mouth_crops", crop_strip(batch, mean, std), step, dataformats="HW")
        if reliability and enc_lengths is not None:
            import matplotlib.pyplot as plt

            fig = reliability_figure(reliability, enc_lengths, batch.utt_ids[0])
            self.writer.add_figure("train/reliability", fig, step)
            plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
