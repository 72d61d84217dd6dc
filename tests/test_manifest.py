"""Manifest I/O and atomic writes."""

from __future__ import annotations

import pytest

from avsr.data.manifest import ManifestError, ManifestRow, read_manifest, write_manifest
from avsr.utils import atomic_path


def _rows():
    return [ManifestRow("b", "train/b", 75, 48000, "BIN BLUE"), ManifestRow("a", "train/a", 74, 47360, "SET RED")]


def test_round_trip_sorted(tmp_path):
    write_manifest(tmp_path, "train", _rows())
    rows = read_manifest(tmp_path, "train")
    assert [r.utt_id for r in rows] == ["a", "b"]
    assert rows[0] == ManifestRow("a", "train/a", 74, 47360, "SET RED")
    assert rows[0].file(tmp_path, ".mp4") == (tmp_path / "train" / "a.mp4").resolve()


@pytest.mark.parametrize(
    "body, message",
    [
        ("a\ttrain/a\t75\t48000\tX\na\ttrain/a\t75\t48000\tY\n", "duplicate utterance id 'a'"),
        ("a\t../../etc/passwd\t75\t48000\tX\n", "escapes the data root"),
        ("a\ttrain/a\tseventy\t48000\tX\n", "must be integers"),
        ("a\ttrain/a\t75\n", "expected 5"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path, body, message):
    (tmp_path / "train.tsv").write_text("utt_id\tpath\tn_frames\tn_samples\ttranscript\n" + body)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path, "train")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path, "val")


def test_atomic_path_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary left behind
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Not mkstemp's 0600: other users of a shared cluster can read results and checkpoints."""
    from avsr.utils import atomic_write_text

    atomic_write_text(tmp_path / "r.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
