"""Padding masks and output lengths: the one place where lengths turn into masks."""

from __future__ import annotations

import torch


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``(B, T)`` bool mask, True on the first ``lengths[b]`` steps of row ``b`` (the valid frames).

    ``lengths`` is ``(B,)`` integer; ``T = max_len`` or ``lengths.max()``.
    """
    t = int(lengths.max()) if max_len is None else max_len
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


def conv_lengths(lengths: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """Output lengths of a 1-D convolution or pooling (dilation 1) on inputs of ``lengths``."""
    return torch.div(lengths + 2 * padding - kernel_size, stride, rounding_mode="floor") + 1


def check_lengths(x: torch.Tensor, lengths: torch.Tensor, dim: int, name: str) -> None:
    """Raise ValueError unless ``lengths`` is ``(B,)`` with ``1 <= lengths <= x.shape[dim]``."""
    if lengths.dim() != 1 or lengths.shape[0] != x.shape[0]:
        raise ValueError(f"{name}_lengths must be ({x.shape[0]},), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > x.shape[dim]):
        raise ValueError(f"{name}_lengths must lie in [1, {x.shape[dim]}], got {lengths.tolist()}")
