"""A small causal Transformer language model over the ASR tokenizer's ids, for shallow fusion.

Shallow fusion (Gulcehre et al. 2015; Kannan et al. 2018) adds ``lm_weight * log P_LM(y_i | y_<i)``
to every beam-search step. The LM reads ``<sos> y_1 .. y_n`` and predicts ``y_1 .. y_n <eos>``
with the ASR model's own tokenizer, so its output ids are the decoder's. It is trained on the
training transcripts only (``scripts/train_lm.py``) and stored as a plain-tensor checkpoint:
``{"model": state_dict, "lm_config": dict, "tokenizer": uint8 tensor, "step": int, "val_loss": float}``.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avsr.safe_load import first_line, safe_torch_load
from avsr.utils import atomic_path

log = logging.getLogger(__name__)

LMCache = list[tuple[Tensor, Tensor]]


@dataclass
class LMConfig:
    """Size of a :class:`TransformerLM`."""

    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (blank, a symbol, sos/eos), got {self.vocab_size}")
        if min(self.d_model, self.num_heads, self.num_layers, self.ffn_dim) < 1:
            raise ValueError(f"d_model, num_heads, num_layers and ffn_dim must be positive, got {self}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


def _sinusoids(positions: Tensor, dim: int) -> Tensor:
    """``(L, dim)`` sinusoidal position encodings (Vaswani et al. 2017) of integer ``positions``."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angle = positions.float()[:, None] * freq[None]
    enc = torch.cat([angle.sin(), angle.cos()], -1)
    return F.pad(enc, (0, dim - 2 * half))


class _Block(nn.Module):
    """Pre-norm causal self-attention + feed-forward block with an incremental key/value cache."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_dim), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_dim, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` ``(N, L, D)`` new positions; ``cache`` keys/values ``(N, H, L0, D/H)`` of earlier ones."""
        N, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if L != 1:
                raise ValueError(f"an LM cache extends one position at a time, got {L}")
            # the one new position sees every cached key: no mask needed
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and L > 1,
                                             dropout_p=self.dropout.p if self.training else 0.0)
        x = x + self.dropout(self.out(att.transpose(1, 2).reshape(N, L, D)))
        x = x + self.dropout(self.ffn(self.norm2(x)))
        return x, (k, v)


class TransformerLM(nn.Module):
    """Causal Transformer LM (pre-norm, sinusoidal positions, tied input/output embeddings).

    ``forward(ys)``: ``ys`` ``(B, L)`` int64 starting with ``<sos>`` -> ``(B, L, V)`` float32 logits of
    the next token. ``forward_step`` gives the same last-position log-probabilities incrementally.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # tied input/output embedding: unit-variance inputs after the sqrt(D) scale, unit-scale logits
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, ys: Tensor, start: int) -> Tensor:
        pos = torch.arange(start, start + ys.shape[1], device=ys.device)
        return self.dropout(self.embed(ys) * math.sqrt(self.cfg.d_model) + _sinusoids(pos, self.cfg.d_model))

    def _logits(self, h: Tensor) -> Tensor:
        return self.norm(h) @ self.embed.weight.t()

    def forward(self, ys: Tensor) -> Tensor:
        h = self._embed(ys, 0)
        for block in self.blocks:
            h, _ = block(h)
        return self._logits(h)

    def forward_step(self, ys: Tensor, cache: Optional[LMCache] = None) -> tuple[Tensor, LMCache]:
        """Next-token log-probabilities after the prefixes ``ys``.

        Args:
            ys: ``(N, l)`` int64 prefixes starting with ``<sos>``.
            cache: what the previous call returned for ``ys[:, :-1]`` (rows reordered with
                ``index_select`` as the beam reorders hypotheses), or None to read all of ``ys``.

        Returns:
            ``(N, V)`` float32 log-probabilities and the cache for ``ys``.
        """
        if cache is None:
            h, start = self._embed(ys, 0), 0
        else:
            start = ys.shape[1] - 1
            h = self._embed(ys[:, -1:], start)
        new_cache: LMCache = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, None if cache is None else cache[i])
            new_cache.append(kv)
        return self._logits(h[:, -1]).log_softmax(-1), new_cache

    def sequence_loss(self, sequences: Sequence[Sequence[int]], sos_id: int, eos_id: int) -> Tensor:
        """Mean cross-entropy (nats per predicted token, ``<eos>`` included) of token sequences."""
        device = self.embed.weight.device
        L = max(len(s) for s in sequences) + 1
        inp = torch.full((len(sequences), L), eos_id, dtype=torch.int64)
        tgt = torch.full((len(sequences), L), -1, dtype=torch.int64)
        for i, s in enumerate(sequences):
            inp[i, 0] = sos_id
            inp[i, 1:len(s) + 1] = torch.as_tensor(s, dtype=torch.int64)
            tgt[i, :len(s)] = torch.as_tensor(s, dtype=torch.int64)
            tgt[i, len(s)] = eos_id
        logits = self(inp.to(device))
        return F.cross_entropy(logits.flatten(0, 1), tgt.to(device).flatten(), ignore_index=-1)


def train_lm(lm: TransformerLM, train: Sequence[Sequence[int]], valid: Sequence[Sequence[int]], *, sos_id: int,
             eos_id: int, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> float:
    """Train ``lm`` in place with AdamW (linear warm-up over 10% of ``steps``, then cosine decay).

    Returns the final validation loss (nats per token); raises ValueError on empty data or
    non-positive ``steps``/``batch_size``.
    """
    if not train or not valid:
        raise ValueError("train_lm needs non-empty training and validation sequences")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))))
    lm.train()
    for step in range(steps):
        loss = lm.sequence_loss(rng.sample(list(train), min(batch_size, len(train))), sos_id, eos_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("LM step %d/%d: train loss %.3f", step + 1, steps, loss.item())
    return evaluate_lm(lm, valid, sos_id=sos_id, eos_id=eos_id)


@torch.no_grad()
def evaluate_lm(lm: TransformerLM, sequences: Sequence[Sequence[int]], *, sos_id: int, eos_id: int,
                batch_size: int = 64) -> float:
    """Token-weighted mean cross-entropy (nats per token, ``<eos>`` included) of ``sequences``."""
    lm.eval()
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        n = sum(len(s) + 1 for s in chunk)
        total += lm.sequence_loss(chunk, sos_id, eos_id).item() * n
        count += n
    return total / max(count, 1)


def save_lm(path: str | Path, lm: TransformerLM, tokenizer_bytes: bytes, step: int, val_loss: float) -> None:
    """Write an LM checkpoint (format in the module docstring) atomically."""
    state = {"model": lm.state_dict(), "lm_config": asdict(lm.cfg),
             "tokenizer": torch.frombuffer(bytearray(tokenizer_bytes), dtype=torch.uint8).clone(),
             "step": int(step), "val_loss": float(val_loss)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_lm(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[TransformerLM, bytes]:
    """Read a checkpoint of :func:`save_lm`: ``(lm in eval mode, tokenizer bytes)``.

    Raises ValueError naming the file when it is missing or not an LM checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LM checkpoint not found: {path}")
    state = safe_torch_load(path, "a language-model checkpoint", ValueError, map_location)
    try:
        lm = TransformerLM(LMConfig(**state["lm_config"]))
        lm.load_state_dict(state["model"])
        tok = bytes(state["tokenizer"].cpu().numpy().tobytes())
    except (RuntimeError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: not a language-model checkpoint ({first_line(exc)})") from None
    return lm.eval(), tok
