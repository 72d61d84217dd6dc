"""Facial landmark sources, all mapped to the iBUG 68-point scheme.

Two sources give per-frame ``(68, 2)`` float32 landmarks in source-image pixels ``(x, y)``, with
NaN rows for frames where no face was found:

* :class:`FaceMeshTracker` runs mediapipe face mesh (``mp.solutions.face_mesh``, the models ship
  inside the ``mediapipe==0.10.21`` wheel, no download) and maps its 468 points to 68 with
  :data:`MP_TO_68`.
* :func:`load_landmarks` reads the precomputed 68-point files LRS2/LRS3 users download (one
  pickle per clip: a list of per-frame ``(68, 2)`` arrays or ``None``) or their ``.npz``
  conversion (:func:`convert_pickle`). Pickles can execute code when loaded, so they are read
  only with ``trust_pickles=True``.

The mouth part of the mapping (points 48..67) is the project contract; the other points are our
own choice of the nearest face-mesh vertex (symmetric left/right), used for the stable points
of the similarity alignment (eye corners 36/39/42/45, nose tip 30, mouth corners 48/54).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from avsr.utils import atomic_path

#: Mediapipe face-mesh vertex for each iBUG-68 point (index = iBUG point number).
#: Jaw 0..16 follows FACEMESH_FACE_OVAL from the subject's right ear level (image left) over the
#: chin (152) to the left; brows 17..26 are the upper brow line; nose bridge 27..30 runs from the
#: nasion (6) to the tip (1); nostril base 31..35; eyes 36..47 (corners 33/133 and 362/263);
#: mouth 48..67: outer 61,40,37,0,267,270,291,321,314,17,84,91 then inner 78,81,13,311,308,402,14,178.
MP_TO_68 = np.array(
    [234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361, 323, 454,  # jaw
     70, 63, 105, 66, 107, 336, 296, 334, 293, 300,  # brows
     6, 195, 5, 1, 98, 97, 2, 326, 327,  # nose
     33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes
     61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,  # outer lip
     78, 81, 13, 311, 308, 402, 14, 178],  # inner lip
    dtype=np.int64)

#: Face-mesh vertices kept beside the crop (``face_mesh`` in the preprocessed ``.npz``) for the
#: lip-sync targets (:mod:`avsr.lipsync.targets`): the 40 lip vertices of mediapipe's
#: FACEMESH_LIPS (outer ring from the subject's right corner 61 over the upper lip, then the inner
#: ring 78..308 and back), jaw and chin, the nose (tip 1, nasion 168) and the outer and inner eye
#: corners (33, 133, 362, 263).
MESH_KEEP = np.array(
    [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146,  # outer lip
     78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95,  # inner lip
     152, 148, 176, 149, 150, 136, 172, 58, 132, 377, 400, 378, 379, 365, 397, 288, 361, 199, 175,  # jaw, chin
     1, 4, 5, 6, 168, 195, 197, 2, 98, 327,  # nose
     33, 133, 362, 263],  # eye corners
    dtype=np.int64)

#: iBUG-68 points of the mouth (48..67), in contract order: 12 outer then 8 inner.
MOUTH = np.arange(48, 68)
#: Points the similarity alignment is fitted on: eye corners, nose tip, mouth corners.
STABLE = np.array([36, 39, 42, 45, 30, 48, 54])

_PICKLE_EXT = ".pkl"


class LandmarkError(ValueError):
    """A landmark file is unreadable, untrusted, or has the wrong shape."""


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: mediapipe's C++ side prints warnings every time its
    graph starts (absl logging, not configurable from Python), i.e. for every clip."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class FaceMeshTracker:
    """Mediapipe face mesh in video mode (tracking between frames), one face, 468 points.

    Call :meth:`reset` between clips so that a clip's result does not depend on the previous
    one. ``tracker(rgb)`` takes one ``(H, W, 3)`` uint8 RGB frame and returns ``(68, 2)``
    float32 pixel coordinates, or ``None`` when no face is found; :meth:`detect` also returns the
    :data:`MESH_KEEP` vertices in 3-D. Face mesh costs ~2.5 ms per
    frame on one core; the face detector runs only until a face is tracked.
    """

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        for name, v in (("min_detection_confidence", min_detection_confidence),
                        ("min_tracking_confidence", min_tracking_confidence)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        import mediapipe as mp

        with _quiet_stderr():
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=False, max_num_faces=1, refine_landmarks=False,
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence)
            self._warm_up()
        self._seen_face = False

    def _warm_up(self) -> None:
        # The graph opens its calculators asynchronously after a (re)start, and they log;
        # one blank frame waits for that to finish while stderr is muted. No face is found in
        # it, so tracking starts afresh on the next real frame.
        self._mesh.process(np.zeros((64, 64, 3), np.uint8))

    def reset(self) -> None:
        """Forget the tracked face (start of a new clip)."""
        with _quiet_stderr():
            self._mesh.reset()
            self._warm_up()

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        found = self.detect(rgb)
        return None if found is None else found[0]

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``((68, 2), (len(MESH_KEEP), 3))`` float32 for one ``(H, W, 3)`` uint8 RGB frame, or
        ``None`` when no face is found. The 3-D points are ``(x, y)`` in pixels and mediapipe's
        relative depth ``z`` scaled by the image width (the unit of ``x``; smaller = nearer the
        camera). Raises ``ValueError`` for another frame shape or dtype."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
        if self._seen_face:
            result = self._mesh.process(rgb)
        else:  # the first face found logs one more warning (once per process)
            with _quiet_stderr():
                result = self._mesh.process(rgb)
            self._seen_face = bool(result.multi_face_landmarks)
        if not result.multi_face_landmarks:
            return None
        lm = result.multi_face_landmarks[0].landmark
        h, w = rgb.shape[:2]
        pts = np.array([(lm[i].x, lm[i].y) for i in MP_TO_68], dtype=np.float32)
        pts *= np.array([w, h], dtype=np.float32)
        mesh = np.array([(lm[i].x, lm[i].y, lm[i].z) for i in MESH_KEEP], dtype=np.float32)
        mesh *= np.array([w, h, w], dtype=np.float32)
        return pts, mesh

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> "FaceMeshTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Lucas-Kanade settings of :func:`track_points` (OpenCV ``calcOpticalFlowPyrLK``).
LK_WINDOW = (11, 11)
LK_LEVELS = 1


def track_points(prev_gray: np.ndarray, gray: np.ndarray, points: np.ndarray,
                 max_fb_error_px: float = 1.0, max_lost_frac: float = 0.1) -> np.ndarray | None:
    """``points`` carried from one frame to the next by pyramidal Lucas-Kanade optical flow.

    Args:
        prev_gray, gray: ``(H, W)`` uint8 consecutive frames.
        points: ``(N, 2)`` float32 pixel ``(x, y)`` in ``prev_gray``.
        max_fb_error_px: a point whose forward-then-backward flow misses its start by more than this
            is lost (the forward-backward check of Kalal et al. 2010, "Forward-Backward Error").
        max_lost_frac: with more points lost than this share, the track has failed.

    Returns the ``(N, 2)`` float32 positions in ``gray`` (lost points moved by the median flow of the
    others), or ``None`` when the track failed and the caller should run the detector again.
    Raises ``ValueError`` for frames of different shapes.
    """
    import cv2

    if prev_gray.shape != gray.shape:
        raise ValueError(f"frames differ in shape: {prev_gray.shape} vs {gray.shape}")
    p0 = np.ascontiguousarray(points, np.float32).reshape(-1, 1, 2)
    kw = dict(winSize=LK_WINDOW, maxLevel=LK_LEVELS)
    p1, ok1, _ = cv2.calcOpticalFlowPyrLK(prev_gray, gray, p0, None, **kw)
    back, ok2, _ = cv2.calcOpticalFlowPyrLK(gray, prev_gray, p1, None, **kw)
    fb = np.linalg.norm((back - p0).reshape(-1, 2), axis=1)
    good = (ok1.ravel() == 1) & (ok2.ravel() == 1) & (fb <= max_fb_error_px)
    if good.mean() < 1.0 - max_lost_frac:
        return None
    p1 = p1.reshape(-1, 2)
    p0 = p0.reshape(-1, 2)
    if not good.all():
        p1[~good] = p0[~good] + np.median(p1[good] - p0[good], axis=0)
    return p1.astype(np.float32)


def stack_frames(frames: list, path: str | Path = "<landmarks>") -> np.ndarray:
    """Per-frame ``(68, 2)`` arrays or ``None`` -> ``(T, 68, 2)`` float32 with NaN for ``None``.

    Raises :class:`LandmarkError` naming ``path`` when an entry has another shape or is not finite.
    """
    out = np.full((len(frames), 68, 2), np.nan, dtype=np.float32)
    for t, pts in enumerate(frames):
        if pts is None:
            continue
        arr = np.asarray(pts, dtype=np.float32)
        if arr.shape != (68, 2):
            raise LandmarkError(f"{path}: frame {t} has landmarks of shape {arr.shape}, expected (68, 2)")
        if not np.isfinite(arr).all():
            raise LandmarkError(f"{path}: frame {t} has non-finite landmarks")
        out[t] = arr
    return out


def _read_pickle(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh)  # noqa: S301 - only reached with trust_pickles=True
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise LandmarkError(f"{path}: cannot read landmark pickle: {exc}") from None
    if isinstance(data, np.ndarray) and data.ndim == 3:
        data = list(data)
    if not isinstance(data, (list, tuple)):
        raise LandmarkError(f"{path}: expected a list of per-frame (68, 2) arrays, got {type(data).__name__}")
    return stack_frames(list(data), path)


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            arr = np.asarray(z["landmarks"], dtype=np.float32)
    except Exception as exc:
        raise LandmarkError(f"{path}: cannot read landmarks: {exc}") from None
    if arr.ndim != 3 or arr.shape[1:] != (68, 2):
        raise LandmarkError(f"{path}: landmarks have shape {arr.shape}, expected (T, 68, 2)")
    return arr


def load_landmarks(path: str | Path, trust_pickles: bool = False) -> np.ndarray:
    """Precomputed 68-point landmarks of one clip: ``(T, 68, 2)`` float32 pixels, NaN = no face.

    ``path`` is a ``.npz`` (key ``landmarks``, written by :func:`convert_pickle`) or a ``.pkl``.
    Raises :class:`LandmarkError` for an unreadable or malformed file, and for a pickle unless
    ``trust_pickles`` (unpickling runs code from the file).
    """
    path = Path(path)
    if path.suffix == _PICKLE_EXT:
        if not trust_pickles:
            raise LandmarkError(f"{path}: refusing to load a pickle (it can run code); pass "
                                "--trust-landmark-pickles or convert it once with `preprocessing.py convert-pickles`")
        return _read_pickle(path)
    return _read_npz(path)


def save_landmarks(path: str | Path, landmarks: np.ndarray) -> None:
    """Write ``(T, 68, 2)`` landmarks (NaN = no face) to ``path`` (.npz, key ``landmarks``) atomically."""
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be (T, 68, 2), got {landmarks.shape}")
    with atomic_path(path) as tmp:
        np.savez(tmp, landmarks=landmarks)


def convert_pickle(pkl: str | Path, npz: str | Path | None = None) -> Path:
    """Convert a trusted landmark pickle to ``.npz`` (default: beside it); returns the new path.

    Call only on pickles you trust: this loads them.
    """
    pkl = Path(pkl)
    npz = Path(npz) if npz is not None else pkl.with_suffix(".npz")
    save_landmarks(npz, _read_pickle(pkl))
    return npz


def convert_pickle_tree(root: str | Path, out: str | Path | None = None,
                        progress: bool = True) -> tuple[int, list[str]]:
    """Convert every ``*.pkl`` under ``root`` to ``.npz`` (beside it, or mirrored under ``out``).

    Loads the pickles: call only on files you trust. Existing ``.npz`` files are kept (the
    conversion resumes). Returns ``(converted, errors)`` with one ``"<file>: <reason>"`` per
    pickle that could not be converted.
    """
    root = Path(root)
    if not root.is_dir():
        raise LandmarkError(f"{root}: not a folder")
    pickles = sorted(root.rglob(f"*{_PICKLE_EXT}"))
    done, errors = 0, []
    for pkl in tqdm(pickles, unit="file", desc="convert pickles", disable=not progress):
        dst = (Path(out) / pkl.relative_to(root)).with_suffix(".npz") if out else pkl.with_suffix(".npz")
        if dst.is_file():
            continue
        try:
            convert_pickle(pkl, dst)
            done += 1
        except LandmarkError as exc:
            errors.append(str(exc))
    return done, errors


def mouth_opening(lips: np.ndarray) -> np.ndarray:
    """Inner-lip gap over mouth width, ``|p62 - p66| / |p60 - p64|``.

    ``lips`` is ``(..., 20, 2)`` in contract order (index k = iBUG point 48 + k); returns
    ``(...)`` float32. Invariant to similarity transforms, so it can be taken in any frame.
    """
    gap = np.linalg.norm(lips[..., 14, :] - lips[..., 18, :], axis=-1)
    width = np.linalg.norm(lips[..., 12, :] - lips[..., 16, :], axis=-1)
    return (gap / np.maximum(width, 1e-6)).astype(np.float32)
