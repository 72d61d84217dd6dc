"""Train and test transforms of one clip, as small composable modules (after auto_avsr's
``datamodule/transforms.py``).

Every transform is a callable ``t(clip, rng) -> clip`` on a :class:`Clip` (the mouth-ROI frames,
their lip landmarks and the waveform of one utterance) with a per-sample
``numpy.random.Generator``, so a sample's augmentation depends only on the generator's seed and
not on the DataLoader worker that happened to load it. Geometric transforms move the landmarks
with the pixels (a crop shifts them, a flip mirrors them and swaps left/right points), so
landmark-driven consumers (occluders, mouth-opening targets) stay on the lips.

Pipelines (:func:`build_transform`):

- train: speed perturbation (one of ``speed_perturb``'s factors per clip, audio and video
  together), random ``crop_size`` crop, horizontal flip with ``hflip_prob``, scale to [0, 1],
  time masking of the video (``time_mask_max_frames`` frames per second of video, replaced by the
  clip's mean frame) and of the audio (the matching span length in samples, replaced by the
  waveform mean), normalisation with ``(video_mean, video_std)``;
- test: centre crop, scale, normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torchaudio

from avsr.config import DataConfig

VIDEO_FPS = 25
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps

# iBUG-68 mouth points 48..67 (index k = point 48 + k) mirrored left <-> right: outer
# 48<->54, 49<->53, 50<->52, 55<->59, 56<->58; inner 60<->64, 61<->63, 65<->67; 51, 57, 62, 66 stay.
MIRROR_MOUTH_20 = np.array([6, 5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 16, 15, 14, 13, 12, 19, 18, 17])


@dataclass
class Clip:
    """One utterance while it is being transformed.

    - ``video``: ``(T, H, W)`` grayscale mouth ROI at 25 fps; ``uint8`` as read, ``float32`` after
      :class:`Scale` (``[0, 1]``) and :class:`Normalize`
    - ``landmarks``: ``(T, 20, 2)`` float32 lip landmarks ``(x, y)`` in pixels of ``video``
      (iBUG-68 mouth order), or ``None``
    - ``audio``: ``(S,)`` float32 waveform in [-1, 1] at 16 kHz, or ``None``
    - ``mouth_opening``: ``(T,)`` float32 per-frame target (moves only with time transforms), or ``None``
    """

    video: np.ndarray
    landmarks: Optional[np.ndarray] = None
    audio: Optional[np.ndarray] = None
    mouth_opening: Optional[np.ndarray] = None


Transform = Callable[[Clip, np.random.Generator], Clip]


class Compose:
    """Apply ``transforms`` in order, threading the same generator through them."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        for t in self.transforms:
            clip = t(clip, rng)
        return clip

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


def _check_size(name: str, size: int) -> None:
    if size <= 0:
        raise ValueError(f"{name}: size must be positive, got {size}")


def _crop(clip: Clip, top: int, left: int, size: int) -> Clip:
    lm = clip.landmarks
    if lm is not None:
        lm = lm - np.array([left, top], dtype=lm.dtype)
    return replace(clip, video=clip.video[:, top:top + size, left:left + size], landmarks=lm)


def _fits(clip: Clip, size: int, who: str) -> tuple[int, int]:
    h, w = clip.video.shape[1:3]
    if h < size or w < size:
        raise ValueError(f"{who}: cannot crop {size}x{size} from {h}x{w} frames")
    return h, w


class RandomCrop:
    """Crop the same random ``size`` x ``size`` window from every frame (train time)."""

    def __init__(self, size: int) -> None:
        _check_size("RandomCrop", size)
        self.size = size

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        h, w = _fits(clip, self.size, "RandomCrop")
        top = int(rng.integers(0, h - self.size + 1))
        left = int(rng.integers(0, w - self.size + 1))
        return _crop(clip, top, left, self.size)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class CenterCrop:
    """Crop the central ``size`` x ``size`` window of every frame (test time)."""

    def __init__(self, size: int) -> None:
        _check_size("CenterCrop", size)
        self.size = size

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        h, w = _fits(clip, self.size, "CenterCrop")
        return _crop(clip, (h - self.size) // 2, (w - self.size) // 2, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class HorizontalFlip:
    """Mirror the whole clip left-right with probability ``p``.

    Landmarks follow: ``x -> W - 1 - x`` and the points are re-indexed with
    :data:`MIRROR_MOUTH_20`, so index 12 is still the speaker's right inner corner after a flip.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"HorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        if rng.random() >= self.p:
            return clip
        lm = clip.landmarks
        if lm is not None:
            w = clip.video.shape[2]
            lm = lm[:, MIRROR_MOUTH_20].copy()
            lm[..., 0] = (w - 1) - lm[..., 0]
        return replace(clip, video=clip.video[:, :, ::-1], landmarks=lm)

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class Scale:
    """``uint8`` frames -> ``float32`` in [0, 1] (contiguous)."""

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        return replace(clip, video=np.ascontiguousarray(clip.video, dtype=np.float32) / np.float32(255.0))

    def __repr__(self) -> str:
        return "Scale()"


class Normalize:
    """``(x - mean) / std`` on [0, 1] frames (AV-RelScore: mean 0.421, std 0.165)."""

    def __init__(self, mean: float, std: float) -> None:
        if std <= 0:
            raise ValueError(f"Normalize: std must be positive, got {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        video = (clip.video.astype(np.float32, copy=False) - np.float32(self.mean)) / np.float32(self.std)
        return replace(clip, video=video)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def speed_perturb(n_frames: int, audio: Optional[np.ndarray], factor: float) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """One clip of ``n_frames`` 25 fps frames played ``factor`` times faster (see :class:`SpeedPerturb`).

    Returns ``(index, audio)``: ``index`` ``(round(n_frames / factor),)`` int64, the source frame of
    each output frame (nearest in time; index any per-frame array with it), and the waveform
    ``(S,)`` float32 at 16 kHz resampled (torchaudio) and cut or zero-padded to 640 samples per
    output frame (``None`` when ``audio`` is ``None``).
    """
    f = Fraction(factor).limit_denominator(100)
    t_new = max(1, round(n_frames / f))
    idx = np.minimum(((np.arange(t_new) + 0.5) * float(f)).astype(np.int64), n_frames - 1)
    if audio is not None:  # f = p / q: every p input samples become q output samples
        audio = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
                                               orig_freq=f.numerator, new_freq=f.denominator).numpy()
        n = t_new * SAMPLES_PER_FRAME
        audio = audio[:n] if len(audio) >= n else np.pad(audio, (0, n - len(audio)))
    return idx, audio


class SpeedPerturb:
    """Speed perturbation of the whole clip (Ko et al. 2015, Kaldi's and ESPnet's 0.9 / 1.0 / 1.1):
    one factor ``f`` of ``factors`` is drawn per clip; the waveform is resampled so that it plays
    ``f`` times faster (tempo and pitch change together, as with sox ``speed``) and the video,
    landmarks and mouth opening are resampled in time by nearest frame, so audio and video stay
    in sync at 25 fps: ``T`` frames become ``round(T / f)`` and the audio ``640`` samples per frame.

    Raises ``ValueError`` for an empty ``factors`` or a factor outside ``[0.5, 2]``.
    """

    def __init__(self, factors: Sequence[float]) -> None:
        if not factors or any(not 0.5 <= f <= 2.0 for f in factors):
            raise ValueError(f"SpeedPerturb: need factors in [0.5, 2], got {list(factors)}")
        self.factors = [float(f) for f in factors]

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        f = self.factors[int(rng.integers(len(self.factors)))]
        if f == 1:
            return clip
        idx, audio = speed_perturb(len(clip.video), clip.audio, f)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return replace(clip, video=clip.video[idx], landmarks=pick(clip.landmarks), audio=audio,
                       mouth_opening=pick(clip.mouth_opening))

    def __repr__(self) -> str:
        return f"SpeedPerturb({self.factors})"


def _mask_spans(n: int, max_len: int, stride: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """One span of up to ``max_len`` items per ``stride`` items of an ``n``-item sequence."""
    spans = []
    for _ in range(n // stride):
        length = int(rng.integers(0, max_len + 1))
        if length == 0 or length >= n:
            continue
        start = int(rng.integers(0, n - length + 1))
        spans.append((start, start + length))
    return spans


class TimeMask:
    """Replace random spans of frames by the clip's mean frame (auto_avsr ``AdaptiveTimeMask``).

    For every ``stride`` frames (25 = one second) one span of ``U{0..max_frames}`` frames is
    masked. Landmarks are left as they are (they describe the un-masked mouth).
    """

    def __init__(self, max_frames: int, stride: int = VIDEO_FPS) -> None:
        if max_frames < 0 or stride <= 0:
            raise ValueError(f"TimeMask: need max_frames >= 0 and stride > 0, got {max_frames}, {stride}")
        self.max_frames, self.stride = max_frames, stride

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        spans = _mask_spans(len(clip.video), self.max_frames, self.stride, rng)
        if not spans:
            return clip
        video = clip.video.copy()
        mean = video.mean(axis=0)
        for a, b in spans:
            video[a:b] = mean
        return replace(clip, video=video)

    def __repr__(self) -> str:
        return f"TimeMask(max_frames={self.max_frames}, stride={self.stride})"


class AudioTimeMask:
    """Replace random spans of the waveform by its mean (auto_avsr's audio ``AdaptiveTimeMask``).

    One span of up to ``max_samples`` per ``stride`` samples (default: 16000 = one second).
    """

    def __init__(self, max_samples: int, stride: int = VIDEO_FPS * SAMPLES_PER_FRAME) -> None:
        if max_samples < 0 or stride <= 0:
            raise ValueError(f"AudioTimeMask: need max_samples >= 0 and stride > 0, got {max_samples}, {stride}")
        self.max_samples, self.stride = max_samples, stride

    def __call__(self, clip: Clip, rng: np.random.Generator) -> Clip:
        if clip.audio is None:
            return clip
        spans = _mask_spans(len(clip.audio), self.max_samples, self.stride, rng)
        if not spans:
            return clip
        audio = clip.audio.copy()
        mean = audio.mean()
        for a, b in spans:
            audio[a:b] = mean
        return replace(clip, audio=audio)

    def __repr__(self) -> str:
        return f"AudioTimeMask(max_samples={self.max_samples}, stride={self.stride})"


def build_transform(cfg: DataConfig, train: bool) -> Compose:
    """The train (speed perturbation, random crop, flip, time masks) or test (centre crop) pipeline of ``cfg``.

    Input: a :class:`Clip` with ``uint8`` ``(T, 96, 96)`` frames; output: ``float32``
    ``(T, crop_size, crop_size)`` normalised frames, landmarks in crop pixels.
    """
    if not train:
        return Compose([CenterCrop(cfg.crop_size), Scale(), Normalize(cfg.video_mean, cfg.video_std)])
    steps: list[Transform] = [SpeedPerturb(cfg.speed_perturb)] if cfg.speed_perturb else []
    steps.append(RandomCrop(cfg.crop_size))
    if cfg.hflip_prob > 0:
        steps.append(HorizontalFlip(cfg.hflip_prob))
    steps.append(Scale())
    if cfg.time_mask_max_frames > 0:
        steps += [TimeMask(cfg.time_mask_max_frames), AudioTimeMask(cfg.time_mask_max_frames * SAMPLES_PER_FRAME)]
    steps.append(Normalize(cfg.video_mean, cfg.video_std))
    return Compose(steps)
