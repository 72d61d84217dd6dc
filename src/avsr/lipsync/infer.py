"""Lip-sync tracks from speech files: the model of :mod:`avsr.lipsync.model` applied to a recording
(``avsr lipsync``), offline or streamed in 10 ms hops, with visemes from the model's own head or,
given the transcript (``dialog``, as Rhubarb's ``--dialogFile``), from forced alignment.

A track is kept at the model's 100 fps and rendered at the frame rate an animation tool wants
(:func:`render`): curves are interpolated linearly, visemes take the label of the nearest 100 fps
frame and become cues (:mod:`avsr.lipsync.export`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from avsr.audio_features import HOP_LENGTH, MEL_FPS, MEL_PER_VIDEO_FRAME, SAMPLE_RATE, log_mel
from avsr.lipsync.export import FORMATS, cues_from_frames, curves_csv, resample_curves, rhubarb_json, rhubarb_tsv
from avsr.lipsync.model import LipSyncModel, LipSyncStream
from avsr.lipsync.targets import BLENDSHAPES
from avsr.lipsync.visemes import RHUBARB, RHUBARB_SHAPES

SUFFIX_FORMAT = {".tsv": "rhubarb-tsv", ".csv": "csv", ".json": "json"}
SILENCE_DBFS = -60.0  #: a file whose peak is below this is refused as silent
HOP_SAMPLES = HOP_LENGTH  #: streaming hop: 10 ms

log = logging.getLogger(__name__)


class LipSyncError(ValueError):
    """A speech file that cannot be lip-synced (unreadable, not audio, truncated, silent, too short);
    the message is one line naming the file."""


@dataclass
class Track:
    """A lip-sync track at :data:`avsr.audio_features.MEL_FPS` (100 fps; frame ``i`` is centred at
    ``i / 100`` s): ``curves`` ``(F, K)`` float32 named ``curve_names``; ``visemes`` one label per
    frame (``None`` without a viseme head, dialog or word timings) from ``viseme_source``
    (``"model"``, ``"dialog"`` or ``"words"``); ``duration`` in seconds."""

    curves: np.ndarray
    curve_names: tuple[str, ...]
    visemes: Optional[list[str]]
    viseme_names: tuple[str, ...]
    viseme_source: Optional[str]
    duration: float


def read_speech(path: str | Path) -> np.ndarray:
    """The audio of a speech or video file: ``(S,)`` float32 at 16 kHz.

    Raises:
        LipSyncError: naming the file when it cannot be decoded or has no audio stream (a
            non-audio or truncated file), is shorter than one 40 ms video frame, or is silent
            (peak below :data:`SILENCE_DBFS`).
    """
    from avsr.data.media import read_audio

    try:
        wave = read_audio(path, SAMPLE_RATE)
    except (ValueError, OSError) as exc:
        msg = str(exc).replace("\n", " ")
        raise LipSyncError(msg if str(path) in msg else f"{path}: {msg}") from None
    if len(wave) < SAMPLE_RATE // 25:
        raise LipSyncError(f"{path}: {len(wave)} samples of audio, shorter than one 40 ms frame")
    peak = float(np.abs(wave).max())
    if peak <= 10 ** (SILENCE_DBFS / 20):
        level = "-inf" if peak == 0 else f"{20 * np.log10(peak):.0f}"
        raise LipSyncError(f"{path}: silent (peak {level} dBFS, below {SILENCE_DBFS:.0f} dBFS): nothing to lip-sync")
    return wave


@torch.no_grad()
def predict_track(model: LipSyncModel, wave: np.ndarray, streaming: bool = False,
                  dialog: Optional[str] = None, aligner=None,
                  words: Optional[Sequence[tuple[str, float, float]]] = None,
                  video: Optional[torch.Tensor] = None) -> Track:
    """Run the model on ``(S,)`` float32 16 kHz audio.

    Args:
        streaming: feed the audio in 10 ms hops through :class:`LipSyncStream` (causal core only);
            the track equals the offline one to float rounding.
        dialog: the transcript; with ``aligner`` (:class:`avsr.lipsync.aligner.PhoneCTC`) the
            visemes come from its forced alignment, as Rhubarb shapes.
        words: without a dialog, ``(word, start s, end s)`` timed elsewhere (the recogniser's own
            alignment): the visemes are each word's phones spread over its span
            (:func:`avsr.lipsync.aligner.word_phone_spans`), as Rhubarb shapes. Else the
            visemes are the model's viseme head.
        video: ``(T, D)`` mouth features at 25 fps (:class:`avsr.lipsync.video.MouthFeatures`)
            for a model with video input (``model.video_dim > 0``).

    Raises:
        ValueError: streaming with an offline core, or ``dialog`` without ``aligner`` (or its words
            missing from the pronouncing dictionary, or too many phones for the audio), or
            ``words`` out of time order, or ``video`` missing for a video model (or given to an
            audio-only one).
    """
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    mel, lengths = log_mel(x)
    if streaming:
        stream = LipSyncStream(model)
        parts = [stream.push(x[i:i + HOP_SAMPLES]) for i in range(0, len(x), HOP_SAMPLES)] + [stream.flush()]
        out = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in ("curves", "visemes")}
    else:
        feats = None if video is None else video[None]
        out = {k: None if v is None else v[0] for k, v in model.eval()(mel, lengths, feats).items() if k != "lengths"}
    curves = np.zeros((mel.shape[1], 0), np.float32) if out["curves"] is None else out["curves"].numpy()
    visemes, names, source = None, (), None
    if dialog is not None or words is not None:
        from avsr.lipsync.aligner import align, frame_visemes, phone_frames, word_phone_spans

        if dialog is not None and aligner is None:
            raise ValueError("a dialog (transcript) needs the phone aligner (--aligner) to time its visemes")
        spans = align(aligner, mel[0], dialog) if dialog is not None else word_phone_spans(words)
        per_video = frame_visemes(phone_frames(spans, mel.shape[1] // MEL_PER_VIDEO_FRAME), RHUBARB)
        visemes = [per_video[min(i // MEL_PER_VIDEO_FRAME, len(per_video) - 1)] for i in range(mel.shape[1])]
        names, source = RHUBARB_SHAPES, "dialog" if dialog is not None else "words"
    elif out["visemes"] is not None:
        visemes = [model.visemes[k] for k in out["visemes"].argmax(-1).tolist()]
        names, source = model.visemes, "model"
    return Track(curves, model.curves, visemes, tuple(names), source, len(wave) / SAMPLE_RATE)


def _labels_at(track: Track, fps: float) -> list[str]:
    n = max(1, int(round(track.duration * fps)))
    idx = np.minimum(np.round(np.arange(n) / fps * MEL_FPS).astype(int), len(track.visemes) - 1)
    return [track.visemes[i] for i in idx]


def render(track: Track, fmt: str, fps: float = 25.0, sound_file: str = "") -> str:
    """The track as the text of a file in ``fmt`` (one of :data:`FORMATS`) at ``fps`` frames per second.

    - ``rhubarb-tsv`` / ``rhubarb-json``: Rhubarb Lip Sync's files (needs Rhubarb-shape visemes);
    - ``csv``: ``time`` and one column per ARKit blendshape of the track (the mouth opening
      when it has no blendshape);
    - ``json``: ``{"fps", "duration", "curves": {name: [...]}, "visemes": {"set", "source",
      "cues": [{"start", "end", "value"}]}}``.

    Raises:
        ValueError: for an unknown format, a non-positive ``fps``, or a format that needs what the
            track lacks (cues without visemes, Rhubarb files from another viseme set, a CSV
            without curves).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if fmt.startswith("rhubarb"):
        if track.visemes is None:
            raise ValueError("Rhubarb files need visemes: the model has no viseme head (give --dialog and --aligner)")
        if not set(track.visemes) <= set(RHUBARB_SHAPES):
            raise ValueError(f"Rhubarb files need Rhubarb shapes ({', '.join(RHUBARB_SHAPES)}); the model's visemes "
                             f"are {', '.join(track.viseme_names)}")
        cues = cues_from_frames(_labels_at(track, fps), fps)
        return rhubarb_tsv(cues) if fmt == "rhubarb-tsv" else rhubarb_json(cues, sound_file)
    n = max(1, int(round(track.duration * fps)))
    curves = resample_curves(track.curves, MEL_FPS, fps)[:n] if track.curves.shape[1] else track.curves
    if fmt == "csv":
        keep = [k for k, c in enumerate(track.curve_names) if c in BLENDSHAPES] or list(range(len(track.curve_names)))
        if not keep:
            raise ValueError("a CSV needs curves: the model predicts visemes only")
        return curves_csv(curves[:, keep], [track.curve_names[k] for k in keep], fps)
    doc = {"fps": fps, "duration": round(track.duration, 4),
           "curves": {c: [round(float(v), 4) for v in curves[:, k]] for k, c in enumerate(track.curve_names)},
           "visemes": None}
    if track.visemes is not None:
        doc["visemes"] = {"set": list(track.viseme_names), "source": track.viseme_source,
                          "cues": [{"start": round(s, 4), "end": round(e, 4), "value": v}
                                   for s, e, v in cues_from_frames(_labels_at(track, fps), fps)]}
    return json.dumps(doc, indent=1) + "\n"


def format_for(out: str | Path, fmt: Optional[str]) -> str:
    """``fmt``, or the format the output's suffix implies (``.tsv``, ``.csv``, ``.json``).
    Raises ``ValueError`` when neither says."""
    if fmt:
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix not in SUFFIX_FORMAT:
        raise ValueError(f"cannot tell the format of '{out}' from its suffix: give --format ({', '.join(FORMATS)})")
    return SUFFIX_FORMAT[suffix]


def _mouth_crops(path: str) -> Optional[np.ndarray]:
    """``(T, 96, 96)`` uint8 mouth crops at 25 fps of a video with one face, else None (logged)."""
    from avsr.config import PreprocessConfig
    from avsr.inference.inputs import InputError, prepare_input, probe_streams

    if not probe_streams(path)[0]:
        return None
    try:
        return prepare_input(path, PreprocessConfig(), need_video=True, need_audio=False).crops
    except InputError as exc:
        log.warning("%s (the preview shows the drawn mouth only)", exc)
        return None


def write_track_preview(path: str | Path, track: Track, wave: np.ndarray, crops: Optional[np.ndarray] = None) -> None:
    """:func:`avsr.lipsync.preview.write_preview` of a track at 25 fps (beside ``crops`` when given)."""
    from avsr.lipsync.preview import write_preview

    n = len(crops) if crops is not None else max(1, int(round(track.duration * 25)))
    curves = resample_curves(track.curves, MEL_FPS, 25.0)[:n] if track.curves.shape[1] else np.zeros((n, 0))
    curves = np.pad(curves, ((0, n - len(curves)), (0, 0)), mode="edge")
    labels = _labels_at(track, 25.0)[:n] if track.visemes is not None else None
    if labels is not None:
        labels = labels + labels[-1:] * (n - len(labels))
    write_preview(path, curves, track.curve_names, 25.0, wave, labels, crops)


def lipsync_files(model: LipSyncModel, inputs: Sequence[str], out: str, fmt: Optional[str], fps: float,
                  streaming: bool = False, dialog: Optional[str] = None, aligner=None,
                  preview: Optional[str] = None, mouth_features=None) -> list[tuple[str, str]]:
    """Write one track per input (``out``, and ``preview`` when given, hold ``{name}`` when there
    are several), atomically; ``preview`` is an mp4 (:func:`write_track_preview`, with the mouth
    crop of a video input). ``mouth_features`` (:class:`avsr.lipsync.video.MouthFeatures`, for a
    model with video input) feeds each input's mouth crops to the model too: an input without a
    video with one face fails. Returns ``[(input, error)]`` for the inputs that failed (each named
    in its one-line error)."""
    from avsr.utils import atomic_write_text

    several = len(inputs) > 1
    for name, value in (("--out", out), ("--preview", preview)):
        if several and value is not None and "{name}" not in value:
            raise ValueError(f"with several inputs, {name} needs a '{{name}}' placeholder, e.g. tracks/{{name}}"
                             f"{Path(value).suffix}")
    fmt = format_for(out, fmt)
    failed = []
    for path in inputs:
        target = Path(out.replace("{name}", Path(path).stem))
        try:
            wave = read_speech(path)
            crops = _mouth_crops(path) if preview is not None or mouth_features is not None else None
            if mouth_features is not None and crops is None:
                raise LipSyncError(f"{path}: --use-video needs a video with one visible face")
            video = None if mouth_features is None else mouth_features(crops)
            track = predict_track(model, wave, streaming, dialog, aligner, video=video)
            atomic_write_text(target, render(track, fmt, fps, sound_file=str(path)))
            if preview is not None:
                write_track_preview(preview.replace("{name}", Path(path).stem), track, wave, crops)
        except LipSyncError as exc:
            failed.append((path, str(exc)))
        except ValueError as exc:
            failed.append((path, f"{path}: {exc}"))
    return failed
