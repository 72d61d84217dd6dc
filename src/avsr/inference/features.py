"""Features of a pretrained frontend or encoder for every clip of a manifest: one ``.npy`` per clip.

``<out>/<utt_id>.npy`` holds a float32 array of shape ``(T, D)`` at 25 fps: ``T`` frames of the
clip (in audio-visual modes the shorter stream), ``D = model.frontend_dim`` for
``visual_frontend`` / ``audio_frontend`` and ``model.d_model`` for ``encoder``. Clips go through
the test transform (centre crop, normalisation), as in evaluation. A clip whose files cannot be
read is reported (one line naming the file) and skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avsr.config import from_dict
from avsr.data.manifest import read_manifest
from avsr.data.media import MediaError, fit_length, load_clip
from avsr.data.transforms import SAMPLES_PER_FRAME, Clip, build_transform
from avsr.export import ExportablePart
from avsr.models import load_encoder
from avsr.training.checkpoint import load_checkpoint
from avsr.utils import atomic_path

log = logging.getLogger(__name__)


def extract_features(checkpoint: str | Path, root: str | Path, split: str, part: str, out_dir: str | Path,
                     device: str | torch.device = "cpu") -> tuple[int, int]:
    """Write ``<out_dir>/<utt_id>.npy`` (float32 ``(T, D)``, see the module docstring) for every clip
    of ``<root>/<split>.tsv``; returns ``(written, failed)``.

    Raises:
        avsr.training.checkpoint.CheckpointError: for an unreadable checkpoint.
        ValueError: for an unknown part or one the checkpoint's mode lacks.
        avsr.data.manifest.ManifestError: for a missing or malformed manifest.
    """
    cfg = from_dict(load_checkpoint(checkpoint)["config"])
    module = ExportablePart(load_encoder(checkpoint, part, freeze=True), part).to(device).eval()
    transform = build_transform(cfg.data, train=False)
    rows = read_manifest(root, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = failed = 0
    rng = np.random.default_rng(0)  # the test transform is deterministic
    for row in tqdm(rows, desc=f"{part} features", unit="clip"):
        try:
            frames, wave, _ = load_clip(root, row)
        except MediaError as exc:
            log.error("%s: skipped (%s)", row.utt_id, exc)
            failed += 1
            continue
        t = len(frames)
        values = {
            "video": torch.from_numpy(transform(Clip(frames), rng).video)[None, :, None],
            "audio": torch.from_numpy(fit_length(wave.astype(np.float32), SAMPLES_PER_FRAME * t))[None],
            "video_lengths": torch.tensor([t]),
            "audio_lengths": torch.tensor([SAMPLES_PER_FRAME * t]),
        }
        with torch.no_grad():
            feats, lengths = module(*(values[n].to(device) for n in module.input_names))
        array = feats[0, : int(lengths[0])].float().cpu().numpy()
        with atomic_path(out_dir / f"{row.utt_id}.npy") as tmp:
            np.save(tmp, array)
        written += 1
    return written, failed
