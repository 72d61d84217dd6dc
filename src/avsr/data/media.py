"""Audio and video I/O with PyAV (any container/codec FFmpeg reads), plus the clip reader.

Reading: :func:`iter_video` streams frames resampled to a target frame rate (nearest frame in
presentation time, like FFmpeg's ``fps`` filter), :func:`read_video` / :func:`read_gray_video`
load a whole clip, :func:`read_audio` decodes, down-mixes and resamples audio with
``av.AudioResampler``. Writing: :func:`write_gray_video` (H.264 via libx264, yuv420p, the grey
image as the Y plane) and :func:`write_wav` (16-bit PCM via soundfile). Every reader raises
:class:`MediaError` with the file name when a file is unreadable or lacks the stream asked for.

"Grey" is the decoded luma (Y) plane for YUV 4:2:0 sources (most video, including GRID's MPEG-1
and LRS's H.264), else BT.601 luma computed from RGB.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np
import soundfile as sf

VIDEO_EXTENSIONS = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm")
_I420 = ("yuv420p", "yuvj420p")
log = logging.getLogger(__name__)


class MediaError(ValueError):
    """A media file cannot be opened or decoded, or lacks the stream asked for."""


class Frame:
    """One output frame of :func:`iter_video`.

    ``index`` is the source frame number (repeated when upsampling, skipped when downsampling);
    ``gray`` is (H, W) uint8; ``rgb`` is (H, W, 3) uint8, converted on first access (a caller
    that needs colour for only some frames pays only for those), or ``None`` unless asked for.
    """

    __slots__ = ("index", "gray", "_source", "_rgb")

    def __init__(self, index: int, gray: np.ndarray, source: av.VideoFrame | None = None) -> None:
        self.index, self.gray, self._source, self._rgb = index, gray, source, None

    @property
    def rgb(self) -> np.ndarray | None:
        if self._rgb is None and self._source is not None:
            self._rgb, self._source = _to_rgb(self._source), None
        return self._rgb


MAX_BAD_AUDIO_PACKETS = 0.05  # undecodable audio packets concealed with silence, as a fraction of all


def _open(path: str | Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"{path}: unreadable media file ({exc})") from None


@contextmanager
def _first_stream(path: str | Path, kind: str) -> Iterator[tuple[av.container.InputContainer, av.stream.Stream]]:
    """``(container, stream)``: ``path`` opened and its first ``kind`` (``"video"`` or
    ``"audio"``) stream; the container is closed on leaving the ``with`` block. Raises
    :class:`MediaError` when the file is unreadable or has no such stream."""
    container = _open(path)
    try:
        streams = getattr(container.streams, kind)
        if not streams:
            raise MediaError(f"{path}: no {kind} stream")
        yield container, streams[0]
    finally:
        container.close()


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    """The stream's frame rate as its header gives it (25 when it gives none)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 25.0


def _is_i420(frame: av.VideoFrame) -> bool:
    return frame.format.name in _I420 and frame.width % 2 == 0 and frame.height % 2 == 0


def _to_gray(frame: av.VideoFrame) -> np.ndarray:
    """(H, W) uint8 grey of a decoded frame; YUV 4:2:0 takes the Y plane (no swscale)."""
    if _is_i420(frame):  # the Y plane alone, rows possibly padded to line_size
        y = frame.planes[0]
        return np.frombuffer(y, np.uint8).reshape(y.height, y.line_size)[:, : y.width].copy()
    return cv2.cvtColor(frame.to_ndarray(format="rgb24"), cv2.COLOR_RGB2GRAY)


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame (OpenCV's I420 conversion for YUV 4:2:0)."""
    if _is_i420(frame):
        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)  # (3H/2, W): Y, then U and V
    return frame.to_ndarray(format="rgb24")


def _frame(index: int, frame: av.VideoFrame, rgb: bool) -> Frame:
    return Frame(index, _to_gray(frame), frame if rgb else None)


def iter_video(path: str | Path, fps: float | None = 25.0, rgb: bool = False,
               threads: bool = True) -> Iterator[Frame]:
    """Decode the first video stream of ``path`` as :class:`Frame` s resampled to ``fps``.

    Output frame ``k`` (time ``k / fps`` after the first frame) is the source frame nearest in
    presentation time; the clip lasts until the last frame's end, so a 25 fps clip of N frames
    gives N frames at ``fps=25`` and ``round(N * fps / 25)`` otherwise. ``fps=None`` keeps every
    source frame. ``threads`` lets FFmpeg decode with frame/slice threads (fast; output is
    identical). Raises :class:`MediaError` when the file is unreadable, has no video stream, the
    decoder fails part-way (raised after the frames decoded before it, naming the source frame
    where decoding stopped: a corrupt H.264 stream does this), or the stream decodes to less than
    90% of the duration its header declares (a truncated download: raised after the decodable
    frames, before the tail that would pad the clip). A truncated MPEG-1/PS file (GRID's ``.mpg``)
    declares no duration of its own and decodes without an error, to fewer frames: the caller
    must judge its length (:func:`avsr.data.preprocess.process_clip` does).
    """
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with _first_stream(path, "video") as (container, stream):
        if threads:
            stream.thread_type = "AUTO"
        src_fps = _frame_rate(stream)
        prev: tuple[int, float, av.VideoFrame] | None = None
        t0 = None
        t = -1.0 / src_fps  # time of the last decoded frame
        k = 0  # next output frame
        n_decoded = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                n_decoded = i + 1
                t = frame.time if frame.time is not None else i / src_fps
                t0 = t if t0 is None else t0
                t -= t0
                if fps is None:
                    yield _frame(i, frame, rgb)
                    continue
                if prev is not None:
                    mid = 0.5 * (prev[1] + t)
                    while k / fps < mid - 1e-6:
                        yield _frame(prev[0], prev[2], rgb)
                        k += 1
                prev = (i, t, frame)
        except av.error.FFmpegError as exc:
            where = (f"at source frame {n_decoded} ({max(t, 0.0) + 1.0 / src_fps:.2f} s in), after "
                     f"{n_decoded} good frames: truncated or corrupt stream" if n_decoded else "at the first frame")
            raise MediaError(f"{path}: video decoding failed {where} ({exc})") from None
        declared = float(stream.duration * stream.time_base) if stream.duration else 0.0
        decoded = t + 1.0 / src_fps
        if decoded < 0.9 * declared - 1.0 / src_fps:
            raise MediaError(f"{path}: truncated or corrupt: decoded {decoded:.2f} s of the "
                             f"{declared:.2f} s its header declares")
        if prev is not None:
            n_total = int(round((prev[1] + 1.0 / src_fps) * fps))
            while k < max(n_total, 1):
                yield _frame(prev[0], prev[2], rgb)
                k += 1


def read_video(path: str | Path, fps: float | None = None, gray: bool = False) -> tuple[np.ndarray, float]:
    """Whole video: ``(frames, fps)``; frames (T, H, W, 3) uint8 RGB, or (T, H, W) if ``gray``.

    ``fps=None`` keeps the source frames and returns the stream's frame rate; otherwise frames
    are resampled (see :func:`iter_video`). Raises :class:`MediaError`; an empty stream gives T=0.
    """
    out_fps = fps
    if fps is None:
        with _first_stream(path, "video") as (_, stream):
            out_fps = _frame_rate(stream)
    frames = [f.gray if gray else f.rgb for f in iter_video(path, fps, rgb=not gray)]
    if not frames:
        return np.zeros((0, 0, 0) if gray else (0, 0, 0, 3), np.uint8), float(out_fps)
    return np.stack(frames), float(out_fps)


def read_gray_video(path: str | Path) -> np.ndarray:
    """All frames of ``path`` as (T, H, W) uint8 grey (the Y plane of the crops we write)."""
    return read_video(path, fps=None, gray=True)[0]


def video_start_time(path: str | Path) -> float:
    """Presentation time (s) of the first video frame, from the stream header (0 if unknown)."""
    with _first_stream(path, "video") as (_, s):
        return float(s.start_time * s.time_base) if s.start_time is not None else 0.0


def read_audio(path: str | Path, sample_rate: int = 16000, start: float | None = None) -> np.ndarray:
    """First audio stream of ``path``, down-mixed to mono and resampled: (S,) float32 in [-1, 1].

    ``start`` (seconds, e.g. :func:`video_start_time`) re-times the result so that sample 0 is
    at that presentation time: leading silence is added when the audio starts later, samples
    are dropped when it starts earlier. A packet the decoder
    rejects (a corrupt MP2 frame, as in GRID s4's ``bbaf2a``) becomes silence of its duration, as
    ffmpeg's error concealment does, so later audio keeps its timing (logged as a warning). Raises
    :class:`MediaError` when the file is unreadable, has no audio stream, or more than
    :data:`MAX_BAD_AUDIO_PACKETS` of its packets (a fraction) cannot be decoded.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    with _first_stream(path, "audio") as (container, stream):
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        first_time = None
        packets, bad = 0, []
        try:
            for packet in container.demux(stream):
                packets += 1
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError as exc:
                    seconds = float(packet.duration * packet.time_base) if packet.duration and packet.time_base else 0.0
                    chunks.append(np.zeros(int(round(seconds * sample_rate)), np.float32))
                    bad.append(f"packet {packets} ({exc})")
                    continue
                for frame in frames:
                    if first_time is None and frame.time is not None:
                        first_time = frame.time
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: audio decoding failed ({exc})") from None
    if len(bad) > MAX_BAD_AUDIO_PACKETS * packets:
        raise MediaError(f"{path}: audio decoding failed in {len(bad)} of {packets} packets (first: {bad[0]})")
    if bad:
        log.warning("%s: %d of %d audio packets undecodable, replaced by silence (first: %s)", path, len(bad),
                    packets, bad[0])
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if start is not None and first_time is not None:
        shift = int(round((first_time - start) * sample_rate))
        wave = np.concatenate([np.zeros(shift, np.float32), wave]) if shift > 0 else wave[-shift:]
    return np.clip(wave, -1.0, 1.0).astype(np.float32, copy=False)


def fit_length(wave: np.ndarray, n: int) -> np.ndarray:
    """``wave`` zero-padded or trimmed at the end to exactly ``n`` samples."""
    if len(wave) >= n:
        return wave[:n]
    return np.concatenate([wave, np.zeros(n - len(wave), wave.dtype)])


def write_gray_video(path: str | Path, frames: np.ndarray, fps: float = 25.0, crf: int = 18,
                     preset: str = "veryfast") -> None:
    """Write (T, H, W) uint8 grey frames as H.264 (libx264, yuv420p, one thread) to ``path``.

    The grey image becomes the Y plane (chroma fixed at 128), so reading back the Y plane
    (:func:`read_gray_video`) returns it up to compression (``crf=0`` is lossless). One encoder
    thread and ``mbtree=0`` make the bytes reproducible. The container comes from the extension (``.mp4``).
    Raises ValueError for a wrong shape/dtype, odd size, or non-positive fps.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty (T, H, W) uint8, got {frames.shape} {frames.dtype}")
    t, h, w = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {h}x{w}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        # mbtree reads uninitialised memory in x264 on small frames (same input, different bytes
        # from run to run); without it the output is reproducible.
        options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
        stream = container.add_stream("libx264", rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        # FFmpeg-allocated frames (aligned, padded rows), filled completely: PyAV's from_ndarray
        # would wrap our buffer without copying while the encoder may still look back at it.
        probe = av.VideoFrame(w, h, "yuv420p")
        y_stride, c_stride = probe.planes[0].line_size, probe.planes[1].line_size
        chroma = np.full((probe.planes[1].height, c_stride), 128, np.uint8)  # neutral U and V
        luma = np.zeros((t, h, y_stride), np.uint8)
        luma[:, :, :w] = frames
        for i in range(t):
            frame = av.VideoFrame(w, h, "yuv420p")
            frame.planes[0].update(luma[i])
            frame.planes[1].update(chroma)
            frame.planes[2].update(chroma)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int = 16000) -> None:
    """Write (S,) float32 in [-1, 1] as 16-bit PCM mono WAV (values outside are clipped)."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"wave must be (S,), got {wave.shape}")
    pcm = np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype(np.int16)
    sf.write(str(path), pcm, sample_rate, subtype="PCM_16", format="WAV")


def load_clip(root: str | Path, row) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One preprocessed clip: ``(frames (T, 96, 96) uint8, wave (S,) float32, npz dict)``.

    ``row`` is an :class:`avsr.data.manifest.ManifestRow`; the npz dict holds ``landmarks``
    (T, 20, 2) float32, ``mouth_opening`` (T,) float32 and ``face_detected`` (T,) bool, and
    every other key the ``.npz`` has (``words``/``word_frames``: see
    :func:`avsr.data.preprocess.process_clip`). Raises :class:`MediaError` naming the file when one is missing or unreadable.
    """
    frames = read_gray_video(row.file(root, ".mp4"))
    wav_path = row.file(root, ".wav")
    try:
        wave, _ = sf.read(str(wav_path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise MediaError(f"{wav_path}: unreadable audio ({exc})") from None
    npz_path = row.file(root, ".npz")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            meta = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise MediaError(f"{npz_path}: unreadable landmarks ({exc})") from None
    return frames, wave, meta
