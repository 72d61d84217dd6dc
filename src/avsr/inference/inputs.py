"""A user's media file prepared exactly as preprocessing prepares a corpus clip.

Video (when the checkpoint's mode uses it, or when it is there and a face is found): frames
decoded with PyAV at 25 fps, mediapipe face mesh, mean-face alignment and the 96x96 grayscale
mouth crop of :mod:`avsr.data.preprocess` (same code, same config section), with the lip
landmarks, mouth opening and per-frame face mask. Audio: the first audio stream decoded with
PyAV, mono 16 kHz, re-timed to the first video frame and padded/trimmed to ``640 * T`` samples
(``T`` video frames; audio-only inputs get ``T = ceil(S / 640)``).

Problems with the input raise :class:`InputError` with one line naming the file: missing or
unreadable file, a stream the mode needs is absent, no face, several faces, too short.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import av
import numpy as np

from avsr.config import PreprocessConfig
from avsr.data import media

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FPS = 25.0
SAMPLES_PER_FRAME = 640
FACE_CHECK_FRAMES = 8  # frames sampled to count faces
MAX_FACES_COUNTED = 4


class InputError(ValueError):
    """An input file cannot be transcribed; the message is one line naming the file."""


@dataclass
class PreparedInput:
    """One input ready for a model.

    - ``n_frames``: ``T`` frames at 25 fps
    - ``crops``: ``(T, 96, 96)`` uint8 grayscale mouth crops, or None (no video used)
    - ``landmarks``: ``(T, 20, 2)`` float32 lip landmarks in crop pixels, or None
    - ``mouth_opening``: ``(T,)`` float32 inner-lip gap / mouth width, or None
    - ``face_detected``: ``(T,)`` bool, False where landmarks were interpolated, or None
    - ``wave``: ``(640 T,)`` float32 16 kHz mono audio, or None (no audio used)
    """

    path: str
    n_frames: int
    crops: Optional[np.ndarray] = None
    landmarks: Optional[np.ndarray] = None
    mouth_opening: Optional[np.ndarray] = None
    face_detected: Optional[np.ndarray] = None
    wave: Optional[np.ndarray] = None


def probe_streams(path: str | Path) -> tuple[bool, bool]:
    """``(has_video, has_audio)`` of a media file.

    Raises:
        InputError: when the file is missing or not a media file PyAV can open.
    """
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return bool(container.streams.video), bool(container.streams.audio)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable audio/video file ({type(exc).__name__}: {exc})") from None


def sample_frames(path: str | Path, n: int = FACE_CHECK_FRAMES) -> np.ndarray:
    """About ``n`` evenly spaced RGB frames ``(N, H, W, 3)`` uint8 of the 25 fps video (spacing from
    the stream's duration; the first ``n`` frames when it is unknown)."""
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / av.time_base if container.duration else 0.0
    est = max(n, int(duration * FPS))
    picks = set(np.linspace(0, est - 1, n).round().astype(int).tolist())
    frames = [f.rgb for k, f in enumerate(media.iter_video(path, FPS, rgb=True)) if k in picks]
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)


def count_faces(rgb: np.ndarray) -> np.ndarray:
    """Faces (up to 4) that mediapipe face mesh finds in each of the ``(N, H, W, 3)`` uint8 RGB
    frames: ``(N,)`` int64."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=MAX_FACES_COUNTED,
                                         refine_landmarks=False, min_detection_confidence=0.5) as mesh:
        return np.array([len(mesh.process(np.ascontiguousarray(f)).multi_face_landmarks or ()) for f in rgb],
                        dtype=np.int64)


def _read_audio(path: str | Path, start: Optional[float]) -> np.ndarray:
    try:
        return media.read_audio(path, SAMPLE_RATE, start=start)
    except media.MediaError as exc:
        raise InputError(str(exc)) from None


def _video_part(path: str | Path, cfg: PreprocessConfig, required: bool) -> Optional[dict]:
    """Mouth crops and landmarks of ``path`` (see :func:`prepare_input`); None when the video is
    optional and unusable (logged)."""
    from avsr.data.corpora import Utterance
    from avsr.data.landmarks import FaceMeshTracker, mouth_opening
    from avsr.data.preprocess import ClipFailure, extract_mouth_roi

    try:
        faces = count_faces(sample_frames(path))
    except media.MediaError as exc:
        raise InputError(str(exc)) from None
    problem = None
    if len(faces) == 0:
        problem = f"{path}: the video stream has no frames"
    elif (faces >= 2).sum() * 2 > len(faces):
        problem = (f"{path}: {int(np.median(faces))} faces in view; the model reads one speaker's lips: "
                   "crop the video to one face")
    elif (faces == 0).all():
        problem = f"{path}: no face found in the video"
    else:
        utt = Utterance(utt_id=Path(path).stem, split="", media=Path(path), transcript=None)
        try:
            with FaceMeshTracker() as tracker:
                roi = extract_mouth_roi(utt, cfg, tracker)
            return {"crops": roi.rois, "landmarks": roi.lips, "mouth_opening": mouth_opening(roi.lips),
                    "face_detected": roi.face_detected}
        except ClipFailure as exc:
            problem = f"{path}: {exc}"
    if required:
        raise InputError(problem)
    log.warning("%s (the video is not used by this model; continuing without mouth crops)", problem)
    return None


def prepare_input(path: str | Path, cfg: PreprocessConfig, need_video: bool, need_audio: bool) -> PreparedInput:
    """Decode and prepare ``path`` for a model that needs video and/or audio.

    A video stream the model does not need is still used for the mouth crops and curves when a
    face is found in it (best effort: problems are logged, not raised).

    Raises:
        InputError: when the file is missing or unreadable, lacks a needed stream, has no face or
            several faces while video is needed, or is shorter than one frame (40 ms).
    """
    has_video, has_audio = probe_streams(path)
    if need_video and not has_video:
        raise InputError(f"{path}: no video stream, but this checkpoint reads lips (it needs video)")
    if need_audio and not has_audio:
        raise InputError(f"{path}: no audio stream, but this checkpoint needs audio")
    roi = _video_part(path, cfg, required=need_video) if has_video else None
    wave = None
    if has_audio:
        try:
            wave = _read_audio(path, media.video_start_time(path) if has_video else None)
        except InputError as exc:
            if need_audio:
                raise
            log.warning("%s (the audio is not used by this model; continuing without it)", exc)
    if roi is not None:
        n_frames = len(roi["crops"])
    elif wave is not None:
        n_frames = math.ceil(len(wave) / SAMPLES_PER_FRAME)
    else:
        n_frames = 0
    if n_frames < 1:
        raise InputError(f"{path}: too short (less than one 40 ms frame)")
    if wave is not None:
        wave = media.fit_length(wave, SAMPLES_PER_FRAME * n_frames)
    return PreparedInput(
        path=str(path), n_frames=n_frames, wave=wave,
        crops=roi["crops"] if roi else None, landmarks=roi["landmarks"] if roi else None,
        mouth_opening=roi["mouth_opening"] if roi else None, face_detected=roi["face_detected"] if roi else None)
