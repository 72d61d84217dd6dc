"""Conformer encoder (Gulati et al. 2020) with relative positional self-attention.

Each block is macaron-style: ``x + FFN/2 -> x + RelPosMHSA -> x + Conv -> x + FFN/2 -> LayerNorm``.
The self-attention uses Transformer-XL relative positions (Dai et al. 2019) in the ESPnet form:
``softmax(((q + u) k^T + shift((q + v) p^T)) / sqrt(d_k))`` with learnt biases ``u, v`` per head
and sinusoidal embeddings ``p`` of the relative distances ``T - 1, ..., -(T - 1)``.

The convolution module zeroes padded frames before its depthwise convolution, and attention
masks padded keys, so in eval mode valid outputs do not depend on the padding. The interface
follows ``torchaudio.models.Conformer``: ``forward(x (B, T, D), lengths) -> (y, lengths)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avsr.models.layers import HeadsBase, feed_forward
from avsr.models.masking import check_lengths, lengths_to_mask

CONV_NORMS = ("batchnorm", "layernorm")


def relative_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embeddings ``(2 * length - 1, dim)`` of relative distances ``length-1 .. -(length-1)``."""
    pos = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(2 * length - 1, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe.to(dtype)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """``(..., T, 2T - 1)`` scores against distances ``T-1 .. -(T-1)`` -> ``(..., T, T)`` with
    ``out[..., i, j] = x[..., i, T - 1 - i + j]`` (the score of distance ``i - j``), by a pad and
    two views (no gather)."""
    *lead, t, p = x.shape
    x = F.pad(x, (1, 0)).view(*lead, p + 1, t)[..., 1:, :]
    return x.reshape(*lead, t, p)[..., :t]


class RelPositionMultiHeadAttention(HeadsBase):
    """Multi-head self-attention with relative positional scores.

    Args:
        dim: model width ``D`` (divisible by ``num_heads``).
        num_heads: attention heads ``H``.
        dropout: dropout on attention weights.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(num_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(num_heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, T, D)`` input.
            pos_emb: ``(2T - 1, D)`` from :func:`relative_positions`.
            key_mask: ``(B, T)`` bool, True on valid frames.

        Returns:
            ``(B, T, D)``.
        """
        q, k, v = self.split_heads(self.qkv(x), 3)  # each (B, H, T, d_k)
        p = self.pos(pos_emb).view(-1, self.h, self.d_k).transpose(0, 1)  # (H, 2T-1, d_k)
        scale = 1.0 / math.sqrt(self.d_k)
        ac = torch.matmul((q + self.pos_bias_u[:, None]) * scale, k.transpose(-2, -1))  # (B, H, T, T)
        bd = rel_shift(torch.matmul((q + self.pos_bias_v[:, None]) * scale, p.transpose(-2, -1)))
        scores = (ac + bd).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attn = self.dropout(torch.softmax(scores, dim=-1))
        return self.merge_heads(torch.matmul(attn, v))


class FeedForward(nn.Module):
    """Pre-norm position-wise feed-forward: LayerNorm, Linear, SiLU, dropout, Linear, dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = feed_forward(dim, hidden_dim, dropout, nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        return self.net(x)


class ConvModule(nn.Module):
    """Conformer convolution module: LayerNorm, pointwise + GLU, depthwise conv, norm, SiLU, pointwise.

    Args:
        dim: model width ``D``.
        kernel_size: depthwise kernel (odd; 31 in the paper).
        dropout: output dropout.
        norm: ``"batchnorm"`` (paper) or ``"layernorm"`` after the depthwise convolution.
    """

    def __init__(self, dim: int, kernel_size: int = 31, dropout: float = 0.0, norm: str = "batchnorm") -> None:
        super().__init__()
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if norm not in CONV_NORMS:
            raise ValueError(f"norm must be one of {', '.join(CONV_NORMS)}, got '{norm}'")
        self.pre_norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.BatchNorm1d(dim) if norm == "batchnorm" else nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, D)``, ``mask`` ``(B, T)`` bool (True = valid) -> ``(B, T, D)``."""
        y = F.glu(self.pointwise_in(self.pre_norm(x)), dim=-1)
        y = y.masked_fill(~mask[:, :, None], 0.0)  # padding must not reach valid frames through the kernel
        y = self.depthwise(y.transpose(1, 2))  # (B, D, T)
        if isinstance(self.norm, nn.BatchNorm1d):
            y = self.norm(y).transpose(1, 2)
        else:
            y = self.norm(y.transpose(1, 2))
        return self.dropout(self.pointwise_out(F.silu(y)))


class ConformerBlock(nn.Module):
    """One macaron Conformer block (see the module docstring for arguments)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, kernel_size: int, dropout: float, conv_norm: str) -> None:
        super().__init__()
        self.ffn1 = FeedForward(dim, ffn_dim, dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = RelPositionMultiHeadAttention(dim, num_heads, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = ConvModule(dim, kernel_size, dropout, conv_norm)
        self.ffn2 = FeedForward(dim, ffn_dim, dropout)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, D)``, ``pos_emb`` ``(2T-1, D)``, ``mask`` ``(B, T)`` bool -> ``(B, T, D)``."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), pos_emb, mask))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


class Conformer(nn.Module):
    """A stack of Conformer blocks with relative positional self-attention.

    Args:
        input_dim: model width ``D``.
        num_heads: attention heads (``D`` divisible by it).
        ffn_dim: hidden width of the feed-forward modules.
        num_layers: blocks.
        depthwise_conv_kernel_size: kernel of the convolution modules (odd).
        dropout: dropout everywhere (attention weights, feed-forward, residual branches).
        conv_norm: ``"batchnorm"`` or ``"layernorm"`` in the convolution modules.

    Raises ValueError on invalid sizes (the same arguments as ``torchaudio.models.Conformer``).
    """

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        depthwise_conv_kernel_size: int = 31,
        dropout: float = 0.0,
        conv_norm: str = "batchnorm",
    ) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.pos_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            ConformerBlock(input_dim, num_heads, ffn_dim, depthwise_conv_kernel_size, dropout, conv_norm)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: ``(B, T, D)`` input frames.
            lengths: ``(B,)`` int64 valid frames.

        Returns:
            ``(y, lengths)``: ``(B, T, D)`` output (zero on padding) and ``lengths``.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, D), got {tuple(x.shape)}")
        check_lengths(x, lengths, 1, "x")
        mask = lengths_to_mask(lengths, x.shape[1])
        pos_emb = self.pos_dropout(relative_positions(x.shape[1], x.shape[2], x.device, x.dtype))
        for layer in self.layers:
            x = layer(x, pos_emb, mask)
        return x.masked_fill(~mask[:, :, None], 0.0), lengths
