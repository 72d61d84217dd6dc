"""Landmark clean-up and mouth-ROI extraction: gap filling, smoothing, similarity alignment, crop.

The ROI of a clip is made in four steps (all landmarks are iBUG-68, ``(T, 68, 2)`` pixels):

1. :func:`fill_gaps` interpolates frames without a face linearly between the nearest detected
   frames and holds the first/last detection at the clip's ends.
2. :func:`smooth` averages the stable points over ``window`` frames (centred) so the crop does
   not jitter with detector noise; the lip points themselves are not smoothed.
3. :func:`similarity_transforms` fits, per frame, a rotation + uniform scale + translation
   (least squares, closed form) from the stable points (eye corners, nose tip, mouth corners,
   :data:`avsr.data.landmarks.STABLE`) to :data:`MEAN_FACE`.
4. :func:`crop_rois` warps only the ``size x size`` window centred on the (smoothed) aligned
   mouth centre, straight from the source frame (one ``cv2.warpAffine`` per frame).

After the LRS preprocessing of Ma et al. (auto_avsr, 2023) and Hong et al. (AV-RelScore, 2023):
mean-face alignment on stable points, then a 96x96 mouth crop.
"""

from __future__ import annotations

import cv2
import numpy as np

from avsr.data.landmarks import MOUTH, STABLE

#: Mean face on the stable points (:data:`avsr.data.landmarks.STABLE`: right-eye outer/inner
#: corner 36/39, left-eye inner/outer corner 42/45, nose tip 30, mouth corners 48/54), in pixels
#: of the aligned face. Made with :func:`procrustes_mean` from the mediapipe face-mesh landmarks
#: (:data:`avsr.data.landmarks.MP_TO_68`) of all 2988 frames with a face in the first 40 clips of
#: GRID s1's train split, rotated so the outer eye corners are level, scaled so they are 80 px
#: apart, made left/right symmetric (averaged with its mirror image) and placed with the mouth
#: corners' midpoint at (0, 0). At this scale the mouth is ~47 px wide in the 96x96 ROI.
MEAN_FACE = np.array(
    [[-40.0, -70.2], [-15.6, -69.1], [15.6, -69.1], [40.0, -70.2],
     [0.0, -30.0], [-23.4, 0.0], [23.4, 0.0]], dtype=np.float32)


def longest_gap(valid: np.ndarray) -> int:
    """Length of the longest run of ``False`` in the (T,) bool mask ``valid``."""
    best = run = 0
    for v in np.asarray(valid, dtype=bool):
        run = 0 if v else run + 1
        best = max(best, run)
    return best


def fill_gaps(points: np.ndarray) -> np.ndarray:
    """Fill frames whose landmarks are NaN: linear inside the clip, held at its ends.

    ``points`` is (T, K, 2) float with whole frames NaN where no face was found; returns a
    float32 copy with no NaN. Raises ValueError when no frame has landmarks.
    """
    points = np.asarray(points, dtype=np.float32)
    valid = ~np.isnan(points).any(axis=(1, 2))
    if not valid.any():
        raise ValueError("no frame has landmarks")
    if valid.all():
        return points.copy()
    t = np.arange(len(points))
    flat = points.reshape(len(points), -1)
    out = np.empty_like(flat)
    for j in range(flat.shape[1]):  # np.interp holds the end values outside the known range
        out[:, j] = np.interp(t, t[valid], flat[valid, j])
    return out.reshape(points.shape)


def smooth(points: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` frames (odd, >= 1) along axis 0, edges replicated; float32."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smoothing window must be odd and >= 1, got {window}")
    points = np.asarray(points, dtype=np.float32)
    if window == 1 or len(points) == 0:
        return points.copy()
    half = window // 2
    padded = np.pad(points.astype(np.float64), [(half, half)] + [(0, 0)] * (points.ndim - 1), mode="edge")
    csum = np.concatenate([np.zeros_like(padded[:1]), np.cumsum(padded, axis=0)])
    return ((csum[window:] - csum[:-window]) / window).astype(np.float32)


def similarity_transforms(stable: np.ndarray, target: np.ndarray = MEAN_FACE) -> np.ndarray:
    """Per-frame least-squares similarity (rotation, uniform scale, translation) from ``stable`` to ``target``.

    ``stable`` is (T, K, 2) source pixels, ``target`` (K, 2); returns (T, 2, 3) float64 affine
    matrices (``cv2.warpAffine`` order). Closed form (Umeyama 1991, in complex numbers), vectorised
    over frames; unlike ``cv2.estimateAffinePartial2D`` (RANSAC) it is exactly reproducible, which
    resumable preprocessing needs. Raises ValueError on mismatched shapes or coincident points.
    """
    stable = np.asarray(stable, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if stable.ndim != 3 or stable.shape[1:] != target.shape:
        raise ValueError(f"stable points {stable.shape} do not match the target {target.shape}")
    z = stable[..., 0] + 1j * stable[..., 1]  # (T, K)
    w = target[:, 0] + 1j * target[:, 1]  # (K,)
    zc = z - z.mean(axis=1, keepdims=True)
    wc = w - w.mean()
    power = (np.abs(zc) ** 2).sum(axis=1)
    if (power < 1e-9).any():
        raise ValueError(f"frame {int(np.argmax(power < 1e-9))}: stable points coincide")
    a = (np.conj(zc) * wc).sum(axis=1) / power  # scale * e^(i angle)
    shift = w.mean() - a * z.mean(axis=1)
    out = np.empty((len(stable), 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = a.real, -a.imag, shift.real
    out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = a.imag, a.real, shift.imag
    return out


def apply_affine(points: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """(T, K, 2) points mapped by (T, 2, 3) affine matrices -> (T, K, 2) float32."""
    pts = np.asarray(points, dtype=np.float64)
    out = np.einsum("tij,tkj->tki", transforms[:, :, :2], pts) + transforms[:, None, :, 2]
    return out.astype(np.float32)


def roi_transforms(landmarks: np.ndarray, size: int = 96, window: int = 5) -> np.ndarray:
    """Affine matrices (T, 2, 3) from source pixels to ``size x size`` mouth-ROI pixels.

    ``landmarks`` is the gap-free (T, 68, 2) clip (:func:`fill_gaps`). The stable points are
    smoothed over ``window`` frames, aligned to :data:`MEAN_FACE`, and the ROI is centred on the
    aligned mouth centre (mean of points 48..67), itself smoothed over ``window`` frames.
    """
    if size <= 0:
        raise ValueError(f"ROI size must be positive, got {size}")
    sim = similarity_transforms(smooth(landmarks[:, STABLE], window))
    centre = smooth(apply_affine(landmarks[:, MOUTH], sim).mean(axis=1), window)  # (T, 2)
    roi = sim.copy()
    roi[:, :, 2] += (size - 1) / 2.0 - centre  # the crop's centre pixel coordinate
    return roi


def crop_centre_error(reference: np.ndarray, transforms: np.ndarray, size: int = 96) -> np.ndarray:
    """Per frame, how far (ROI pixels) the centre of the crop made with ``transforms`` lies from the
    centre of the crop made with ``reference``: both ``(T, 2, 3)`` source->ROI affine maps (as
    :func:`roi_transforms` returns) of ``size`` x ``size`` crops. Returns ``(T,)`` float64."""
    c = np.array([size / 2.0, size / 2.0])
    src = np.linalg.solve(transforms[:, :, :2], (c - transforms[:, :, 2])[..., None])  # (T, 2, 1) source pixels
    return np.linalg.norm((reference[:, :, :2] @ src)[..., 0] + reference[:, :, 2] - c, axis=1)


def crop_rois(frames: list[np.ndarray] | np.ndarray, transforms: np.ndarray, size: int = 96) -> np.ndarray:
    """Warp each (H, W) uint8 frame by its (2, 3) matrix into a (size, size) crop -> (T, size, size) uint8.

    Bilinear; pixels outside the source frame repeat its border.
    """
    if len(frames) != len(transforms):
        raise ValueError(f"{len(frames)} frames but {len(transforms)} transforms")
    out = np.empty((len(frames), size, size), dtype=np.uint8)
    for t, (frame, m) in enumerate(zip(frames, transforms)):
        cv2.warpAffine(frame, m, (size, size), dst=out[t], flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    return out


def procrustes_mean(shapes: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Generalised Procrustes mean of (N, K, 2) point sets under similarity transforms.

    Returns the (K, 2) mean shape, centred at its centroid with unit RMS radius (the usual
    normalisation; callers rescale/place it). Used to make :data:`MEAN_FACE`.
    """
    shapes = np.asarray(shapes, dtype=np.float64)
    if shapes.ndim != 3 or shapes.shape[2] != 2 or len(shapes) == 0:
        raise ValueError(f"shapes must be (N, K, 2), got {shapes.shape}")

    def normalise(s: np.ndarray) -> np.ndarray:
        s = s - s.mean(axis=-2, keepdims=True)
        return s / np.sqrt((s ** 2).sum(axis=(-2, -1), keepdims=True) / s.shape[-2])

    x = normalise(shapes)
    mean = x[0]
    for _ in range(iterations):
        # optimal rotation+scale of each shape onto the mean (complex least squares)
        zc = x[..., 0] + 1j * x[..., 1]
        mc = mean[:, 0] + 1j * mean[:, 1]
        a = (np.conj(zc) @ mc) / (np.abs(zc) ** 2).sum(axis=1)
        aligned = zc * a[:, None]
        new = aligned.mean(axis=0)
        mean = normalise(np.stack([new.real, new.imag], axis=-1))
    return mean.astype(np.float32)
