"""LRS2- and LRS3-shaped corpora made from real GRID clips, for the LRS recipe tests.

Each clip is a 160x160 face crop (:func:`media_utils.face_crop`), H.264 + AAC at 25 fps, with an LRS
``.txt`` (``Text:`` and ``Conf:`` lines, then ``WORD START END ASDSCORE`` word timings in seconds from the
clip's ``.align`` file, except for LRS2 ``main/``, which ships without them) and 68-point landmarks
(mediapipe face mesh mapped to the iBUG points) in a landmark tree that mirrors the corpus, as the
landmarks of Ma et al. do: pickles (a list with an array or ``None`` per frame) for one subset, ``.npz``
for the others. ``pretrain/`` clips are three GRID clips one after the other (9 s, 18 words), longer
than the first curriculum stages, so training has to cut them at word boundaries.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from avsr.data.corpora import read_align
from avsr.data.landmarks import FaceMeshTracker, save_landmarks
from avsr.data.media import read_audio, read_video
from media_utils import face_crop, write_av

SILENCE = ("sil", "sp")


def _clip(grid: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[tuple[str, float, float]]]:
    """Face-cropped RGB frames, 16 kHz audio and word timings (s) of the GRID clips ``ids`` in a row."""
    frames, waves, words, offset = [], [], [], 0.0
    for gid in ids:
        src = grid / "video" / f"{gid}.mpg"
        rgb = face_crop(read_video(src, fps=25.0)[0])
        wave = read_audio(src)[: len(rgb) * 640]
        wave = np.pad(wave, (0, len(rgb) * 640 - len(wave)))
        words += [(w.upper(), offset + s / 25, offset + e / 25) for s, e, w in read_align(grid / "align" / f"{gid}.align")
                  if w not in SILENCE]
        frames.append(rgb)
        waves.append(wave)
        offset += len(rgb) / 25
    return np.concatenate(frames), np.concatenate(waves), words


def _lrs_text(words: list[tuple[str, float, float]], timings: bool) -> str:
    text = f"Text:  {' '.join(w for w, _, _ in words)}\nConf:  4\n"
    if timings:
        text += "\nWORD START END ASDSCORE\n" + "".join(f"{w} {s:.2f} {e:.2f} 5.0\n" for w, s, e in words)
    return text


def _write(root: Path, landmarks: Path, rel: str, clip, timings: bool, pickled: bool, tracker) -> None:
    frames, wave, words = clip
    mp4 = root / f"{rel}.mp4"
    mp4.parent.mkdir(parents=True, exist_ok=True)
    write_av(mp4, frames, wave, 25)
    mp4.with_suffix(".txt").write_text(_lrs_text(words, timings))
    tracker.reset()
    pts = [tracker(f) for f in frames]
    lm = landmarks / rel
    lm.parent.mkdir(parents=True, exist_ok=True)
    if pickled:
        with open(lm.with_suffix(".pkl"), "wb") as fh:
            pickle.dump(pts, fh)
    else:
        save_landmarks(lm.with_suffix(".npz"), np.stack([p if p is not None else np.full((68, 2), np.nan, np.float32)
                                                         for p in pts]))


def _grid_ids(grid: Path, split: str) -> list[str]:
    return [Path(x).stem for x in (grid / f"split_{split}.txt").read_text().split()]


def build_lrs3(grid: Path, root: Path, landmarks: Path) -> dict[str, int]:
    """``trainval/`` (3 speakers x 4 clips, pickled landmarks), ``pretrain/`` (2 x 2 clips of 3 GRID clips
    each) and ``test/`` (3 speakers x 3 clips of the GRID test split); returns clips per subset."""
    train, test = _grid_ids(grid, "train"), _grid_ids(grid, "test")
    layout = {"trainval": [(f"tv{s}", [train[4 * s + c]]) for s in range(3) for c in range(4)],
              "pretrain": [(f"pt{s}", train[12 + 6 * s + 3 * c: 12 + 6 * s + 3 * c + 3]) for s in range(2) for c in range(2)],
              "test": [(f"ts{s}", [test[3 * s + c]]) for s in range(3) for c in range(3)]}
    with FaceMeshTracker() as tracker:
        for subset, clips in layout.items():
            for n, (spk, ids) in enumerate(clips):
                _write(root, landmarks, f"{subset}/{spk}/{n:05d}", _clip(grid, ids), timings=True,
                       pickled=subset == "trainval", tracker=tracker)
    return {k: len(v) for k, v in layout.items()}


def build_lrs2(grid: Path, root: Path, landmarks: Path) -> dict[str, int]:
    """``main/`` (train 3 speakers x 4 clips, val 2 and test 3 speakers x 3, no word timings, pickled
    landmarks) with ``train.txt``/``val.txt``/``test.txt``, and ``pretrain/`` (2 x 2 clips of 3 GRID clips,
    with timings) with ``pretrain.txt``; returns clips per split."""
    train, test = _grid_ids(grid, "train"), _grid_ids(grid, "test")
    splits = {"train": [(f"tr{s}", [train[4 * s + c]]) for s in range(3) for c in range(4)],
              "val": [("va0", [train[12 + c]]) for c in range(2)],
              "test": [(f"ts{s}", [test[3 * s + c]]) for s in range(3) for c in range(3)],
              "pretrain": [(f"pt{s}", train[14 + 6 * s + 3 * c: 14 + 6 * s + 3 * c + 3]) for s in range(2) for c in range(2)]}
    with FaceMeshTracker() as tracker:
        for split, clips in splits.items():
            subset = "pretrain" if split == "pretrain" else "main"
            names = []
            for n, (spk, ids) in enumerate(clips):
                rel = f"{spk}/{n:05d}"
                _write(root, landmarks, f"{subset}/{rel}", _clip(grid, ids), timings=subset == "pretrain",
                       pickled=subset == "main", tracker=tracker)
                names.append(rel + (" NF" if split == "test" else ""))  # LRS2's test list has a second column
            (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return {k: len(v) for k, v in splits.items()}
