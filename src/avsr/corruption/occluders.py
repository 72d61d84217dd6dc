"""Occluder bank: object cut-outs with alpha masks, pasted over the lips by :mod:`avsr.corruption.visual`.

AV-RelScore (Hong et al. 2023) occludes the mouth with COCO object patches, which cannot be
downloaded here. The built-in bank instead cuts objects out of the real photographs that ship
inside the scikit-image wheel (no download: ``skimage.data`` files marked as bundled), each with a
documented crop and mask (ellipse, polygon or an Otsu threshold); see :data:`BUILTIN_CUTOUTS`.
Users with the COCO patches (or any other set) point ``corruption.occluder_dir`` /
``--occluder-dir`` at a folder of RGBA PNGs instead (:meth:`OccluderBank.from_dir`).

Patches are stored as RGBA ``uint8`` ``(h, w, 4)``; since mouth ROIs are grayscale, they are
converted to gray at application time (:meth:`OccluderBank.gray`). A bank has a
:attr:`~OccluderBank.fingerprint` (SHA-256 of its ids and pixels) that a test protocol records,
so replaying a protocol with a different bank is detected.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import cv2
import numpy as np

logger = logging.getLogger(__name__)

MAX_PATCH_SIDE = 128  # stored patches are downscaled to at most this many pixels (they are pasted at 20-45 px)
_FEATHER_SIGMA = 1.0  # Gaussian softening of cut-out mask edges, in source pixels


@dataclass(frozen=True)
class Cutout:
    """How one built-in occluder is cut out of a scikit-image photograph.

    Coordinates are (x, y) = (column, row) pixels of the full source image. ``box`` is the crop
    ``(x0, y0, x1, y1)`` (end-exclusive). ``shapes`` is a list of ``("ellipse", (cx, cy, ax, ay))``
    (centre and semi-axes) and ``("polygon", ((x, y), ...))`` whose union is the mask; with
    ``threshold=True`` the mask is instead the largest bright connected blob (Otsu threshold on
    the gray crop, holes filled).
    """

    id: str
    image: str  # skimage.data loader name
    box: tuple[int, int, int, int]
    shapes: tuple[tuple[str, tuple], ...] = ()
    threshold: bool = False
    note: str = ""


BUILTIN_CUTOUTS: tuple[Cutout, ...] = (
    Cutout("coffee_cup", "coffee", (165, 12, 414, 310),
           (("ellipse", (290, 112, 118, 95)),
            ("polygon", ((174, 120), (182, 190), (196, 226), (216, 252), (252, 271), (290, 279),
                         (330, 270), (362, 246), (386, 210), (401, 170), (408, 118))),
            ("ellipse", (228, 268, 31, 38))),
           note="espresso cup with handle, rim ellipse + body polygon + handle ellipse"),
    Cutout("coffee_spoon", "coffee", (326, 190, 410, 330),
           (("ellipse", (367, 285, 38, 42)),
            ("polygon", ((370, 252), (377, 216), (384, 194), (392, 196), (390, 220), (386, 252)))),
           note="bowl and neck of a teaspoon, ellipse + polygon"),
    Cutout("coffee_saucer", "coffee", (74, 60, 484, 386),
           (("ellipse", (279, 222, 204, 162)),),
           note="cup on its saucer, one ellipse"),
    Cutout("cat_face", "chelsea", (60, 20, 400, 300),
           (("ellipse", (232, 165, 165, 132)),),
           note="tabby cat's face (fur, eyes, nose), one ellipse"),
    Cutout("astronaut_helmet", "astronaut", (276, 342, 512, 512),
           (("ellipse", (394, 448, 117, 104)),),
           note="space helmet held at the bottom right, ellipse cut by the image border"),
    Cutout("astronaut_badge", "astronaut", (130, 345, 212, 426),
           (("ellipse", (171, 385, 39, 38)),),
           note="round mission badge on the suit, one ellipse"),
    Cutout("rocket", "rocket", (300, 122, 346, 412), threshold=True,
           note="white rocket on the pad against the evening sky, Otsu threshold"),
    Cutout("coin_large", "coins", (294, 4, 374, 84), threshold=True,
           note="large coin (top right of the tray), Otsu threshold"),
    Cutout("coin_head", "coins", (178, 158, 246, 224), threshold=True,
           note="coin with a facing head (third row), Otsu threshold"),
    Cutout("coin_helmet", "coins", (306, 146, 384, 224), threshold=True,
           note="coin with a helmeted head (third row, right), Otsu threshold"),
    Cutout("motorcycle_headlight", "stereo_motorcycle", (500, 118, 574, 192),
           (("ellipse", (537, 155, 33, 33)),),
           note="round chrome headlight of the red motorcycle (left stereo view), one ellipse"),
    Cutout("clock", "clock", (130, 85, 295, 225),
           (("ellipse", (212, 155, 76, 62)),),
           note="motion-blurred wall clock, one ellipse"),
)


def _load_skimage(name: str) -> np.ndarray:
    """RGB ``uint8`` (H, W, 3) of the bundled ``skimage.data`` image ``name``."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _shape_mask(size_hw: tuple[int, int], shapes: tuple[tuple[str, tuple], ...]) -> np.ndarray:
    mask = np.zeros(size_hw, np.uint8)
    for kind, params in shapes:
        if kind == "ellipse":
            cx, cy, ax, ay = params
            cv2.ellipse(mask, (cx, cy), (ax, ay), 0, 0, 360, 255, thickness=-1, lineType=cv2.LINE_AA)
        elif kind == "polygon":
            cv2.fillPoly(mask, [np.asarray(params, np.int32)], 255, lineType=cv2.LINE_AA)
        else:
            raise ValueError(f"unknown cut-out shape '{kind}' (expected ellipse or polygon)")
    return mask


def _threshold_mask(rgb: np.ndarray) -> np.ndarray:
    """Largest bright blob of ``rgb`` (Otsu threshold, holes filled) as a 0/255 mask."""
    from scipy.ndimage import binary_fill_holes

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _, fg = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n < 2:
        raise ValueError("threshold cut-out found no foreground")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return binary_fill_holes(labels == largest).astype(np.uint8) * 255


def _finish_patch(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Feather ``mask``, trim to its bounding box and cap the size: RGBA uint8 (h, w, 4)."""
    alpha = cv2.GaussianBlur(mask, (0, 0), _FEATHER_SIGMA)
    ys, xs = np.nonzero(alpha)
    rgba = np.dstack([rgb, alpha])[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    scale = MAX_PATCH_SIDE / max(rgba.shape[:2])
    if scale < 1.0:
        size = (max(1, round(rgba.shape[1] * scale)), max(1, round(rgba.shape[0] * scale)))
        rgba = cv2.resize(rgba, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgba)


def cut_out(cutout: Cutout, image: np.ndarray) -> np.ndarray:
    """The RGBA ``uint8`` (h, w, 4) patch that ``cutout`` describes, cut from RGB ``image`` (H, W, 3)."""
    x0, y0, x1, y1 = cutout.box
    if not (0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]):
        raise ValueError(f"cut-out '{cutout.id}': box {cutout.box} outside its {image.shape[1]}x{image.shape[0]} image")
    if cutout.threshold:
        rgb = image[y0:y1, x0:x1]
        mask = _threshold_mask(rgb)
    else:
        mask = _shape_mask(image.shape[:2], cutout.shapes)[y0:y1, x0:x1]
        rgb = image[y0:y1, x0:x1]
    if not mask.any():
        raise ValueError(f"cut-out '{cutout.id}': empty mask")
    return _finish_patch(rgb, mask)


class OccluderBank:
    """A named set of RGBA occluder patches.

    Args:
        patches: id -> RGBA ``uint8`` array ``(h, w, 4)`` with a non-empty alpha channel.
        name: where the patches came from (logged and recorded in test protocols).

    Raises ``ValueError`` for an empty bank or a patch that is not RGBA uint8 with some opaque pixel.
    """

    def __init__(self, patches: Mapping[str, np.ndarray], name: str = "custom") -> None:
        if not patches:
            raise ValueError("an occluder bank needs at least one patch")
        self._patches: dict[str, np.ndarray] = {}
        for key in sorted(patches):
            arr = np.asarray(patches[key])
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 4 or min(arr.shape[:2]) < 2:
                raise ValueError(f"occluder '{key}' must be RGBA uint8 (h, w, 4) with h, w >= 2, "
                                 f"got {arr.dtype} {arr.shape}")
            if not arr[..., 3].any():
                raise ValueError(f"occluder '{key}' is fully transparent")
            self._patches[key] = np.ascontiguousarray(arr)
        self.name = name
        self._gray: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        digest = hashlib.sha256()
        for key, arr in self._patches.items():
            digest.update(key.encode() + b"\0" + repr(arr.shape).encode() + arr.tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    @property
    def ids(self) -> tuple[str, ...]:
        """Patch ids, sorted."""
        return tuple(self._patches)

    def __len__(self) -> int:
        return len(self._patches)

    def __contains__(self, key: object) -> bool:
        return key in self._patches

    def __iter__(self) -> Iterator[str]:
        return iter(self._patches)

    def __getitem__(self, key: str) -> np.ndarray:
        """RGBA ``uint8`` (h, w, 4) patch ``key``; raises ``KeyError`` naming the bank."""
        try:
            return self._patches[key]
        except KeyError:
            raise KeyError(f"occluder '{key}' not in bank '{self.name}' ({len(self)} patches)") from None

    def gray(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``key`` as (gray ``uint8`` (h, w), alpha ``float32`` (h, w) in [0, 1]); cached."""
        if key not in self._gray:
            rgba = self[key]
            gray = cv2.cvtColor(np.ascontiguousarray(rgba[..., :3]), cv2.COLOR_RGB2GRAY)
            self._gray[key] = (gray, rgba[..., 3].astype(np.float32) / 255.0)
        return self._gray[key]

    @classmethod
    def builtin(cls) -> "OccluderBank":
        """The :data:`BUILTIN_CUTOUTS` cut from the photographs bundled with scikit-image (no download)."""
        cache: dict[str, np.ndarray] = {}
        patches = {}
        for c in BUILTIN_CUTOUTS:
            if c.image not in cache:
                cache[c.image] = _load_skimage(c.image)
            patches[c.id] = cut_out(c, cache[c.image])
        return cls(patches, name="builtin-skimage")

    @classmethod
    def from_dir(cls, folder: str | Path) -> "OccluderBank":
        """Every ``*.png`` with an alpha channel in ``folder`` (id = file stem).

        Raises ``ValueError`` when the folder is missing or holds no usable RGBA PNG; PNGs without
        alpha or that fail to decode are skipped with a warning naming the file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"occluder folder not found: {folder}")
        patches = {}
        for path in sorted(folder.glob("*.png")):
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None or img.ndim != 3 or img.shape[2] != 4 or img.dtype != np.uint8:
                logger.warning("skipping occluder %s: not an 8-bit RGBA PNG", path)
                continue
            if not img[..., 3].any():
                logger.warning("skipping occluder %s: fully transparent", path)
                continue
            patches[path.stem] = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
        if not patches:
            raise ValueError(f"no 8-bit RGBA PNG occluders in {folder}")
        return cls(patches, name=f"dir:{folder.name}")

    @classmethod
    def from_config(cls, occluder_dir: str = "") -> "OccluderBank":
        """:meth:`from_dir` when ``occluder_dir`` is set (``CorruptionConfig.occluder_dir``), else :meth:`builtin`."""
        bank = cls.from_dir(occluder_dir) if occluder_dir else cls.builtin()
        logger.info("occluder bank '%s': %d patches (fingerprint %s)", bank.name, len(bank), bank.fingerprint)
        return bank
