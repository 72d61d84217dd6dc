"""Modality frontends: frames or waveform in, one feature vector per video frame (25 fps) out.

- :class:`VisualFrontend`: Conv3d stem (5x7x7, stride 1x2x2) + max-pool, then a 2-D ResNet-18
  trunk applied to every frame and global average pooling (Stafylakis & Tzimiropoulos 2017;
  Ma et al. 2021, used by Hong et al. 2023).
- :class:`AudioResNetFrontend`: a 1-D ResNet-18 on the raw 16 kHz waveform with a total stride of
  640 samples, so its output is also 25 fps (Ma et al. 2021).
- :class:`LogMelFrontend`: 80-bin log-mel (10 ms hop, 4 mel frames per video frame) and two
  stride-2 convolutions down to 25 fps: a cheaper audio alternative.

The ResNet frontends take ``activation``: ``"relu"`` (default) or ``"swish"`` (``x * sigmoid(x)``,
the activation of the LRW models of Ma et al. 2021/2022, whose weights :mod:`avsr.models.lrw` loads).

Padding never leaks into valid frames: every convolution sees zeros past each clip's length,
exactly as it would for the clip alone, so in eval mode a clip's features do not depend on the
batch it is in. (In train mode, batch-norm statistics of the audio frontends include the zeroed
padding; the visual trunk runs on valid frames only.)
"""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.transforms import MelSpectrogram

from avsr.models.masking import check_lengths, conv_lengths, lengths_to_mask

SAMPLES_PER_FRAME = 640  # 16 kHz audio / 25 fps video
_STAGE_STRIDES = (1, 2, 2, 2)  # ResNet-18: four stages of two basic blocks
ACTIVATIONS = ("relu", "swish")  # of the ResNet frontends (model.frontend_activation)


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def make_activation(name: str) -> nn.Module:
    """``nn.ReLU(inplace=True)`` for ``"relu"``, ``nn.SiLU()`` (swish, ``x * sigmoid(x)``) for
    ``"swish"``; ValueError for anything else."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "swish":
        return nn.SiLU()
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{name}'")


def _check_audio(audio: torch.Tensor, lengths: torch.Tensor, min_samples: int) -> None:
    """ValueError unless ``audio`` is ``(B, S)`` with ``(B,)`` lengths in ``[min_samples, S]``."""
    if audio.dim() != 2:
        raise ValueError(f"audio must be (B, S), got {tuple(audio.shape)}")
    check_lengths(audio, lengths, 1, "audio")
    if int(lengths.min()) < min_samples:
        raise ValueError(f"audio clips must hold at least {min_samples} samples, got {lengths.tolist()}")


class _BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) on ``(N, C, H, W)`` images (``dims=2``) or ``(B, C, L)``
    sequences (``dims=1``), with ``activation`` (:func:`make_activation`) after each conv stage."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dims: int = 2, activation: str = "relu") -> None:
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.stride = stride
        self.conv1 = conv(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = norm(out_ch)
        self.act = make_activation(activation)
        self.shortcut = (
            nn.Sequential(conv(in_ch, out_ch, 1, bias=False), norm(out_ch))
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def _skip(self, x: torch.Tensor) -> torch.Tensor:
        # Subsampling + 1x1 conv rather than a strided 1x1 conv: the same function, but torch 2.14's
        # oneDNN weight gradient of a strided 1x1 channels-last conv corrupts the heap for narrow
        # layers (8-12 channels) on 2 CPU threads.
        step = slice(None, None, self.stride)
        return self.shortcut(x[(slice(None), slice(None)) + (step,) * (x.dim() - 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + self._skip(x))


class VisualFrontend(nn.Module):
    """Mouth-ROI frames to per-frame features.

    Args:
        width: channels of the stem and first ResNet stage (stages use ``w, 2w, 4w, 8w``;
            64 is ResNet-18).
        out_dim: output feature size (a linear projection is added when ``8 * width != out_dim``).
        stem_kernel_t: temporal kernel of the Conv3d stem (odd; 5 in the paper).
        activation: ``"relu"`` or ``"swish"`` (:data:`ACTIVATIONS`), after the stem and in every block.

    Raises ValueError for a non-positive size, an even ``stem_kernel_t`` or an unknown activation.
    """

    def __init__(self, width: int = 64, out_dim: int = 512, stem_kernel_t: int = 5, activation: str = "relu") -> None:
        super().__init__()
        _check_positive(width=width, out_dim=out_dim, stem_kernel_t=stem_kernel_t)
        self.activation = activation
        if stem_kernel_t % 2 == 0:
            raise ValueError(f"stem_kernel_t must be odd (centred in time), got {stem_kernel_t}")
        self.stem_conv = nn.Conv3d(1, width, (stem_kernel_t, 7, 7), (1, 2, 2), (stem_kernel_t // 2, 3, 3), bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_pool = nn.Sequential(make_activation(activation), nn.MaxPool2d(3, 2, 1))
        blocks, ch = [], width
        for i, stride in enumerate(_STAGE_STRIDES):
            out = width * 2**i
            blocks += [_BasicBlock(ch, out, stride, activation=activation),
                       _BasicBlock(out, out, 1, activation=activation)]
            ch = out
        self.trunk = nn.Sequential(*blocks)
        self.proj = nn.Linear(ch, out_dim) if ch != out_dim else nn.Identity()
        self.out_dim = out_dim
        # channels-last weights and activations: oneDNN's fastest CPU path (~1.3x for the trunk,
        # ~2x for the stem), and no layout conversions in backward
        self.stem_conv.to(memory_format=torch.channels_last_3d)
        self.trunk.to(memory_format=torch.channels_last)

    def forward(self, video: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            video: ``(B, T, 1, H, W)`` float, normalised grayscale frames at 25 fps (H = W = 88).
            lengths: ``(B,)`` int64 valid frames per clip.

        Returns:
            ``(feats, lengths)``: ``(B, T, out_dim)`` features (zero on padding), and ``lengths``.
        """
        if video.dim() != 5 or video.shape[2] != 1:
            raise ValueError(f"video must be (B, T, 1, H, W), got {tuple(video.shape)}")
        check_lengths(video, lengths, 1, "video")
        b, t = video.shape[:2]
        mask = lengths_to_mask(lengths, t)
        padded = bool(int(lengths.min()) < t)
        if padded:
            video = video.masked_fill(~mask[:, :, None, None, None], 0.0)
        x = self.stem_conv(video.transpose(1, 2).contiguous(memory_format=torch.channels_last_3d))  # (B, w, T, h, w)
        x = x.permute(0, 2, 3, 4, 1)  # (B, T, h, w, C): contiguous, as the conv output is channels-last
        frames = x[mask] if padded else x.flatten(0, 1)  # valid frames only: (N, h, w, C)
        frames = frames.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (N, C, h, w), a view
        frames = self.trunk(self.stem_pool(self.stem_bn(frames)))
        feats = self.proj(frames.mean(dim=(2, 3)))  # (N, out_dim)
        if not padded:
            return feats.view(b, t, self.out_dim), lengths
        out = feats.new_zeros(b, t, self.out_dim)
        out[mask] = feats
        return out, lengths


class _MaskedBlock1d(_BasicBlock):
    """:class:`_BasicBlock` on ``(B, C, L)`` sequences that zeroes padding before each conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, activation: str = "relu") -> None:
        super().__init__(in_ch, out_ch, stride, dims=1, activation=activation)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, C, L)`` zero past ``lengths`` -> ``(B, C', L')`` zero past the new lengths.

        ``padded=False`` says every row is full length (then so are the outputs: nothing to mask).
        """
        lengths = conv_lengths(lengths, 3, self.stride, 1)
        y = self.act(self.bn1(self.conv1(x)))
        mask = lengths_to_mask(lengths, y.shape[-1])[:, None, :] if padded else None
        if mask is not None:
            y = y * mask
        y = self.act(self.bn2(self.conv2(y)) + self._skip(x))
        return (y * mask if mask is not None else y), lengths


class AudioResNetFrontend(nn.Module):
    """Raw 16 kHz waveform to 25 fps features with a 1-D ResNet-18.

    A stride-4 stem (kernel 80), four stages (strides 1, 2, 2, 2) and an average pool of 20
    give one output per 640 samples.

    Args:
        width: channels of the first stage (stages use ``w, 2w, 4w, 8w``; 64 is ResNet-18).
        out_dim: output feature size (a linear projection is added when ``8 * width != out_dim``).
        activation: ``"relu"`` or ``"swish"`` (:data:`ACTIVATIONS`), after the stem and in every block.

    Raises ValueError for a non-positive size or an unknown activation.
    """

    def __init__(self, width: int = 64, out_dim: int = 512, activation: str = "relu") -> None:
        super().__init__()
        _check_positive(width=width, out_dim=out_dim)
        self.activation = activation
        self.stem = nn.Sequential(nn.Conv1d(1, width, 80, 4, 38, bias=False), nn.BatchNorm1d(width),
                                  make_activation(activation))
        blocks, ch = [], width
        for i, stride in enumerate(_STAGE_STRIDES):
            out = width * 2**i
            blocks += [_MaskedBlock1d(ch, out, stride, activation), _MaskedBlock1d(out, out, 1, activation)]
            ch = out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AvgPool1d(20, 20)
        self.proj = nn.Linear(ch, out_dim) if ch != out_dim else nn.Identity()
        self.out_dim = out_dim

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            audio: ``(B, S)`` float waveform in [-1, 1] at 16 kHz.
            lengths: ``(B,)`` int64 valid samples per clip.

        Returns:
            ``(feats, lengths)``: ``(B, S // 640, out_dim)`` features (zero on padding) and
            ``(B,)`` valid frames (``samples // 640`` for multiples of 640).
        """
        _check_audio(audio, lengths, SAMPLES_PER_FRAME)
        # with every clip full length, every layer's output is too: masks are skipped (saves memory)
        padded = bool(int(lengths.min()) < audio.shape[1])
        x = (audio * lengths_to_mask(lengths, audio.shape[1]) if padded else audio)[:, None, :]
        lengths = conv_lengths(lengths, 80, 4, 38)
        x = self.stem(x)
        if padded:
            x = x * lengths_to_mask(lengths, x.shape[-1])[:, None, :]
        for block in self.blocks:
            x, lengths = block(x, lengths, padded)
        x = self.pool(x).transpose(1, 2)  # (B, T, C)
        lengths = torch.div(lengths, 20, rounding_mode="floor")
        mask = lengths_to_mask(lengths, x.shape[1])[:, :, None]
        return self.proj(x) * mask, lengths


class LogMelFrontend(nn.Module):
    """16 kHz waveform to 25 fps features through an 80-bin log-mel spectrogram.

    25 ms windows every 10 ms (4 mel frames per video frame), per-utterance mean/variance
    normalisation over valid frames, then two stride-2 Conv1d + BatchNorm + ReLU layers.

    Args:
        hidden: channels of the convolutions.
        out_dim: output feature size.
        n_mels: mel bins.
    """

    HOP = 160

    def __init__(self, hidden: int = 512, out_dim: int = 512, n_mels: int = 80) -> None:
        super().__init__()
        _check_positive(hidden=hidden, out_dim=out_dim, n_mels=n_mels)
        self.mel = MelSpectrogram(16000, n_fft=512, win_length=400, hop_length=self.HOP, n_mels=n_mels,
                                  center=True, pad_mode="constant")
        self.conv1 = nn.Sequential(nn.Conv1d(n_mels, hidden, 3, 2, 1, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, 3, 2, 1, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.proj = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``audio`` ``(B, S)`` float waveform in [-1, 1] at 16 kHz and ``(B,)`` int64 valid samples
        per clip (as :meth:`AudioResNetFrontend.forward`) -> ``(feats, lengths)``: ``(B, T, out_dim)``
        features (zero on padding) with ``T = ceil(S // 160 / 4)``, and ``(B,)`` valid frames
        (``samples // 640`` for multiples of 640)."""
        _check_audio(audio, lengths, self.HOP)
        audio = audio * lengths_to_mask(lengths, audio.shape[1])
        n = audio.shape[1] // self.HOP
        lengths = torch.div(lengths, self.HOP, rounding_mode="floor")
        mask = lengths_to_mask(lengths, n)[:, None, :]  # (B, 1, F)
        with torch.autocast(audio.device.type, enabled=False):
            x = torch.log(self.mel(audio.float())[..., :n] + 1e-6)  # (B, n_mels, F)
        count = lengths[:, None, None]
        mean = (x * mask).sum(-1, keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / count
        x = (x - mean) / (var + 1e-5).sqrt() * mask
        for conv in (self.conv1, self.conv2):
            lengths = conv_lengths(lengths, 3, 2, 1)
            x = conv(x)
            x = x * lengths_to_mask(lengths, x.shape[-1])[:, None, :]
        return self.proj(x.transpose(1, 2)) * lengths_to_mask(lengths, x.shape[-1])[:, :, None], lengths
