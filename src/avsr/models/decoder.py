"""Transformer decoder of the attention branch (Vaswani et al. 2017), pre-norm as in ESPnet.

Token embedding (scaled by sqrt(D)) + sinusoidal absolute positions, then layers of causal
self-attention, cross-attention to the encoder output and a feed-forward module, a final
LayerNorm and a linear layer to the vocabulary.

:meth:`TransformerDecoder.forward_step` decodes incrementally for beam search: it caches each
layer's self-attention keys/values of the prefix and the cross-attention keys/values of the
encoder output, so a step costs one new position, and it gives the same log-probabilities as
:meth:`TransformerDecoder.forward` on the same prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avsr.models.layers import HeadsBase, feed_forward
from avsr.models.masking import lengths_to_mask


@dataclass
class DecoderCache:
    """Cached keys/values of :meth:`TransformerDecoder.forward_step`, one entry per layer.

    ``self_k/self_v``: ``(N, H, l, d_k)`` of the ``l`` prefix tokens seen so far;
    ``memory_k/memory_v``: ``(N, H, T, d_k)`` of the encoder output. Every tensor has the
    hypotheses on dim 0: reorder or prune them with :meth:`select`.
    """

    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    memory_k: list[torch.Tensor]
    memory_v: list[torch.Tensor]

    @property
    def length(self) -> int:
        """Prefix tokens held (``l``)."""
        return self.self_k[0].shape[2]

    def select(self, index: torch.Tensor) -> "DecoderCache":
        """The cache of hypotheses ``index`` (``(N',)`` int64 rows), e.g. the surviving beams."""
        pick = lambda ts: [t.index_select(0, index) for t in ts]  # noqa: E731
        return DecoderCache(pick(self.self_k), pick(self.self_v), pick(self.memory_k), pick(self.memory_v))


def _sinusoids(start: int, length: int, dim: int, device: torch.device) -> torch.Tensor:
    """``(length, dim)`` sinusoidal embeddings of absolute positions ``start .. start+length-1``."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe


class MultiHeadAttention(HeadsBase):
    """Multi-head attention whose keys/values can be projected once and reused.

    Args:
        dim: model width ``D`` (divisible by ``num_heads``).
        num_heads: heads ``H``.
        dropout: dropout on attention weights.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__(dim, num_heads)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, D)`` -> keys and values ``(B, H, L, d_k)`` each."""
        k, v = self.split_heads(self.kv(x), 2)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Queries from ``x`` ``(B, Lq, D)`` over ``k, v`` ``(B, H, Lk, d_k)``; ``mask`` bool
        broadcastable to ``(B, H, Lq, Lk)``, True = may attend. Returns ``(B, Lq, D)``."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.merge_heads(y)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention, feed-forward (ReLU)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.src_norm = nn.LayerNorm(dim)
        self.src_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.ffn = feed_forward(dim, ffn_dim, dropout, nn.ReLU, final_dropout=False)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None,
        self_mask: torch.Tensor | None,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """New positions ``x`` ``(N, l, D)`` after ``past_kv`` ``(N, H, p, d_k)`` (or None).

        Returns ``(y (N, l, D), (k, v))`` with the keys/values of all ``p + l`` positions.
        """
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        x = x + self.dropout(self.self_attn.attend(h, k, v, self_mask))
        x = x + self.dropout(self.src_attn.attend(self.src_norm(x), *memory_kv, memory_mask))
        x = x + self.dropout(self.ffn(x))
        return x, (k, v)


class TransformerDecoder(nn.Module):
    """Attention decoder over encoder frames.

    Args:
        vocab_size: output classes ``V`` (tokenizer vocabulary).
        dim: model width ``D`` (the encoder's).
        num_heads: attention heads.
        ffn_dim: feed-forward hidden width.
        num_layers: decoder layers.
        dropout: dropout on embeddings, attention weights and residual branches.

    Raises ValueError on invalid sizes.
    """

    def __init__(self, vocab_size: int, dim: int, num_heads: int, ffn_dim: int, num_layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        if vocab_size < 2 or num_layers <= 0 or ffn_dim <= 0:
            raise ValueError(f"need vocab_size >= 2, num_layers > 0, ffn_dim > 0; got {vocab_size}, {num_layers}, {ffn_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim, self.vocab_size = dim, vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        self.embed_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab_size)

    def _run(
        self, ys: torch.Tensor, start: int, memory_mask: torch.Tensor, cache: DecoderCache
    ) -> tuple[torch.Tensor, DecoderCache]:
        """Hidden states ``(N, l, D)`` of tokens ``ys`` ``(N, l)`` at positions ``start..`` given
        a cache holding ``start`` prefix positions (self keys/values empty when ``start == 0``)."""
        n, length = ys.shape
        x = self.embed(ys) * math.sqrt(self.dim) + _sinusoids(start, length, self.dim, ys.device).to(self.embed.weight.dtype)
        x = self.embed_dropout(x)
        self_mask = None
        if length > 1:  # causal: position start+i sees keys 0..start+i
            keys = torch.arange(start + length, device=ys.device)
            self_mask = keys[None, :] <= (start + torch.arange(length, device=ys.device))[:, None]
        mem_mask = memory_mask[:, None, None, :]
        new = DecoderCache([], [], cache.memory_k, cache.memory_v)
        for i, layer in enumerate(self.layers):
            past = (cache.self_k[i], cache.self_v[i]) if start else None
            x, (k, v) = layer(x, past, self_mask, (cache.memory_k[i], cache.memory_v[i]), mem_mask)
            new.self_k.append(k)
            new.self_v.append(v)
        return self.final_norm(x), new

    def _memory_cache(self, memory: torch.Tensor) -> DecoderCache:
        kv = [layer.src_attn.keys_values(memory) for layer in self.layers]
        return DecoderCache([], [], [k for k, _ in kv], [v for _, v in kv])

    def _check(self, ys: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> None:
        if ys.dim() != 2 or memory.dim() != 3 or memory.shape[-1] != self.dim:
            raise ValueError(f"need ys (N, L) and memory (N, T, {self.dim}); got {tuple(ys.shape)}, {tuple(memory.shape)}")
        if memory_mask.shape != memory.shape[:2] or memory_mask.dtype != torch.bool:
            raise ValueError(f"memory_mask must be bool {tuple(memory.shape[:2])}, got {memory_mask.dtype} {tuple(memory_mask.shape)}")
        if ys.shape[0] != memory.shape[0]:
            raise ValueError(f"ys has {ys.shape[0]} rows but memory has {memory.shape[0]}")

    def forward(self, ys_in: torch.Tensor, memory: torch.Tensor, memory_lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            ys_in: ``(B, L)`` int64 input tokens (``<sos>`` first; padding any valid id).
            memory: ``(B, T, D)`` encoder output.
            memory_lengths: ``(B,)`` int64 valid encoder frames.

        Returns:
            ``(B, L, V)`` logits; position ``i`` depends on ``ys_in[:, :i+1]`` only.
        """
        mask = lengths_to_mask(memory_lengths, memory.shape[1])
        self._check(ys_in, memory, mask)
        hidden, _ = self._run(ys_in, 0, mask, self._memory_cache(memory))
        return self.output(hidden)

    def forward_step(
        self, ys: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, cache: DecoderCache | None = None
    ) -> tuple[torch.Tensor, DecoderCache]:
        """Log-probabilities of the token after each prefix, reusing ``cache``.

        Args:
            ys: ``(N, l)`` int64 prefixes (``<sos>`` first), ``N`` = batch x beam.
            memory: ``(N, T, D)`` encoder output per hypothesis (read only when ``cache`` is None).
            memory_mask: ``(N, T)`` bool, True on valid encoder frames.
            cache: the cache returned by the previous call for ``ys[:, :-1]`` (or any shorter
                prefix of ``ys``), reordered with :meth:`DecoderCache.select` when hypotheses
                moved; None on the first call.

        Returns:
            ``(log_probs, cache)``: ``(N, V)`` log-probabilities of the next token (equal to
            ``log_softmax(forward(ys, ...))[:, -1]``) and the cache for ``ys``.

        Raises ValueError when shapes disagree or the cache is not shorter than ``ys``.
        """
        self._check(ys, memory, memory_mask)
        if cache is None:
            cache = self._memory_cache(memory)
            start = 0
        else:
            start = cache.length
            if start >= ys.shape[1] or cache.memory_k[0].shape[0] != ys.shape[0]:
                raise ValueError(
                    f"cache holds {start} positions of {cache.memory_k[0].shape[0]} hypotheses; "
                    f"ys is {tuple(ys.shape)}: the cache must be for a shorter prefix of the same hypotheses"
                )
        hidden, cache = self._run(ys[:, start:], start, memory_mask, cache)
        return torch.log_softmax(self.output(hidden[:, -1]), dim=-1), cache
