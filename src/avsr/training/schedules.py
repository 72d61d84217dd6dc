"""Learning-rate schedules: linear warm-up, then cosine decay or Noam (inverse square root).

Both are multiplicative factors of the peak learning rate ``train.lr`` for a
``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimiser step. Step ``s`` (0-based)
trains with ``lr * factor(s)``; warm-up rises linearly to the peak at ``s = warmup - 1``, so the
first step never has a zero learning rate.

- cosine: ``0.5 * (1 + cos(pi * p))`` of the progress ``p`` from the end of warm-up to
  ``total_steps``, floored at ``min_ratio``;
- noam (Vaswani et al. 2017; ESPnet/AV-RelScore): ``min((s + 1) / warmup, sqrt(warmup / (s + 1)))``,
  normalised so the peak is ``lr`` rather than ``d_model ** -0.5 * warmup ** -0.5``.
"""

from __future__ import annotations

import math

import torch

from avsr.config import TrainConfig

SCHEDULES = ("cosine", "noam")


class WarmupCosine:
    """Factor of linear warm-up over ``warmup`` steps then cosine decay to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0) -> None:
        if warmup < 0 or total <= 0 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupCosine: need warmup >= 0, total > 0, 0 <= min_ratio <= 1; got {warmup}, {total}, {min_ratio}")
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Noam:
    """Factor ``min((s + 1) / warmup, sqrt(warmup / (s + 1)))``: peak 1 at the end of warm-up."""

    def __init__(self, warmup: int) -> None:
        if warmup <= 0:
            raise ValueError(f"Noam: warmup must be positive, got {warmup}")
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        s = step + 1
        return min(s / self.warmup, math.sqrt(self.warmup / s))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``cfg.schedule`` schedule over ``total_steps`` optimiser steps (cosine needs the total).

    Raises ``ValueError`` for an unknown schedule name.
    """
    if cfg.schedule == "cosine":
        factor = WarmupCosine(cfg.warmup_steps, max(1, total_steps), cfg.min_lr_ratio)
    elif cfg.schedule == "noam":
        factor = Noam(max(1, cfg.warmup_steps))
    else:
        raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
