"""Checkpoint averaging (as in icefall/ESPnet): the element-wise mean of the last K models.

Floating-point tensors are averaged in float64 and cast back; integer tensors (e.g. batch-norm
``num_batches_tracked``) get the floor of their mean, as icefall does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from avsr.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of model ``state_dict``s with identical keys and shapes.

    Raises ``ValueError`` for an empty list, differing key sets or differing shapes.
    """
    if not states:
        raise ValueError("nothing to average (no state dicts)")
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))[:5]
            raise ValueError(f"state dict {i} has different parameters than state dict 0 (e.g. {diff})")
    out: dict[str, torch.Tensor] = {}
    n = len(states)
    for k in keys:
        ref = states[0][k]
        if any(s[k].shape != ref.shape for s in states):
            raise ValueError(f"parameter {k} has different shapes across checkpoints")
        if ref.is_floating_point():
            total = sum(s[k].to(torch.float64) for s in states)
            out[k] = (total / n).to(ref.dtype)
        else:
            total = sum(s[k].to(torch.int64) for s in states)
            out[k] = torch.div(total, n, rounding_mode="floor").to(ref.dtype)
    return out


def average_checkpoints(paths: Sequence[str | Path]) -> dict:
    """A checkpoint whose ``model`` is the mean of ``paths``' models.

    Config, tokenizer, step and epoch come from the last path; optimiser and resume state are
    left out (an average is for evaluation or fine-tuning, not for ``--resume``). Raises
    :class:`~avsr.training.checkpoint.CheckpointError` for an unreadable file and ``ValueError``
    for models that do not match.
    """
    if not paths:
        raise ValueError("nothing to average (no checkpoint paths)")
    states = [load_checkpoint(p) for p in paths]
    last = states[-1]
    log.info("averaging %d checkpoints: %s", len(paths), ", ".join(str(p) for p in paths))
    return {
        "model": average_state_dicts([s["model"] for s in states]),
        "config": last["config"],
        "tokenizer": last["tokenizer"],
        "step": last.get("step", 0),
        "epoch": last.get("epoch", 0),
        "averaged_from": [str(p) for p in paths],
    }
