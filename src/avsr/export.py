"""Export the frontends and the encoder of a checkpoint to TorchScript or ONNX, checked against eager mode.

A part (:func:`avsr.models.load_encoder`) is wrapped so that it takes and returns tensors only:

=====================  ==============================================  ================================
part                   inputs                                           outputs
=====================  ==============================================  ================================
``visual_frontend``    ``video`` (B, T, 1, 88, 88) float32 normalised,   ``feats`` (B, T, frontend_dim),
                       ``video_lengths`` (B,) int64                     ``lengths`` (B,) int64
``audio_frontend``     ``audio`` (B, 640 T) float32 16 kHz,             ``feats`` (B, T, frontend_dim),
                       ``audio_lengths`` (B,) int64 samples             ``lengths`` (B,) int64 frames
``encoder``            the inputs of the checkpoint's mode, in the      ``enc`` (B, T, d_model),
                       order video, video_lengths, audio, audio_lengths ``enc_lengths`` (B,) int64
=====================  ==============================================  ================================

Everything is at 25 fps; batch and time axes are dynamic in both formats.

``lipsync`` (a checkpoint of ``scripts/train_lipsync.py`` with the causal core) exports one hop
of the streaming lip-sync model with its log-mel inside the graph, :class:`LipSyncAudioStep`, so
that a game engine (Unity, Unreal, Godot) can stream raw audio into it: inputs ``audio`` (1, 160 n)
float32 at 16 kHz (``n`` dynamic: any whole number of 10 ms hops), ``audio_state`` (1, 480),
``conv1_state``, ``conv2_state``, ``gru_state``; outputs ``curves`` (1, n, K), ``visemes`` (1, n,
V) logits and the four new states (``*_out``). It is checked hop by hop (hops of 10 to 160 ms,
state carried) against the PyTorch stream (:class:`avsr.lipsync.model.LipSyncStream`).

- TorchScript: :func:`torch.jit.trace` (load with ``torch.jit.load``).
- ONNX: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17); the
  ``torch.export``-based one cannot trace the models' input checks (``int(lengths.max())``).
  ``torch.stft`` (complex) does not export there, so the log-mel frontend's mel spectrogram is
  swapped for the same transform as a convolution over a DFT basis (:class:`DFTMelSpectrogram`).
  Run with onnxruntime.

The model's shape checks turn into constants while tracing (they are validation, not computation),
so the exporter is checked on inputs of another batch size, length and padding than it was traced
with: :func:`export_part` raises :class:`ExportError` unless the exported part reproduces eager mode
within ``atol`` and gives the same lengths.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchaudio.transforms import MelSpectrogram

from avsr.models import load_encoder
from avsr.models.avsr import ENCODER_PARTS
from avsr.utils import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17
SAMPLES_PER_FRAME = 640
CROP = 88
_DYNAMIC = {"video": {0: "batch", 1: "frames"}, "audio": {0: "batch", 1: "samples"},
            "video_lengths": {0: "batch"}, "audio_lengths": {0: "batch"}}


class ExportError(RuntimeError):
    """Export failed, a needed package is missing, or the exported part differs from eager mode."""


def part_inputs(part: str, module: nn.Module) -> tuple[str, ...]:
    """Input names of ``part`` (``module`` as given by ``load_encoder``), in call order."""
    if part == "visual_frontend":
        return ("video", "video_lengths")
    if part == "audio_frontend":
        return ("audio", "audio_lengths")
    if part == "encoder":
        names: tuple[str, ...] = ()
        if module.uses_video:
            names += ("video", "video_lengths")
        if module.uses_audio:
            names += ("audio", "audio_lengths")
        return names
    raise ValueError(f"part must be one of {', '.join(ENCODER_PARTS)}, got '{part}'")


def part_outputs(part: str) -> tuple[str, str]:
    """Output names of ``part``."""
    return ("enc", "enc_lengths") if part == "encoder" else ("feats", "lengths")


class DFTMelSpectrogram(nn.Module):
    """A :class:`torchaudio.transforms.MelSpectrogram` computed with a strided convolution over a
    fixed (windowed) DFT basis instead of ``torch.stft``, which the TorchScript-based ONNX exporter
    cannot export (complex tensors). Same parameters and output ``(B, n_mels, frames)``; used only
    for ONNX export, where :func:`check_export` compares it against the original.

    Raises:
        ValueError: for settings it does not reproduce (``normalized``, two-sided, extra padding,
            power other than 1 or 2).
    """

    def __init__(self, mel: MelSpectrogram) -> None:
        super().__init__()
        spec = mel.spectrogram
        if spec.normalized or not spec.onesided or spec.pad or spec.power not in (1.0, 2.0):
            raise ValueError("DFTMelSpectrogram supports one-sided, unnormalised power-1/2 spectrograms without padding")
        n_fft, win = spec.n_fft, spec.win_length
        window = torch.zeros(n_fft, dtype=torch.float64)
        left = (n_fft - win) // 2  # torch.stft centres a shorter window in the frame
        window[left: left + win] = spec.window.double()
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * k * torch.arange(n_fft, dtype=torch.float64)[None] / n_fft
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # (2 F, n_fft)
        self.register_buffer("basis", basis.float()[:, None, :])
        self.register_buffer("fb", mel.mel_scale.fb.float())  # (F, n_mels)
        self.n_fft, self.hop, self.power = n_fft, spec.hop_length, spec.power
        self.center, self.pad_mode = spec.center, spec.pad_mode

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave[:, None, :]
        if self.center:
            x = F.pad(x, (self.n_fft // 2, self.n_fft // 2), mode=self.pad_mode)
        re_im = F.conv1d(x, self.basis, stride=self.hop)  # (B, 2 F, frames)
        re, im = re_im.chunk(2, dim=1)
        spec = re * re + im * im
        if self.power == 1.0:
            spec = spec.sqrt()
        return torch.matmul(spec.transpose(1, 2), self.fb).transpose(1, 2)


def _identity_symbolic(g, x, memory_format):
    """ONNX symbolic of ``aten::contiguous``: the tensor itself (ONNX tensors have no layout)."""
    return x


def onnx_friendly(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``MelSpectrogram`` replaced by a :class:`DFTMelSpectrogram`."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, MelSpectrogram):
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], DFTMelSpectrogram(child))
    return module


class ExportablePart(nn.Module):
    """A frontend or the encoder with a tensors-only ``forward(*inputs) -> (features, lengths)``
    (inputs named by :func:`part_inputs`)."""

    def __init__(self, module: nn.Module, part: str) -> None:
        super().__init__()
        self.part = part
        self.input_names = part_inputs(part, module)
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.part != "encoder":
            return self.module(*inputs)
        named = dict(zip(self.input_names, inputs))
        return self.module(named.get("video"), named.get("video_lengths"), named.get("audio"),
                           named.get("audio_lengths"))


def example_inputs(names: Sequence[str], lengths: Sequence[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs for the given input ``names``: a batch of clips of ``lengths`` frames (padded)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    frames = torch.tensor(list(lengths), dtype=torch.int64)
    values = {
        "video": torch.randn(b, t, 1, CROP, CROP, generator=g),
        "video_lengths": frames,
        "audio": 0.1 * torch.randn(b, SAMPLES_PER_FRAME * t, generator=g),
        "audio_lengths": frames * SAMPLES_PER_FRAME,
    }
    return tuple(values[n] for n in names)


@dataclass(frozen=True)
class ExportReport:
    """Where a part went, and how far it is from eager mode on the check inputs."""

    part: str
    format: str
    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    max_abs_diff: float


def _ignore_tracer_notes() -> None:
    """Silence, inside ``catch_warnings``, the tracer's notes about shape checks becoming constants
    (see the module docstring), the ONNX constant-folding notes, and the deprecation notes of
    ``torch.jit`` and of the TorchScript-based ONNX exporter (both still work in torch 2.14; moving
    to ``torch.export`` needs export-friendly shape checks in the models)."""
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Constant folding", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*", category=DeprecationWarning)


def export_module(wrapper: ExportablePart, fmt: str, path: str | Path,
                  trace_lengths: Sequence[int] = (12, 9)) -> Path:
    """Trace ``wrapper`` on example inputs of ``trace_lengths`` frames and write it to ``path`` (atomically).

    Raises:
        ValueError: for an unknown ``fmt``.
        ExportError: when ONNX export is asked for without the ``onnx`` package.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    wrapper.eval()
    example = example_inputs(wrapper.input_names, trace_lengths)
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        _ignore_tracer_notes()
        if fmt == "torchscript":
            torch.jit.trace(wrapper, example, check_trace=False).save(str(tmp))
        else:
            outputs = part_outputs(wrapper.part)
            axes = {n: _DYNAMIC[n] for n in wrapper.input_names}
            axes.update({outputs[0]: {0: "batch", 1: "frames"}, outputs[1]: {0: "batch"}})
            # memory formats (channels-last, a CPU speed-up of the frontends) are a layout hint with
            # no meaning in ONNX, whose exporter rejects channels_last_3d: export contiguous() as identity
            torch.onnx.register_custom_op_symbolic("aten::contiguous", _identity_symbolic, ONNX_OPSET)
            try:
                torch.onnx.export(onnx_friendly(wrapper), example, str(tmp), dynamo=False,
                                  opset_version=ONNX_OPSET, input_names=list(wrapper.input_names),
                                  output_names=list(outputs), dynamic_axes=axes)
            except (torch.onnx.OnnxExporterError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"ONNX export of {wrapper.part} failed: {first}") from None
            finally:
                torch.onnx.unregister_custom_op_symbolic("aten::contiguous", ONNX_OPSET)
    return path


def run_exported(fmt: str, path: str | Path, names: Sequence[str],
                 inputs: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported part (TorchScript with torch, ONNX with onnxruntime): ``(features, lengths)``.

    Raises:
        ExportError: for ONNX without ``onnxruntime`` installed.
    """
    if fmt == "torchscript":
        with warnings.catch_warnings():
            _ignore_tracer_notes()
            module = torch.jit.load(str(path))
        with torch.no_grad():
            feats, lengths = module(*inputs)
        return feats.numpy(), lengths.numpy()
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("running ONNX exports needs onnxruntime (pip install onnxruntime)") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feats, lengths = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
    return feats, lengths


def check_export(wrapper: ExportablePart, fmt: str, path: str | Path,
                 check_lengths: Sequence[int] = (20, 14, 5)) -> float:
    """Largest ``|exported - eager|`` over the valid frames of check inputs of ``check_lengths`` frames.

    Raises:
        ExportError: when the exported part returns other lengths or shapes than eager mode.
    """
    inputs = example_inputs(wrapper.input_names, check_lengths, seed=1)
    with torch.no_grad():
        ref, ref_lengths = wrapper.eval()(*inputs)
    feats, lengths = run_exported(fmt, path, wrapper.input_names, inputs)
    if feats.shape != tuple(ref.shape) or not np.array_equal(lengths, ref_lengths.numpy()):
        raise ExportError(f"{path}: exported {wrapper.part} gives shape {feats.shape} lengths {lengths.tolist()}, "
                          f"eager {tuple(ref.shape)} {ref_lengths.tolist()}")
    diff = 0.0
    for b, n in enumerate(ref_lengths.tolist()):
        diff = max(diff, float(np.abs(feats[b, :n] - ref[b, :n].numpy()).max()))
    return diff


LIPSYNC_PART = "lipsync"
LIPSYNC_INPUTS = ("audio", "audio_state", "conv1_state", "conv2_state", "gru_state")
LIPSYNC_OUTPUTS = ("curves", "visemes", "audio_state_out", "conv1_state_out", "conv2_state_out", "gru_state_out")
LIPSYNC_CHECK_HOPS = (1, 3, 16, 2, 1, 10, 4)  # 10 ms hops per call in the check


class LipSyncAudioStep(nn.Module):
    """One hop of the causal lip-sync core from raw audio: the streaming log-mel
    (:class:`avsr.audio_features.LogMelStream`) as a convolution over a DFT basis
    (:class:`DFTMelSpectrogram`), then :class:`avsr.lipsync.model.LipSyncStep`; what ``avsr export
    --part lipsync`` writes.

    ``forward(audio, audio_state, conv1_state, conv2_state, gru_state)`` takes ``audio`` ``(1, 160
    n)`` float32 at 16 kHz, the next ``n >= 1`` hops of 10 ms, and returns ``(curves (1, n, K),
    visemes (1, n, V), audio_state, conv1_state, conv2_state, gru_state)``. ``audio_state`` ``(1,
    480)`` holds the last 30 ms of audio (the 40 ms windows of the next frames reach back that far).
    A stream starts from :meth:`initial_state`, whose audio state is 320 zeros (the offline padding
    before the first sample) followed by the stream's first 160 samples: no frame is complete after
    10 ms. From then on, the call that completes samples up to ``160 t + 320`` returns mel frame
    ``t``, as :class:`~avsr.audio_features.LogMelStream` does; the core's outputs lag the frames by
    ``lookahead`` steps (:class:`~avsr.lipsync.model.LipSyncStep`).

    Raises:
        ValueError: when the model's core is not causal.
    """

    def __init__(self, model: nn.Module) -> None:
        from avsr.audio_features import LOG_FLOOR, framewise_mel_transform
        from avsr.lipsync.model import LipSyncStep

        super().__init__()
        self.step = LipSyncStep(model)
        self.mel = DFTMelSpectrogram(framewise_mel_transform())
        self.floor = LOG_FLOOR
        self.context = self.mel.n_fft - self.mel.hop  # 480 samples

    def initial_state(self, first_hop: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(audio_state (1, 480), conv1_state, conv2_state, gru_state)`` for a stream whose first
        160 samples are ``first_hop`` ``(160,)``.

        Raises:
            ValueError: when ``first_hop`` is not 160 samples.
        """
        if first_hop.shape != (self.mel.hop,):
            raise ValueError(f"first_hop must be ({self.mel.hop},) samples, got shape {tuple(first_hop.shape)}")
        audio = torch.cat([torch.zeros(self.mel.n_fft // 2), first_hop.float()])[None]
        return (audio, *self.step.initial_state())

    def forward(self, audio: torch.Tensor, audio_state: torch.Tensor, conv1_state: torch.Tensor,
                conv2_state: torch.Tensor, gru_state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        buf = torch.cat([audio_state, audio], dim=1)
        mel = torch.log(self.mel(buf).clamp_min(self.floor)).transpose(1, 2)  # (1, n, 80)
        curves, visemes, *state = self.step(mel, conv1_state, conv2_state, gru_state)
        return (curves, visemes, buf[:, -self.context:], *state)


def _run_step(fmt: str, path: Path):
    """A callable ``(audio, *state) -> outputs`` (numpy) of an exported lip-sync step."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            _ignore_tracer_notes()
            module = torch.jit.load(str(path))

        def run(*x: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                return [t.numpy() for t in module(*(torch.from_numpy(a) for a in x))]
        return run
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("running ONNX exports needs onnxruntime (pip install onnxruntime)") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda *x: session.run(None, dict(zip(LIPSYNC_INPUTS, x)))


def export_lipsync(checkpoint: str | Path, fmt: str, out: str | Path, atol: float = 1e-4) -> ExportReport:
    """Export the streaming step of a causal lip-sync checkpoint, raw audio in
    (:class:`LipSyncAudioStep`), and check it hop by hop against the PyTorch stream.

    Raises:
        ValueError: for an unknown format, a file that is not a lip-sync checkpoint, or an offline core.
        ExportError: when a needed package is missing or the check fails (the file is removed).
    """
    from avsr.audio_features import LogMelStream
    from avsr.lipsync.model import load_lipsync_model

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    model = load_lipsync_model(checkpoint)[0]
    step = LipSyncAudioStep(model).eval()
    hop = step.mel.hop
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(hop * (1 + sum(LIPSYNC_CHECK_HOPS)), generator=g) * 0.1
    state = step.initial_state(wave[:hop])
    example = (wave[None, hop: 5 * hop], *state)
    path = Path(out)
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        _ignore_tracer_notes()  # and the GRU batch-size note: the initial state is an input here
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*", category=UserWarning)
        if fmt == "torchscript":
            torch.jit.trace(step, example, check_trace=False).save(str(tmp))
        else:
            try:
                torch.onnx.export(step, example, str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=list(LIPSYNC_INPUTS), output_names=list(LIPSYNC_OUTPUTS),
                                  dynamic_axes={"audio": {1: "samples"}, "curves": {1: "frames"},
                                                "visemes": {1: "frames"}})
            except (torch.onnx.OnnxExporterError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"ONNX export of {LIPSYNC_PART} failed: {first}") from None
    run = _run_step(fmt, path)
    mel_stream, ref_state = LogMelStream(), step.step.initial_state()
    mel_stream.push(wave[:hop])
    state, start, got, ref = [t.numpy() for t in state], hop, [], []
    for n in LIPSYNC_CHECK_HOPS:
        chunk = wave[start: start + hop * n]
        start += hop * n
        curves, visemes, *state = run(chunk.numpy()[None], *state)
        got.append(np.concatenate([curves[0], visemes[0]], axis=-1))
        with torch.no_grad():
            ref_curves, ref_visemes, *ref_state = step.step(mel_stream.push(chunk)[None], *ref_state)
        ref.append(torch.cat([ref_curves[0], ref_visemes[0]], dim=-1).numpy())
    got, ref = np.concatenate(got), np.concatenate(ref)
    diff = float(np.abs(got - ref).max()) if got.size else 0.0
    if got.shape != ref.shape or not diff <= atol:
        path.unlink()
        raise ExportError(f"exported {LIPSYNC_PART} differs from PyTorch by {diff:.3g} > atol {atol:g} "
                          f"(shapes {got.shape}, {ref.shape}); removed {path}")
    log.info("exported %s as %s to %s (max |diff| %.2e over %d hops)", LIPSYNC_PART, fmt, path, diff,
             len(LIPSYNC_CHECK_HOPS))
    return ExportReport(LIPSYNC_PART, fmt, path, LIPSYNC_INPUTS, LIPSYNC_OUTPUTS, diff)


def export_part(checkpoint: str | Path, part: str, fmt: str, out: str | Path, atol: float = 1e-4,
                module: Optional[nn.Module] = None) -> ExportReport:
    """Export ``part`` of ``checkpoint`` as ``fmt`` to ``out`` and check it against eager mode.

    Args:
        checkpoint: trained checkpoint (``load_encoder`` reads it); unused when ``module`` is given.
        part: ``visual_frontend``, ``audio_frontend``, ``encoder``, or ``lipsync`` (a lip-sync
            checkpoint: :func:`export_lipsync`).
        fmt: ``torchscript`` or ``onnx``.
        out: output file.
        atol: largest allowed absolute difference from eager mode on the check inputs.
        module: an already loaded part (as ``load_encoder`` returns it) instead of the checkpoint's.

    Raises:
        ValueError: for an unknown part/format, or a part the checkpoint lacks.
        ExportError: when a needed package is missing or the check fails (the file is removed).
    """
    if part == LIPSYNC_PART:
        return export_lipsync(checkpoint, fmt, out, atol)
    if part not in ENCODER_PARTS:
        raise ValueError(f"part must be one of {', '.join(ENCODER_PARTS + (LIPSYNC_PART,))}, got '{part}'")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    module = module if module is not None else load_encoder(checkpoint, part, freeze=True)
    wrapper = ExportablePart(module, part).eval()
    path = export_module(wrapper, fmt, out)
    diff = check_export(wrapper, fmt, path)
    if not diff <= atol:
        path.unlink()
        raise ExportError(f"exported {part} differs from eager mode by {diff:.3g} > atol {atol:g}; removed {path}")
    log.info("exported %s as %s to %s (max |diff| %.2e)", part, fmt, path, diff)
    return ExportReport(part, fmt, path, wrapper.input_names, part_outputs(part), diff)
