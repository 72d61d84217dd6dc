"""Shared fixtures.

Real GRID clips are found through ``$AVSR_DATA`` (default ``../shared/data/real``). Without them
the tests that need them are skipped with a reason — unless ``AVSR_REQUIRE_DATA=1`` (set by
``.ci/run``), which turns a missing data folder into a failure so CI always runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avsr.utils import real_data_dir, set_num_threads

set_num_threads(2)


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
