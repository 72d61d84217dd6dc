"""Shared fixtures, and helpers the test modules import (``from conftest import one_thread``).

Real GRID clips are found through ``$AVSR_DATA`` (default ``../shared/data/real``). Without them
the tests that need them are skipped with a reason — unless ``AVSR_REQUIRE_DATA=1`` (set by
``.ci/run``), which turns a missing data folder into a failure so CI always runs them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Iterator

import pytest

from avsr.utils import real_data_dir, set_num_threads

set_num_threads(2)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread (restored after): with other jobs on the 2 cores, two
    spinning OpenMP threads stall (a 150-step run took 230 s on 2 threads and 25 s on 1 at load 7)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError (SIGALRM) when the block runs longer than ``seconds``, instead of hanging."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    msg = f"{what} not found at {path} (set AVSR_DATA to the folder holding grid_s1_tvr28/)"
    if os.environ.get("AVSR_REQUIRE_DATA") == "1":
        pytest.fail(msg + "; AVSR_REQUIRE_DATA=1 makes this a failure", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def grid_dir() -> Path:
    """The real GRID s1 set (500 clips, ``video/``, ``align/``, ``transcripts.tsv``, splits)."""
    return _require(real_data_dir() / "grid_s1_tvr28", "GRID s1 clips")


@pytest.fixture(scope="session")
def lipnet_dir() -> Path:
    """The unseen-speaker GRID clips — evaluation only, never train or tune on them."""
    return _require(real_data_dir() / "grid_lipnet_samples", "GRID unseen-speaker clips")


@pytest.fixture(scope="session")
def s4_dir() -> Path:
    """GRID s4 (a speaker no s1 model has seen): adapt on ``split_adapt.txt``, report on ``split_test.txt``."""
    return _require(real_data_dir() / "grid_s4_vid2speech", "GRID s4 clips")


# GRID s1 clips of the `grid_prepared` corpus: six train clips (lgbf8n starts with 12 grey
# frames, lrae3s decodes to 74 frames) and three test clips.
GRID_PREPARED_CLIPS = {
    "train": ("bbaf2n", "bbaf5a", "bbal6n", "bbal8p", "lgbf8n", "lrae3s"),
    "test": ("bbal9a", "bbbf7s", "bgat8n"),
}


@pytest.fixture(scope="session")
def grid_prepared(grid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preprocessed corpus root (``train.tsv``, ``test.tsv``, ``<split>/<utt_id>.{mp4,wav,txt,npz}``)
    made by ``avsr.data.preprocess`` from the real GRID s1 clips in :data:`GRID_PREPARED_CLIPS`
    (mediapipe landmarks; ~5 s). Read only: copy it before changing anything."""
    from avsr.config import PreprocessConfig
    from avsr.data.corpora import discover
    from avsr.data.preprocess import preprocess

    wanted = {u for ids in GRID_PREPARED_CLIPS.values() for u in ids}
    utts = [u for u in discover("grid", grid_dir) if u.utt_id in wanted]
    root = tmp_path_factory.mktemp("grid_prepared")
    summary = preprocess(utts, root, PreprocessConfig(), workers=1, progress=False)
    assert summary.kept == len(wanted), f"grid_prepared lost clips: {summary.failures}"
    return root


# Smaller than configs/model/tiny.yaml: every branch of the full model (both frontends, reliability
# scorers, Conformer, decoder) at a size that trains a step in about a second on this CPU.
MICRO_AVSR = [
    "model.mode=audiovisual_relscore", "model.visual_width=8", "model.visual_stem_kernel_t=3",
    "model.audio_frontend=logmel", "model.audio_width=16", "model.frontend_dim=64", "model.d_model=64",
    "model.num_heads=2", "model.ffn_dim=128", "model.num_layers=2", "model.conv_kernel=15", "model.decoder_layers=1",
    "model.decoder_ffn_dim=128", "model.relscore_layers=2", "model.mouth_opening_weight=0.5",
    "model.lip2speech_weight=0.5", "text.kind=char",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(grid_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.pt`` of a micro ``audiovisual_relscore`` model with both auxiliary heads (mouth
    opening ``"mouth"``, lip-to-speech ``"l2s"``) trained for 3 steps (with visual corruption) on
    ``grid_prepared``'s train split and validated on its test split, written by ``avsr.training``
    (load it with ``avsr.training.load_model``). Untrained: test plumbing with it, never accuracy."""
    from avsr.config import load_config
    from avsr.training.loop import Trainer

    exp = tmp_path_factory.mktemp("tiny_checkpoint")
    cfg = load_config(None, [
        f"data.root={grid_prepared}", f"train.exp_dir={exp}", *MICRO_AVSR, "data.val_split=test",
        "data.num_workers=0", "data.max_frames=150", "data.num_buckets=1", "train.max_steps=3", "train.epochs=10",
        "train.warmup_steps=2", "train.save_step=3", "train.eval_step=3", "train.log_step=1"])
    with one_thread():
        return Trainer(cfg).fit()
