"""Mouth blendshape targets from face-mesh landmarks: video that labels itself.

Per frame, 16 ARKit-named mouth coefficients (:data:`BLENDSHAPES`) are measured geometrically on
the face-mesh vertices that preprocessing keeps (``face_mesh`` in the clip's ``.npz``, vertex
numbers :data:`avsr.data.landmarks.MESH_KEEP`) and normalised per speaker to [0, 1].

**Head frame.** Each frame's points are expressed in a head-fixed frame, so head turns and
distance to the camera do not move the coefficients: origin at the nose tip (vertex 1); x from
the subject's right outer eye corner (33) to the left one (263); y from the nasion (168) towards
the chin (152), made orthogonal to x (so +y points down the face); z = x × y (away from the
camera); unit = the outer eye-corner distance |263 - 33| in 3-D. ``P[v]`` below is vertex ``v``
in that frame, ``.x .y .z`` its coordinates. "Left" is the subject's left (image right in
unmirrored video), as ARKit names it.

**Raw measures** (larger = more of the shape; ``c`` is the mouth corner of that side, 291 left
and 61 right):

- ``jawOpen``: ``P[152].y - P[13].y``, the chin below the upper inner lip (the upper lip rides on
  the skull, so this is steadier under head pitch than the chin below the nose tip)
- ``mouthClose``: ``P[152].y - P[14].y``, the chin below the lower inner lip: the jaw drop not
  matched by the lips parting (lips held together while the jaw opens, ARKit's "closure
  independent of jaw position")
- ``mouthFunnel``: ``(P[14].y - P[13].y) / |P[308].x - P[78].x|``, the inner opening's height over
  its width (a round "O" opening)
- ``mouthPucker``: ``mean(P[61].z, P[291].z) - mean(P[0].z, P[17].z) - |P[291].x - P[61].x|``, the
  lip centre forward of the corners, and the mouth narrow
- ``mouthSmileLeft/Right``: ``-P[c].y``, the corner's height relative to the nose tip (it rises in a
  smile and drops a little as the jaw opens; relative to the lip centre it would grow with
  every opening of the mouth). On a corpus without smiles (GRID) its per-speaker range is the
  corners' small motion in speech, largest with the lips closed: see the contact sheet
- ``mouthStretchLeft/Right``: ``|P[c].x|``, the corner pulled away from the face midline
- ``mouthRollLower``: ``P[14].y - P[17].y``, the lower lip's visible height, negated (rolled in)
- ``mouthRollUpper``: ``P[0].y - P[13].y``, the upper lip's visible height, negated
- ``mouthPressLeft/Right``: ``P[up].y - P[lo].y``, the lip stack beside the corner, negated (pressed
  together and thinned; left 270 over 321, right 40 over 91)
- ``mouthLowerDownLeft/Right``: ``P[lo].y - P[c].y``, the lower lip (314 left, 84 right) below its
  corner
- ``mouthUpperUpLeft/Right``: ``P[c].y - P[up].y``, the upper lip (267 left, 37 right) above its
  corner

**Per-speaker normalisation** (:func:`fit_normaliser`, :func:`normalise`): each raw measure is
mapped linearly from its 5th..95th percentile over all of one speaker's face-detected frames to
[0, 1] and clipped, so a coefficient means "how far into this speaker's own range".

The geometry is ours (no public formula exists for ARKit coefficients from a landmark mesh); the
names and the [0, 1] range are ARKit's (``ARFaceAnchor.BlendShapeLocation``). The frames at each
end of every coefficient on GRID s1 test: ``docs/blendshape_contact_sheet.png``
(``scripts/blendshape_contact_sheet.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from avsr.data.align import fill_gaps
from avsr.data.landmarks import MESH_KEEP

#: The coefficients, in the order of the last axis of :func:`normalise`'s output.
BLENDSHAPES = ("jawOpen", "mouthClose", "mouthFunnel", "mouthPucker", "mouthSmileLeft", "mouthSmileRight",
               "mouthStretchLeft", "mouthStretchRight", "mouthRollLower", "mouthRollUpper", "mouthPressLeft",
               "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
               "mouthUpperUpRight")
PERCENTILES = (5.0, 95.0)

_COL = {int(v): i for i, v in enumerate(MESH_KEEP)}


def head_frame(mesh: np.ndarray) -> np.ndarray:
    """``(T, K, 3)`` kept face-mesh vertices (any pixel unit, no NaN) -> the same points in the head
    frame of the module docstring (eye-corner distance = 1). Raises ``ValueError`` for another
    shape or when the eye corners coincide."""
    mesh = np.asarray(mesh, dtype=np.float64)
    if mesh.ndim != 3 or mesh.shape[1:] != (len(MESH_KEEP), 3):
        raise ValueError(f"face mesh must be (T, {len(MESH_KEEP)}, 3), got {mesh.shape}")
    x = mesh[:, _COL[263]] - mesh[:, _COL[33]]
    scale = np.linalg.norm(x, axis=-1, keepdims=True)
    if (scale < 1e-6).any():
        raise ValueError("the outer eye corners coincide in some frame: not a face mesh")
    x = x / scale
    y = mesh[:, _COL[152]] - mesh[:, _COL[168]]
    y = y - (y * x).sum(-1, keepdims=True) * x
    y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-9)
    z = np.cross(x, y)
    rot = np.stack([x, y, z], axis=1)  # (T, 3, 3): rows are the head axes
    local = (mesh - mesh[:, _COL[1]][:, None]) / scale[:, None]
    return np.einsum("tij,tkj->tki", rot, local)


def raw_measures(mesh: np.ndarray) -> np.ndarray:
    """``(T, K, 3)`` kept vertices (NaN frames allowed: filled linearly first) -> ``(T, 16)``
    float32 raw measures in :data:`BLENDSHAPES` order (formulas in the module docstring). Raises
    ``ValueError`` when no frame has a face."""
    p = head_frame(fill_gaps(mesh))

    def v(i: int) -> np.ndarray:
        return p[:, _COL[i]]

    gap = v(14)[:, 1] - v(13)[:, 1]
    cols = {
        "jawOpen": v(152)[:, 1] - v(13)[:, 1],
        "mouthClose": v(152)[:, 1] - v(14)[:, 1],
        "mouthFunnel": gap / np.maximum(np.abs(v(308)[:, 0] - v(78)[:, 0]), 1e-6),
        "mouthPucker": (v(61)[:, 2] + v(291)[:, 2]) / 2 - (v(0)[:, 2] + v(17)[:, 2]) / 2
        - np.abs(v(291)[:, 0] - v(61)[:, 0]),
        "mouthSmileLeft": -v(291)[:, 1],
        "mouthSmileRight": -v(61)[:, 1],
        "mouthStretchLeft": np.abs(v(291)[:, 0]),
        "mouthStretchRight": np.abs(v(61)[:, 0]),
        "mouthRollLower": v(14)[:, 1] - v(17)[:, 1],
        "mouthRollUpper": v(0)[:, 1] - v(13)[:, 1],
        "mouthPressLeft": v(270)[:, 1] - v(321)[:, 1],
        "mouthPressRight": v(40)[:, 1] - v(91)[:, 1],
        "mouthLowerDownLeft": v(314)[:, 1] - v(291)[:, 1],
        "mouthLowerDownRight": v(84)[:, 1] - v(61)[:, 1],
        "mouthUpperUpLeft": v(291)[:, 1] - v(267)[:, 1],
        "mouthUpperUpRight": v(61)[:, 1] - v(37)[:, 1],
    }
    return np.stack([cols[n] for n in BLENDSHAPES], axis=1).astype(np.float32)


def fit_normaliser(raws: list[np.ndarray], masks: Optional[list[np.ndarray]] = None,
                   percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """One speaker's ``(2, 16)`` float32 low/high percentiles of each raw measure over the frames
    of all ``raws`` (each ``(T, 16)``) where ``masks`` (each ``(T,)`` bool, default all) is True.
    Raises ``ValueError`` with no frames, or when a measure does not vary (low == high)."""
    masks = masks if masks is not None else [np.ones(len(r), bool) for r in raws]
    frames = [r[m] for r, m in zip(raws, masks)]
    if not frames or sum(len(f) for f in frames) == 0:
        raise ValueError("no face-detected frames to fit the per-speaker normalisation on")
    stats = np.percentile(np.concatenate(frames), percentiles, axis=0).astype(np.float32)
    flat = [BLENDSHAPES[i] for i in np.flatnonzero(stats[1] - stats[0] <= 1e-9)]
    if flat:
        raise ValueError(f"{', '.join(flat)} do not vary over this speaker's frames: cannot normalise")
    return stats


def normalise(raw: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """``(T, 16)`` raw measures -> ``(T, 16)`` float32 coefficients in [0, 1] with one speaker's
    ``(2, 16)`` percentiles from :func:`fit_normaliser`."""
    return np.clip((raw - stats[0]) / (stats[1] - stats[0]), 0.0, 1.0).astype(np.float32)


def load_clip_mesh(npz: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(face_mesh (T, K, 3), face_detected (T,) bool)`` of one preprocessed clip. Raises
    ``ValueError`` naming the file when it has no face mesh (preprocessed from precomputed 68-point
    landmarks, or by a version before face meshes were kept)."""
    with np.load(npz, allow_pickle=False) as z:
        if "face_mesh" not in z:
            raise ValueError(f"{npz}: no face_mesh (precomputed 68-point landmarks, or preprocessed before "
                             "face meshes were kept): rerun preprocessing.py on it with face mesh")
        ids = z["face_mesh_ids"]
        if not np.array_equal(ids, MESH_KEEP):
            raise ValueError(f"{npz}: face_mesh holds other vertices than avsr.data.landmarks.MESH_KEEP: "
                             "rerun preprocessing.py on it")
        return z["face_mesh"].astype(np.float32), z["face_detected"].astype(bool)


def corpus_blendshapes(root: str | Path, split: str,
                       speaker_of: Callable[[str], str] = lambda utt_id: "") -> dict[str, np.ndarray]:
    """Per-utterance ``(T, 16)`` float32 coefficients of a preprocessed split, each speaker
    (``speaker_of(utt_id)``, default: the whole split is one speaker) normalised on its own frames.
    Raises ``ValueError`` as :func:`load_clip_mesh` does."""
    from avsr.data.manifest import read_manifest

    rows = read_manifest(root, split)
    raws: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for row in rows:
        mesh, detected = load_clip_mesh(row.file(root, ".npz"))
        raws[row.utt_id], masks[row.utt_id] = raw_measures(mesh), detected
    out: dict[str, np.ndarray] = {}
    for spk in sorted({speaker_of(u) for u in raws}):
        utts = [u for u in raws if speaker_of(u) == spk]
        stats = fit_normaliser([raws[u] for u in utts], [masks[u] for u in utts])
        out.update({u: normalise(raws[u], stats) for u in utts})
    return out
