"""Visual corruption of mouth-ROI clips: occluders that follow the lips, Gaussian noise and blur.

After AV-RelScore (Hong et al. 2023): 1-3 occluders per clip, each over a contiguous
30-50% of the clip, placed at a random lip landmark and following it, 20-45 px on the 96x96 ROI;
Gaussian noise (variance ~ U(0, 0.2) on [0, 1] intensities) or Gaussian blur (7x7, sigma ~
U(0.1, 2.0)) over 1-3 segments of 10-50% of the clip.

Corruption is split in two pure steps so that train time and the test protocol share code:

* :func:`sample_visual_spec` draws a JSON-able *spec* (every occluder, segment and parameter)
  from a ``numpy.random.Generator``;
* :func:`apply_visual_spec` renders a spec onto frames deterministically (no global RNG: the
  noise comes from a seed stored in the spec), so a spec always yields bit-identical frames
  (with the pinned NumPy / OpenCV / albumentations versions; other versions may differ by
  rounding).

Unlike the published AV-RelScore scripts (see DESIGN.md, "Known traps"), the occluder on frame
``t`` is placed at ``landmarks[t]`` (not at the landmark of frame ``t - start``), and positions are
(x, y) = (column, row) throughout: OpenCV's convention, no manual row/column pasting.

Spec format (all numbers plain JSON)::

    {"kind": "occlusion_noise_blur",
     "occluders": [{"image": "coffee_cup", "landmark": 14, "size": 31, "start": 9, "end": 38,
                    "hflip": false, "angle": -6.2, "scale": 1.03, "shift": [0.8, -1.1],
                    "contrast": 1.07, "brightness": -9.5}, ...],
     "segments": [{"type": "noise", "start": 40, "end": 61, "var": 0.13, "seed": 1234},
                  {"type": "blur", "start": 3, "end": 20, "sigma": 1.4}, ...]}

Frame ranges are ``[start, end)``. ``size`` is the occluder's longest side in ROI pixels,
``angle`` (degrees, counter-clockwise as displayed), ``scale`` and ``shift`` ((dx, dy) pixels
from the landmark) are its per-clip affine jitter, ``contrast``/``brightness`` its photometric
jitter (``gray * contrast + brightness``, gray levels; albumentations ``RandomBrightnessContrast``).
The occluder's alpha-weighted centroid is what sits on the landmark.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Optional, Sequence

import cv2
import numpy as np

from avsr.config import CorruptionConfig
from avsr.corruption.occluders import OccluderBank

VISUAL_KINDS = ("occlusion", "noise_blur", "occlusion_noise_blur")
N_LIP_LANDMARKS = 20  # iBUG-68 points 48..67 (see the data contract)

OCCLUDER_COUNT = (1, 3)  # occluders per clip, inclusive
OCCLUDER_SIZE_PX = (20, 45)  # longest side on the 96x96 ROI, inclusive
OCCLUSION_SEGMENT_FRAC = (0.3, 0.5)  # fraction of the clip each occluder is shown
NOISE_SEGMENT_COUNT = (1, 3)
NOISE_SEGMENT_FRAC = (0.1, 0.5)
NOISE_VAR = (0.0, 0.2)  # Gaussian noise variance on [0, 1] intensities
BLUR_KERNEL = 7
BLUR_SIGMA = (0.1, 2.0)
# per-clip jitter of each occluder (small: the occluder must stay on its landmark)
JITTER_ANGLE_DEG = 15.0
JITTER_SCALE = (0.9, 1.1)
JITTER_SHIFT_PX = 2.0
JITTER_CONTRAST = 0.2  # contrast factor in 1 +- this
JITTER_BRIGHTNESS = 0.1  # brightness offset in +- this * 255 gray levels



@functools.lru_cache(maxsize=1)
def _photometric():
    """albumentations' brightness/contrast transform, used only through ``.apply`` with spec parameters.

    Imported on first use: albumentations imports torch, which preview and protocol scripts need not pay for.
    """
    import albumentations as A

    return A.RandomBrightnessContrast(p=1.0)


def _segment(T: int, frac: tuple[float, float], rng: np.random.Generator) -> tuple[int, int]:
    """A random contiguous ``[start, end)`` covering ``frac`` (uniform) of ``T`` frames, at least one."""
    length = min(T, max(1, round(float(rng.uniform(*frac)) * T)))
    start = int(rng.integers(0, T - length + 1))
    return start, start + length


def _r(x: float) -> float:
    return round(float(x), 4)


def sample_occluder(T: int, rng: np.random.Generator, bank: OccluderBank,
                    n_landmarks: int = N_LIP_LANDMARKS) -> dict[str, Any]:
    """One occluder spec (see the module docstring) for a clip of ``T`` frames."""
    start, end = _segment(T, OCCLUSION_SEGMENT_FRAC, rng)
    return {
        "image": bank.ids[int(rng.integers(len(bank)))],
        "landmark": int(rng.integers(n_landmarks)),
        "size": int(rng.integers(OCCLUDER_SIZE_PX[0], OCCLUDER_SIZE_PX[1] + 1)),
        "start": start,
        "end": end,
        "hflip": bool(rng.random() < 0.5),
        "angle": _r(rng.uniform(-JITTER_ANGLE_DEG, JITTER_ANGLE_DEG)),
        "scale": _r(rng.uniform(*JITTER_SCALE)),
        "shift": [_r(rng.uniform(-JITTER_SHIFT_PX, JITTER_SHIFT_PX)) for _ in range(2)],
        "contrast": _r(1.0 + rng.uniform(-JITTER_CONTRAST, JITTER_CONTRAST)),
        "brightness": _r(255.0 * rng.uniform(-JITTER_BRIGHTNESS, JITTER_BRIGHTNESS)),
    }


def sample_noise_segment(T: int, rng: np.random.Generator) -> dict[str, Any]:
    """One Gaussian noise or blur segment spec (50/50) for a clip of ``T`` frames."""
    start, end = _segment(T, NOISE_SEGMENT_FRAC, rng)
    if rng.random() < 0.5:
        return {"type": "noise", "start": start, "end": end, "var": _r(rng.uniform(*NOISE_VAR)),
                "seed": int(rng.integers(2**31))}
    return {"type": "blur", "start": start, "end": end, "sigma": _r(rng.uniform(*BLUR_SIGMA))}


def sample_visual_spec(T: int, rng: np.random.Generator, bank: OccluderBank, kind: str,
                       n_landmarks: int = N_LIP_LANDMARKS) -> dict[str, Any]:
    """Draw a visual corruption spec of ``kind`` (one of :data:`VISUAL_KINDS`) for ``T`` frames.

    Raises ``ValueError`` for an unknown ``kind`` or ``T < 1``.
    """
    if kind not in VISUAL_KINDS:
        raise ValueError(f"unknown visual corruption kind '{kind}' (expected one of {', '.join(VISUAL_KINDS)})")
    if T < 1:
        raise ValueError(f"a clip needs at least one frame, got T={T}")
    spec: dict[str, Any] = {"kind": kind, "occluders": [], "segments": []}
    if kind in ("occlusion", "occlusion_noise_blur"):
        n = int(rng.integers(OCCLUDER_COUNT[0], OCCLUDER_COUNT[1] + 1))
        spec["occluders"] = [sample_occluder(T, rng, bank, n_landmarks) for _ in range(n)]
    if kind in ("noise_blur", "occlusion_noise_blur"):
        n = int(rng.integers(NOISE_SEGMENT_COUNT[0], NOISE_SEGMENT_COUNT[1] + 1))
        spec["segments"] = [sample_noise_segment(T, rng) for _ in range(n)]
    return spec


def _prepare_patch(occ: dict[str, Any], bank: OccluderBank) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Occluder ``occ`` flipped, photometrically jittered and resized, once per clip.

    Returns (alpha-premultiplied gray float32 (h, w) in [0, 255], alpha float32 (h, w) in [0, 1],
    alpha centroid (x, y) float64). Resampling premultiplied values keeps the colour of the
    transparent surroundings of a cut-out from bleeding into its edges.
    """
    gray, alpha = bank.gray(occ["image"])
    if occ["hflip"]:
        gray, alpha = gray[:, ::-1], alpha[:, ::-1]
    gray = _photometric().apply(np.ascontiguousarray(gray), alpha=float(occ["contrast"]),
                                beta=float(occ["brightness"]))
    h, w = gray.shape
    size = int(occ["size"])
    if size < 2:
        raise ValueError(f"occluder size must be >= 2 px, got {size}")
    f = size / max(h, w)
    dsize = (max(1, round(w * f)), max(1, round(h * f)))
    premult = cv2.resize(gray.astype(np.float32) * alpha, dsize, interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(np.ascontiguousarray(alpha), dsize, interpolation=cv2.INTER_AREA)
    mass = float(alpha.sum())
    if mass <= 0:
        raise ValueError(f"occluder '{occ['image']}' vanishes at size {size}")
    ys, xs = np.indices(alpha.shape, dtype=np.float64)
    centroid = np.array([(xs * alpha).sum() / mass, (ys * alpha).sum() / mass])
    return premult, alpha, centroid


def _render(occ: dict[str, Any], landmarks: np.ndarray, bank: OccluderBank,
            frame_hw: tuple[int, int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(t, premultiplied gray (H, W) float32, alpha (H, W) float32)`` per frame of occluder ``occ``.

    The patch's alpha centroid is mapped to ``landmarks[t, occ["landmark"]] + shift`` on frame
    ``t`` itself; rotation and scale are about that centroid.
    """
    premult, alpha, c = _prepare_patch(occ, bank)
    th = math.radians(float(occ["angle"]))
    s = float(occ["scale"])
    # y points down, so this is counter-clockwise on screen
    rot = s * np.array([[math.cos(th), math.sin(th)], [-math.sin(th), math.cos(th)]])
    k = int(occ["landmark"])
    shift = np.asarray(occ["shift"], np.float64)
    H, W = frame_hw
    for t in range(int(occ["start"]), int(occ["end"])):
        anchor = landmarks[t, k].astype(np.float64) + shift  # (x, y) of frame t
        M = np.hstack([rot, (anchor - rot @ c)[:, None]])
        p = cv2.warpAffine(premult, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        a = cv2.warpAffine(alpha, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        yield t, p, a


def _check_inputs(frames: np.ndarray, landmarks: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 3:
        raise ValueError(f"frames must be uint8 (T, H, W), got {frames.dtype} {frames.shape}")
    if landmarks.ndim != 3 or landmarks.shape[0] != frames.shape[0] or landmarks.shape[2] != 2:
        raise ValueError(f"landmarks must be (T, K, 2) with T={frames.shape[0]}, got {landmarks.shape}")


def _check_range(item: dict[str, Any], T: int, what: str) -> tuple[int, int]:
    start, end = int(item["start"]), int(item["end"])
    if not 0 <= start < end <= T:
        raise ValueError(f"{what} frames [{start}, {end}) do not fit a clip of {T} frames")
    return start, end


def _check_occluder(occ: dict[str, Any], landmarks: np.ndarray) -> None:
    start, end = _check_range(occ, landmarks.shape[0], f"occluder '{occ['image']}'")
    k = int(occ["landmark"])
    if not 0 <= k < landmarks.shape[1]:
        raise ValueError(f"occluder landmark {k} out of range for {landmarks.shape[1]} landmarks")
    if not np.isfinite(landmarks[start:end, k]).all():
        raise ValueError(f"landmark {k} is not finite on frames [{start}, {end}): cannot place the occluder")


def occluder_alpha(occ: dict[str, Any], landmarks: np.ndarray, bank: OccluderBank,
                   frame_hw: tuple[int, int] = (96, 96)) -> np.ndarray:
    """Alpha masks ``(end - start, H, W)`` float32 in [0, 1] that occluder spec ``occ`` pastes.

    Row ``i`` is frame ``start + i``. For inspection and tests; :func:`apply_visual_spec` uses the
    same rendering.
    """
    landmarks = np.asarray(landmarks)
    _check_occluder(occ, landmarks)
    return np.stack([a for _, _, a in _render(occ, landmarks, bank, frame_hw)])


def apply_visual_spec(frames: np.ndarray, landmarks: np.ndarray, spec: Optional[dict[str, Any]],
                      bank: OccluderBank) -> np.ndarray:
    """Render ``spec`` onto a copy of ``frames``; deterministic.

    Args:
        frames: ``(T, H, W)`` uint8 grayscale mouth ROIs (the 96x96 crops, before the 88x88 crop).
        landmarks: ``(T, K, 2)`` float lip landmarks (x, y) in ROI pixels (K = 20, iBUG order).
        spec: from :func:`sample_visual_spec` (or a protocol); ``None`` returns an unchanged copy.
        bank: holds every occluder ``image`` the spec names.

    Returns ``(T, H, W)`` uint8. Occluders are alpha-blended first (in spec order), then noise and
    blur segments are applied in spec order over the occluded frames.

    Raises ``ValueError`` for malformed inputs, a segment outside the clip, a landmark index out
    of range or a non-finite landmark where an occluder follows it; ``KeyError`` for an occluder
    missing from ``bank``.
    """
    frames = np.asarray(frames)
    landmarks = np.asarray(landmarks)
    _check_inputs(frames, landmarks)
    out = frames.copy()
    if spec is None:
        return out
    T, H, W = frames.shape
    for occ in spec.get("occluders", []):
        _check_occluder(occ, landmarks)
        for t, p, a in _render(occ, landmarks, bank, (H, W)):
            f = out[t].astype(np.float32)
            out[t] = np.clip(np.rint(f * (1.0 - a) + p), 0, 255).astype(np.uint8)
    for seg in spec.get("segments", []):
        start, end = _check_range(seg, T, f"{seg['type']} segment")
        if seg["type"] == "noise":
            std = math.sqrt(float(seg["var"]))
            noise = np.random.default_rng(int(seg["seed"])).standard_normal((end - start, H, W), dtype=np.float32)
            x = out[start:end].astype(np.float32) / 255.0 + np.float32(std) * noise
            out[start:end] = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        elif seg["type"] == "blur":
            sigma = float(seg["sigma"])
            for t in range(start, end):
                out[t] = cv2.GaussianBlur(out[t], (BLUR_KERNEL, BLUR_KERNEL), sigmaX=sigma, sigmaY=sigma,
                                          borderType=cv2.BORDER_REFLECT_101)
        else:
            raise ValueError(f"unknown segment type '{seg['type']}' (expected noise or blur)")
    return out


class VisualCorruptor:
    """Train-time visual corruption of one clip, applied with probability ``cfg.visual_prob``.

    Each corrupted clip gets a kind drawn uniformly from ``cfg.visual_kinds``, then a spec from
    :func:`sample_visual_spec`. Call it in the dataset on the 96x96 ROIs, before the 88x88 crop.

    Raises ``ValueError`` when ``cfg.visual_prob`` is outside [0, 1] or ``cfg.visual_kinds`` is
    empty or names an unknown kind.
    """

    def __init__(self, cfg: CorruptionConfig, bank: OccluderBank) -> None:
        if not 0.0 <= cfg.visual_prob <= 1.0:
            raise ValueError(f"corruption.visual_prob must be in [0, 1], got {cfg.visual_prob}")
        kinds: Sequence[str] = tuple(cfg.visual_kinds)
        if not kinds or any(k not in VISUAL_KINDS for k in kinds):
            raise ValueError(f"corruption.visual_kinds must be a non-empty subset of {list(VISUAL_KINDS)}, "
                             f"got {list(kinds)}")
        self.prob = float(cfg.visual_prob)
        self.kinds = kinds
        self.bank = bank

    def __call__(self, frames: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Corrupt ``frames`` (T, H, W) uint8 given ``landmarks`` (T, 20, 2); same shape and dtype.

        Returns ``frames`` itself (not a copy) when the clip is left clean.
        """
        _check_inputs(np.asarray(frames), np.asarray(landmarks))
        if rng.random() >= self.prob:
            return frames
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        spec = sample_visual_spec(frames.shape[0], rng, self.bank, kind, n_landmarks=landmarks.shape[1])
        return apply_visual_spec(frames, landmarks, spec, self.bank)
