"""Reliability scoring of one modality's features (Hong et al., CVPR 2023, Sec. 3.2).

Three 1-D convolutions over time (kernel 7) end in a sigmoid that scores every frame and
channel in (0, 1); the features are re-weighted as ``f * s + f``, so an unreliable frame is
attenuated towards ``f`` rather than erased and a reliable one is amplified up to ``2 f``. The
module is trained only through the recognition loss; the scores are returned for inspection.
"""

from __future__ import annotations

import torch
from torch import nn

from avsr.models.masking import check_lengths, lengths_to_mask


class ReliabilityScorer(nn.Module):
    """Per-frame, per-channel reliability scores of a feature sequence.

    Args:
        dim: feature channels ``C``.
        num_layers: convolutions (3 in the paper); ReLU between them, sigmoid after the last.
        kernel_size: temporal kernel (odd; 7 in the paper).
        hidden_dim: channels of the inner convolutions (default ``dim``).

    Raises ValueError for non-positive sizes or an even kernel.
    """

    def __init__(self, dim: int, num_layers: int = 3, kernel_size: int = 7, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or dim
        if min(dim, num_layers, kernel_size, hidden_dim) <= 0:
            raise ValueError(f"dim, num_layers, kernel_size, hidden_dim must be positive, got "
                             f"{dim}, {num_layers}, {kernel_size}, {hidden_dim}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        chans = [dim] + [hidden_dim] * (num_layers - 1) + [dim]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, kernel_size, padding=kernel_size // 2) for a, b in zip(chans, chans[1:]))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            feats: ``(B, T, C)`` features, zero on padding.
            lengths: ``(B,)`` int64 valid frames.

        Returns:
            ``(scored, scores, lengths)``: re-weighted features ``feats * scores + feats``
            ``(B, T, C)``; scores ``(B, T, C)`` in (0, 1) on valid frames and 0 on padding;
            ``lengths``.
        """
        if feats.dim() != 3:
            raise ValueError(f"feats must be (B, T, C), got {tuple(feats.shape)}")
        check_lengths(feats, lengths, 1, "feats")
        mask = lengths_to_mask(lengths, feats.shape[1])[:, None, :]  # (B, 1, T)
        x = feats.transpose(1, 2) * mask
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = torch.sigmoid(x) if i == len(self.convs) - 1 else self.relu(x)
            x = x * mask
        scores = x.transpose(1, 2)
        return feats * scores + feats, scores, lengths
