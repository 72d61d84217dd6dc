"""Losses of the hybrid CTC/attention objective (Watanabe et al. 2017; Hong et al. 2023 Sec. 3.4).

``loss = ctc_weight * CTC + (1 - ctc_weight) * attention``, both normalised per target token:
the CTC loss of each utterance is divided by its target length and averaged over the batch;
the attention loss is a label-smoothed KL divergence averaged over target tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avsr.data.batch import IGNORE_ID
from avsr.models.masking import lengths_to_mask


def add_sos_eos(tokens: torch.Tensor, lengths: torch.Tensor, sos_eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and targets from padded token ids.

    Args:
        tokens: ``(B, L)`` int64 ids, valid on the first ``lengths[b]`` positions.
        lengths: ``(B,)`` int64.
        sos_eos: the ``<sos/eos>`` id.

    Returns:
        ``(ys_in, ys_out)`` both ``(B, L + 1)``: ``[sos, y_1 .. y_n, eos, eos ..]`` and
        ``[y_1 .. y_n, eos, IGNORE_ID ..]``.
    """
    b, length = tokens.shape
    valid = lengths_to_mask(lengths, length)
    ys_in = tokens.new_full((b, length + 1), sos_eos)
    ys_in[:, 1:] = tokens.masked_fill(~valid, sos_eos)
    ys_out = tokens.new_full((b, length + 1), IGNORE_ID)
    ys_out[:, :length] = tokens.masked_fill(~valid, IGNORE_ID)
    ys_out[torch.arange(b, device=tokens.device), lengths] = sos_eos
    return ys_in, ys_out


def label_smoothing_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL divergence to label-smoothed targets (as ESPnet's ``LabelSmoothingLoss``), mean per token.

    The smoothed target puts ``1 - smoothing + smoothing / V`` on the true class and
    ``smoothing / V`` elsewhere; subtracting its entropy from the cross-entropy makes the loss
    zero exactly when the prediction equals it.

    Args:
        logits: ``(B, L, V)``.
        targets: ``(B, L)`` int64, ``IGNORE_ID`` where not scored.
        smoothing: in ``[0, 1)``.

    Returns:
        ``(loss, accuracy)`` scalars; accuracy is the argmax hit rate over scored tokens.
    """
    v = logits.shape[-1]
    flat, tgt = logits.reshape(-1, v).float(), targets.reshape(-1)
    ce = F.cross_entropy(flat, tgt, ignore_index=IGNORE_ID, label_smoothing=smoothing)
    hit, off = 1.0 - smoothing + smoothing / v, smoothing / v
    entropy = -hit * math.log(hit) - (v - 1) * off * math.log(off) if smoothing > 0 else 0.0
    scored = tgt != IGNORE_ID
    acc = (flat.argmax(-1)[scored] == tgt[scored]).float().mean()
    return ce - entropy, acc


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, token_lengths: torch.Tensor, blank: int = 0) -> torch.Tensor:
    """CTC loss per target token, averaged over the batch.

    Args:
        log_probs: ``(B, T, V)`` log-probabilities.
        lengths: ``(B,)`` int64 valid frames.
        tokens: ``(B, L)`` int64 padded targets (padding ignored through ``token_lengths``).
        token_lengths: ``(B,)`` int64.

    Impossible alignments (fewer frames than the targets need) give 0 instead of infinity.
    """
    return F.ctc_loss(
        log_probs.transpose(0, 1).float(), tokens.clamp(min=0), lengths, token_lengths,
        blank=blank, reduction="mean", zero_infinity=True,
    )
