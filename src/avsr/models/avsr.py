"""The audio-visual speech recogniser of "Watch or Listen" (Hong et al., CVPR 2023).

::

    video (B,T,1,88,88) ─ VisualFrontend ─┬─ [ReliabilityScorer] ─┐ (B,T,C)
    audio (B,S)         ─ Audio frontend ─┴─ [ReliabilityScorer] ─┴─ fusion ─ Linear ─ Conformer ─┬─ CTC head
                                                                                                  └─ Transformer decoder

    fusion "channel": concat channels [video | audio]  (B,T,2C) ─ Linear(2C->d) ─ Conformer (B,T,d)
    fusion "time":    join in time [video_b[:L_b] audio_b[:L_b]]  (B,2T,C) ─ Linear(C->d) ─ Conformer (B,2T,d)
                      ─ keep the video half: frames [0, L_b) of clip b ─ (B,T,d)

``cfg.mode`` picks the branches: ``audio`` and ``video`` use one frontend; ``audiovisual``
fuses both; ``audiovisual_relscore`` scores each modality per frame and channel first.
``cfg.fusion`` (audio-visual modes only) concatenates the two streams along channels or, as in
the AV-RelScore reference code (after Hong et al. 2023), along time, so that the Conformer's
self-attention attends across modalities; ``cfg.relscore_variant`` picks the scorer layout
(see :mod:`.reliability`).
Training minimises ``ctc_weight * CTC + (1 - ctc_weight) * attention`` (see :mod:`.losses`).

Auxiliary heads (mouth opening, lip-to-speech) plug in with :meth:`AVSRModel.register_aux_head`:
a head is called as ``head(batch, encoded) -> scalar loss`` with the :class:`EncoderOutput`
(frontend features included) and its weighted loss is added to the total.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from avsr.config import MODES, ModelConfig, from_dict
from avsr.data.batch import Batch
from avsr.models.conformer import Conformer
from avsr.models.decoder import TransformerDecoder
from avsr.models.frontends import ACTIVATIONS, AudioResNetFrontend, LogMelFrontend, VisualFrontend
from avsr.models.heads import attach_aux_heads
from avsr.models.losses import add_sos_eos, ctc_loss, label_smoothing_loss
from avsr.models.masking import lengths_to_mask
from avsr.models.reliability import ReliabilityScorer
from avsr.safe_load import first_line, safe_torch_load

log = logging.getLogger(__name__)

AUDIO_FRONTENDS = ("resnet1d", "logmel")
RELSCORE_VARIANTS = ("ours", "reference")
FUSIONS = ("channel", "time")
ENCODER_PARTS = ("visual_frontend", "audio_frontend", "encoder")


@dataclass
class EncoderOutput:
    """What :meth:`AVSREncoder.encode` gives.

    - ``enc``: ``(B, T, D)`` Conformer output at 25 fps (zero on padding)
    - ``enc_lengths``: ``(B,)`` int64 valid frames
    - ``reliability``: ``{"video": (B, T, C), "audio": (B, T, C)}`` scores in (0, 1) (0 on
      padding) in ``audiovisual_relscore`` mode, else empty
    - ``visual_feats`` / ``audio_feats``: ``(B, T, C)`` frontend outputs before scoring, or
      None when the mode does not use that modality
    """

    enc: torch.Tensor
    enc_lengths: torch.Tensor
    reliability: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_feats: torch.Tensor | None = None
    audio_feats: torch.Tensor | None = None


@dataclass
class ModelOutput:
    """What :meth:`AVSRModel.forward` gives.

    - ``loss``: scalar to minimise
    - ``losses``: detached scalars for logging: ``ctc``, ``att``, ``acc`` (decoder token
      accuracy) and one entry per auxiliary head
    - ``enc``, ``enc_lengths``, ``reliability``: as in :class:`EncoderOutput`
    - ``ctc_log_probs``: ``(B, T, V)`` CTC log-probabilities
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    enc: torch.Tensor
    enc_lengths: torch.Tensor
    ctc_log_probs: torch.Tensor
    reliability: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_config(cfg: ModelConfig) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"model.mode must be one of {', '.join(MODES)}, got '{cfg.mode}'")
    if cfg.audio_frontend not in AUDIO_FRONTENDS:
        raise ValueError(f"model.audio_frontend must be one of {', '.join(AUDIO_FRONTENDS)}, got '{cfg.audio_frontend}'")
    if cfg.frontend_activation not in ACTIVATIONS:
        raise ValueError(f"model.frontend_activation must be one of {', '.join(ACTIVATIONS)}, "
                         f"got '{cfg.frontend_activation}'")
    if cfg.relscore_variant not in RELSCORE_VARIANTS:
        raise ValueError(f"model.relscore_variant must be one of {', '.join(RELSCORE_VARIANTS)}, got '{cfg.relscore_variant}'")
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"model.fusion must be one of {', '.join(FUSIONS)}, got '{cfg.fusion}'")
    for name in ("modality_dropout", "modality_dropout_audio"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"model.{name} must be in [0, 1], got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ctc_weight <= 1.0:
        raise ValueError(f"model.ctc_weight must be in [0, 1], got {cfg.ctc_weight}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"model.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")


def join_in_time(video: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two streams of each clip as one sequence, video first (after the AV-RelScore reference code).

    Args:
        video, audio: ``(B, T, C)`` features, zero on padding.
        lengths: ``(B,)`` int64 valid frames ``L_b`` of both.

    Returns:
        ``(joined (B, 2T, C), 2 * lengths)``: row ``b`` holds ``video[b, :L_b]`` at
        ``[0, L_b)``, ``audio[b, :L_b]`` at ``[L_b, 2 L_b)`` and zeros after. The reference
        concatenates the padded streams (``[video_b, pad, audio_b, pad]``) and masks the padding
        keys, which puts the audio at a position (and relative distance) that depends on the
        batch's longest clip; packed here, a clip's joined sequence is the same alone or padded,
        and equals the reference's whenever the clip is not padded.
    """
    b, t, c = video.shape
    pos = torch.arange(2 * t, device=video.device)[None, :]  # (1, 2T)
    ln = lengths[:, None]
    # index into cat([video, audio], 1): video frame p, then audio frame p - L_b (at T + p - L_b)
    idx = torch.where(pos < ln, pos, pos - ln + t).clamp(max=2 * t - 1)
    joined = torch.gather(torch.cat([video, audio], dim=1), 1, idx[:, :, None].expand(b, 2 * t, c))
    return joined * (pos < 2 * ln)[:, :, None], 2 * lengths


class AVSREncoder(nn.Module):
    """Frontends, optional reliability scoring, fusion and the Conformer (``cfg`` as in
    :class:`avsr.config.ModelConfig`). Raises ValueError on an invalid configuration.

    Audio-visual fusion (``cfg.fusion``): ``"channel"`` concatenates video then audio channels
    into ``Linear(2C -> d)`` (audio in input columns ``[C, 2C)``); ``"time"`` joins each clip's
    valid video frames and then its valid audio frames into one sequence of ``2 L_b`` frames
    (:func:`join_in_time`), projects it with ``Linear(C -> d)`` (the shape of a single-modality
    model's fusion) and keeps the first ``L_b`` Conformer outputs, those of the video frames.
    Video comes first, as in the AV-RelScore reference code (``torch.cat([vid_s, aud_s], dim=1)``
    and ``out[:, :T]``), after Hong et al. 2023. Single-modality modes ignore ``cfg.fusion``.

    Modality dropout (training only, audio-visual modes; after Shi et al. 2022, AV-HuBERT): a
    share ``cfg.modality_dropout`` of the clips in a batch has one stream's frontend features set to
    zero before scoring and fusion, the audio's with probability ``cfg.modality_dropout_audio``, else
    the video's, so that the encoder learns to read either stream alone.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.mode = cfg.mode
        self.uses_video = cfg.mode != "audio"
        self.uses_audio = cfg.mode != "video"
        c = cfg.frontend_dim
        act = cfg.frontend_activation  # the ResNet frontends' (the log-mel one keeps ReLU)
        self.visual_frontend = (VisualFrontend(cfg.visual_width, c, cfg.visual_stem_kernel_t, act)
                                if self.uses_video else None)
        self.audio_frontend: nn.Module | None = None
        if self.uses_audio:
            self.audio_frontend = (
                AudioResNetFrontend(cfg.audio_width, c, act) if cfg.audio_frontend == "resnet1d"
                else LogMelFrontend(8 * cfg.audio_width, c)
            )
        self.scorers = nn.ModuleDict()
        if cfg.mode == "audiovisual_relscore":
            reference = cfg.relscore_variant == "reference"
            for name in ("video", "audio"):
                self.scorers[name] = ReliabilityScorer(c, cfg.relscore_layers, cfg.relscore_kernel,
                                                       hidden_dim=2 * c if reference else c, batch_norm=reference)
        n_streams = int(self.uses_video) + int(self.uses_audio)
        self.time_fusion = n_streams == 2 and cfg.fusion == "time"
        in_dim = c if self.time_fusion else n_streams * c
        self.fusion = nn.Sequential(nn.Linear(in_dim, cfg.d_model), nn.Dropout(cfg.dropout))
        self.conformer = Conformer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.num_layers, cfg.conv_kernel,
                                   cfg.dropout, cfg.conv_norm)
        self.modality_dropout = cfg.modality_dropout if n_streams == 2 else 0.0
        self.modality_dropout_audio = cfg.modality_dropout_audio

    def _drop_modality(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zero one stream of a random ``modality_dropout`` share of the clips (training only)."""
        b = feats["video"].shape[0]
        device = feats["video"].device
        drop = torch.rand(b, device=device) < self.modality_dropout
        audio = torch.rand(b, device=device) < self.modality_dropout_audio
        keep = {"audio": ~(drop & audio), "video": ~(drop & ~audio)}
        return {name: f * keep[name][:, None, None].to(f.dtype) for name, f in feats.items()}

    def encode(
        self,
        video: torch.Tensor | None,
        video_lengths: torch.Tensor | None,
        audio: torch.Tensor | None,
        audio_lengths: torch.Tensor | None,
    ) -> EncoderOutput:
        """
        Args:
            video: ``(B, T, 1, H, W)`` float normalised frames at 25 fps (None in ``audio`` mode).
            video_lengths: ``(B,)`` int64 frames.
            audio: ``(B, S)`` float 16 kHz waveform, ``S = 640 T`` (None in ``video`` mode).
            audio_lengths: ``(B,)`` int64 samples.

        Returns:
            :class:`EncoderOutput` with ``enc`` ``(B, T, D)`` in every fusion. In audio-visual
            modes both streams are cut to the shorter one; raises ValueError when a clip's
            streams differ by more than one frame or a needed input is missing.
        """
        streams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.uses_video:
            if video is None or video_lengths is None:
                raise ValueError(f"mode '{self.mode}' needs video and video_lengths")
            streams["video"] = self.visual_frontend(video, video_lengths)
        if self.uses_audio:
            if audio is None or audio_lengths is None:
                raise ValueError(f"mode '{self.mode}' needs audio and audio_lengths")
            streams["audio"] = self.audio_frontend(audio, audio_lengths)
        lengths = torch.stack([ln for _, ln in streams.values()]).amin(0)
        if len(streams) == 2:
            gap = (streams["video"][1] - streams["audio"][1]).abs().max()
            if int(gap) > 1:
                raise ValueError(f"video and audio lengths disagree by {int(gap)} frames (audio must be 640 samples per frame)")
        t = min(f.shape[1] for f, _ in streams.values())
        feats = {name: f[:, :t] for name, (f, _) in streams.items()}
        kept = self._drop_modality(feats) if self.training and self.modality_dropout > 0 else feats
        reliability = {}
        fused = []
        for name, f in kept.items():
            if name in self.scorers:
                f, reliability[name], _ = self.scorers[name](f, lengths)
            fused.append(f)
        if self.time_fusion:
            joined, joined_lengths = join_in_time(fused[0], fused[1], lengths)  # (B, 2T, C), video first
            enc, _ = self.conformer(self.fusion(joined), joined_lengths)
            # the video half: frames [0, L_b) of clip b (beyond them lie the clip's audio outputs)
            enc = enc[:, :t].masked_fill(~lengths_to_mask(lengths, t)[:, :, None], 0.0)
        else:
            enc, lengths = self.conformer(self.fusion(torch.cat(fused, dim=-1)), lengths)
        return EncoderOutput(enc, lengths, reliability, feats.get("video"), feats.get("audio"))

    def forward(
        self,
        video: torch.Tensor | None,
        video_lengths: torch.Tensor | None,
        audio: torch.Tensor | None,
        audio_lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`encode`, returning only ``(enc (B, T, D), enc_lengths (B,))``."""
        out = self.encode(video, video_lengths, audio, audio_lengths)
        return out.enc, out.enc_lengths


class CTCHead(nn.Module):
    """Linear layer and log-softmax: ``(B, T, D)`` encoder frames -> ``(B, T, V)`` log-probabilities."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, vocab_size)

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.linear(enc), dim=-1)


class AVSRModel(nn.Module):
    """Encoder, CTC head and attention decoder with the hybrid loss.

    Args:
        cfg: the ``model`` section of the config.
        vocab_size: tokenizer vocabulary ``V`` (blank 0, ``<sos/eos>`` ``V - 1``).

    Raises ValueError on an invalid configuration or ``vocab_size < 3``.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (blank, one token, sos/eos), got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.sos_id = self.eos_id = vocab_size - 1
        self.encoder = AVSREncoder(cfg)
        self.ctc_head = CTCHead(cfg.d_model, vocab_size)
        self.decoder = TransformerDecoder(vocab_size, cfg.d_model, cfg.num_heads, cfg.decoder_ffn_dim,
                                          cfg.decoder_layers, cfg.dropout)
        self.aux_heads = nn.ModuleDict()
        self.aux_weights: dict[str, float] = {}
        attach_aux_heads(self, cfg)  # mouth opening / lip-to-speech when their weights are > 0

    def register_aux_head(self, name: str, head: nn.Module, weight: float) -> None:
        """Add an auxiliary head ``head(batch, encoded: EncoderOutput) -> scalar loss`` whose
        loss is added with ``weight`` and logged as ``losses[name]``."""
        if name in self.aux_heads or name in ("ctc", "att", "acc"):
            raise ValueError(f"auxiliary head name '{name}' is taken")
        if weight <= 0:
            raise ValueError(f"auxiliary head weight must be positive, got {weight}")
        self.aux_heads[name] = head
        self.aux_weights[name] = float(weight)

    def encode(
        self,
        video: torch.Tensor | None,
        video_lengths: torch.Tensor | None,
        audio: torch.Tensor | None,
        audio_lengths: torch.Tensor | None,
    ) -> EncoderOutput:
        """See :meth:`AVSREncoder.encode`."""
        return self.encoder.encode(video, video_lengths, audio, audio_lengths)

    def forward(self, batch: Batch) -> ModelOutput:
        """Losses and encoder outputs of a :class:`~avsr.data.batch.Batch` (tokens padded with ``IGNORE_ID``)."""
        encoded = self.encode(batch.video, batch.video_lengths, batch.audio, batch.audio_lengths)
        ctc_log_probs = self.ctc_head(encoded.enc)
        ctc = ctc_loss(ctc_log_probs, encoded.enc_lengths, batch.tokens, batch.token_lengths)
        ys_in, ys_out = add_sos_eos(batch.tokens, batch.token_lengths, self.sos_id)
        logits = self.decoder(ys_in, encoded.enc, encoded.enc_lengths)
        att, acc = label_smoothing_loss(logits, ys_out, self.cfg.label_smoothing)
        w = self.cfg.ctc_weight
        loss = w * ctc + (1.0 - w) * att
        losses = {"ctc": ctc.detach(), "att": att.detach(), "acc": acc.detach()}
        for name, head in self.aux_heads.items():
            term = head(batch, encoded)
            loss = loss + self.aux_weights[name] * term
            losses[name] = term.detach()
        return ModelOutput(loss, losses, encoded.enc, encoded.enc_lengths, ctc_log_probs, encoded.reliability)


def build_model(cfg: ModelConfig, vocab_size: int) -> AVSRModel:
    """The :class:`AVSRModel` of ``cfg`` for a ``vocab_size``-token vocabulary."""
    model = AVSRModel(cfg, vocab_size)
    log.info("built %s model: %.2f M parameters", cfg.mode, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def load_encoder(checkpoint: str | Path, part: str = "encoder", freeze: bool = True) -> nn.Module:
    """A pretrained part of a trained model, for reuse.

    Args:
        checkpoint: file with keys ``model`` (state dict of an :class:`AVSRModel`) and
            ``config`` (:func:`avsr.config.to_dict` form), read with ``weights_only=True``.
        part: ``"visual_frontend"`` (``(video, lengths) -> (feats, lengths)``),
            ``"audio_frontend"`` (``(audio, lengths) -> (feats, lengths)``) or ``"encoder"``
            (``(video, video_lengths, audio, audio_lengths) -> (enc, lengths)``).
        freeze: set ``requires_grad=False`` and eval mode (a parent's ``.train()`` undoes the
            latter; call ``.eval()`` on the part again when fine-tuning around it).

    Raises ValueError for an unknown part, a part the checkpoint's mode lacks, or an unreadable
    checkpoint (naming the file).
    """
    if part not in ENCODER_PARTS:
        raise ValueError(f"part must be one of {', '.join(ENCODER_PARTS)}, got '{part}'")
    ckpt = safe_torch_load(checkpoint, "an avsr checkpoint", ValueError)
    try:
        cfg = from_dict(ckpt["config"]).model
        prefix = "encoder."
        state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        encoder = AVSREncoder(cfg)
        encoder.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot load an encoder from checkpoint {checkpoint}: {first_line(exc)}") from None
    module = encoder if part == "encoder" else getattr(encoder, part)
    if module is None:
        raise ValueError(f"checkpoint {checkpoint} is a '{cfg.mode}' model without a {part}")
    if freeze:
        module.requires_grad_(False)
        module.eval()
    return module
