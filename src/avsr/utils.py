"""Small shared helpers: atomic file writes, seeding, logging, thread limits, data location."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV = "AVSR_DATA"


def real_data_dir() -> Path:
    """Folder of the real GRID clips: ``$AVSR_DATA``, default ``<repo>/../shared/data/real``."""
    return Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data" / "real")).resolve()


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once (umask can only be read by setting it)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A killed process or an exception leaves ``path`` as it was (old content or absent) and
    removes the temporary file. ``suffix`` (default: ``path``'s own) keeps writers that pick a
    format from the extension (PyAV, soundfile) working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = suffix if suffix is not None else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{ext}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that runs repeat."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_num_threads(n: int | None = None) -> None:
    """Limit torch/OpenCV CPU threads (default ``$AVSR_THREADS`` or 2, this project's CPU budget)."""
    import cv2
    import torch

    n = n or int(os.environ.get("AVSR_THREADS", "2"))
    torch.set_num_threads(n)
    cv2.setNumThreads(n)


def setup_logging(level: int = logging.INFO, log_file: str | Path | None = None) -> None:
    """Configure the root logger: ``time level name: message`` to stderr (and ``log_file``)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
