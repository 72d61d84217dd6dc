"""Video input of the lip-sync model: per-frame features of the mouth crops from the visual
frontend of a trained AVSR model.

With ``LipSyncModel(video_dim=D)`` the model adds these features to its audio features (one
feature vector per 25 fps video frame, held over its four 10 ms mel frames), so that a clip with
a visible face is animated from what its mouth does as well as from what it sounds like. The
frontend (the ResNet-18 :class:`avsr.models.VisualFrontend` of an AVSR checkpoint, frozen, with
that checkpoint's test-time centre crop and normalisation) is stored in the lip-sync checkpoint,
so the lip-sync model needs no AVSR checkpoint at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from avsr.data.transforms import CenterCrop, Clip, Compose, Normalize, Scale
from avsr.models.frontends import VisualFrontend

CHUNK_FRAMES = 256  #: frames per frontend call (bounds the memory of long clips)


class MouthFeatures:
    """Mouth crops ``(T, 96, 96)`` uint8 at 25 fps → ``(T, D)`` float32 visual-frontend features.

    Args:
        frontend: a trained :class:`~avsr.models.VisualFrontend` (used frozen, in eval mode).
        args: its constructor arguments (``width``, ``out_dim``, ``stem_kernel_t``, ``activation``), for
            :meth:`state` (lip-sync checkpoints without ``activation`` get ReLU, as before).
        crop_size, video_mean, video_std: the AVSR model's test transform (centre crop of the
            96x96 ROI, then ``(x / 255 - mean) / std``).
    """

    def __init__(self, frontend: VisualFrontend, args: dict, crop_size: int, video_mean: float,
                 video_std: float) -> None:
        self.frontend = frontend.eval().requires_grad_(False)
        self.args = dict(args)
        self.transform_args = dict(crop_size=int(crop_size), video_mean=float(video_mean), video_std=float(video_std))
        self.transform = Compose([CenterCrop(crop_size), Scale(), Normalize(video_mean, video_std)])

    @property
    def dim(self) -> int:
        """``D``, the feature size."""
        return self.frontend.out_dim

    @classmethod
    def from_avsr_checkpoint(cls, path: str | Path) -> "MouthFeatures":
        """The visual frontend and test transform of an AVSR checkpoint (``train.py``'s ``best.pt``).

        Raises:
            ValueError: when the file is not an AVSR checkpoint or its mode has no video.
        """
        from avsr.config import from_dict
        from avsr.models import load_encoder
        from avsr.safe_load import safe_torch_load

        frontend = load_encoder(path, "visual_frontend")
        cfg = from_dict(safe_torch_load(path, "an avsr checkpoint", ValueError)["config"])
        args = dict(width=cfg.model.visual_width, out_dim=frontend.out_dim,
                    stem_kernel_t=cfg.model.visual_stem_kernel_t, activation=cfg.model.frontend_activation)
        return cls(frontend, args, cfg.data.crop_size, cfg.data.video_mean, cfg.data.video_std)

    def state(self) -> dict:
        """What :meth:`from_state` needs: ``{"args", "transform", "weights"}`` (tensors and plain values)."""
        return {"args": self.args, "transform": self.transform_args, "weights": self.frontend.state_dict()}

    @classmethod
    def from_state(cls, state: dict) -> "MouthFeatures":
        """Rebuild from :meth:`state` (as stored in a lip-sync checkpoint).

        Raises:
            ValueError: when ``state`` is malformed.
        """
        try:
            frontend = VisualFrontend(**state["args"])
            frontend.load_state_dict(state["weights"])
            return cls(frontend, state["args"], **state["transform"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"malformed video frontend in the lip-sync checkpoint: {exc}") from None

    @torch.no_grad()
    def __call__(self, crops: np.ndarray) -> torch.Tensor:
        """``(T, D)`` float32 features of ``crops``, ``(T, H, W)`` uint8 grayscale mouth ROIs
        (``H, W >= crop_size``).

        Raises:
            ValueError: for crops that are not ``(T >= 1, H, W)`` uint8 or smaller than the crop.
        """
        if crops.ndim != 3 or crops.dtype != np.uint8 or len(crops) < 1:
            raise ValueError(f"crops must be (T>=1, H, W) uint8, got {crops.shape} {crops.dtype}")
        video = torch.from_numpy(self.transform(Clip(crops), np.random.default_rng(0)).video)
        out = []
        for start in range(0, len(video), CHUNK_FRAMES):
            chunk = video[start:start + CHUNK_FRAMES][None, :, None]  # (1, t, 1, S, S)
            out.append(self.frontend(chunk, torch.tensor([chunk.shape[1]]))[0][0])
        return torch.cat(out)


def load_mouth_features(ckpt: dict) -> Optional[MouthFeatures]:
    """The video frontend of a loaded lip-sync checkpoint (:func:`avsr.lipsync.model.load_lipsync_model`),
    or None for an audio-only model."""
    state = ckpt.get("video_frontend")
    return None if state is None else MouthFeatures.from_state(state)
