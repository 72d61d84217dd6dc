"""Typed configuration: YAML files under ``configs/`` plus ``key.sub=value`` overrides.

Every hyper-parameter lives in one dataclass below (one section per concern). A YAML file may
name other files to start from with ``_base_: [other.yaml, ...]`` (paths relative to the file);
later files and then the command-line overrides win. Unknown keys are an error that lists the
valid keys of that section, so a typo never silently falls back to a default.

Example::

    cfg = load_config("configs/grid/audio.yaml", ["model.d_model=128", "train.lr=5e-4"])
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

MODES = ("audio", "video", "audiovisual", "audiovisual_relscore")


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class PreprocessConfig:
    """Mouth-ROI extraction (``preprocessing.py``)."""

    roi_size: int = 96  # output crop, pixels (square)
    fps: float = 25.0  # output video frame rate
    sample_rate: int = 16000  # output audio rate, Hz
    max_missing_frac: float = 0.5  # skip a clip when more frames than this have no face
    max_gap_frames: int = 15  # longest landmark gap (frames) filled by interpolation
    smooth_window: int = 5  # temporal smoothing of landmarks, frames (odd; 1 disables)
    workers: int = 1  # parallel clip workers
    video_crf: int = 18  # H.264 quality of the written crops (0 = lossless)
    detect_every: int = 1  # face mesh on every k-th frame, optical-flow tracking in between (1 = every frame)
    # skip a clip whose transcript has more words per second of video than this (a truncated or mislabelled
    # clip): read speech runs at ~2-3 words/s (GRID: 6 words in 3 s), fast read speech ~3-4.5, LRS3 TED talks
    # peak around 5-6; 8 leaves a margin above the fastest real speech (0 disables)
    max_words_per_second: float = 8.0
    # skip a clip whose audio runs on this many seconds past its last video frame: the video stream stopped
    # early (corrupt or cut); real clips differ by a frame or an audio codec's padding (the 561 real GRID
    # clips: at most 0.06 s; AAC adds ~0.1 s of padding)
    max_audio_overhang_s: float = 0.5


@dataclass
class DataConfig:
    """Preprocessed corpus and batching (``avsr.data``)."""

    root: str = ""  # folder written by preprocessing.py (holds <split>.tsv)
    name: str = ""  # corpus label for logs (the seed CLI's --data_name)
    train_split: str = "train"  # one split, or several joined by "+" (LRS3: pretrain+trainval)
    val_split: str = "val"
    val_holdout: int = 0  # without <val_split>.tsv: hold out this many train clips (picked by seed) to validate on
    test_split: str = "test"
    max_frames: int = 1500  # frame budget of one batch: clips x longest clip, in video frames
    max_clips: Optional[int] = None  # optional cap on clips per batch (the seed CLI's --batch_size)
    num_buckets: int = 8  # length buckets of the dynamic bucketing sampler
    num_workers: int = 2  # DataLoader workers
    # length curriculum (auto_avsr, AV-RelScore): [[max_clip_frames, epochs], ...] stages in turn; during a
    # stage, longer clips with word timings (LRS pretrain) are cut to a random word-aligned segment that
    # fits, longer ones without are skipped; after the last stage every clip up to max_frames is used
    curriculum: list[list[int]] = field(default_factory=list)
    crop_size: int = 88  # random (train) / centre (test) crop of the 96x96 ROI
    hflip_prob: float = 0.5
    time_mask_max_frames: int = 10  # longest train-time time mask, frames (0 disables)
    speed_perturb: list[float] = field(default_factory=list)  # train-time speed factors, one drawn per clip
                                                              # (Kaldi/ESPnet: [0.9, 1.0, 1.1]); empty disables
    video_mean: float = 0.421  # grayscale normalisation (after AV-RelScore)
    video_std: float = 0.165


@dataclass
class TextConfig:
    """Tokenizer (``avsr.text``)."""

    kind: str = "sentencepiece"  # "sentencepiece" (unigram) or "char"
    vocab_size: int = 1000  # SentencePiece pieces (incl. specials); ignored for "char"
    model_path: str = ""  # trained tokenizer file; empty = train from the train manifest


@dataclass
class ModelConfig:
    """The network (``avsr.models``); defaults are the paper's base size (Hong et al. 2023)."""

    mode: str = "audiovisual_relscore"  # one of MODES
    # frontends
    visual_width: int = 64  # channels of the first ResNet stage (64 = ResNet-18)
    visual_stem_kernel_t: int = 5  # temporal kernel of the Conv3d stem
    audio_frontend: str = "resnet1d"  # "resnet1d" (raw waveform) or "logmel"
    audio_width: int = 64
    frontend_dim: int = 512  # frontend output width
    frontend_activation: str = "relu"  # of the ResNet frontends: "relu" or "swish" (x * sigmoid(x): the LRW
                                       # models of Ma et al. that train.init_visual_frontend / init_audio_frontend load)
    # reliability scoring
    relscore_layers: int = 3
    relscore_kernel: int = 7
    relscore_variant: str = "ours"  # "ours" (width C, no norm) or "reference" (AV-RelScore code: C->2C->2C->C, BatchNorm)
    # audio-visual fusion in front of the Conformer
    fusion: str = "channel"  # "channel" (concat channels, Linear(2C->d)) or "time" (AV-RelScore code: video frames
                             # then audio frames in one 2T sequence, Linear(C->d), first T outputs kept)
    # modality dropout in training (audio-visual modes; after AV-HuBERT, Shi et al. 2022, who use 0.5 / 0.5):
    # this share of the clips loses one stream's frontend features (set to zero), the audio with
    # probability modality_dropout_audio, else the video
    modality_dropout: float = 0.0
    modality_dropout_audio: float = 0.5
    # conformer encoder
    d_model: int = 256
    num_heads: int = 4
    ffn_dim: int = 2048
    num_layers: int = 12
    conv_kernel: int = 31
    conv_norm: str = "batchnorm"  # norm after the depthwise conv: "batchnorm" (paper) or "layernorm"
    dropout: float = 0.1
    # attention decoder
    decoder_layers: int = 6
    decoder_ffn_dim: int = 2048
    # loss
    ctc_weight: float = 0.1  # lambda in lambda*CTC + (1-lambda)*attention
    label_smoothing: float = 0.1
    # auxiliary heads (multi-task weights; 0 disables the head)
    mouth_opening_weight: float = 0.0
    lip2speech_weight: float = 0.0


@dataclass
class CorruptionConfig:
    """Train-time corruption modelling (``avsr.corruption``)."""

    visual_prob: float = 0.8  # probability a clip gets visual corruption (paper: 0.8)
    visual_kinds: list[str] = field(default_factory=lambda: ["occlusion", "noise_blur", "occlusion_noise_blur"])
    occluder_dir: str = ""  # folder of RGBA PNG occluders; empty = built-in bank
    audio_noise_prob: float = 0.0  # probability a clip gets audio noise
    audio_noise_types: list[str] = field(default_factory=lambda: ["babble", "white"])  # babble, white, file
    snr_db: list[float] = field(default_factory=lambda: [-5.0, 0.0, 5.0, 10.0, 15.0])
    babble_speakers: int = 6  # utterances summed into one babble signal
    noise_file: str = ""  # user-given noise waveform (any format PyAV reads)
    intermittent_prob: float = 0.0  # probability that audio noise is present only in some spans


@dataclass
class TrainConfig:
    """Optimisation, checkpoints and logging (``avsr.training``)."""

    exp_dir: str = "checkpoints/exp"
    epochs: int = 50
    max_steps: Optional[int] = None  # stop after this many optimiser steps
    optimizer: str = "adamw"  # "adamw" or "adam"
    lr: float = 1e-3
    weight_decay: float = 0.03
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    schedule: str = "cosine"  # "cosine" or "noam"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 5.0
    accum_grad: int = 1
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16", "fp16"
    eval_step: int = 500  # validate every N optimiser steps
    save_step: int = 500  # checkpoint every N optimiser steps
    save_epoch_end: bool = True  # also checkpoint at the end of every epoch
    keep_last: int = 5  # periodic checkpoints kept on disk
    average_last: int = 0  # > 1: at the end, average.pt = the mean of the newest N step checkpoints (<= keep_last)
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row
    log_step: int = 20
    init_from: str = ""  # initialise weights (not optimiser) from a checkpoint, where names and shapes fit
    init_visual_from: str = ""  # then the visual frontend from this one (e.g. a lip-reading model, for AV)
    init_visual_frontend: str = ""  # fresh start: the visual frontend (stem + ResNet-18 trunk) from an LRW model of
    # Ma et al. (lrw_resnet18_dctcn_video.pth.tar, avsr.models.lrw); needs visual_width=64, and
    # model.frontend_activation=swish to compute what it was trained to
    init_audio_frontend: str = ""  # the same for the resnet1d audio frontend (lrw_resnet18_dctcn_audio.pth.tar)
    init_visual_share: float = 0.0  # AV: share of the init_visual_from model in the parts both models have
    # (Conformer, CTC head, decoder: a weighted average) and its projection in the fusion's video columns
    freeze: list[str] = field(default_factory=list)  # parts kept as they are: module names (encoder.scorers),
    # or "frontends" for every frontend of the mode; no gradient, and run in eval mode (BatchNorm statistics fixed)
    device: str = "auto"  # "auto" (GPU of this rank if any, else CPU), "cpu", "cuda", "cuda:N"
    find_unused_parameters: bool = False  # DDP option for models with parameters a mode leaves unused


@dataclass
class DecodeConfig:
    """Decoding (``avsr.decoding``); defaults are the paper's test settings."""

    method: str = "beam"  # "beam" (joint CTC/attention beam search) or "greedy" (best-path CTC)
    beam_size: int = 40
    ctc_weight: float = 0.1  # weight of the CTC prefix score; 1 - ctc_weight for the decoder
    length_penalty: float = 0.0  # bonus per output token (<eos> included); < 0 favours short outputs
    max_len_ratio: float = 1.0  # longest hypothesis, as a fraction of encoder frames
    pre_beam_ratio: float = 1.5  # CTC-scored candidates per hypothesis, x beam_size (ESPnet's pre-beam)
    lm_path: str = ""  # Transformer LM of scripts/train_lm.py, for shallow fusion
    lm_weight: float = 0.0  # 0 disables the LM
    batch_size: int = 8  # utterances decoded together
    search_threads: int = 1  # CPU threads of the beam search's step loop (the encoder keeps the process's):
                             # on 2 cores one thread was 2x faster per step than two (13.5 vs 26.9 ms, beam 10)


@dataclass
class Config:
    """The whole experiment."""

    seed: int = 42
    exp_name: str = "exp"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def _section(dotted: str) -> type:
    """The config dataclass that owns the dotted key path ``dotted`` (``""`` = top level)."""
    obj: Any = Config()
    for part in filter(None, dotted.split(".")):
        sub = getattr(obj, part, None)
        if not is_dataclass(sub):
            break
        obj = sub
    return type(obj)


def _unknown_key_error(full_key: str) -> ConfigError:
    parent, _, leaf = full_key.rpartition(".")
    cls = _section(parent)
    valid = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return ConfigError(f"unknown config key '{full_key}'.{hint} Valid keys in {where}: {', '.join(valid)}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The YAML file at ``path`` and its ``_base_`` files, bases first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} includes itself through _base_")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    out: list[dict] = []
    for base in bases:
        out.extend(_read_yaml(path.parent / base, seen + (path,)))
    out.append(data)
    return out


def load_config(path: str | Path | Sequence[str | Path] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from defaults, optional YAML files and ``key=value`` overrides.

    ``path`` is one file or several, merged in order (a later file wins: a recipe, then an overlay
    such as ``configs/grid/adapt_all.yaml``).

    Raises :class:`ConfigError` (a ``ValueError``) for an unknown key (listing the valid ones),
    a value of the wrong type, a malformed override, or a mode not in :data:`MODES`.
    """
    merged = OmegaConf.structured(Config)
    paths = [] if not path else [path] if isinstance(path, (str, Path)) else list(path)
    layers = [layer for p in paths for layer in _read_yaml(Path(p))]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        if overrides:
            dot = [f"{k}={v}" for k, v in (o.split("=", 1) for o in overrides)]
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dot))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as exc:
        raise _unknown_key_error(str(exc.full_key)) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"invalid config value{' for ' + key if key else ''}: {msg}") from None
    if cfg.model.mode not in MODES:
        raise ConfigError(f"model.mode must be one of {', '.join(MODES)}, got '{cfg.model.mode}'")
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of ``cfg`` (for checkpoints and logs)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """Inverse of :func:`to_dict`, validating keys as :func:`load_config` does."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))  # type: ignore[return-value]
    except ConfigKeyError as exc:
        raise _unknown_key_error(str(exc.full_key)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically)."""
    from avsr.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
