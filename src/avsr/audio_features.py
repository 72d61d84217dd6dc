"""Log-mel features at 100 fps and their inversion to a waveform (Griffin-Lim).

The mel spectrogram of the audio→mouth-opening model and the lip-to-speech target: both call
:func:`log_mel`, and :func:`mel_to_wave` inverts it. (The recogniser's
:class:`avsr.models.frontends.LogMelFrontend` still computes its own: 25 ms window, power
spectrogram, floor ``1e-6``; a frozen recogniser fed with this mel, as lip-to-speech content
supervision would need, sees slightly different features.) Parameters: 16 kHz audio, 40 ms Hann window (``n_fft`` 640),
10 ms hop (160 samples), centred frames with zero padding at the ends, 80 HTK mel bands over
0–8 kHz, magnitude (power 1) spectrogram, natural log with a floor of ``1e-5`` (so silence is ``log(1e-5) ≈ -11.5``). A clip of
``640 * T`` samples (``T`` video frames at 25 fps) gives exactly ``4 * T`` mel frames.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torchaudio

SAMPLE_RATE = 16000
N_FFT = 640
HOP_LENGTH = 160
N_MELS = 80
MEL_FPS = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
MEL_PER_VIDEO_FRAME = 4  # 100 fps mel / 25 fps video
LOG_FLOOR = 1e-5
LOG_FLOOR_VALUE = math.log(LOG_FLOOR)  # value of a silent (or padded) mel bin

_MEL_KW = dict(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS,
               f_min=0.0, f_max=SAMPLE_RATE / 2, power=1.0, mel_scale="htk", pad_mode="constant")
_CACHE: dict[tuple[str, torch.device], torch.nn.Module] = {}


def _cached(name: str, device: torch.device, build) -> torch.nn.Module:
    key = (name, device)
    if key not in _CACHE:
        _CACHE[key] = build().to(device)
    return _CACHE[key]


def mel_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Mel frames ``(B,)`` int64 of waveforms with ``lengths`` ``(B,)`` samples (``len // 160``)."""
    return torch.div(lengths, HOP_LENGTH, rounding_mode="floor").long()


def log_mel(wave: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel spectrogram of 16 kHz waveforms.

    Args:
        wave: ``(B, S)`` or ``(S,)`` float waveform in [-1, 1] at 16 kHz (any device).
        lengths: ``(B,)`` valid samples per row; ``None`` = all ``S``.

    Returns:
        ``(mel, mel_lengths)``: ``mel`` ``(B, S // 160, 80)`` float32 natural-log magnitude mel
        at 100 fps (frame ``i`` centred on sample ``160 * i``), frames past ``mel_lengths``
        (``lengths // 160``, int64 ``(B,)``) set to :data:`LOG_FLOOR_VALUE`. A 1-D input gives
        ``B = 1``.

    Raises:
        ValueError: when ``wave`` is not 1-D/2-D, is shorter than one hop, or ``lengths`` does
            not match its batch size or exceeds ``S``.
    """
    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    if wave.dim() != 2:
        raise ValueError(f"wave must be (B, S) or (S,), got shape {tuple(wave.shape)}")
    batch, n_samples = wave.shape
    if n_samples < HOP_LENGTH:
        raise ValueError(f"wave has {n_samples} samples, fewer than one hop ({HOP_LENGTH})")
    if lengths is None:
        lengths = torch.full((batch,), n_samples, dtype=torch.long, device=wave.device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be ({batch},), got {tuple(lengths.shape)}")
    if int(lengths.max()) > n_samples:
        raise ValueError(f"lengths reach {int(lengths.max())} samples but wave has {n_samples}")
    n_frames = n_samples // HOP_LENGTH
    # zero the padding so that it does not leak into the last valid frames' windows
    valid = torch.arange(n_samples, device=wave.device)[None, :] < lengths[:, None].to(wave.device)
    wave = wave.float() * valid
    transform = _cached("mel", wave.device, lambda: torchaudio.transforms.MelSpectrogram(**_MEL_KW))
    mel = transform(wave)[..., :n_frames]  # (B, 80, F)
    mel = torch.log(mel.clamp_min(LOG_FLOOR)).transpose(1, 2).contiguous()  # (B, F, 80)
    out_lengths = mel_lengths(lengths.to(wave.device))
    pad = torch.arange(n_frames, device=wave.device)[None, :] >= out_lengths[:, None]
    return mel.masked_fill(pad[..., None], LOG_FLOOR_VALUE), out_lengths


def framewise_mel_transform() -> torchaudio.transforms.MelSpectrogram:
    """The mel filterbank of :func:`log_mel` without its centring pad (``center=False``): frame
    ``i`` covers samples ``[160 i, 160 i + 640)`` of its input (before the log). Used by
    :class:`LogMelStream` and by the ONNX export's streaming step."""
    kw = {k: v for k, v in _MEL_KW.items() if k != "pad_mode"}
    return torchaudio.transforms.MelSpectrogram(**kw, center=False)


class LogMelStream:
    """:func:`log_mel` of one stream of audio that arrives in pieces, frame by frame.

    Frame ``i`` (centred on sample ``160 i``) is emitted as soon as samples up to ``160 i + 320``
    are in; :meth:`flush` ends the stream with the frames whose windows reach past its end (zeros
    there, as offline). Concatenated, the frames equal ``log_mel`` of the whole stream (its
    ``S // 160`` frames for ``S`` samples) to float rounding.
    """

    def __init__(self) -> None:
        self._mel = framewise_mel_transform()
        self._buf = torch.zeros(N_FFT // 2)  # the offline zero padding before the first sample
        self._offset = 0  # index of self._buf[0] in the zero-padded stream
        self._samples = 0
        self._done = 0  # frames emitted

    def _frames(self, upto: int) -> torch.Tensor:
        n = upto - self._done
        if n <= 0:
            return torch.empty(0, N_MELS)
        start = HOP_LENGTH * self._done - self._offset  # frame i's window: padded [160 i, 160 i + 640)
        chunk = self._buf[start: start + N_FFT + HOP_LENGTH * (n - 1)]
        self._done = upto
        self._buf = self._buf[start + HOP_LENGTH * n:]
        self._offset += start + HOP_LENGTH * n
        return torch.log(self._mel(chunk).clamp_min(LOG_FLOOR)).T  # (n, 80)

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """Append ``(S,)`` float samples at 16 kHz; returns the ``(n, 80)`` newly complete frames.

        Raises:
            ValueError: when ``samples`` is not 1-D.
        """
        if samples.dim() != 1:
            raise ValueError(f"samples must be (S,), got shape {tuple(samples.shape)}")
        self._buf = torch.cat([self._buf, samples.float()])
        self._samples += len(samples)
        ready = max(0, (self._samples - N_FFT // 2) // HOP_LENGTH + 1)  # frames whose window is in
        return self._frames(min(ready, self._samples // HOP_LENGTH))

    def flush(self) -> torch.Tensor:
        """The last ``(n, 80)`` frames, their windows zero-padded past the end of the stream."""
        self._buf = torch.cat([self._buf, torch.zeros(N_FFT)])
        return self._frames(self._samples // HOP_LENGTH)


def mel_to_wave(mel: torch.Tensor, n_iter: int = 64, seed: int = 0) -> torch.Tensor:
    """Waveform from a :func:`log_mel` spectrogram by least-squares mel inversion + Griffin-Lim.

    Args:
        mel: ``(B, F, 80)`` or ``(F, 80)`` natural-log magnitude mel at 100 fps.
        n_iter: Griffin-Lim iterations (torchaudio ``GriffinLim``, momentum 0.99).
        seed: seed of the random initial phase, so that a call repeats exactly.

    Returns:
        ``(B, 160 * F)`` (or ``(160 * F,)``) float32 waveform at 16 kHz, on ``mel``'s device.

    Raises:
        ValueError: when the last axis is not 80 mel bins or ``n_iter < 1``.
    """
    squeeze = mel.dim() == 2
    if squeeze:
        mel = mel.unsqueeze(0)
    if mel.dim() != 3 or mel.shape[-1] != N_MELS:
        raise ValueError(f"mel must be (B, F, {N_MELS}) or (F, {N_MELS}), got shape {tuple(mel.shape)}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    device = mel.device
    inverse = _cached("inv", device, lambda: torchaudio.transforms.InverseMelScale(
        n_stft=N_FFT // 2 + 1, n_mels=N_MELS, sample_rate=SAMPLE_RATE, f_min=0.0, f_max=SAMPLE_RATE / 2,
        mel_scale="htk"))
    magnitude = inverse(torch.exp(mel.float()).transpose(1, 2))  # (B, 321, F)
    # a centred STFT of 160 * F samples has F + 1 frames: repeat the last one
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
    griffin_lim = torchaudio.transforms.GriffinLim(
        n_fft=N_FFT, n_iter=n_iter, hop_length=HOP_LENGTH, power=1.0,
        length=HOP_LENGTH * mel.shape[1]).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        wave = griffin_lim(magnitude)
    return wave[0] if squeeze else wave
