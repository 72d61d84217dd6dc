"""Data, training and evaluation of the lip-sync model (:class:`avsr.lipsync.model.LipSyncModel`).

The recipe follows R3MOE: Huber loss on the landmark curves (here the mouth opening and the ARKit
blendshapes of :mod:`avsr.lipsync.targets`), optional R-Drop (two dropout passes with a
consistency term, Liang et al. 2021) and optional mean-teacher consistency on unlabelled audio (EMA
teacher, sigmoid ramp-up; Tarvainen & Valpola 2017), plus cross-entropy on per-frame visemes when
the clips have them (forced-alignment labels, :func:`avsr.lipsync.aligner.clip_visemes`).
Optional TTS augmentation (after Chen et al., ICASSP 2023): TTS renditions of the training
sentences (:mod:`avsr.lipsync.tts`) paired with the speaker's recorded tracks of the same sentences
(:func:`load_tts_pairs`); their timing differs from the recording, so their loss is the soft-DTW
divergence (Cuturi & Blondel 2017; Blondel et al. 2021) instead of the frame-wise Huber.

Targets come at 25 fps (one per video frame); the model predicts at 100 fps. Video frame ``t``
spans mel frames ``4t .. 4t + 3``: for the loss, a curve is linearly interpolated to the mel
frames (frame ``t``'s value at the centre of its span) and a viseme label is repeated; for the
metrics, predictions are averaged back over each span (:func:`avsr.lipsync.model.to_video_rate`).
Frames whose landmarks were interpolated (no face detected) are left out of the loss and the metrics.

Used by ``scripts/train_lipsync.py``, ``scripts/demo.py``, ``scripts/adapt.py`` and
``benchmarks/bench_aux.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

from avsr.audio_features import MEL_PER_VIDEO_FRAME, SAMPLE_RATE, log_mel
from avsr.data.manifest import read_manifest
from avsr.data.media import MediaError, read_video
from avsr.data.transforms import speed_perturb as speed_perturb_clip
from avsr.evaluation.aux_metrics import curve_metrics
from avsr.lipsync.model import LipSyncModel, save_lipsync_model, to_video_rate
from avsr.lipsync.targets import BLENDSHAPES, corpus_blendshapes
from avsr.lipsync.tts import Rendition
from avsr.lipsync.video import MouthFeatures
from avsr.models.heads import masked_mean
from avsr.models.masking import lengths_to_mask
from avsr.utils import seed_everything

log = logging.getLogger(__name__)

MOUTH_OPENING = "mouth_opening"  #: the landmark inner-lip gap / mouth width (``.npz`` key)
CURVES = (MOUTH_OPENING,) + BLENDSHAPES  #: every curve the targets offer, in this order
SAMPLES_PER_FRAME = SAMPLE_RATE // 25  # audio samples per 25 fps video frame
DB_TO_LOG_MAGNITUDE = math.log(10.0) / 20.0  # a gain of g dB adds g * this to a natural-log magnitude
#: The audio → mouth-opening model of ``make demo`` and the benchmarks (R3MOE's task and core).
MOUTH_OPENING_ARGS = dict(curves=[MOUTH_OPENING], core="bigru", channels=64, hidden=64, kernel=3, dropout=0.1,
                          stride=4)
#: Speeds of the training clips' extra copies (``load_lipsync_data(speed_perturb=)``) in the lip-sync
#: recipe (``train_lipsync.py``, ``make lipsync-bench``): held-out speaker (GRID s4 adapt split)
#: mouth-opening r 0.620 -> 0.658 (bigru), 0.503 -> 0.546 (attention), 0.506 -> 0.596 (causal_gru), means of
#: two seeds (docs/lipsync_recipe.md); the audio -> mouth-opening model of ``make demo`` trains without them
LIPSYNC_SPEEDS = (0.8, 0.9, 1.1, 1.2)
NO_LABEL = -1  # viseme label of frames without one (ignored by the loss and the accuracy)


@dataclass
class LipSyncData:
    """Utterances ready for the model. Per utterance: log-mel ``(4T, 80)`` float32 at 100 fps,
    curves ``(T, K)`` float32 at 25 fps (columns :attr:`curve_names`), a ``(T,)`` bool mask of
    frames with a detected face, viseme labels ``(T,)`` int64 (indices into
    :attr:`viseme_names`, :data:`NO_LABEL` where there is none), and, when loaded with a video
    frontend, mouth features ``(T, D)`` float32 (:mod:`avsr.lipsync.video`; else ``videos`` is empty)."""

    curve_names: tuple[str, ...] = ()
    viseme_names: tuple[str, ...] = ()
    utt_ids: list[str] = field(default_factory=list)
    mels: list[torch.Tensor] = field(default_factory=list)
    curves: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    visemes: list[torch.Tensor] = field(default_factory=list)
    videos: list[torch.Tensor] = field(default_factory=list)
    _mel_rate: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)  # batch()'s cache

    def __len__(self) -> int:
        return len(self.utt_ids)

    def subset(self, keep: Sequence[bool]) -> "LipSyncData":
        """The utterances where ``keep`` is True."""
        pick = [i for i, k in enumerate(keep) if k]
        fields = ("utt_ids", "mels", "curves", "masks", "visemes") + (("videos",) if self.videos else ())
        return LipSyncData(self.curve_names, self.viseme_names, *([getattr(self, f)[i] for i in pick] for f in fields))

    def curve(self, name: str) -> list[np.ndarray]:
        """One curve ``(T,)`` of every utterance. Raises ``KeyError`` for a curve the data lack."""
        k = self.curve_names.index(name) if name in self.curve_names else None
        if k is None:
            raise KeyError(f"no curve '{name}' (have {', '.join(self.curve_names)})")
        return [c[:, k].numpy() for c in self.curves]

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        """Padded batch at 100 fps: ``mel (B, F, 80)``, ``mel_lengths (B,)``, ``curves (B, F, K)``,
        ``curve_mask (B, F)`` bool, ``visemes (B, F)`` int64 (:data:`NO_LABEL` past the end), and
        ``video (B, F / 4, D)`` (None without video features)."""
        pad = torch.nn.utils.rnn.pad_sequence
        mels = [self.mels[i] for i in index]
        for i in index:  # the 100 fps targets of a clip, made once
            if i not in self._mel_rate:
                self._mel_rate[i] = _to_mel_rate(self.curves[i], self.masks[i], self.visemes[i], len(self.mels[i]))
        ups = [self._mel_rate[i] for i in index]
        return {"mel": pad(mels, batch_first=True),
                "mel_lengths": torch.tensor([len(m) for m in mels], dtype=torch.long),
                "curves": pad([u[0] for u in ups], batch_first=True),
                "curve_mask": pad([u[1] for u in ups], batch_first=True),
                "visemes": pad([u[2] for u in ups], batch_first=True, padding_value=NO_LABEL),
                "video": pad([self.videos[i] for i in index], batch_first=True) if self.videos else None}


def _to_mel_rate(curves: torch.Tensor, mask: torch.Tensor, visemes: torch.Tensor,
                 n_mel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """25 fps targets → ``n_mel`` mel frames: curves interpolated linearly between span centres
    (held at the ends), the mask true where both neighbours are, visemes repeated."""
    n = curves.shape[0]
    pos = ((torch.arange(n_mel, dtype=torch.float32) - 1.5) / MEL_PER_VIDEO_FRAME).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo)[:, None]
    up = curves[lo] * (1 - w) + curves[hi] * w
    frame = (torch.arange(n_mel) // MEL_PER_VIDEO_FRAME).clamp(max=n - 1)
    return up, mask[lo] & mask[hi], visemes[frame]


def load_lipsync_data(root: str | Path, split: str, curves: Sequence[str] = (MOUTH_OPENING,),
                      visemes: Optional[dict[str, list[str]]] = None, viseme_names: Sequence[str] = (),
                      with_targets: bool = True,
                      speaker_of: Callable[[str], str] = lambda utt_id: "",
                      video_features: Optional[MouthFeatures] = None,
                      speed_perturb: Sequence[float] = ()) -> LipSyncData:
    """Log-mel and targets of every clip of ``<root>/<split>.tsv``.

    Args:
        root, split: a preprocessed corpus (``.wav`` and ``.npz`` per clip).
        curves: curve names from :data:`CURVES`; the blendshapes are normalised per speaker
            (``speaker_of``; default: the split is one speaker) on this split's own frames.
        visemes: per-utterance frame labels (names from ``viseme_names``), e.g. from
            :func:`avsr.lipsync.aligner.clip_visemes`; utterances without labels get :data:`NO_LABEL`.
        viseme_names: the viseme classes, in the model's order.
        with_targets: False reads the audio only (unlabelled data; curves zero, masks false).
        video_features: also the mouth features of each clip's ``.mp4`` (its 96x96 mouth ROI,
            cut or zero-padded to the audio's frames), for a model with video input.
        speed_perturb: speed factors (e.g. ``(0.9, 1.1)``, training data only): each clip is also
            added once per factor other than 1, its audio played that much faster (tempo and pitch,
            :func:`avsr.data.transforms.speed_perturb`) and its targets, mask, visemes and video
            features resampled in time with it; the copy's id is ``<utt_id>_sp<factor>``.

    Clips whose files cannot be read are logged (naming the file) and skipped.

    Raises:
        ValueError: on an unknown curve or viseme label, a missing or malformed manifest, or
            when no clip can be read.
    """
    unknown = [c for c in curves if c not in CURVES]
    if unknown:
        raise ValueError(f"unknown curves {unknown}; choose from {', '.join(CURVES)}")
    rows = read_manifest(root, split)
    shapes = {}
    wanted = [c for c in curves if c in BLENDSHAPES]
    if with_targets and wanted:
        cols = [BLENDSHAPES.index(c) for c in wanted]
        shapes = {u: s[:, cols] for u, s in corpus_blendshapes(root, split, speaker_of).items()}
    index = {v: i for i, v in enumerate(viseme_names)}
    data = LipSyncData(tuple(curves), tuple(viseme_names))
    waves: list[torch.Tensor] = []
    for row in tqdm(rows, desc=f"load {split}", unit="clip", leave=False, disable=len(rows) < 50):
        wav_path = row.file(root, ".wav")
        try:
            wave, sr = sf.read(str(wav_path), dtype="float32", always_2d=False)
            if sr != SAMPLE_RATE or wave.ndim != 1:
                raise ValueError(f"expected 16 kHz mono, got {sr} Hz with shape {wave.shape}")
            n_frames = len(wave) // SAMPLES_PER_FRAME
            target = np.zeros((n_frames, len(curves)), np.float32)
            mask = np.zeros(n_frames, bool)
            if with_targets:
                with np.load(row.file(root, ".npz"), allow_pickle=False) as z:
                    opening, mask = z[MOUTH_OPENING].astype(np.float32), z["face_detected"].astype(bool)
                cols = {MOUTH_OPENING: opening}
                cols.update(zip(wanted, shapes[row.utt_id].T) if wanted else ())
                n_frames = min([n_frames, len(mask)] + [len(c) for c in cols.values()])
                target = np.stack([cols[c][:n_frames] for c in curves], 1) if curves else target[:n_frames]
                mask = mask[:n_frames]
            if n_frames < 1:
                raise ValueError("shorter than one video frame")
            if video_features is not None:
                crops = read_video(row.file(root, ".mp4"), gray=True)[0]
                if not len(crops):
                    raise ValueError("no video frames")
                feats = video_features(crops[:n_frames])
                feats = torch.nn.functional.pad(feats, (0, 0, 0, n_frames - len(feats)))
        except (OSError, ValueError, KeyError, RuntimeError, MediaError) as exc:
            log.warning("skipping %s: %s", wav_path, exc)
            continue
        labels = np.full(n_frames, NO_LABEL, np.int64)
        if visemes and row.utt_id in visemes:
            got = visemes[row.utt_id][:n_frames]
            bad = sorted(set(got) - set(index))
            if bad:
                raise ValueError(f"{row.utt_id}: viseme labels {bad} not in {list(viseme_names)}")
            labels[: len(got)] = [index[v] for v in got]
        wave = wave[: n_frames * SAMPLES_PER_FRAME]
        for factor in [1.0] + [f for f in speed_perturb if f != 1]:
            idx, w = (np.arange(n_frames), wave) if factor == 1 else speed_perturb_clip(n_frames, wave, factor)
            waves.append(torch.from_numpy(np.ascontiguousarray(w)))
            if video_features is not None:
                data.videos.append(feats[torch.from_numpy(idx)])
            data.utt_ids.append(row.utt_id if factor == 1 else f"{row.utt_id}_sp{factor:g}")
            data.curves.append(torch.from_numpy(np.ascontiguousarray(target[idx])))
            data.masks.append(torch.from_numpy(np.ascontiguousarray(mask[idx])))
            data.visemes.append(torch.from_numpy(labels[idx]))
    if not data.utt_ids:
        raise ValueError(f"no readable clips in {Path(root) / (split + '.tsv')}")
    data.mels = _log_mels(waves)
    return data


def load_tts_pairs(renditions: Sequence[Rendition], real: LipSyncData) -> LipSyncData:
    """TTS renditions (:func:`avsr.lipsync.tts.synthesize_corpus`) paired with the real clips of
    the same utterance: log-mel of the rendition ``(F, 80)`` and the real clip's curves ``(T, K)``,
    mask and viseme labels, **not aligned in time** (``F != 4 T`` in general; train them with the
    soft-DTW loss, :func:`train_lipsync_model` ``tts=``). The id of a pair is
    ``<utt_id>_tts<k>``; renditions of utterances that ``real`` lacks are skipped, an unreadable
    file is logged and skipped.

    Raises:
        ValueError: when no rendition pairs with a clip of ``real``.
    """
    index = {u: i for i, u in enumerate(real.utt_ids)}
    pairs = LipSyncData(real.curve_names, real.viseme_names)
    waves = []
    for r in renditions:
        if r.utt_id not in index:
            continue
        try:
            wave, sr = sf.read(str(r.path), dtype="float32", always_2d=False)
            if sr != SAMPLE_RATE or wave.ndim != 1 or len(wave) < SAMPLES_PER_FRAME:
                raise ValueError(f"expected 16 kHz mono of at least one frame, got {sr} Hz, shape {wave.shape}")
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("skipping %s: %s", r.path, exc)
            continue
        i = index[r.utt_id]
        waves.append(torch.from_numpy(wave))
        pairs.utt_ids.append(f"{r.utt_id}_tts{r.k}")
        pairs.curves.append(real.curves[i])
        pairs.masks.append(real.masks[i])
        pairs.visemes.append(real.visemes[i])
    if not waves:
        raise ValueError("no TTS rendition pairs with a clip of the real data")
    pairs.mels = _log_mels(waves)
    return pairs


def _log_mels(waves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-mel ``(F, 80)`` of each ``(S,)`` waveform, computed in padded batches (much faster than one by one)."""
    mels = []
    for start in range(0, len(waves), 32):
        chunk = waves[start:start + 32]
        lengths = torch.tensor([len(w) for w in chunk])
        mel, mel_lengths = log_mel(torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True), lengths)
        mels += [m[:n] for m, n in zip(mel, mel_lengths.tolist())]
    return mels


def soft_dtw_divergence(pred: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Soft-DTW divergence ``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` (squared Euclidean frame
    cost; tslearn's ``SoftDTWLossPyTorch(normalize=True)``), divided by ``len(target)`` and the
    number of channels (a per-frame, per-channel squared error, on the scale of the frame-wise
    loss): 0 for identical sequences, growing as they differ in shape or timing, differentiable in ``pred``.
    ``pred`` ``(T1, K)``, ``target`` ``(T2, K)``; ``gamma`` > 0 is the soft-min temperature (-> 0: DTW).

    Raises:
        ValueError: on ``gamma <= 0``, an empty sequence or a different number of channels.
    """
    from tslearn.metrics import SoftDTWLossPyTorch  # numba compiles it on first use (~10 s)

    if gamma <= 0 or not len(pred) or not len(target) or pred.shape[1:] != target.shape[1:]:
        raise ValueError(f"need gamma > 0 and non-empty sequences of the same channels, got gamma {gamma}, "
                         f"shapes {tuple(pred.shape)} and {tuple(target.shape)}")
    loss = SoftDTWLossPyTorch(gamma=gamma, normalize=True)(pred[None].float(), target[None].float())
    return loss[0] / (len(target) * max(1, target[0].numel()))


@dataclass
class LipSyncTrainConfig:
    """Optimisation of :func:`train_lipsync_model` (all budgets in steps, not wall time)."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3  # peak of a one-cycle schedule (10% warm-up, cosine decay)
    weight_decay: float = 1e-2
    grad_clip: float = 5.0
    huber_delta: float = 1.0  # in target standard deviations
    viseme_weight: float = 1.0  # weight of the viseme cross-entropy (when the model has the head)
    gain_db: float = 6.0  # random input gain in [-gain_db, +gain_db] dB per utterance (0 disables)
    # vocal-tract-length warp of the mel axis by up to +-this fraction (0 disables); 0.1 lifted the
    # held-out speaker's mouth-opening r from 0.53 to 0.63 (bench bigru, GRID s4 adapt split; 0.2: 0.63)
    freq_warp: float = 0.1
    rdrop_weight: float = 0.0  # R-Drop consistency weight (0 disables R-Drop)
    mean_teacher_weight: float = 0.0  # mean-teacher consistency weight (needs unlabelled data)
    ema_decay: float = 0.99
    rampup_steps: int = 500  # sigmoid ramp-up of the mean-teacher weight
    sdtw_weight: float = 1.0  # weight of the soft-DTW loss on the TTS pairs (when given)
    sdtw_gamma: float = 0.1  # soft-DTW temperature, on curves in target standard deviations
    tts_batch_size: int = 4  # TTS pairs per step, beside batch_size real clips (soft-DTW costs ~20 ms a pair here)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.lr <= 0 or min(self.weight_decay, self.gain_db, self.rdrop_weight, self.mean_teacher_weight,
                               self.viseme_weight, self.sdtw_weight) < 0:
            raise ValueError("lr must be positive; weight_decay, gain_db and loss weights non-negative")
        if not 0.0 <= self.freq_warp < 0.5:
            raise ValueError(f"freq_warp must be in [0, 0.5), got {self.freq_warp}")
        if self.sdtw_gamma <= 0 or self.tts_batch_size < 1:
            raise ValueError(f"sdtw_gamma must be positive and tts_batch_size >= 1, got {self.sdtw_gamma} and "
                             f"{self.tts_batch_size}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """``exp(-5 (1 - x)^2)`` with ``x = step / rampup_steps`` clipped to [0, 1] (Tarvainen & Valpola 2017)."""
    if rampup_steps <= 0:
        return 1.0
    x = min(max(step / rampup_steps, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - x) ** 2)


def warp_mel_axis(mel: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Vocal tract length perturbation on log-mel (after VTLP, Jaitly & Hinton 2013, here a linear
    warp of the mel axis): output bin ``k`` of utterance ``b`` is input bin ``k * factor[b]``,
    linearly interpolated, the last bin repeated past the top. ``mel`` ``(B, F, M)``, ``factor``
    ``(B,)`` (> 1 reads higher bins: formants move down, as for a longer vocal tract)."""
    m = mel.shape[-1]
    pos = (torch.arange(m, dtype=mel.dtype)[None] * factor[:, None]).clamp(0, m - 1)  # (B, M)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo)[:, None, :]
    take = lambda idx: torch.gather(mel, 2, idx[:, None, :].expand(-1, mel.shape[1], -1))  # noqa: E731
    return take(lo) * (1 - frac) + take(hi) * frac


def _augment(mel: torch.Tensor, gain_db: float, freq_warp: float) -> torch.Tensor:
    if freq_warp > 0:
        mel = warp_mel_axis(mel, torch.empty(mel.shape[0]).uniform_(1 - freq_warp, 1 + freq_warp))
    if gain_db <= 0:
        return mel
    return mel + torch.empty(mel.shape[0], 1, 1).uniform_(-gain_db, gain_db) * DB_TO_LOG_MAGNITUDE


def _stats(data: LipSyncData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mels = torch.cat(data.mels)
    frames = torch.cat([c[m] for c, m in zip(data.curves, data.masks)])
    if len(data.curve_names) and not len(frames):
        raise ValueError("no face-detected frames to train the curves on")
    t_mean = frames.mean(0) if len(frames) else torch.zeros(0)
    t_std = frames.std(0).clamp_min(1e-4) if len(frames) > 1 else torch.ones(len(data.curve_names))
    return mels.mean(0), mels.std(0).clamp_min(1e-3), t_mean, t_std


def _supervised(out: dict, batch: dict, scale: torch.Tensor, cfg: LipSyncTrainConfig) -> torch.Tensor:
    loss = torch.zeros(())
    if out["curves"] is not None:
        valid = batch["curve_mask"] & lengths_to_mask(out["lengths"], batch["curve_mask"].shape[1])
        huber = F.huber_loss(out["curves"] / scale, batch["curves"] / scale, reduction="none", delta=cfg.huber_delta)
        loss = loss + masked_mean(huber, valid)
    if out["visemes"] is not None and bool((batch["visemes"] != NO_LABEL).any()):
        ce = F.cross_entropy(out["visemes"].transpose(1, 2), batch["visemes"], ignore_index=NO_LABEL)
        loss = loss + cfg.viseme_weight * ce
    return loss


def _consistency(a: dict, b: dict, scale: torch.Tensor) -> torch.Tensor:
    """Squared curve difference (in target deviations) plus the symmetric KL of the viseme posteriors."""
    valid = lengths_to_mask(a["lengths"], (a["curves"] if a["curves"] is not None else a["visemes"]).shape[1])
    loss = torch.zeros(())
    if a["curves"] is not None:
        loss = loss + masked_mean(((a["curves"] - b["curves"]) / scale) ** 2, valid)
    if a["visemes"] is not None:
        pa, pb = F.log_softmax(a["visemes"], -1), F.log_softmax(b["visemes"], -1)
        kl = (pa.exp() * (pa - pb)).sum(-1) + (pb.exp() * (pb - pa)).sum(-1)
        loss = loss + 0.5 * masked_mean(kl, valid)
    return loss


@torch.no_grad()
def _ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def _tts_loss(model: LipSyncModel, tts: LipSyncData, index: list[int], scale: torch.Tensor,
              cfg: LipSyncTrainConfig) -> torch.Tensor:
    """Mean soft-DTW divergence between the 25 fps predicted curves of TTS renditions and the real
    tracks they are paired with (face-detected frames), in target standard deviations."""
    mels = [tts.mels[i] for i in index]  # not tts.batch(): its 100 fps targets assume aligned pairs
    lengths = torch.tensor([len(m) for m in mels], dtype=torch.long)
    mel = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
    out = model(_augment(mel, cfg.gain_db, cfg.freq_warp), lengths, None)
    losses = []
    for row, i in enumerate(index):
        pred = to_video_rate(out["curves"][row, : int(out["lengths"][row])])
        target = tts.curves[i][tts.masks[i]]
        if len(pred) and len(target):
            losses.append(soft_dtw_divergence(pred / scale, target / scale, cfg.sdtw_gamma))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def train_lipsync_model(train: LipSyncData, model_args: dict, cfg: LipSyncTrainConfig,
                        unlabelled: Optional[LipSyncData] = None,
                        init: Optional[LipSyncModel] = None,
                        tts: Optional[LipSyncData] = None) -> tuple[LipSyncModel, dict]:
    """Train a ``LipSyncModel(**model_args)`` on ``train``.

    Input and target normalisation come from ``train``. With ``cfg.mean_teacher_weight > 0`` the
    EMA teacher is returned (it is the better model); ``unlabelled`` audio (default: the training
    audio) feeds its consistency term. ``init`` (a model of the same ``model_args``) fine-tunes:
    training starts from its weights, with the normalisation of ``train`` (a new speaker).
    ``tts``: TTS pairs (:func:`load_tts_pairs`, audio-only models): each step adds
    ``cfg.sdtw_weight`` times the soft-DTW divergence of ``cfg.tts_batch_size`` of them.

    Returns:
        ``(model in eval mode, history)`` with ``history = {"loss": [...], "step_time_median_s": ...}``.

    Raises:
        ValueError: when ``train`` is empty, its curves or viseme classes are not the model's, or
            ``tts`` is given to a model with video input or without curves.
    """
    if not len(train):
        raise ValueError("no training utterances")
    seed_everything(cfg.seed)
    model = LipSyncModel(**model_args)
    if model.curves != train.curve_names or model.visemes not in ((), train.viseme_names):
        raise ValueError(f"the model predicts curves {model.curves} and visemes {model.visemes}; the data have "
                         f"{train.curve_names} and {train.viseme_names}")
    if bool(model.video_dim) != bool(train.videos):
        raise ValueError("the model takes video features and the data have none" if model.video_dim else
                         "the data have video features and the model is audio-only")
    tts = tts if tts is not None and len(tts) else None
    if tts is not None and (model.video_dim or not model.curves or tts.curve_names != model.curves):
        raise ValueError("TTS pairs need an audio-only model with the data's curves")
    if cfg.sdtw_weight == 0:
        tts = None
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.set_stats(*_stats(train))
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
    for step in tqdm(range(cfg.steps), desc="train lipsync", unit="step", leave=False):
        t0 = time.perf_counter()
        batch = train.batch(torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist())
        mel = _augment(batch["mel"], cfg.gain_db, cfg.freq_warp)
        out = model(mel, batch["mel_lengths"], batch["video"])
        loss = _supervised(out, batch, scale, cfg)
        if cfg.rdrop_weight > 0:
            out2 = model(mel, batch["mel_lengths"], batch["video"])
            loss = 0.5 * (loss + _supervised(out2, batch, scale, cfg)) + cfg.rdrop_weight * _consistency(out, out2, scale)
        if tts is not None:
            pick = torch.randint(len(tts), (cfg.tts_batch_size,), generator=gen).tolist()
            loss = loss + cfg.sdtw_weight * _tts_loss(model, tts, pick, scale, cfg)
        if teacher is not None:
            u = unlabelled.batch(torch.randint(len(unlabelled), (cfg.batch_size,), generator=gen).tolist())
            student = model(_augment(u["mel"], cfg.gain_db, cfg.freq_warp), u["mel_lengths"], u["video"])
            with torch.no_grad():
                target = teacher(_augment(u["mel"], cfg.gain_db, cfg.freq_warp), u["mel_lengths"], u["video"])
            weight = cfg.mean_teacher_weight * sigmoid_rampup(step, cfg.rampup_steps)
            loss = loss + weight * _consistency(student, target, scale)
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
def predict(model: LipSyncModel, data: LipSyncData, batch_size: int = 32) -> list[dict[str, Optional[np.ndarray]]]:
    """Per utterance, at 25 fps: ``{"curves": (T, K) float32 or None, "visemes": (T, V) float32
    posteriors or None}`` (means of each video frame's 4 mel frames; eval mode)."""
    model.eval()
    out: list[dict] = []
    for start in range(0, len(data), batch_size):
        index = list(range(start, min(start + batch_size, len(data))))
        batch = data.batch(index)
        pred = model(batch["mel"], batch["mel_lengths"], batch["video"])
        probs = None if pred["visemes"] is None else pred["visemes"].softmax(-1)
        for row, i in enumerate(index):
            n, t = int(pred["lengths"][row]), len(data.curves[i])
            out.append({"curves": None if pred["curves"] is None else to_video_rate(pred["curves"][row, :n], t).numpy(),
                        "visemes": None if probs is None else to_video_rate(probs[row, :n], t).numpy()})
    return out


def evaluate_lipsync_model(model: LipSyncModel, data: LipSyncData) -> dict:
    """Metrics on face-detected frames: ``{"curves": {name: curve_metrics(...)}, "viseme_accuracy":
    fraction of labelled frames whose most likely viseme is the label, or None}``
    (:func:`avsr.evaluation.aux_metrics.curve_metrics`)."""
    preds = predict(model, data)
    report: dict = {"curves": {}, "viseme_accuracy": None}
    for k, name in enumerate(model.curves):
        pairs = []
        for p, c, m in zip(preds, data.curves, data.masks):
            n = min(len(p["curves"]), len(c))
            keep = m[:n].numpy()
            pairs.append((p["curves"][:n, k][keep], c[:n, k].numpy()[keep]))
        report["curves"][name] = curve_metrics([p for p, _ in pairs], [t for _, t in pairs], data.utt_ids)
    if model.visemes:
        hits = [(p["visemes"].argmax(-1) == v.numpy()[: len(p["visemes"])])[v.numpy()[: len(p["visemes"])] != NO_LABEL]
                for p, v in zip(preds, data.visemes)]
        n = sum(len(h) for h in hits)
        report["viseme_accuracy"] = float(sum(h.sum() for h in hits) / n) if n else None
    return report


def energy_envelope_curves(data: LipSyncData) -> list[np.ndarray]:
    """Baseline: mean log-mel energy per video frame ``(T,)`` of every utterance."""
    return [to_video_rate(m.mean(1), len(c)).numpy() for m, c in zip(data.mels, data.curves)]


def save_lipsync_checkpoint(path: str | Path, model: LipSyncModel, model_args: dict, cfg: LipSyncTrainConfig,
                            metrics: Optional[dict] = None, video_features: Optional[MouthFeatures] = None) -> Path:
    """Write the model with its ``train_config``, ``metrics`` (plain numbers and strings) and, for a
    model with video input, its video frontend (``video_frontend``: :meth:`MouthFeatures.state`)
    atomically (read by :func:`avsr.lipsync.model.load_lipsync_model` and
    :func:`avsr.lipsync.video.load_mouth_features`)."""
    extra = {"train_config": asdict(cfg), "metrics": metrics or {}}
    if video_features is not None:
        extra["video_frontend"] = video_features.state()
    save_lipsync_model(path, model, model_args, extra)
    return Path(path)
