"""Checkpoints: atomic save, safe load, resume bookkeeping and model loading.

A checkpoint is a ``dict`` of tensors and plain Python containers, so it loads with
``torch.load(..., weights_only=True)`` (a checkpoint is data, never code)::

    model       model state_dict
    config      avsr.config.to_dict(cfg)
    tokenizer   (N,) uint8 tensor of Tokenizer.to_bytes()
    step        optimiser steps done;  epoch: current epoch
    optimizer, scheduler, scaler, sampler, rng, trainer   (training checkpoints only)

Files in an experiment folder: ``step-<N>.pt`` (the last ``keep_last`` kept), ``last.pt`` (the
newest), ``best.pt`` (best validation WER) and, with ``train.average_last``, ``average.pt``
(the mean of the newest step checkpoints); ``last.pt`` and ``best.pt`` are hard links where the
file system allows, so they cost no space.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from avsr.config import Config, from_dict
from avsr.safe_load import first_line, safe_torch_load
from avsr.utils import atomic_path

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "config", "tokenizer")
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or not an avsr checkpoint."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` with a one-line message naming the file when it does not
    exist, is truncated or corrupt, holds pickled code/objects other than tensors and
    containers, or lacks the keys ``model``, ``config`` and ``tokenizer``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = safe_torch_load(path, "an avsr checkpoint", CheckpointError, map_location)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not an avsr checkpoint (needs keys {', '.join(REQUIRED_KEYS)}; has {have})")
    return state


def tokenizer_to_tensor(tokenizer) -> torch.Tensor:
    """``Tokenizer.to_bytes()`` as a ``(N,)`` uint8 tensor (storable under ``weights_only``)."""
    return torch.frombuffer(bytearray(tokenizer.to_bytes()), dtype=torch.uint8).clone()


def tokenizer_from_state(state: dict):
    """The tokenizer stored in checkpoint ``state``."""
    from avsr.text import from_bytes

    return from_bytes(state["tokenizer"].numpy().tobytes())


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) global generator states, as tensors and tuples."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        with atomic_path(dst) as part:
            shutil.copyfile(src, part)


def step_checkpoints(exp_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-<N>.pt`` files in ``exp_dir``, oldest first."""
    found = []
    for p in Path(exp_dir).glob("step-*.pt"):
        m = _STEP_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def final_model(exp_dir: str | Path) -> Path:
    """The model a finished run in ``exp_dir`` delivers: ``average.pt`` (``train.average_last``),
    else ``best.pt`` (best validation WER), else ``last.pt``. Raises ``FileNotFoundError`` when
    ``exp_dir`` holds none of them."""
    for name in ("average.pt", "best.pt", "last.pt"):
        if (Path(exp_dir) / name).is_file():
            return Path(exp_dir) / name
    raise FileNotFoundError(f"no trained model (average.pt, best.pt or last.pt) in {exp_dir}")


def latest_checkpoint(exp_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of ``exp_dir`` (highest step), or ``None``."""
    steps = step_checkpoints(exp_dir)
    if steps:
        return steps[-1][1]
    last = Path(exp_dir) / "last.pt"
    return last if last.is_file() else None


class CheckpointManager:
    """Writes ``step-<N>.pt`` + ``last.pt``, keeps the last ``keep_last``, and ``best.pt``.

    Raises ``ValueError`` when ``keep_last < 1``.
    """

    def __init__(self, exp_dir: str | Path, keep_last: int = 5) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.exp_dir = Path(exp_dir)
        self.keep_last = keep_last
        self.exp_dir.mkdir(parents=True, exist_ok=True)

    def remove_partial(self) -> None:
        """Delete temporary files a killed run left behind (``.*.part.pt``, ``.*.link``)."""
        for p in list(self.exp_dir.glob(".*.part.pt")) + list(self.exp_dir.glob(".*.link")):
            p.unlink(missing_ok=True)

    def save(self, state: dict, step: int) -> Path:
        """Write ``step-<step>.pt``, point ``last.pt`` at it, prune old step files."""
        path = save_checkpoint(state, self.exp_dir / f"step-{step}.pt")
        _link(path, self.exp_dir / "last.pt")
        for _, old in step_checkpoints(self.exp_dir)[:-self.keep_last]:
            old.unlink(missing_ok=True)
        log.info("saved checkpoint %s", path)
        return path

    def mark_best(self, path: Path) -> Path:
        """Make ``best.pt`` the checkpoint at ``path``."""
        best = self.exp_dir / "best.pt"
        _link(path, best)
        return best


def make_model(cfg, vocab_size: int) -> torch.nn.Module:
    """``avsr.models.build_model`` plus the auxiliary heads (mouth opening, lip-to-speech) that
    ``cfg`` (a :class:`~avsr.config.ModelConfig`) switches on, named as
    ``avsr.models.heads.attach_aux_heads`` names them: the model a checkpoint's weights belong to."""
    from avsr.models import build_model
    from avsr.models.heads import attach_aux_heads

    model = build_model(cfg, vocab_size)
    if len(model.aux_heads) == 0:
        attach_aux_heads(model, cfg)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Config]:
    """``(model in eval mode, tokenizer, config)`` of checkpoint ``path``.

    Raises :class:`CheckpointError` for an unreadable file or weights that do not fit the model
    its own config describes.
    """
    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    tokenizer = tokenizer_from_state(state)
    model = make_model(cfg.model, tokenizer.vocab_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model of its config ({first_line(exc)})") from None
    return model.to(device).eval(), tokenizer, cfg
