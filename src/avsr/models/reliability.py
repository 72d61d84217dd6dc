"""Reliability scoring of one modality's features (Hong et al., CVPR 2023, Sec. 3.2).

Three 1-D convolutions over time (kernel 7) end in a sigmoid that scores every frame and
channel in (0, 1); the features are re-weighted as ``f * s + f``, so an unreliable frame is
attenuated towards ``f`` rather than erased and a reliable one is amplified up to ``2 f``. The
module is trained only through the recognition loss; the scores are returned for inspection.

Two layouts (``model.relscore_variant``): ``"ours"`` keeps width ``C`` and has no
normalisation; ``"reference"`` follows the AV-RelScore reference code (``Scoring_Module``):
Conv1d ``C -> 2C -> 2C -> C`` with BatchNorm1d after every convolution, the last included
(conv, BN, ReLU, conv, BN, ReLU, conv, BN, sigmoid). Unlike the reference, the batch norms here
see valid frames only (their batch statistics and running averages skip padding), and every
layer's output is zero on padding, so in eval mode a clip's scores do not depend on the batch.
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
        hidden_dim: channels of the inner convolutions (default ``dim``; ``2 * dim`` in the
            AV-RelScore reference code).
        batch_norm: BatchNorm1d after every convolution, the last included (the reference
            code's layout, after Hong et al. 2023); its statistics are taken over valid frames only.

    Raises ValueError for non-positive sizes or an even kernel.
    """

    def __init__(self, dim: int, num_layers: int = 3, kernel_size: int = 7, hidden_dim: int | None = None,
                 batch_norm: bool = False) -> None:
        super().__init__()
        hidden_dim = hidden_dim or dim
        if min(dim, num_layers, kernel_size, hidden_dim) <= 0:
            raise ValueError(f"dim, num_layers, kernel_size, hidden_dim must be positive, got "
                             f"{dim}, {num_layers}, {kernel_size}, {hidden_dim}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        chans = [dim] + [hidden_dim] * (num_layers - 1) + [dim]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, kernel_size, padding=kernel_size // 2) for a, b in zip(chans, chans[1:]))
        # registered after the convolutions: the last norm is the last affine layer before the sigmoid
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in chans[1:]) if batch_norm else None
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
        valid = lengths_to_mask(lengths, feats.shape[1])  # (B, T)
        mask = valid[:, None, :]  # (B, 1, T)
        x = feats.transpose(1, 2) * mask
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self._masked_norm(self.norms[i], x, valid)
            x = torch.sigmoid(x) if i == len(self.convs) - 1 else self.relu(x)
            x = x * mask
        scores = x.transpose(1, 2)
        return feats * scores + feats, scores, lengths

    @staticmethod
    def _masked_norm(norm: nn.BatchNorm1d, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``norm`` over the valid frames of ``x`` ``(B, C, T)`` only (``valid`` ``(B, T)`` bool);
        padding comes out zero. Equals ``norm(x)`` on valid frames when nothing is padded."""
        if bool(valid.all()):
            return norm(x)
        frames = x.transpose(1, 2)  # (B, T, C)
        out = frames.new_zeros(frames.shape)
        out[valid] = norm(frames[valid])  # (N, C): batch statistics of the N valid frames
        return out.transpose(1, 2)
