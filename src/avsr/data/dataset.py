"""The audio-visual dataset over a preprocessed manifest, and its collate function.

A sample is loaded from ``<root>/<path>.{mp4,wav,npz}`` (see :mod:`avsr.data.manifest`),
optionally corrupted (train-time corruption modelling, :mod:`avsr.corruption`), transformed
(:mod:`avsr.data.transforms`) and paired with its token ids. Randomness comes from a generator
seeded with ``(seed, epoch, index)`` — the key :class:`~avsr.data.sampler.FrameBudgetSampler`
yields — so the same sample gets the same augmentation whichever worker loads it, and a resumed
run sees exactly the data an uninterrupted one would.

Under a length curriculum (``curriculum``), a clip longer than its epoch's limit is cut to a
random run of whole words that fits (:func:`word_segment`, from the ``words``/``word_frames`` its
``.npz`` keeps for LRS ``pretrain`` clips), its transcript cut to match, as auto_avsr and
AV-RelScore cut their ``pretrain`` sets.

A clip that cannot be read, cut, corrupted or transformed is reported once (one log line naming the
file and the stage that failed) and dropped from its batch, in a DataLoader worker as in the main
process; :func:`collate` returns ``None`` when nothing in a batch could be read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from avsr.data.batch import IGNORE_ID, Batch
from avsr.data.manifest import ManifestRow
from avsr.data.sampler import check_curriculum, clip_limit
from avsr.data.transforms import SAMPLES_PER_FRAME, Clip, Compose

log = logging.getLogger(__name__)

VisualCorruptFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]
AudioCorruptFn = Callable[..., np.ndarray]  # f(wave, rng, exclude=(utt_id,)) -> wave


@dataclass
class Sample:
    """One transformed utterance (what :func:`collate` pads into a :class:`Batch`).

    - ``video``: ``(T, H, W)`` float32 normalised mouth ROI at 25 fps
    - ``audio``: ``(640 * T,)`` float32 waveform at 16 kHz
    - ``tokens``: ``(L,)`` int64 token ids
    - ``landmarks``: ``(T, 20, 2)`` float32 lip landmarks in pixels of ``video``
    - ``mouth_opening``: ``(T,)`` float32
    """

    utt_id: str
    transcript: str
    video: np.ndarray
    audio: np.ndarray
    tokens: np.ndarray
    landmarks: np.ndarray
    mouth_opening: np.ndarray


class AVDataset(torch.utils.data.Dataset):
    """Clips of one manifest split, ready for a model.

    Args:
        root: preprocessed corpus root (holds ``<path>.mp4/.wav/.npz``).
        rows: manifest rows (``avsr.data.manifest.read_manifest(root, split)``).
        encode: text -> token ids (``Tokenizer.encode``); rows whose transcript encodes to no
            token are dropped at construction (logged).
        transform: :func:`avsr.data.transforms.build_transform` pipeline.
        seed: base seed of the per-sample generators.
        visual_corrupt: optional ``f(frames uint8 (T, H, W), landmarks (T, 20, 2), rng) -> frames``
            applied to the 96x96 ROI before the transform (e.g. ``avsr.corruption.VisualCorruptor``).
        audio_corrupt: optional ``f(wave float32 (S,), rng, exclude=(utt_id,)) -> wave`` (e.g.
            ``avsr.corruption.audio.AudioCorruptor``; ``exclude`` keeps a clip out of its own babble).
        curriculum, max_frames: a length curriculum (``data.curriculum`` stages, see
            :func:`avsr.data.sampler.clip_limit`) and the limit after it: a clip longer than its epoch's
            limit is cut at word boundaries; :attr:`cuttable` says which clips can be (checked, in
            their ``.npz``, for clips longer than the shortest stage).

    ``dataset[key]`` takes a ``(index, epoch)`` key (an ``int`` means epoch 0) and returns a
    :class:`Sample`, or ``None`` when the clip's files cannot be read.
    """

    def __init__(
        self,
        root: str | Path,
        rows: Sequence[ManifestRow],
        encode: Callable[[str], list[int]],
        transform: Compose,
        seed: int = 0,
        visual_corrupt: Optional[VisualCorruptFn] = None,
        audio_corrupt: Optional[AudioCorruptFn] = None,
        curriculum: Sequence[Sequence[int]] = (),
        max_frames: Optional[int] = None,
    ) -> None:
        self.root = Path(root)
        self.encode = encode
        self.curriculum, self.max_frames = check_curriculum(curriculum), max_frames
        self.transform = transform
        self.seed = seed
        self.visual_corrupt, self.audio_corrupt = visual_corrupt, audio_corrupt
        self.rows: list[ManifestRow] = []
        self.tokens: list[np.ndarray] = []
        for row in rows:
            ids = encode(row.transcript)
            if not ids:
                log.warning("skipping %s: transcript %r has no tokens", self._name(row), row.transcript)
                continue
            self.rows.append(row)
            self.tokens.append(np.asarray(ids, dtype=np.int64))
        if not self.rows:
            raise ValueError(f"no usable clips under {self.root}")
        self._reported: set[str] = set()
        shortest = min([max_frames] + [a for a, _ in self.curriculum]) if max_frames is not None else None
        self.cuttable = [shortest is not None and r.n_frames > shortest and self._has_word_timings(r)
                         for r in self.rows]

    def _has_word_timings(self, row: ManifestRow) -> bool:
        try:
            with np.load(row.file(self.root, ".npz"), allow_pickle=False) as z:
                return "word_frames" in z.files
        except (OSError, ValueError):
            return False  # reported when the clip itself is read

    def _name(self, row: ManifestRow) -> str:
        """The clip's ``.mp4`` for messages (not ``row.file``, which raises for a path escaping the root)."""
        return os.path.abspath(self.root / f"{row.path}.mp4")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Video frames of each clip (from the manifest), for the sampler."""
        return [r.n_frames for r in self.rows]

    def _load(self, row: ManifestRow) -> tuple[np.ndarray, np.ndarray, dict]:
        from avsr.data.media import load_clip

        frames, wave, meta = load_clip(self.root, row)
        if frames.ndim != 3 or len(frames) == 0:
            raise ValueError(f"expected (T, H, W) frames with T > 0, got shape {frames.shape}")
        n = len(frames) * SAMPLES_PER_FRAME
        wave = np.asarray(wave, dtype=np.float32)
        wave = wave[:n] if len(wave) >= n else np.pad(wave, (0, n - len(wave)))
        t = len(frames)
        lm = np.asarray(meta["landmarks"], dtype=np.float32)[:t]
        mo = np.asarray(meta["mouth_opening"], dtype=np.float32)[:t]
        if len(lm) != t or len(mo) != t:
            raise ValueError(f"npz has {len(lm)} landmark frames for {t} video frames")
        return frames, wave, {"landmarks": lm, "mouth_opening": mo, "words": meta.get("words"),
                              "word_frames": meta.get("word_frames")}

    def __getitem__(self, key: int | tuple[int, int]) -> Optional[Sample]:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        row = self.rows[index]
        stage = "reading"
        try:
            frames, wave, meta = self._load(row)
            rng = np.random.default_rng([self.seed, epoch, index])
            transcript, tokens = row.transcript, self.tokens[index]
            limit = clip_limit(self.curriculum, epoch, self.max_frames) if self.max_frames is not None else None
            if limit is not None and len(frames) > limit:
                stage = "cutting"
                if meta["word_frames"] is None:
                    raise ValueError(f"{len(frames)} frames, over the limit of {limit}, and no word timings to cut at")
                first, last, start, end = word_segment(meta["word_frames"], limit, rng)
                transcript = " ".join(str(w) for w in meta["words"][first:last + 1])
                frames, wave = frames[start:end], wave[start * SAMPLES_PER_FRAME:end * SAMPLES_PER_FRAME]
                meta = {k: meta[k][start:end] for k in ("landmarks", "mouth_opening")}
                tokens = np.asarray(self.encode(transcript), dtype=np.int64)
            stage = "corrupting"
            landmarks = meta["landmarks"]
            if self.visual_corrupt is not None:
                frames = self.visual_corrupt(frames, landmarks, rng)
            if self.audio_corrupt is not None:
                wave = self.audio_corrupt(wave, rng, exclude=(row.utt_id,))
            stage = "transforming"
            clip = self.transform(Clip(video=frames, landmarks=landmarks, audio=wave,
                                       mouth_opening=meta["mouth_opening"]), rng)
        except Exception as exc:  # noqa: BLE001 - decoders and corruptors raise many types; report and skip
            name = self._name(row)
            if name not in self._reported:
                self._reported.add(name)
                log.warning("skipping bad clip %s (failed while %s): %s: %s", name, stage, type(exc).__name__, exc)
            return None
        return Sample(utt_id=row.utt_id, transcript=transcript, video=clip.video,
                      audio=np.ascontiguousarray(clip.audio, dtype=np.float32), tokens=tokens,
                      landmarks=np.ascontiguousarray(clip.landmarks, dtype=np.float32),
                      mouth_opening=clip.mouth_opening)


def word_segment(word_frames: np.ndarray, limit: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random run of whole words that fits in ``limit`` video frames.

    Args:
        word_frames: ``(N, 2)`` float start/end of each word in video frames (the ``.npz``'s
            ``word_frames``), in order.
        limit: longest segment, frames.
        rng: draws the first word, uniformly among the words that fit; the run then takes every
            following word that still fits.

    Returns:
        ``(first, last, start, end)``: word indices (inclusive) and the frame range
        ``[start, end)`` (``floor`` of the first word's start, ``ceil`` of the last one's end).

    Raises:
        ValueError: when there are no words or none fits in ``limit`` frames.
    """
    spans = np.asarray(word_frames, dtype=np.float64).reshape(-1, 2)
    starts = np.floor(spans[:, 0]).astype(int)
    ends = np.maximum(np.ceil(spans[:, 1]).astype(int), starts + 1)
    fits = np.flatnonzero(ends - starts <= limit)
    if len(fits) == 0:
        raise ValueError(f"no word fits in {limit} frames (of {len(spans)} words)")
    first = int(fits[rng.integers(len(fits))])
    last = first
    while last + 1 < len(spans) and ends[last + 1] - starts[first] <= limit:
        last += 1
    return first, last, int(starts[first]), int(ends[last])


def hold_out(rows: Sequence[ManifestRow], n: int, seed: int) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """``(kept, held_out)``: ``n`` rows picked at random (by ``seed``, independent of row order),
    for corpora without a validation split. Raises ``ValueError`` unless ``0 < n < len(rows)``."""
    if not 0 < n < len(rows):
        raise ValueError(f"cannot hold out {n} of {len(rows)} clips for validation")
    ordered = sorted(rows, key=lambda r: r.utt_id)
    held = set(np.random.default_rng(seed).permutation(len(ordered))[:n].tolist())
    return ([r for i, r in enumerate(ordered) if i not in held], [r for i, r in enumerate(ordered) if i in held])


def _pad(arrays: Sequence[np.ndarray], value: float, dtype: torch.dtype) -> torch.Tensor:
    """Stack arrays of equal trailing shape, padding the first axis with ``value``."""
    longest = max(len(a) for a in arrays)
    out = torch.full((len(arrays), longest, *arrays[0].shape[1:]), value, dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def _lengths(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.tensor([len(a) for a in arrays], dtype=torch.int64)


def collate(samples: Sequence[Optional[Sample]]) -> Optional[Batch]:
    """Pad samples into a :class:`Batch` (``None`` entries, i.e. unreadable clips, are dropped).

    Video is padded with 0 (the normalised mean grey), audio and mouth opening with 0, tokens
    with ``IGNORE_ID``. Returns ``None`` when no sample is left.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    return Batch(
        video=_pad([s.video for s in kept], 0.0, torch.float32).unsqueeze(2),
        video_lengths=_lengths([s.video for s in kept]),
        audio=_pad([s.audio for s in kept], 0.0, torch.float32),
        audio_lengths=_lengths([s.audio for s in kept]),
        tokens=_pad([s.tokens for s in kept], IGNORE_ID, torch.int64),
        token_lengths=_lengths([s.tokens for s in kept]),
        utt_ids=[s.utt_id for s in kept],
        transcripts=[s.transcript for s in kept],
        mouth_opening=_pad([s.mouth_opening for s in kept], 0.0, torch.float32),
        landmarks=_pad([s.landmarks for s in kept], 0.0, torch.float32),
    )
