"""Stand-alone audio → mouth-opening model (the R3MOE task: drive a character's mouth from speech).

Log-mel (100 fps, :mod:`avsr.audio_features`) → 4 mel frames stacked per 25 fps video frame →
two 1-D convolutions → GRU/LSTM → one value per video frame, in the units of the landmark target
(inner-lip gap / mouth width). After R3MOE (log-mel 80 → conv + BiLSTM, Huber loss).

Two variants:

- ``causal=False``: bidirectional recurrent layer, symmetric convolutions (offline use).
- ``causal=True``: unidirectional recurrent layer and left-padded convolutions, with ``lookahead``
  (0–3) video frames of future context, as in real-time lip sync (Aneja & Li 2019). The mel input
  is delayed by one mel frame so that the output for video frame ``t`` depends on no audio sample
  at or after ``640 * (t + 1 + lookahead)`` (the end of frame ``t + lookahead``), STFT window
  included. :meth:`AudioMouthOpening.stream` runs it on mel frames as they arrive (state carried
  between calls) and gives the offline curve exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from avsr.audio_features import LOG_FLOOR_VALUE, MEL_PER_VIDEO_FRAME, N_MELS
from avsr.models.masking import lengths_to_mask
from avsr.safe_load import safe_torch_load

MAX_LOOKAHEAD = 3


class AudioMouthOpening(nn.Module):
    """Log-mel ``(B, 4T, 80)`` → mouth opening ``(B, T)`` at 25 fps.

    Args:
        n_mels: mel bins of the input (80).
        channels: width of the convolutions.
        hidden: recurrent units per direction.
        rnn: ``"gru"`` or ``"lstm"``.
        num_layers: recurrent layers.
        kernel: temporal kernel of the convolutions, in video frames (odd for ``causal=False``).
        dropout: dropout after each convolution and before the output layer.
        causal: unidirectional streaming variant (see the module docstring).
        lookahead: future video frames the causal variant may see (0–3); must be 0 when not causal.

    Raises:
        ValueError: on a non-positive size, an unknown ``rnn``, ``dropout`` outside [0, 1), an even
            ``kernel`` for the bidirectional variant, or a ``lookahead`` outside 0–3 (or non-zero
            without ``causal``).
    """

    def __init__(self, n_mels: int = N_MELS, channels: int = 64, hidden: int = 64, rnn: str = "gru",
                 num_layers: int = 1, kernel: int = 3, dropout: float = 0.1, causal: bool = False,
                 lookahead: int = 0) -> None:
        super().__init__()
        for name, value in (("n_mels", n_mels), ("channels", channels), ("hidden", hidden),
                            ("num_layers", num_layers), ("kernel", kernel)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if rnn not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got '{rnn}'")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not causal and kernel % 2 == 0:
            raise ValueError(f"kernel must be odd for the bidirectional model, got {kernel}")
        if not 0 <= lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"lookahead must be in 0..{MAX_LOOKAHEAD} frames, got {lookahead}")
        if lookahead and not causal:
            raise ValueError("lookahead applies to the causal model only (causal=True)")
        self.n_mels = n_mels
        self.causal = causal
        self.lookahead = lookahead
        self.kernel = kernel
        self.register_buffer("feat_mean", torch.zeros(n_mels))
        self.register_buffer("feat_std", torch.ones(n_mels))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.conv1 = nn.Conv1d(n_mels * MEL_PER_VIDEO_FRAME, channels, kernel)
        self.conv2 = nn.Conv1d(channels, channels, kernel)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        rnn_cls = nn.GRU if rnn == "gru" else nn.LSTM
        self.rnn = rnn_cls(channels, hidden, num_layers=num_layers, batch_first=True,
                           bidirectional=not causal, dropout=dropout if num_layers > 1 else 0.0)
        self.out = nn.Linear(hidden * (1 if causal else 2), 1)

    def set_stats(self, feat_mean: torch.Tensor, feat_std: torch.Tensor, target_mean: float,
                  target_std: float) -> None:
        """Store input (per mel bin, ``(80,)``) and target normalisation, taken from training data."""
        if feat_mean.shape != (self.n_mels,) or feat_std.shape != (self.n_mels,):
            raise ValueError(f"feature stats must be ({self.n_mels},), got {tuple(feat_mean.shape)}, "
                             f"{tuple(feat_std.shape)}")
        if not (target_std > 0 and bool((feat_std > 0).all())):
            raise ValueError("standard deviations must be positive")
        self.feat_mean.copy_(feat_mean)
        self.feat_std.copy_(feat_std)
        self.target_mean.fill_(float(target_mean))
        self.target_std.fill_(float(target_std))

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel - 1, 0) if self.causal else ((self.kernel - 1) // 2,) * 2
        return self.dropout(self.act(conv(nn.functional.pad(x, pad)))) * mask

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the mouth-opening curve.

        Args:
            mel: ``(B, F, 80)`` float32 log-mel at 100 fps from :func:`avsr.audio_features.log_mel`.
            mel_lengths: ``(B,)`` int64 valid mel frames.

        Returns:
            ``(curve, lengths)``: ``curve`` ``(B, F // 4)`` float32 mouth opening per 25 fps frame
            (0 past ``lengths``), ``lengths`` ``(B,)`` int64 = ``mel_lengths // 4``.

        Raises:
            ValueError: when ``mel`` is not ``(B, F, n_mels)`` with ``F >= 4``.
        """
        if mel.dim() != 3 or mel.shape[-1] != self.n_mels or mel.shape[1] < MEL_PER_VIDEO_FRAME:
            raise ValueError(f"mel must be (B, F>=4, {self.n_mels}), got shape {tuple(mel.shape)}")
        batch, n_mel = mel.shape[:2]
        if self.causal:  # delay by one mel frame: frame t then ends exactly at sample 640 (t + 1)
            floor = mel.new_full((batch, 1, self.n_mels), LOG_FLOOR_VALUE)
            mel = torch.cat([floor, mel[:, :-1]], dim=1)
        n_frames = n_mel // MEL_PER_VIDEO_FRAME
        lengths = torch.div(mel_lengths, MEL_PER_VIDEO_FRAME, rounding_mode="floor").clamp_min(1)
        x = (mel[:, : n_frames * MEL_PER_VIDEO_FRAME] - self.feat_mean) / self.feat_std
        x = x.reshape(batch, n_frames, MEL_PER_VIDEO_FRAME * self.n_mels).transpose(1, 2)
        if self.lookahead:  # see `lookahead` frames ahead: frame t is read from step t + lookahead
            x = nn.functional.pad(x, (0, self.lookahead))
        mask = lengths_to_mask(lengths, x.shape[-1])[:, None, :]  # (B, 1, T'): padding stays zero
        x = self._conv(self.conv2, self._conv(self.conv1, x * mask, mask), mask).transpose(1, 2)  # (B, T', C)
        if self.causal:
            h, _ = self.rnn(x)
            h = h[:, self.lookahead:]
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=n_frames)
        y = self.out(self.dropout(h)).squeeze(-1) * self.target_std + self.target_mean
        return y * lengths_to_mask(lengths, n_frames), lengths

    # -- streaming (causal model only) --------------------------------------------------------------

    def init_stream(self) -> dict:
        """State of a new stream for :meth:`stream` (causal model only; raises ValueError otherwise)."""
        if not self.causal:
            raise ValueError("streaming needs the causal model (causal=True)")
        p = next(self.parameters())
        k = self.kernel - 1
        return {"last_mel": p.new_full((1, self.n_mels), LOG_FLOOR_VALUE), "pending": p.new_zeros((0, self.n_mels)),
                "in1": p.new_zeros((1, self.conv1.in_channels, k)), "in2": p.new_zeros((1, self.conv2.in_channels, k)),
                "h": None, "skip": self.lookahead}

    def _stream_frames(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """Run ``x`` ``(1, C, n)`` GRU inputs through the recurrent layer, dropping the look-ahead lag."""
        h, state["h"] = self.rnn(x.transpose(1, 2), state["h"])
        drop = min(state["skip"], h.shape[1])
        state["skip"] -= drop
        y = self.out(h[:, drop:]).squeeze(-1) * self.target_std + self.target_mean
        return y[0]

    @torch.no_grad()
    def stream(self, mel: torch.Tensor, state: dict) -> torch.Tensor:
        """Feed the next log-mel frames of one stream; returns the newly final curve values.

        Args:
            mel: ``(F, 80)`` next mel frames (any ``F >= 0``; frame ``i`` of the stream is
                :func:`avsr.audio_features.log_mel` frame ``i``, available once audio up to
                sample ``160 i + 320`` has arrived).
            state: from :meth:`init_stream`, updated in place.

        Returns:
            ``(n,)`` float mouth opening of the next ``n`` video frames. Concatenated over a stream
            and :meth:`flush`, they equal :meth:`forward` of the whole stream (eval mode). Frame
            ``t`` is emitted once mel frames up to ``4 (t + 1 + lookahead) - 2`` are in.
        """
        if mel.dim() != 2 or mel.shape[-1] != self.n_mels:
            raise ValueError(f"mel must be (F, {self.n_mels}), got shape {tuple(mel.shape)}")
        delayed = torch.cat([state["last_mel"], mel])  # the causal model's one-frame delay
        state["last_mel"] = delayed[-1:]
        pending = torch.cat([state["pending"], delayed[:-1]])
        n = pending.shape[0] // MEL_PER_VIDEO_FRAME
        state["pending"] = pending[n * MEL_PER_VIDEO_FRAME:]
        if n == 0:
            return mel.new_zeros(0)
        x = (pending[: n * MEL_PER_VIDEO_FRAME] - self.feat_mean) / self.feat_std
        x = x.reshape(1, n, MEL_PER_VIDEO_FRAME * self.n_mels).transpose(1, 2)
        for conv, key in ((self.conv1, "in1"), (self.conv2, "in2")):
            x = torch.cat([state[key], x], dim=-1)
            state[key] = x[..., x.shape[-1] - (self.kernel - 1):]
            x = self.act(conv(x))
        return self._stream_frames(x, state)

    @torch.no_grad()
    def flush(self, state: dict) -> torch.Tensor:
        """End a stream: the last ``lookahead`` curve values (the audio after the end is silence)."""
        if self.lookahead == 0:
            return state["last_mel"].new_zeros(0)
        x = state["last_mel"].new_zeros((1, self.conv2.out_channels, self.lookahead))
        return self._stream_frames(x, state)


def build_mouth_model(**kwargs) -> AudioMouthOpening:
    """:class:`AudioMouthOpening` from keyword arguments (as stored in a checkpoint's ``model_args``)."""
    return AudioMouthOpening(**kwargs)


def load_mouth_model(path: str, map_location: str | torch.device = "cpu") -> AudioMouthOpening:
    """Model saved by ``scripts/train_mouth_opening.py`` (checkpoint keys ``model``, ``model_args``), in eval mode.

    Raises:
        ValueError: when the file is not such a checkpoint (naming the file).
    """
    ckpt = safe_torch_load(path, "a mouth-opening checkpoint", ValueError, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a mouth-opening checkpoint (needs keys 'model' and 'model_args')")
    model = build_mouth_model(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """``exp(-5 (1 - x)^2)`` with ``x = step / rampup_steps`` clipped to [0, 1] (Tarvainen & Valpola 2017)."""
    if rampup_steps <= 0:
        return 1.0
    x = min(max(step / rampup_steps, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - x) ** 2)
