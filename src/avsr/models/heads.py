"""Auxiliary heads on frontend/encoder features: mouth opening and lip-to-speech.

- :class:`MouthOpeningHead`: ``(B, T, C)`` features at 25 fps → ``(B, T)`` mouth opening
  (inner-lip gap / mouth width, the landmark target of preprocessing).
- :class:`Lip2SpeechDecoder`: visual features ``(B, T, C)`` + a speaker embedding from a reference
  mel → ``(B, 4T, 80)`` log-mel at 100 fps (:mod:`avsr.audio_features`), after Kim, Hong & Ro,
  "Lip-to-speech synthesis in the wild with multi-task learning" (ICASSP 2023).
- :class:`Lip2SpeechLoss`: L1 on the mel, plus the paper's content supervision — matching the
  features of a frozen ASR encoder on generated vs real mel, switched on after a warm-up — and
  CTC on the visual features.
- :class:`MouthOpeningAux` and :class:`Lip2SpeechAux`: the two heads as auxiliary tasks of
  :class:`avsr.models.AVSRModel` (``register_aux_head``: ``head(batch, encoded) -> loss``);
  :func:`attach_aux_heads` registers them from the model config and :func:`aux_predictions` runs
  them on an encoding (inference and evaluation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from avsr.audio_features import LOG_FLOOR_VALUE, MEL_PER_VIDEO_FRAME, N_MELS, log_mel
from avsr.data.batch import Batch
from avsr.models.masking import lengths_to_mask

# Mouth opening on GRID: mean ~0.06 (speaker s1) to ~0.3, standard deviation ~0.04-0.1 per speaker.
MOUTH_OPENING_OFFSET = 0.08
MOUTH_OPENING_SCALE = 0.05
REFERENCE_MEL_FRAMES = 100  # 1 s of ground-truth mel for the speaker embedding
MOUTH_HEAD, SPEECH_HEAD = "mouth", "l2s"  # names of the heads in ``model.aux_heads`` (attach_aux_heads)


def _check_positive(**kwargs: float) -> None:
    for name, value in kwargs.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def _check_feats(feats: torch.Tensor, lengths: torch.Tensor, dim: int, name: str = "feats") -> None:
    if feats.dim() != 3 or feats.shape[-1] != dim:
        raise ValueError(f"{name} must be (B, T, {dim}), got {tuple(feats.shape)}")
    if lengths.shape != (feats.shape[0],):
        raise ValueError(f"{name} lengths must be ({feats.shape[0]},), got {tuple(lengths.shape)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` ``(B, T, ...)`` over the positions where ``mask`` ``(B, T)`` is True (scalar)."""
    mask = mask.reshape(mask.shape + (1,) * (values.dim() - mask.dim())).to(values.dtype)
    per_pos = values.numel() // (mask.shape[0] * mask.shape[1])
    return (values * mask).sum() / (mask.sum() * per_pos).clamp_min(1)


def mouth_opening_loss(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor,
                       scale: float | torch.Tensor = MOUTH_OPENING_SCALE, delta: float = 1.0,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Huber loss (``delta`` in units of ``scale``) between ``(B, T)`` curves, mean over valid frames.

    Valid frames are the first ``lengths[b]`` of each row, and where ``mask`` ``(B, T')`` bool (e.g.
    frames with a detected face) is True. The curves are cut to the shorter time axis (streams may
    differ by a frame). Raises ValueError when the batch sizes differ.
    """
    if pred.dim() != 2 or target.dim() != 2 or pred.shape[0] != target.shape[0]:
        raise ValueError(f"pred and target must be (B, T) with equal B, got {tuple(pred.shape)} and {tuple(target.shape)}")
    t = min(pred.shape[1], target.shape[1])
    pred, target = pred[:, :t] / scale, target[:, :t].to(pred.dtype) / scale
    loss = F.huber_loss(pred, target, reduction="none", delta=delta)
    valid = lengths_to_mask(lengths.clamp(max=t), t)
    if mask is not None:
        valid = valid & mask[:, :t]
    return masked_mean(loss, valid)


class _ConvBlock(nn.Module):
    """Pre-norm residual block: LayerNorm, 1-D conv (``kernel``, same length), GELU, dropout."""

    def __init__(self, dim: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).masked_fill(~mask[..., None], 0.0)
        y = self.conv(y.transpose(1, 2)).transpose(1, 2)
        return x + self.dropout(F.gelu(y))


class MouthOpeningHead(nn.Module):
    """Features ``(B, T, C)`` at 25 fps → mouth opening ``(B, T)`` (inner-lip gap / mouth width).

    LayerNorm, a temporal convolution (``kernel`` frames) with GELU, and a linear output mapped to
    the target's range (``offset + scale * y``), so that the Huber loss of
    :func:`mouth_opening_loss` works in units of a typical curve deviation.

    Args:
        in_dim: feature size ``C``.
        hidden: channels of the convolution.
        kernel: temporal kernel (odd).
        dropout: dropout before the output layer.

    Raises:
        ValueError: on a non-positive size, an even kernel or ``dropout`` outside [0, 1).
    """

    def __init__(self, in_dim: int, hidden: int = 128, kernel: int = 5, dropout: float = 0.1) -> None:
        super().__init__()
        _check_positive(in_dim=in_dim, hidden=hidden, kernel=kernel)
        _check_dropout(dropout)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (centred in time), got {kernel}")
        self.in_dim = in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.conv = nn.Conv1d(in_dim, hidden, kernel, padding=kernel // 2)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """
        Args:
            feats: ``(B, T, C)`` float features at 25 fps (visual or audio frontend, or encoder).
            lengths: ``(B,)`` int64 valid frames.

        Returns:
            ``(B, T)`` float mouth opening per frame, 0 past ``lengths``.
        """
        _check_feats(feats, lengths, self.in_dim)
        mask = lengths_to_mask(lengths, feats.shape[1])
        x = self.norm(feats).masked_fill(~mask[..., None], 0.0)
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        y = MOUTH_OPENING_OFFSET + MOUTH_OPENING_SCALE * self.out(self.dropout(x)).squeeze(-1)
        return y * mask


class SpeakerEncoder(nn.Module):
    """Reference log-mel ``(B, F, 80)`` → speaker embedding ``(B, dim)`` (unit length).

    Two 1-D convolutions with GELU, a mean over the valid frames and a linear layer.
    """

    def __init__(self, n_mels: int = N_MELS, hidden: int = 128, dim: int = 64) -> None:
        super().__init__()
        _check_positive(n_mels=n_mels, hidden=hidden, dim=dim)
        self.n_mels = n_mels
        self.conv1 = nn.Conv1d(n_mels, hidden, 5, padding=2)
        self.conv2 = nn.Conv1d(hidden, hidden, 5, padding=2)
        self.out = nn.Linear(hidden, dim)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _check_feats(mel, lengths, self.n_mels, "reference mel")
        mask = lengths_to_mask(lengths.clamp(min=1), mel.shape[1])[:, None, :]  # (B, 1, F)
        x = F.gelu(self.conv1(mel.transpose(1, 2) * mask))
        x = F.gelu(self.conv2(x * mask)) * mask
        pooled = x.sum(2) / mask.sum(2).clamp_min(1)  # (B, hidden)
        return F.normalize(self.out(pooled), dim=-1)


class Lip2SpeechDecoder(nn.Module):
    """Visual features ``(B, T, C)`` at 25 fps + reference mel → log-mel ``(B, 4T, 80)`` at 100 fps.

    The speaker embedding of the reference (:class:`SpeakerEncoder`) is concatenated to every
    frame; residual conv blocks at 25 fps, a bidirectional GRU, a ×4 upsampling (linear to
    ``4 * d_model`` and reshape), residual conv blocks at 100 fps and a linear layer to the mel
    bins. Follows the shape of Kim et al. 2023 (visual encoder → speaker-conditioned mel decoder).

    Args:
        in_dim: visual feature size ``C``.
        d_model: width of the decoder.
        n_mels: output mel bins (80, as :func:`avsr.audio_features.log_mel`).
        speaker_dim: speaker-embedding size.
        num_blocks: conv blocks at each of the two rates.
        kernel: temporal kernel of the blocks (odd).
        dropout: dropout in the blocks.

    Raises:
        ValueError: on a non-positive size, an even kernel or ``dropout`` outside [0, 1).
    """

    def __init__(self, in_dim: int, d_model: int = 256, n_mels: int = N_MELS, speaker_dim: int = 64,
                 num_blocks: int = 2, kernel: int = 5, dropout: float = 0.1) -> None:
        super().__init__()
        _check_positive(in_dim=in_dim, d_model=d_model, n_mels=n_mels, speaker_dim=speaker_dim,
                        num_blocks=num_blocks, kernel=kernel)
        _check_dropout(dropout)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (centred in time), got {kernel}")
        self.in_dim, self.d_model, self.n_mels = in_dim, d_model, n_mels
        self.speaker = SpeakerEncoder(n_mels, dim=speaker_dim)
        self.in_proj = nn.Linear(in_dim + speaker_dim, d_model)
        self.video_blocks = nn.ModuleList(_ConvBlock(d_model, kernel, dropout) for _ in range(num_blocks))
        self.rnn = nn.GRU(d_model, d_model // 2, batch_first=True, bidirectional=True)
        self.upsample = nn.Linear(d_model, MEL_PER_VIDEO_FRAME * d_model)
        self.mel_blocks = nn.ModuleList(_ConvBlock(d_model, kernel, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, n_mels)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, ref_mel: torch.Tensor,
                ref_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            feats: ``(B, T, C)`` float visual features at 25 fps.
            lengths: ``(B,)`` int64 valid frames.
            ref_mel: ``(B, F_ref, 80)`` log-mel of reference speech of each speaker (e.g. the first
                second of the target, :func:`reference_mel`).
            ref_lengths: ``(B,)`` int64 valid reference frames.

        Returns:
            ``(mel, mel_lengths)``: ``(B, 4T, 80)`` float log-mel (the floor value past
            ``mel_lengths``), ``(B,)`` int64 ``4 * lengths``.
        """
        _check_feats(feats, lengths, self.in_dim)
        b, t, _ = feats.shape
        mask = lengths_to_mask(lengths, t)
        spk = self.speaker(ref_mel, ref_lengths)
        x = self.in_proj(torch.cat([feats, spk[:, None].expand(b, t, -1)], dim=-1))
        for block in self.video_blocks:
            x = block(x, mask)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        x = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=t)[0]
        x = self.upsample(x).reshape(b, MEL_PER_VIDEO_FRAME * t, self.d_model)
        mel_lengths = lengths * MEL_PER_VIDEO_FRAME
        mel_mask = lengths_to_mask(mel_lengths, x.shape[1])
        for block in self.mel_blocks:
            x = block(x, mel_mask)
        mel = self.out(self.norm(x))
        return mel.masked_fill(~mel_mask[..., None], LOG_FLOOR_VALUE), mel_lengths


def reference_mel(mel: torch.Tensor, lengths: torch.Tensor,
                  frames: int = REFERENCE_MEL_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``frames`` mel frames of each utterance as the speaker reference: ``(B, F', 80)``, ``(B,)``."""
    return mel[:, :frames], lengths.clamp(max=frames)


class Lip2SpeechLoss(nn.Module):
    """Training loss of lip-to-speech (Kim et al. 2023, Sec. 2).

    ``L1(mel) + content_weight * content + ctc_weight * CTC``:

    - L1 between generated and real log-mel over valid frames;
    - content (optional, needs ``content_encoder``): L1 between the features of a frozen ASR
      encoder on the generated and on the real mel, active once ``step >= content_warmup_steps``
      (the caller passes ``step``); ``content_encoder(mel (B, F, 80), mel_lengths (B,)) ->
      (feats (B, T', D), lengths (B,))``. Its parameters are frozen here; gradients flow through
      it to the generated mel only;
    - CTC (optional, needs ``vocab_size``): a linear CTC layer on the visual features against the
      transcript tokens (blank 0), so that the visual features carry the content.

    Args:
        feat_dim: visual feature size (for the CTC layer).
        content_encoder: frozen ASR encoder module on log-mel, or None.
        content_weight, content_warmup_steps: weight and start step of the content term.
        vocab_size: tokenizer size for the CTC term, or None to disable it.
        ctc_weight: weight of the CTC term.

    Raises:
        ValueError: on a negative weight or warm-up, a positive ``content_weight`` without an
            encoder, or a positive ``ctc_weight`` without ``vocab_size``.
    """

    def __init__(self, feat_dim: int, content_encoder: Optional[nn.Module] = None, content_weight: float = 0.0,
                 content_warmup_steps: int = 0, vocab_size: Optional[int] = None, ctc_weight: float = 0.0) -> None:
        super().__init__()
        if min(content_weight, content_warmup_steps, ctc_weight) < 0:
            raise ValueError("content_weight, content_warmup_steps and ctc_weight must be >= 0")
        if content_weight > 0 and content_encoder is None:
            raise ValueError("content_weight > 0 needs a content_encoder (a frozen ASR encoder on log-mel)")
        if ctc_weight > 0 and not vocab_size:
            raise ValueError("ctc_weight > 0 needs vocab_size")
        self.content_weight, self.content_warmup_steps, self.ctc_weight = content_weight, content_warmup_steps, ctc_weight
        self.content_encoder = content_encoder
        if content_encoder is not None:
            content_encoder.requires_grad_(False)
            content_encoder.eval()
        self.ctc = nn.Linear(feat_dim, vocab_size) if ctc_weight > 0 else None

    def train(self, mode: bool = True) -> "Lip2SpeechLoss":
        super().train(mode)
        if self.content_encoder is not None:  # frozen: dropout/batch-norm stay in eval mode
            self.content_encoder.eval()
        return self

    def forward(self, pred: torch.Tensor, pred_lengths: torch.Tensor, target: torch.Tensor,
                target_lengths: torch.Tensor, feats: Optional[torch.Tensor] = None,
                feat_lengths: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None,
                token_lengths: Optional[torch.Tensor] = None, step: int = 0) -> dict[str, torch.Tensor]:
        """
        Args:
            pred, pred_lengths: generated ``(B, F, 80)`` log-mel and ``(B,)`` frames.
            target, target_lengths: real log-mel ``(B, F', 80)`` (:func:`avsr.audio_features.log_mel`).
            feats, feat_lengths: visual features ``(B, T, C)`` and ``(B,)`` (for CTC).
            tokens, token_lengths: ``(B, L)`` int64 targets padded with -1, and ``(B,)`` (for CTC).
            step: the optimiser step (switches the content term on after the warm-up).

        Returns:
            ``{"loss": total, "l1": ..., ["content": ...], ["ctc": ...]}`` scalars (only ``loss``
            carries gradients).

        Raises:
            ValueError: when CTC is on and the features or tokens are missing.
        """
        f = min(pred.shape[1], target.shape[1])
        lengths = torch.minimum(pred_lengths, target_lengths).clamp(max=f)
        pred, target = pred[:, :f], target[:, :f].to(pred.dtype)
        l1 = masked_mean((pred - target).abs(), lengths_to_mask(lengths, f))
        out = {"l1": l1.detach()}
        loss = l1
        if self.content_encoder is not None and self.content_weight > 0 and step >= self.content_warmup_steps:
            fake, fake_lengths = self.content_encoder(pred, lengths)
            with torch.no_grad():
                real, _ = self.content_encoder(target, lengths)
            n = min(fake.shape[1], real.shape[1])
            content = masked_mean((fake[:, :n] - real[:, :n]).abs(), lengths_to_mask(fake_lengths.clamp(max=n), n))
            loss = loss + self.content_weight * content
            out["content"] = content.detach()
        if self.ctc is not None:
            if feats is None or feat_lengths is None or tokens is None or token_lengths is None:
                raise ValueError("the CTC term needs feats, feat_lengths, tokens and token_lengths")
            log_probs = torch.log_softmax(self.ctc(feats), dim=-1).transpose(0, 1).float()
            ctc = F.ctc_loss(log_probs, tokens.clamp(min=0), feat_lengths, token_lengths, blank=0,
                             reduction="mean", zero_infinity=True)
            loss = loss + self.ctc_weight * ctc
            out["ctc"] = ctc.detach()
        out["loss"] = loss
        return out


class MouthOpeningAux(nn.Module):
    """Mouth-opening task of :class:`avsr.models.AVSRModel`: one :class:`MouthOpeningHead` per
    modality the model uses (``"video"`` on the visual, ``"audio"`` on the audio frontend features).

    ``forward(batch, encoded)`` is the mean Huber loss of the heads against
    ``batch.mouth_opening`` over valid frames; :meth:`predict` gives the curves.

    Raises:
        ValueError: when ``sources`` is empty or names an unknown modality.
    """

    def __init__(self, feat_dim: int, sources: tuple[str, ...], hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        if not sources or set(sources) - {"video", "audio"}:
            raise ValueError(f"sources must be a non-empty subset of ('video', 'audio'), got {sources}")
        self.heads = nn.ModuleDict({s: MouthOpeningHead(feat_dim, hidden, dropout=dropout) for s in sources})

    @staticmethod
    def _feats(encoded, source: str) -> Optional[torch.Tensor]:
        return encoded.visual_feats if source == "video" else encoded.audio_feats

    def predict(self, encoded, source: Optional[str] = None) -> torch.Tensor:
        """Mouth opening ``(B, T)`` from an :class:`~avsr.models.EncoderOutput`: the ``source`` head's
        curve, or the mean of all heads (``source=None``); 0 past ``encoded.enc_lengths``.

        Raises ValueError for a source without a head or without features in ``encoded``.
        """
        names = list(self.heads) if source is None else [source]
        curves = []
        for name in names:
            feats = self._feats(encoded, name)
            if name not in self.heads or feats is None:
                raise ValueError(f"no mouth-opening head or no '{name}' features for source '{name}'")
            curves.append(self.heads[name](feats, encoded.enc_lengths))
        return torch.stack(curves).mean(0)

    def forward(self, batch: Batch, encoded) -> torch.Tensor:
        if batch.mouth_opening is None:
            raise ValueError("the mouth-opening head needs batch.mouth_opening (preprocessed landmarks)")
        losses = [mouth_opening_loss(self.heads[name](self._feats(encoded, name), encoded.enc_lengths),
                                     batch.mouth_opening, encoded.enc_lengths) for name in self.heads]
        return torch.stack(losses).mean()


class Lip2SpeechAux(nn.Module):
    """Lip-to-speech task of :class:`avsr.models.AVSRModel`: a :class:`Lip2SpeechDecoder` on the
    visual frontend features, L1 against the log-mel of ``batch.audio`` (speaker reference: its
    first second). CTC on the visual features is not added here (the model's own CTC head covers
    content); content supervision needs a frozen ASR encoder: use :class:`Lip2SpeechLoss` directly.
    The target is the batch's audio as the model gets it, so train-time audio noise or time masks
    also reach the target mel: train this head on clean audio.
    """

    def __init__(self, feat_dim: int, d_model: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.decoder = Lip2SpeechDecoder(feat_dim, d_model, dropout=dropout)
        self.loss = Lip2SpeechLoss(feat_dim)

    def predict(self, encoded, ref_mel: torch.Tensor, ref_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel ``(B, 4T, 80)`` and ``(B,)`` lengths from an :class:`~avsr.models.EncoderOutput`
        with visual features; raises ValueError when it has none."""
        if encoded.visual_feats is None:
            raise ValueError("lip-to-speech needs visual features (a video or audio-visual mode)")
        return self.decoder(encoded.visual_feats, encoded.enc_lengths, ref_mel, ref_lengths)

    def forward(self, batch: Batch, encoded) -> torch.Tensor:
        target, target_lengths = log_mel(batch.audio, batch.audio_lengths)
        pred, pred_lengths = self.predict(encoded, *reference_mel(target, target_lengths))
        return self.loss(pred, pred_lengths, target, target_lengths)["loss"]


def attach_aux_heads(model: nn.Module, cfg) -> None:
    """Register the auxiliary heads that ``cfg`` (:class:`avsr.config.ModelConfig`) switches on and
    ``model`` (an :class:`avsr.models.AVSRModel`, which calls this itself) does not have yet.

    ``cfg.mouth_opening_weight > 0``: a :class:`MouthOpeningAux` named ``"mouth"`` on the frontend
    features of every modality of ``cfg.mode``; ``cfg.lip2speech_weight > 0``: a
    :class:`Lip2SpeechAux` named ``"l2s"`` (raises ValueError in ``audio`` mode, which has no
    visual features).
    """
    sources = tuple(s for s, used in (("video", cfg.mode != "audio"), ("audio", cfg.mode != "video")) if used)
    if cfg.mouth_opening_weight > 0 and MOUTH_HEAD not in model.aux_heads:
        model.register_aux_head(MOUTH_HEAD, MouthOpeningAux(cfg.frontend_dim, sources, dropout=cfg.dropout),
                                cfg.mouth_opening_weight)
    if cfg.lip2speech_weight > 0 and SPEECH_HEAD not in model.aux_heads:
        if "video" not in sources:
            raise ValueError("model.lip2speech_weight > 0 needs video: mode 'audio' has no visual features")
        model.register_aux_head(SPEECH_HEAD, Lip2SpeechAux(cfg.frontend_dim, dropout=cfg.dropout),
                                cfg.lip2speech_weight)


def aux_predictions(model: nn.Module, encoded,
                    reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """What the auxiliary heads of ``model`` predict from one encoding of ``N`` clips.

    Args:
        model: an :class:`avsr.models.AVSRModel` (heads in ``model.aux_heads``, as
            :func:`attach_aux_heads` names them); call under ``torch.no_grad``/``inference_mode``.
        encoded: its :class:`~avsr.models.EncoderOutput` (``T`` frames at 25 fps).
        reference: speaker reference for lip-to-speech, ``(ref_mel (N or 1, F, 80), ref_lengths
            (N or 1,))`` (:func:`reference_mel`; one row is shared by all clips), or None to skip
            lip-to-speech.

    Returns:
        ``{"mouth_opening_pred": (N, T)}`` when the model has a ``"mouth"`` head (mean of its
        per-modality curves, 0 past ``encoded.enc_lengths``) and ``{"mel": (N, 4T, 80)}`` log-mel
        at 100 fps (valid for ``4 * enc_lengths`` frames) when it has an ``"l2s"`` head and
        ``reference`` is given; empty for a model without heads.
    """
    out = {}
    if MOUTH_HEAD in model.aux_heads:
        out["mouth_opening_pred"] = model.aux_heads[MOUTH_HEAD].predict(encoded)
    if reference is not None and SPEECH_HEAD in model.aux_heads:
        n = encoded.enc.shape[0]
        ref_mel, ref_lengths = reference
        if ref_mel.shape[0] == 1 and n > 1:
            ref_mel, ref_lengths = ref_mel.expand(n, -1, -1), ref_lengths.expand(n)
        out["mel"], _ = model.aux_heads[SPEECH_HEAD].predict(encoded, ref_mel, ref_lengths)
    return out
