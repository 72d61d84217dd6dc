"""Training and evaluation of the stand-alone audio → mouth-opening model (:mod:`avsr.models.mouth`).

The recipe follows R3MOE: Huber loss on the landmark curve, optional R-Drop (two dropout passes
with a consistency term, Liang et al. 2021) and optional mean-teacher consistency on unlabelled
audio (EMA teacher, sigmoid ramp-up; Tarvainen & Valpola 2017). Data come from a preprocessed
corpus (``<root>/<split>.tsv``): the ``.wav`` (log-mel input) and the ``.npz`` (``mouth_opening``
target, ``face_detected`` mask: frames whose landmarks were interpolated are left out of the loss
and of the metrics).

Used by ``scripts/train_mouth_opening.py`` and ``benchmarks/bench_aux.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from avsr.audio_features import MEL_PER_VIDEO_FRAME, SAMPLE_RATE, log_mel
from avsr.data.manifest import read_manifest
from avsr.evaluation.aux_metrics import curve_metrics
from avsr.models.heads import masked_mean, mouth_opening_loss
from avsr.models.masking import lengths_to_mask
from avsr.models.mouth import AudioMouthOpening, build_mouth_model, sigmoid_rampup
from avsr.utils import atomic_path, seed_everything

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = SAMPLE_RATE // 25  # audio samples per 25 fps video frame
DB_TO_LOG_MAGNITUDE = math.log(10.0) / 20.0  # a gain of g dB adds g * this to a natural-log magnitude


@dataclass
class MouthData:
    """Utterances ready for the model: per utterance a log-mel ``(4T, 80)`` float32, the target
    ``(T,)`` float32 and a ``(T,)`` bool mask of frames with a detected face."""

    utt_ids: list[str] = field(default_factory=list)
    mels: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.utt_ids)

    def subset(self, keep: list[bool]) -> "MouthData":
        """The utterances where ``keep`` is True."""
        pick = [i for i, k in enumerate(keep) if k]
        return MouthData([self.utt_ids[i] for i in pick], [self.mels[i] for i in pick],
                         [self.targets[i] for i in pick], [self.masks[i] for i in pick])

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded ``(mel (B, 4T, 80), mel_lengths (B,), target (B, T), mask (B, T) bool)``."""
        mels = torch.nn.utils.rnn.pad_sequence([self.mels[i] for i in index], batch_first=True)
        lengths = torch.tensor([len(self.mels[i]) for i in index], dtype=torch.long)
        target = torch.nn.utils.rnn.pad_sequence([self.targets[i] for i in index], batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([self.masks[i] for i in index], batch_first=True)
        return mels, lengths, target, mask


def load_mouth_data(root: str | Path, split: str, with_targets: bool = True) -> MouthData:
    """Log-mel and mouth-opening targets of every clip of ``<root>/<split>.tsv``.

    Clips whose files cannot be read are logged (naming the file) and skipped. With
    ``with_targets=False`` only the audio is read (unlabelled data; targets are empty).

    Raises:
        ValueError: when the manifest is missing/malformed or no clip can be read.
    """
    rows = read_manifest(root, split)
    data = MouthData()
    waves: list[torch.Tensor] = []
    for row in tqdm(rows, desc=f"load {split}", unit="clip", leave=False, disable=len(rows) < 50):
        wav_path = row.file(root, ".wav")
        try:
            wave, sr = sf.read(str(wav_path), dtype="float32", always_2d=False)
            if sr != SAMPLE_RATE or wave.ndim != 1:
                raise ValueError(f"expected 16 kHz mono, got {sr} Hz with shape {wave.shape}")
            n_frames = len(wave) // SAMPLES_PER_FRAME
            target = np.zeros(n_frames, np.float32)
            mask = np.ones(n_frames, bool)
            if with_targets:
                with np.load(row.file(root, ".npz"), allow_pickle=False) as z:
                    curve, face = z["mouth_opening"].astype(np.float32), z["face_detected"].astype(bool)
                n_frames = min(n_frames, len(curve))
                target, mask = curve[:n_frames], face[:n_frames]
            if n_frames < 1:
                raise ValueError("shorter than one video frame")
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("skipping %s: %s", wav_path, exc)
            continue
        waves.append(torch.from_numpy(wave[: n_frames * SAMPLES_PER_FRAME]))
        data.utt_ids.append(row.utt_id)
        data.targets.append(torch.from_numpy(np.ascontiguousarray(target)))
        data.masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
    if not data.utt_ids:
        raise ValueError(f"no readable clips in {Path(root) / (split + '.tsv')}")
    for start in range(0, len(waves), 32):  # batched: much faster than clip by clip
        chunk = waves[start:start + 32]
        lengths = torch.tensor([len(w) for w in chunk])
        mel, mel_lengths = log_mel(torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True), lengths)
        data.mels += [m[:n] for m, n in zip(mel, mel_lengths.tolist())]
    return data


@dataclass
class MouthTrainConfig:
    """Optimisation of :func:`train_mouth_model` (all budgets in steps, not wall time)."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3  # peak of a one-cycle schedule (10% warm-up, cosine decay)
    weight_decay: float = 1e-2
    grad_clip: float = 5.0
    huber_delta: float = 1.0  # in target standard deviations
    gain_db: float = 6.0  # random input gain in [-gain_db, +gain_db] dB per utterance (0 disables)
    rdrop_weight: float = 0.0  # R-Drop consistency weight (0 disables R-Drop)
    mean_teacher_weight: float = 0.0  # mean-teacher consistency weight (needs unlabelled data)
    ema_decay: float = 0.99
    rampup_steps: int = 500  # sigmoid ramp-up of the mean-teacher weight
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.lr <= 0 or min(self.weight_decay, self.gain_db, self.rdrop_weight, self.mean_teacher_weight) < 0:
            raise ValueError("lr must be positive; weight_decay, gain_db and consistency weights non-negative")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


def _augment(mel: torch.Tensor, gain_db: float) -> torch.Tensor:
    if gain_db <= 0:
        return mel
    gain = torch.empty(mel.shape[0], 1, 1).uniform_(-gain_db, gain_db) * DB_TO_LOG_MAGNITUDE
    return mel + gain


def _feature_stats(data: MouthData) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    mels = torch.cat(data.mels)
    targets = torch.cat([t[m] for t, m in zip(data.targets, data.masks)])
    return mels.mean(0), mels.std(0).clamp_min(1e-3), float(targets.mean()), max(float(targets.std()), 1e-4)


def _consistency(a: torch.Tensor, b: torch.Tensor, lengths: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return masked_mean(((a - b) / scale) ** 2, lengths_to_mask(lengths, a.shape[1]))


@torch.no_grad()
def _ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def train_mouth_model(train: MouthData, model_args: dict, cfg: MouthTrainConfig,
                      unlabelled: Optional[MouthData] = None,
                      init: Optional[AudioMouthOpening] = None) -> tuple[AudioMouthOpening, dict]:
    """Train an :class:`AudioMouthOpening` (``build_mouth_model(**model_args)``) on ``train``.

    Input and target normalisation are taken from ``train``. With ``cfg.mean_teacher_weight > 0``
    the EMA teacher is returned (it is the better model); ``unlabelled`` audio (default: the
    training audio) feeds its consistency term. ``init`` (a model of the same ``model_args``)
    fine-tunes: training starts from its weights, with the normalisation of ``train`` (a new
    speaker's voice and mouth).

    Returns:
        ``(model in eval mode, history)`` with ``history = {"loss": [...], "step_time_median_s": ...}``.

    Raises:
        ValueError: when ``train`` is empty.
    """
    if not len(train):
        raise ValueError("no training utterances")
    seed_everything(cfg.seed)
    model = build_mouth_model(**model_args)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.set_stats(*_feature_stats(train))
    model.train()
    teacher = None
    if cfg.mean_teacher_weight > 0:
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        unlabelled = unlabelled if unlabelled is not None and len(unlabelled) else train
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = model.target_std
    losses, times = [], []
    for step in tqdm(range(cfg.steps), desc="train mouth", unit="step", leave=False):
        t0 = time.perf_counter()
        index = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
        mel, mel_lengths, target, mask = train.batch(index)
        mel = _augment(mel, cfg.gain_db)
        pred, lengths = model(mel, mel_lengths)
        loss = mouth_opening_loss(pred, target, lengths, scale, cfg.huber_delta, mask)
        if cfg.rdrop_weight > 0:
            pred2, _ = model(mel, mel_lengths)
            loss = 0.5 * (loss + mouth_opening_loss(pred2, target, lengths, scale, cfg.huber_delta, mask))
            loss = loss + cfg.rdrop_weight * _consistency(pred, pred2, lengths, scale)
        if teacher is not None:
            u_index = torch.randint(len(unlabelled), (cfg.batch_size,), generator=gen).tolist()
            u_mel, u_lengths, _, _ = unlabelled.batch(u_index)
            student, s_lengths = model(_augment(u_mel, cfg.gain_db), u_lengths)
            with torch.no_grad():
                teacher_pred, _ = teacher(_augment(u_mel, cfg.gain_db), u_lengths)
            weight = cfg.mean_teacher_weight * sigmoid_rampup(step, cfg.rampup_steps)
            loss = loss + weight * _consistency(student, teacher_pred, s_lengths, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if teacher is not None:
            _ema_update(teacher, model, cfg.ema_decay)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log.info("step %d/%d loss %.4f", step + 1, cfg.steps, float(np.mean(losses[-50:])))
    final = teacher if teacher is not None else model
    return final.eval(), {"loss": losses, "step_time_median_s": float(np.median(times))}


@torch.no_grad()
def predict_curves(model: AudioMouthOpening, data: MouthData, batch_size: int = 32) -> list[np.ndarray]:
    """Predicted mouth-opening curve ``(T,)`` float32 of every utterance (model in eval mode)."""
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(data), batch_size):
        index = list(range(start, min(start + batch_size, len(data))))
        mel, mel_lengths, _, _ = data.batch(index)
        pred, lengths = model(mel, mel_lengths)
        out += [pred[i, : int(lengths[i])].numpy().astype(np.float32) for i in range(len(index))]
    return out


def evaluate_mouth_model(model: AudioMouthOpening, data: MouthData) -> dict:
    """:func:`avsr.evaluation.aux_metrics.curve_metrics` of the model on ``data`` (face-detected frames only)."""
    preds = predict_curves(model, data)
    pairs = [(p[: len(t)][m[: len(p)].numpy()], t[: len(p)][m[: len(p)]].numpy())
             for p, t, m in zip(preds, data.targets, data.masks)]
    return curve_metrics([p for p, _ in pairs], [t for _, t in pairs], data.utt_ids)


def energy_envelope_curves(data: MouthData) -> list[np.ndarray]:
    """Baseline: mean log-mel energy per video frame ``(T,)`` of every utterance."""
    return [m.reshape(-1, MEL_PER_VIDEO_FRAME * m.shape[1]).mean(1).numpy() for m in data.mels]


def save_mouth_checkpoint(path: str | Path, model: AudioMouthOpening, model_args: dict, cfg: MouthTrainConfig,
                          metrics: Optional[dict] = None) -> Path:
    """Write ``{"model", "model_args", "train_config", "metrics"}`` atomically (read by
    :func:`avsr.models.mouth.load_mouth_model`); ``metrics`` holds plain numbers and strings."""
    ckpt = {"model": model.state_dict(), "model_args": dict(model_args), "train_config": asdict(cfg),
            "metrics": metrics or {}}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)
