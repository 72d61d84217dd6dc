"""The manifest of a preprocessed split: ``<root>/<split>.tsv``.

One header line, then one row per kept clip::

    utt_id  path  n_frames  n_samples  transcript

``path`` is relative to ``<root>`` and has no extension: ``<root>/<path>.mp4`` (96x96 grayscale
mouth ROI, 25 fps), ``.wav`` (16 kHz mono), ``.txt`` (transcript) and ``.npz`` (lip landmarks in
ROI coordinates, mouth opening, face mask) belong to the clip.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

from avsr.utils import atomic_write_text

COLUMNS = ("utt_id", "path", "n_frames", "n_samples", "transcript")


class ManifestError(ValueError):
    """A manifest is missing, malformed, or points outside its data root."""


@dataclass(frozen=True)
class ManifestRow:
    utt_id: str
    path: str  # relative to the data root, no extension
    n_frames: int  # video frames at 25 fps
    n_samples: int  # audio samples at 16 kHz
    transcript: str

    def file(self, root: str | Path, ext: str) -> Path:
        """``<root>/<path><ext>``; raises :class:`ManifestError` if it escapes ``root``."""
        root = Path(root).resolve()
        full = (root / (self.path + ext)).resolve()
        if not full.is_relative_to(root):
            raise ManifestError(f"manifest path '{self.path}' of {self.utt_id} escapes the data root {root} "
                                f"('{self.path}{ext}' is {full})")
        return full


def manifest_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.tsv"


def read_manifest(root: str | Path, split: str) -> list[ManifestRow]:
    """Rows of ``<root>/<split>.tsv``; ``split`` may join several with ``+`` (``pretrain+trainval``):
    their rows in that order, each utterance id then prefixed with its split (``pretrain/<utt_id>``),
    as LRS3 reuses ``<spk>/<clip>`` names across its folders.

    Raises :class:`ManifestError` when a file is missing, the header is wrong, a row is
    malformed (naming the line), an utterance id repeats, or a path escapes ``root``.
    """
    if "+" in split:
        return [dataclasses.replace(r, utt_id=f"{name}/{r.utt_id}")
                for name in split.split("+") for r in read_manifest(root, name)]
    path = manifest_path(root, split)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    rows: list[ManifestRow] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ManifestError(f"{path}: header must be {' '.join(COLUMNS)}, got {header}")
        for lineno, rec in enumerate(reader, start=2):
            if len(rec) != len(COLUMNS):
                raise ManifestError(f"{path}:{lineno}: expected {len(COLUMNS)} tab-separated fields, got {len(rec)}")
            try:
                row = ManifestRow(rec[0], rec[1], int(rec[2]), int(rec[3]), rec[4])
            except ValueError:
                raise ManifestError(f"{path}:{lineno}: n_frames and n_samples must be integers") from None
            if row.utt_id in seen:
                raise ManifestError(f"{path}:{lineno}: duplicate utterance id '{row.utt_id}'")
            row.file(root, "")  # path-escape check
            seen.add(row.utt_id)
            rows.append(row)
    return rows


def write_manifest(root: str | Path, split: str, rows: list[ManifestRow]) -> Path:
    """Write ``<root>/<split>.tsv`` atomically, rows sorted by utterance id."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
    writer.writerow(COLUMNS)
    for r in sorted(rows, key=lambda r: r.utt_id):
        writer.writerow([r.utt_id, r.path, r.n_frames, r.n_samples, r.transcript])
    path = manifest_path(root, split)
    atomic_write_text(path, buf.getvalue())
    return path
