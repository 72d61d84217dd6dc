"""Audio → face-track model of the lip sync: mouth curves and visemes at 100 fps from log-mel.

One model, three interchangeable cores (``core``), behind the same frontend and heads:

- ``"bigru"``: a bidirectional GRU (R3MOE's audio → mouth-opening model: log-mel, convolutions, a
  bidirectional recurrent layer, Huber loss). Offline.
- ``"causal_gru"``: a 2-layer unidirectional GRU that sees ``lookahead`` (0–3) mel frames of future
  context, after Cherry Lip Sync and Aneja & Li 2019 (real-time lip sync from a unidirectional LSTM
  with a short look-ahead). Streams: :class:`LipSyncStream`.
- ``"attention"``: a single self-attention layer over the speech features, after the AIWIN 2022
  speech → 37 blendshapes model. Offline.

Frontend: log-mel ``(B, F, 80)`` at 100 fps (:func:`avsr.audio_features.log_mel`), normalised per
mel bin with training statistics, then two 1-D convolutions (``kernel`` mel frames; left-padded for
the causal core, symmetric otherwise). Heads, one output per mel frame (10 ms):

- curves: ``len(curves)`` values in the units of the targets (the landmark mouth opening and the
  ARKit blendshapes of :mod:`avsr.lipsync.targets`), de-normalised with per-curve target statistics;
- visemes (when ``visemes`` names classes): logits over a viseme set (:mod:`avsr.lipsync.visemes`).

Causality of ``causal_gru``: the output of mel frame ``t`` (centred on sample ``160 t``) depends on
no mel frame after ``t + lookahead``, hence on no audio sample at or after ``160 (t + lookahead) +
320`` (the 40 ms window reaches 20 ms ahead): the look-ahead in time is ``10 lookahead + 20`` ms
(:attr:`LipSyncModel.lookahead_ms`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from avsr.audio_features import N_FFT, N_MELS, SAMPLE_RATE, LogMelStream
from avsr.models.masking import lengths_to_mask
from avsr.safe_load import safe_torch_load

CORES = ("bigru", "causal_gru", "attention")
MAX_LOOKAHEAD = 3  #: mel frames (10 ms each) of future context the causal core may see
WINDOW_AHEAD_MS = 1000.0 * (N_FFT // 2) / SAMPLE_RATE  #: 20 ms: a mel frame's window past its centre


class LipSyncModel(nn.Module):
    """Log-mel ``(B, F, 80)`` at 100 fps → curves ``(B, F, K)`` and viseme logits ``(B, F, V)``.

    Args:
        curves: names of the curve outputs, in order (``K = len(curves)``; may be empty).
        visemes: names of the viseme head's classes, in order (``V = len(visemes)``; empty: no
            viseme head).
        core: one of :data:`CORES` (see the module docstring).
        channels: width of the convolutions.
        hidden: GRU units per direction, or the attention layer's model width.
        num_layers: recurrent layers (default 1 for ``bigru``, 2 for ``causal_gru``; must be 1 for
            ``attention``).
        kernel: temporal kernel of the convolutions in core steps (odd unless causal).
        stride: mel frames per core step for the offline cores (1, 2 or 4: 100, 50 or 25 steps per
            second; ``stride`` consecutive frames are stacked, and each step's outputs are repeated
            over its frames). The causal core runs at 100 fps (stride 1).
        lookahead: mel frames of future context of ``causal_gru`` (0–3); 0 for the other cores.
        attention_heads: heads of the attention layer (must divide ``hidden``).
        dropout: after each convolution, inside the core and before the heads.
        n_mels: mel bins of the input.
        video_dim: size of per-video-frame features of the mouth (:mod:`avsr.lipsync.video`;
            0: audio only). They are projected to ``channels``, held over each video frame's
            ``4 / stride`` core steps and added to the audio features before the core. Offline
            cores only.

    Raises:
        ValueError: on an unknown core, no outputs, a non-positive size, ``dropout`` outside
            [0, 1), an even kernel for an offline core, a ``lookahead`` outside 0–3 or given to an
            offline core, ``hidden`` not divisible by ``attention_heads``, or video for the causal core.
    """

    def __init__(self, curves: Sequence[str] = ("mouth_opening",), visemes: Sequence[str] = (), core: str = "bigru",
                 channels: int = 128, hidden: int = 128, num_layers: Optional[int] = None, kernel: int = 3,
                 lookahead: int = 0, attention_heads: int = 4, dropout: float = 0.1, n_mels: int = N_MELS,
                 stride: int = 1, video_dim: int = 0) -> None:
        super().__init__()
        if core not in CORES:
            raise ValueError(f"core must be one of {', '.join(CORES)}, got '{core}'")
        num_layers = num_layers if num_layers is not None else (2 if core == "causal_gru" else 1)
        if not curves and not visemes:
            raise ValueError("the model needs curves or viseme classes")
        for name, value in (("channels", channels), ("hidden", hidden), ("num_layers", num_layers),
                            ("kernel", kernel), ("attention_heads", attention_heads), ("n_mels", n_mels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.causal = core == "causal_gru"
        if not self.causal and kernel % 2 == 0:
            raise ValueError(f"kernel must be odd for the offline core '{core}', got {kernel}")
        if not 0 <= lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"lookahead must be in 0..{MAX_LOOKAHEAD} mel frames, got {lookahead}")
        if lookahead and not self.causal:
            raise ValueError(f"lookahead applies to the causal core only, not '{core}'")
        if stride not in (1, 2, 4) or (stride > 1 and self.causal):
            raise ValueError(f"stride must be 1, 2 or 4 (1 for the causal core), got {stride} for '{core}'")
        if core == "attention" and (num_layers != 1 or hidden % attention_heads):
            raise ValueError(f"the attention core is one layer (got num_layers={num_layers}) whose width "
                             f"{hidden} must be divisible by attention_heads={attention_heads}")
        if video_dim < 0 or (video_dim and core == "causal_gru"):
            raise ValueError(f"video_dim must be >= 0 and is for the offline cores, got {video_dim} for '{core}'")
        self.curves = tuple(curves)
        self.visemes = tuple(visemes)
        self.core = core
        self.kernel = kernel
        self.lookahead = lookahead
        self.n_mels = n_mels
        self.stride = stride
        self.register_buffer("feat_mean", torch.zeros(n_mels))
        self.register_buffer("feat_std", torch.ones(n_mels))
        self.register_buffer("target_mean", torch.zeros(len(self.curves)))
        self.register_buffer("target_std", torch.ones(len(self.curves)))
        self.conv1 = nn.Conv1d(n_mels * stride, channels, kernel)
        self.conv2 = nn.Conv1d(channels, channels, kernel)
        self.video_dim = video_dim
        self.video_proj = nn.Linear(video_dim, channels) if video_dim else None
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        if core == "attention":
            self.proj = nn.Linear(channels, hidden)
            self.attention = nn.TransformerEncoderLayer(hidden, attention_heads, 2 * hidden, dropout,
                                                        activation="gelu", batch_first=True, norm_first=True)
            out_dim = hidden
        else:
            self.rnn = nn.GRU(channels, hidden, num_layers=num_layers, batch_first=True,
                              bidirectional=not self.causal, dropout=dropout if num_layers > 1 else 0.0)
            out_dim = hidden * (1 if self.causal else 2)
        self.curve_head = nn.Linear(out_dim, len(self.curves)) if self.curves else None
        self.viseme_head = nn.Linear(out_dim, len(self.visemes)) if self.visemes else None

    @property
    def lookahead_ms(self) -> float:
        """Audio after an output frame's centre that the output depends on, in ms (offline cores: ``inf``)."""
        return 10.0 * self.lookahead + WINDOW_AHEAD_MS if self.causal else math.inf

    def set_stats(self, feat_mean: torch.Tensor, feat_std: torch.Tensor, target_mean: torch.Tensor,
                  target_std: torch.Tensor) -> None:
        """Store input (per mel bin, ``(80,)``) and target (per curve, ``(K,)``) normalisation.

        Raises:
            ValueError: on a wrong shape or a non-positive standard deviation.
        """
        shapes = (feat_mean.shape, feat_std.shape, target_mean.shape, target_std.shape)
        if shapes != ((self.n_mels,),) * 2 + ((len(self.curves),),) * 2:
            raise ValueError(f"stats must be ({self.n_mels},) x2 and ({len(self.curves)},) x2, got {shapes}")
        if not (bool((feat_std > 0).all()) and bool((target_std > 0).all())):
            raise ValueError("standard deviations must be positive")
        for buf, value in ((self.feat_mean, feat_mean), (self.feat_std, feat_std),
                           (self.target_mean, target_mean), (self.target_std, target_std)):
            buf.copy_(value)

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel - 1, 0) if self.causal else ((self.kernel - 1) // 2,) * 2
        return self.dropout(self.act(conv(nn.functional.pad(x, pad)))) * mask

    def _heads(self, h: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        h = self.dropout(h)
        curves = None if self.curve_head is None else self.curve_head(h) * self.target_std + self.target_mean
        visemes = None if self.viseme_head is None else self.viseme_head(h)
        return {"curves": curves, "visemes": visemes}

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor,
                video: Optional[torch.Tensor] = None) -> dict[str, Optional[torch.Tensor]]:
        """Predict the face track.

        Args:
            mel: ``(B, F, 80)`` float32 log-mel at 100 fps.
            mel_lengths: ``(B,)`` int64 valid frames.
            video: ``(B, T, video_dim)`` float32 mouth features at 25 fps (video frame ``t`` spans
                mel frames ``4t .. 4t + 3``; frames past ``F / 4`` are ignored, missing ones are
                zero); required when ``video_dim > 0``, refused otherwise.

        Returns:
            ``{"curves": (B, F, K) float32 or None, "visemes": (B, F, V) logits or None,
            "lengths": (B,) int64}``; values past ``lengths`` are not meaningful.

        Raises:
            ValueError: when ``mel`` is not ``(B, F, n_mels)`` with ``F >= 1``, or ``video`` is
                missing, not ``(B, T, video_dim)``, or given to an audio-only model.
        """
        if mel.dim() != 3 or mel.shape[-1] != self.n_mels or mel.shape[1] < 1:
            raise ValueError(f"mel must be (B, F>=1, {self.n_mels}), got shape {tuple(mel.shape)}")
        if (video is None) != (self.video_proj is None) or (
                video is not None and (video.dim() != 3 or video.shape[0] != mel.shape[0] or video.shape[2] != self.video_dim)):
            raise ValueError(f"this model takes video (B, T, {self.video_dim}) features" if self.video_dim else
                             "this model is audio-only: it takes no video")
        n, batch = mel.shape[1], mel.shape[0]
        lengths = mel_lengths.clamp(1, n)
        x = (mel - self.feat_mean) / self.feat_std * lengths_to_mask(lengths, n)[..., None]
        steps, n_steps = lengths, n
        if self.stride > 1:  # stack `stride` frames per step (zeros past the end)
            n_steps = -(-n // self.stride)
            x = nn.functional.pad(x, (0, 0, 0, n_steps * self.stride - n)).reshape(batch, n_steps, -1)
            steps = torch.div(lengths + self.stride - 1, self.stride, rounding_mode="floor")
        mask = lengths_to_mask(steps, n_steps)
        x = self._conv(self.conv2, self._conv(self.conv1, x.transpose(1, 2), mask[:, None]), mask[:, None]).transpose(1, 2)
        if video is not None:  # one video frame per 4 / stride steps
            v = self.video_proj(video).repeat_interleave(4 // self.stride, dim=1)[:, :n_steps]
            x = x + nn.functional.pad(v, (0, 0, 0, n_steps - v.shape[1])) * mask[..., None]
        if self.core == "attention":
            h = self.proj(x) + _sinusoid(n_steps, self.proj.out_features, x.device)
            h = self.attention(h, src_key_padding_mask=~mask)
        elif self.causal:  # output t is read at step t + lookahead (zero inputs past the end)
            h = self.rnn(nn.functional.pad(x, (0, 0, 0, self.lookahead)))[0][:, self.lookahead:]
        else:
            packed = pack_padded_sequence(x, steps.cpu(), batch_first=True, enforce_sorted=False)
            h = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=n_steps)[0]
        out = self._heads(h)
        if self.stride > 1:
            out = {k: None if v is None else v.repeat_interleave(self.stride, dim=1)[:, :n] for k, v in out.items()}
        return {**out, "lengths": lengths}


def _sinusoid(n: int, dim: int, device: torch.device) -> torch.Tensor:
    """``(n, dim)`` sinusoidal position table (Vaswani et al. 2017)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class LipSyncStep(nn.Module):
    """One hop of the ``causal_gru`` core as a function of its state: what the streaming runtime
    calls and what ONNX export traces (``avsr export --part lipsync``).

    ``forward(mel, conv1_state, conv2_state, gru_state)`` takes ``mel`` ``(1, n, 80)``, the next
    ``n >= 1`` log-mel frames (:func:`avsr.audio_features.log_mel`: 16 kHz, 40 ms Hann window, 10
    ms hop, 80 HTK mel bands, natural log of the magnitude clamped at 1e-5), and the state of
    :meth:`initial_state`; it returns ``(curves (1, n, K), visemes (1, n, V) logits, conv1_state,
    conv2_state, gru_state)``. Step ``j``'s outputs belong to frame ``j - lookahead``: a caller
    drops the first ``lookahead`` outputs of a stream and, at its end, feeds ``lookahead`` steps of
    :meth:`tail` input. ``K`` or ``V`` may be 0 (no such head).

    Raises:
        ValueError: when the model's core is not causal.
    """

    def __init__(self, model: LipSyncModel) -> None:
        super().__init__()
        if not model.causal:
            raise ValueError(f"streaming needs the causal core (causal_gru), not '{model.core}'")
        self.model = model.eval()

    def initial_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(conv1_state (1, 80, k-1), conv2_state (1, C, k-1), gru_state (layers, 1, H))``: zeros."""
        m, k = self.model, self.model.kernel - 1
        return (torch.zeros(1, m.conv1.in_channels, k), torch.zeros(1, m.conv2.in_channels, k),
                torch.zeros(m.rnn.num_layers, 1, m.rnn.hidden_size))

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([state, x], dim=-1)
        return self.model.act(conv(x)), x[..., x.shape[-1] - state.shape[-1]:]

    def _out(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model._heads(h)
        empty = h.new_zeros(h.shape[0], h.shape[1], 0)
        return (empty if out["curves"] is None else out["curves"]), (empty if out["visemes"] is None else out["visemes"])

    def forward(self, mel: torch.Tensor, conv1_state: torch.Tensor, conv2_state: torch.Tensor,
                gru_state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        x = ((mel - m.feat_mean) / m.feat_std).transpose(1, 2)
        x, conv1_state = self._conv(m.conv1, x, conv1_state)
        x, conv2_state = self._conv(m.conv2, x, conv2_state)
        h, gru_state = m.rnn(x.transpose(1, 2), gru_state)
        return (*self._out(h), conv1_state, conv2_state, gru_state)

    def tail(self, h_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``lookahead`` last outputs of a stream: the core's steps on the zero inputs past
        its end, as offline. Returns ``(curves, visemes, gru_state)``."""
        m = self.model
        h, h_state = m.rnn(h_state.new_zeros(1, m.lookahead, m.conv2.out_channels), h_state)
        return (*self._out(h), h_state)


class LipSyncStream:
    """Streaming inference of a ``causal_gru`` :class:`LipSyncModel`: audio in, face-track frames out.

    :meth:`push` takes audio in hops of any size (for example 160 samples, 10 ms) and returns the
    output frames that became final; :meth:`flush` ends the stream. Output frame ``t`` is emitted
    once audio up to sample ``160 (t + lookahead) + 320`` has arrived: a latency of
    ``model.lookahead_ms`` beyond the frame plus the compute of one hop. Concatenated over a stream,
    the outputs equal :meth:`LipSyncModel.forward` of the whole audio (eval mode) to float rounding.

    Raises:
        ValueError: when the model's core is not causal.
    """

    def __init__(self, model: LipSyncModel) -> None:
        self.step = LipSyncStep(model)
        self.mel = LogMelStream()
        self._state = list(self.step.initial_state())
        self._skip = model.lookahead

    def _emit(self, curves: torch.Tensor, visemes: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        drop = min(self._skip, curves.shape[1])
        self._skip -= drop
        m = self.step.model
        return {"curves": curves[0, drop:] if m.curves else None, "visemes": visemes[0, drop:] if m.visemes else None}

    @torch.no_grad()
    def push_mel(self, mel: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        """Feed the next ``(n, 80)`` log-mel frames; returns ``{"curves": (n', K), "visemes": (n', V)}``
        (``None`` for a head the model lacks)."""
        m = self.step.model
        if mel.dim() != 2 or mel.shape[-1] != m.n_mels:
            raise ValueError(f"mel must be (n, {m.n_mels}), got shape {tuple(mel.shape)}")
        if not len(mel):
            return self._emit(*self.step._out(mel.new_zeros(1, 0, m.rnn.hidden_size)))
        curves, visemes, *self._state = self.step(mel[None], *self._state)
        return self._emit(curves, visemes)

    def push(self, samples: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        """Feed ``(S,)`` float samples at 16 kHz; returns the newly final frames as :meth:`push_mel`."""
        return self.push_mel(self.mel.push(samples))

    @torch.no_grad()
    def flush(self) -> dict[str, Optional[torch.Tensor]]:
        """End the stream: the remaining frames (the audio after the end is silence)."""
        out = [self.push_mel(self.mel.flush())]
        if self.step.model.lookahead:
            curves, visemes, self._state[2] = self.step.tail(self._state[2])
            out.append(self._emit(curves, visemes))
        return {k: None if out[0][k] is None else torch.cat([o[k] for o in out]) for k in out[0]}


def to_video_rate(x: torch.Tensor, n_video: Optional[int] = None) -> torch.Tensor:
    """``(F, ...)`` per-mel-frame outputs → ``(F // 4, ...)`` per 25 fps video frame (mean of its 4
    mel frames), cut to ``n_video`` frames when given."""
    n = x.shape[0] // 4 if n_video is None else min(n_video, x.shape[0] // 4)
    return x[: 4 * n].reshape(n, 4, *x.shape[1:]).mean(1)


def save_lipsync_model(path, model: LipSyncModel, model_args: dict, extra: Optional[dict] = None) -> None:
    """Write ``{"kind": "lipsync", "model", "model_args", **extra}`` atomically (read by :func:`load_lipsync_model`)."""
    from avsr.utils import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"kind": "lipsync", "model": model.state_dict(), "model_args": dict(model_args),
                    **(extra or {})}, tmp)


def load_lipsync_model(path, map_location: str | torch.device = "cpu") -> tuple[LipSyncModel, dict]:
    """``(model in eval mode, checkpoint)`` saved by :func:`save_lipsync_model`.

    Raises:
        ValueError: when the file is not a lip-sync checkpoint (naming the file).
    """
    ckpt = safe_torch_load(path, "a lip-sync checkpoint", ValueError, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "lipsync" or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a lip-sync checkpoint (needs kind 'lipsync', 'model' and 'model_args')")
    model = LipSyncModel(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
