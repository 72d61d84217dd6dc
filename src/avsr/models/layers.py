"""Pieces shared by the Conformer encoder (:mod:`.conformer`) and the Transformer decoder (:mod:`.decoder`).

- :func:`feed_forward`: the pre-norm position-wise feed-forward stack.
- :class:`HeadsBase`: width checks and the head split/merge of multi-head attention; subclasses
  create their own projections (so parameter names and their order stay theirs).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def feed_forward(dim: int, hidden_dim: int, dropout: float, activation: Callable[[], nn.Module],
                 final_dropout: bool = True) -> nn.Sequential:
    """``LayerNorm, Linear(dim, hidden_dim), activation(), Dropout, Linear(hidden_dim, dim)[, Dropout]``.

    The indices of the ``nn.Sequential`` (``0`` norm, ``1`` and ``4`` linears) are the state-dict
    keys of the models built with it. Raises ValueError unless both widths are positive.
    """
    if dim <= 0 or hidden_dim <= 0:
        raise ValueError(f"dim and hidden_dim must be positive, got {dim}, {hidden_dim}")
    layers = [nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), activation(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim)]
    if final_dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class HeadsBase(nn.Module):
    """Base of the multi-head attention modules: ``h`` heads of width ``d_k = dim / h``.

    Subclasses define the projections, among them ``out`` (``Linear(dim, dim)``) that
    :meth:`merge_heads` applies. Raises ValueError unless ``dim`` is a positive multiple of
    ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        self.h, self.d_k = num_heads, dim // num_heads

    def split_heads(self, y: torch.Tensor, parts: int) -> torch.Tensor:
        """``(B, L, parts * D)`` (e.g. stacked keys and values) -> ``(parts, B, H, L, d_k)``."""
        b, n, _ = y.shape
        return y.view(b, n, parts, self.h, self.d_k).permute(2, 0, 3, 1, 4)

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, H, L, d_k)`` attention output -> ``out`` projection of ``(B, L, D)``."""
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, -1))
