"""The preprocessing pipeline: utterances -> mouth-ROI clips, audio, transcripts, manifests.

Per clip (:func:`process_clip`): check the transcript; decode the video at 25 fps
(:func:`avsr.data.media.iter_video`); take landmarks from a precomputed file or mediapipe face
mesh (on every frame, or with ``detect_every = k > 1`` on every k-th frame and whenever the
Lucas-Kanade track of :func:`avsr.data.landmarks.track_points` fails in between); reject the
clip when too many frames have no face; fill gaps, smooth, similarity-align to the mean face and
crop a 96x96 grey mouth ROI (:mod:`avsr.data.align`); decode the audio at 16 kHz mono, re-timed
to the first video frame and padded/trimmed to ``640 * T`` samples; reject the clip when its
transcript cannot fit it (:func:`check_fits`: a truncated clip, or a video stream that stops
before the audio); keep word timings that match the transcript (:func:`word_frames`). Then write, each atomically,
``<out>/<split>/<utt_id>.mp4``, ``.wav``, ``.txt`` and ``.npz`` (last, so a clip is finished
exactly when its ``.npz`` exists beside the others).

Per corpus (:func:`preprocess`): one shard of the sorted utterances, clips already finished are
skipped (resume), the rest run in ``workers`` processes (one thread each); failures are
collected with their reason in ``failures.tsv``; each split's manifest ``<split>.tsv`` lists
every finished clip of the corpus (so shards that finish last complete it).

GRID specifics handled here by the general rules: clips starting with grey frames (no face)
get the first detected landmarks held over them and ``face_detected`` False; the 4 clips that
decode to 74 frames stay 74 frames long (no invented frame; audio trimmed to 74 * 640).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import soundfile as sf
from tqdm import tqdm

from avsr.config import PreprocessConfig
from avsr.data.align import apply_affine, crop_rois, fill_gaps, longest_gap, roi_transforms
from avsr.data.corpora import TranscriptError, Utterance, normalise_transcript
from avsr.data.landmarks import (MESH_KEEP, MOUTH, FaceMeshTracker, LandmarkError, load_landmarks,
                                 mouth_opening, track_points)
from avsr.data.manifest import ManifestRow, write_manifest
from avsr.data.media import (MediaError, fit_length, iter_video, read_audio, video_start_time,
                             write_gray_video, write_wav)
from avsr.text.normalize import normalise
from avsr.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".mp4", ".wav", ".txt", ".npz")  # written in this order; .npz marks "done"
FAILURE_COLUMNS = ("utt_id", "split", "media", "reason")


class MouthROI(NamedTuple):
    """The video part of one preprocessed clip (:func:`extract_mouth_roi`)."""

    rois: np.ndarray  #: (T, roi_size, roi_size) uint8 grey mouth crops at 25 fps
    lips: np.ndarray  #: (T, 20, 2) float32 lip points in ROI pixels (iBUG 48..67)
    face_detected: np.ndarray  #: (T,) bool
    face_mesh: Optional[np.ndarray]  #: (T, len(MESH_KEEP), 3) float32 source pixels, NaN = no face; None
    #: for precomputed 68-point landmarks
    transforms: np.ndarray  #: (T, 2, 3) float32 affine maps from source pixels to ROI pixels


class ClipFailure(Exception):
    """A clip cannot be used; the message is the reason written to ``failures.tsv``."""


@dataclass
class ClipResult:
    """Outcome of one clip: counts when kept, ``failure`` (reason) when skipped."""

    utt: Utterance
    n_frames: int = 0
    n_samples: int = 0
    transcript: str = ""
    failure: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage


@dataclass
class Summary:
    """What :func:`preprocess` did (this shard)."""

    kept: int = 0  # clips written now
    resumed: int = 0  # clips already finished before this run
    failures: list[tuple[Utterance, str]] = field(default_factory=list)
    frames: int = 0  # video frames written now
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # CPU time of this process, all its threads (the work itself when workers=1)
    timings: dict[str, float] = field(default_factory=dict)  # summed wall seconds per stage of kept clips

    @property
    def failed(self) -> int:
        return len(self.failures)


def is_done(out_root: str | Path, utt: Utterance) -> bool:
    """True when every output file of ``utt`` exists under ``out_root``."""
    base = Path(out_root) / utt.rel_path
    return all(base.with_name(base.name + ext).is_file() for ext in OUTPUT_EXTENSIONS)


def _landmarks_and_frames(utt: Utterance, cfg: PreprocessConfig, tracker: FaceMeshTracker | None,
                          trust_pickles: bool, timings: dict[str, float]
                          ) -> tuple[list[np.ndarray], np.ndarray, Optional[np.ndarray]]:
    """Grey frames at ``cfg.fps``, their (T, 68, 2) landmarks (NaN where no face) and, from face
    mesh, the (T, len(MESH_KEEP), 3) kept vertices (None for precomputed landmarks)."""
    pre = None
    if utt.landmarks is not None:
        try:
            pre = load_landmarks(utt.landmarks, trust_pickles)
        except LandmarkError as exc:
            raise ClipFailure(str(exc)) from None
    elif tracker is None:
        raise ValueError("a FaceMeshTracker is needed for clips without precomputed landmarks")
    grays: list[np.ndarray] = []
    points: list[np.ndarray] = []
    meshes: list[np.ndarray] = []
    nan = np.full((68, 2), np.nan, np.float32)
    nan_mesh = np.full((len(MESH_KEEP), 3), np.nan, np.float32)
    t_mesh = 0.0
    t0 = time.perf_counter()
    if tracker is not None:
        tracker.reset()
    last_index, last_pts, last_mesh = -1, nan, nan_mesh
    tracked = 0  # frames since the last detection that found a face (0: none to track from)
    for frame in iter_video(utt.media, cfg.fps, rgb=pre is None):
        if frame.index != last_index:
            if pre is not None:
                last_pts = pre[frame.index] if frame.index < len(pre) else nan
            else:
                tm = time.perf_counter()
                moved = None
                if 0 < tracked < cfg.detect_every:
                    moved = track_points(grays[-1], frame.gray, np.concatenate([last_pts, last_mesh[:, :2]]))
                if moved is not None:  # depth stays that of the last detection
                    last_pts, last_mesh = moved[:68], np.concatenate([moved[68:], last_mesh[:, 2:]], axis=1)
                    tracked += 1
                else:
                    found = tracker.detect(frame.rgb)  # type: ignore[union-attr]
                    last_pts, last_mesh = found if found is not None else (nan, nan_mesh)
                    tracked = int(found is not None)
                t_mesh += time.perf_counter() - tm
            last_index = frame.index
        grays.append(frame.gray)
        points.append(last_pts)
        meshes.append(last_mesh)
    timings["landmarks"] = t_mesh
    timings["decode"] = time.perf_counter() - t0 - t_mesh
    mesh = None if pre is not None else (np.stack(meshes) if meshes else np.zeros((0, len(MESH_KEEP), 3), np.float32))
    return grays, (np.stack(points) if points else np.zeros((0, 68, 2), np.float32)), mesh


def extract_mouth_roi(utt: Utterance, cfg: PreprocessConfig, tracker: FaceMeshTracker | None = None,
                      trust_pickles: bool = False,
                      timings: dict[str, float] | None = None) -> MouthROI:
    """The mouth ROI of ``utt``'s video, in memory (the video part of :func:`process_clip`).

    Returns a :class:`MouthROI`: (T, roi_size, roi_size) uint8 grey crops at ``cfg.fps``, (T, 20, 2)
    float32 lip points in ROI pixels (iBUG 48..67), (T,) bool face found, and with face mesh the
    (T, len(MESH_KEEP), 3) kept vertices in source pixels (NaN where no face).
    Raises :class:`ClipFailure` (the reason, without the file name) for unreadable media, no
    video stream, zero length, or no face in more than ``cfg.max_missing_frac`` of the frames or
    for more than ``cfg.max_gap_frames`` in a row. ``timings`` (optional) receives stage seconds.
    """
    timings = {} if timings is None else timings
    try:
        grays, points, mesh = _landmarks_and_frames(utt, cfg, tracker, trust_pickles, timings)
    except MediaError as exc:
        raise ClipFailure(str(exc).replace(f"{utt.media}: ", "")) from None
    n = len(grays)
    if n == 0:
        raise ClipFailure("zero length: no video frames")
    detected = ~np.isnan(points).any(axis=(1, 2))
    missing = int(n - detected.sum())
    if missing > cfg.max_missing_frac * n:
        raise ClipFailure(f"no face in {missing}/{n} frames (max_missing_frac={cfg.max_missing_frac})")
    gap = longest_gap(detected)
    if gap > cfg.max_gap_frames:
        raise ClipFailure(f"face lost for {gap} frames in a row (max_gap_frames={cfg.max_gap_frames})")
    t0 = time.perf_counter()
    filled = fill_gaps(points)
    transforms = roi_transforms(filled, cfg.roi_size, cfg.smooth_window)
    rois = crop_rois(grays, transforms, cfg.roi_size)
    lips = apply_affine(filled[:, MOUTH], transforms)
    timings["align"] = time.perf_counter() - t0
    return MouthROI(rois, lips, detected, mesh, transforms)


def check_fits(transcript: str, n_frames: int, n_samples: int, cfg: PreprocessConfig) -> None:
    """Raise :class:`ClipFailure` unless normalised ``transcript`` can be what the clip of
    ``n_frames`` video frames at ``cfg.fps`` and ``n_samples`` audio samples at ``cfg.sample_rate``
    (re-timed to the first video frame) says.

    In turn: the audio runs more than ``cfg.max_audio_overhang_s`` past the last video frame (the
    video stream stopped early: corrupt or cut); fewer frames than words (every tokenizer gives a word at least one token,
    and the CTC encoders run at the video frame rate, so no model could fit it; a character bound
    would reject fast LRS speech that SentencePiece models fit); more than ``cfg.max_words_per_second`` words per second of video (0 disables that check).
    """
    video_s, audio_s = n_frames / cfg.fps, n_samples / cfg.sample_rate
    if audio_s > video_s + cfg.max_audio_overhang_s:
        raise ClipFailure(f"video stopped early: its last frame is frame {n_frames - 1} ({video_s:.2f} s) but the "
                          f"audio runs to {audio_s:.2f} s (truncated or corrupt video stream; "
                          f"max_audio_overhang_s={cfg.max_audio_overhang_s})")
    words = len(transcript.split())
    if words > n_frames:
        raise ClipFailure(f"transcript too long for the clip: {words} words need at least {words} frames (one CTC "
                          f"token each), the clip has {n_frames} ({video_s:.2f} s): a truncated clip or the wrong "
                          "transcript")
    if cfg.max_words_per_second > 0 and words > cfg.max_words_per_second * video_s:
        raise ClipFailure(f"implausible speaking rate: {words} words in {video_s:.2f} s = {words / video_s:.1f} "
                          f"words/s (max_words_per_second={cfg.max_words_per_second}): a truncated clip or the "
                          "wrong transcript")


def word_frames(utt: Utterance, transcript: str, n_frames: int, fps: float
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(words (N,) str, frames (N, 2) float32)`` of ``utt.word_times`` in video frames at ``fps``
    from the first frame, clipped to ``[0, n_frames]``; ``None`` when the utterance has no timings
    or their words, normalised like the transcript (a word that normalises to nothing, such as a
    ``{LG}`` tag, is dropped), are not exactly ``transcript``'s words (logged at debug)."""
    if not utt.word_times:
        return None
    words, spans = [], []
    for raw, start, end in utt.word_times:
        norm = normalise(raw).split()
        if len(norm) > 1:
            log.debug("%s: no word timings kept: timed word %r normalises to %d words", utt.media, raw, len(norm))
            return None
        if norm:
            words.append(norm[0])
            spans.append((start, end))
    if words != transcript.split():
        log.debug("%s: no word timings kept: timed words %r differ from the transcript %r", utt.media,
                  " ".join(words), transcript)
        return None
    frames = np.clip(np.asarray(spans, np.float64).reshape(-1, 2) * fps, 0, n_frames).astype(np.float32)
    return np.asarray(words, dtype=str), frames


def process_clip(utt: Utterance, out_root: str | Path, cfg: PreprocessConfig,
                 tracker: FaceMeshTracker | None = None, trust_pickles: bool = False) -> ClipResult:
    """Preprocess one utterance into ``<out_root>/<split>/<utt_id>.{mp4,wav,txt,npz}``.

    The ``.npz`` holds ``landmarks`` (T, 20, 2) float32 lip points in ROI pixels (iBUG 48..67),
    ``mouth_opening`` (T,) float32 (inner-lip gap / mouth width) and ``face_detected`` (T,) bool;
    with face mesh (no precomputed landmarks) also ``face_mesh`` (T, len(MESH_KEEP), 3) float32, the
    :data:`avsr.data.landmarks.MESH_KEEP` vertices in source-image pixels with depth in the same
    unit (NaN where no face), and ``face_mesh_ids`` (the mediapipe vertex numbers). When
    ``utt.word_times`` are given and their normalised words are the transcript's (see
    :func:`word_frames`), also ``words`` (N,) unicode, the transcript's N words in order, and
    ``word_frames`` (N, 2) float32, each word's start and end in video frames at ``cfg.fps``
    counted from the first written frame (time ``t`` s -> ``t * fps``; frame ``k`` covers
    ``[k, k + 1)``), clipped to ``[0, T]``; without them neither key is written.
    A clip that cannot be used comes back with ``failure`` set (nothing written): unreadable
    media, no video or audio stream, video decoding failing part-way (the reason names the frame),
    zero length, a transcript that cannot fit the clip (:func:`check_fits`: audio running past the
    video by more than ``cfg.max_audio_overhang_s``, fewer frames than words, more
    than ``cfg.max_words_per_second``), no face in more than ``cfg.max_missing_frac`` of the
    frames or for more than ``cfg.max_gap_frames`` in a row, bad transcript or landmarks.
    """
    res = ClipResult(utt)
    try:
        res.transcript = normalise_transcript(utt.transcript)
        t0 = time.perf_counter()
        try:
            start = video_start_time(utt.media)
            wave = read_audio(utt.media, cfg.sample_rate, start=start)
        except MediaError as exc:
            raise ClipFailure(str(exc).replace(f"{utt.media}: ", "")) from None
        if len(wave) == 0:
            raise ClipFailure("audio stream has no samples")
        res.timings["audio"] = time.perf_counter() - t0
        rois, lips, detected, mesh, _ = extract_mouth_roi(utt, cfg, tracker, trust_pickles, res.timings)
        n = len(rois)
        check_fits(res.transcript, n, len(wave), cfg)
    except (ClipFailure, TranscriptError) as exc:
        res.failure = str(exc)
        return res

    t0 = time.perf_counter()
    res.n_frames = n
    res.n_samples = int(round(n * cfg.sample_rate / cfg.fps))
    base = Path(out_root) / utt.rel_path
    base.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(base.with_name(base.name + ".mp4")) as tmp:
        write_gray_video(tmp, rois, cfg.fps, crf=cfg.video_crf)
    with atomic_path(base.with_name(base.name + ".wav")) as tmp:
        write_wav(tmp, fit_length(wave, res.n_samples), cfg.sample_rate)
    atomic_write_text(base.with_name(base.name + ".txt"), res.transcript + "\n")
    with atomic_path(base.with_name(base.name + ".npz")) as tmp:
        extra = {} if mesh is None else {"face_mesh": mesh, "face_mesh_ids": MESH_KEEP}
        timed = word_frames(utt, res.transcript, n, cfg.fps)
        if timed is not None:
            extra.update(words=timed[0], word_frames=timed[1])
        np.savez(tmp, landmarks=lips, mouth_opening=mouth_opening(lips), face_detected=detected, **extra)
    res.timings["write"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------- worker processes
_WORKER: dict = {}


def _init_worker(cfg: PreprocessConfig, out_root: str, trust_pickles: bool) -> None:
    import cv2

    cv2.setNumThreads(1)
    _WORKER.update(cfg=cfg, out_root=out_root, trust=trust_pickles, tracker=None)


def _run_one(utt: Utterance) -> ClipResult:
    if utt.landmarks is None and _WORKER["tracker"] is None:
        _WORKER["tracker"] = FaceMeshTracker()
    try:
        return process_clip(utt, _WORKER["out_root"], _WORKER["cfg"], _WORKER["tracker"], _WORKER["trust"])
    except Exception as exc:  # never let one clip end the run; report it instead
        log.exception("unexpected error on %s", utt.media)
        return ClipResult(utt, failure=f"unexpected error: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- corpus level
def shard(utts: list[Utterance], shard_index: int = 0, num_shards: int = 1) -> list[Utterance]:
    """Every ``num_shards``-th utterance of the sorted list, starting at ``shard_index``."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index} and {num_shards}")
    return sorted(utts, key=lambda u: u.rel_path)[shard_index::num_shards]


def _remove_stale_temps(out_root: Path, utts: list[Utterance]) -> None:
    """Delete temporary files a killed run left for these utterances (``.<id>.XXXX.part.<ext>``)."""
    by_dir: dict[Path, set[str]] = {}
    for u in utts:
        by_dir.setdefault((out_root / u.rel_path).parent, set()).add(u.utt_id)
    for d, ids in by_dir.items():
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and ".part." in p.name:
                utt_id = p.name.rsplit(".part.", 1)[0][1:].rsplit(".", 1)[0]
                if utt_id in ids:
                    p.unlink(missing_ok=True)


def _row_from_files(out_root: Path, utt: Utterance) -> ManifestRow:
    base = out_root / utt.rel_path
    with np.load(base.with_name(base.name + ".npz"), allow_pickle=False) as z:
        n_frames = int(z["mouth_opening"].shape[0])
    n_samples = sf.info(str(base.with_name(base.name + ".wav"))).frames
    text = base.with_name(base.name + ".txt").read_text(encoding="utf-8").strip()
    return ManifestRow(utt.utt_id, utt.rel_path, n_frames, n_samples, text)


def write_manifests(out_root: str | Path, utts: list[Utterance]) -> dict[str, int]:
    """Write ``<out_root>/<split>.tsv`` for each split with finished clips; returns rows per split."""
    out_root = Path(out_root)
    rows: dict[str, list[ManifestRow]] = {}
    for u in utts:
        if is_done(out_root, u):
            rows.setdefault(u.split, []).append(_row_from_files(out_root, u))
    for split, split_rows in rows.items():
        write_manifest(out_root, split, split_rows)
    return {s: len(r) for s, r in rows.items()}


def write_failures(path: str | Path, failures: list[tuple[Utterance, str]]) -> None:
    """``failures.tsv``: header ``utt_id split media reason``, one row per skipped clip."""
    lines = ["\t".join(FAILURE_COLUMNS)]
    for utt, reason in sorted(failures, key=lambda f: f[0].rel_path):
        reason = " ".join(reason.split())  # one line, no tabs
        lines.append("\t".join([utt.utt_id, utt.split, str(utt.media), reason]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def failures_path(out_root: str | Path, shard_index: int = 0, num_shards: int = 1) -> Path:
    """``failures.tsv``, or ``failures.shard<i>of<n>.tsv`` when the corpus is split into shards."""
    name = "failures.tsv" if num_shards == 1 else f"failures.shard{shard_index}of{num_shards}.tsv"
    return Path(out_root) / name


def check_trust(utts: list[Utterance], trust_pickles: bool) -> None:
    """Raise :class:`LandmarkError` when any clip's landmarks are a pickle and they are not trusted."""
    pickles = [u.landmarks for u in utts if u.landmarks is not None and u.landmarks.suffix == ".pkl"]
    if pickles and not trust_pickles:
        raise LandmarkError(
            f"{len(pickles)} landmark file(s) are pickles (e.g. {pickles[0]}), which can run code when "
            "loaded: pass --trust-landmark-pickles, or convert them once to .npz with "
            "`preprocessing.py convert-pickles DIR --trust-landmark-pickles`")


def preprocess(utts: list[Utterance], out_root: str | Path, cfg: PreprocessConfig, workers: int | None = None,
               shard_index: int = 0, num_shards: int = 1, trust_pickles: bool = False,
               progress: bool = True) -> Summary:
    """Preprocess this shard of ``utts`` into ``out_root``; see the module docstring.

    Finished clips are skipped; failures go to :func:`failures_path`; manifests are rewritten
    from every finished clip of ``utts``. Raises :class:`LandmarkError` up front for untrusted
    pickles and ValueError for bad shard arguments, ``workers < 1`` or ``cfg.detect_every < 1``.
    """
    workers = cfg.workers if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cfg.detect_every < 1:
        raise ValueError(f"preprocess.detect_every must be >= 1, got {cfg.detect_every}")
    out_root = Path(out_root)
    mine = shard(utts, shard_index, num_shards)
    check_trust(mine, trust_pickles)
    out_root.mkdir(parents=True, exist_ok=True)
    todo = [u for u in mine if not is_done(out_root, u)]
    summary = Summary(resumed=len(mine) - len(todo))
    if summary.resumed:
        log.info("%d of %d clips already finished (resuming)", summary.resumed, len(mine))
    _remove_stale_temps(out_root, todo)

    start = time.perf_counter()
    cpu_start = time.process_time()
    bar = tqdm(total=len(mine), initial=summary.resumed, unit="clip", disable=not progress,
               desc=f"preprocess {out_root.name}", dynamic_ncols=True)
    if workers == 1 or len(todo) <= 1:
        _init_worker(cfg, str(out_root), trust_pickles)
        results = map(_run_one, todo)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=_init_worker,
                                            initargs=(cfg, str(out_root), trust_pickles))
        results = pool.imap_unordered(_run_one, todo, chunksize=1)
    try:
        for res in results:
            if res.failure is None:
                summary.kept += 1
                summary.frames += res.n_frames
                for k, v in res.timings.items():
                    summary.timings[k] = summary.timings.get(k, 0.0) + v
            else:
                summary.failures.append((res.utt, res.failure))
                log.debug("skipped %s: %s", res.utt.media, res.failure)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(1)
            bar.set_postfix(clips_s=f"{(summary.kept + summary.failed) / elapsed:.1f}",
                            frames_s=f"{summary.frames / elapsed:.0f}", failed=summary.failed)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
        _WORKER.clear()
    summary.seconds = time.perf_counter() - start
    summary.cpu_seconds = time.process_time() - cpu_start

    write_failures(failures_path(out_root, shard_index, num_shards), summary.failures)
    counts = write_manifests(out_root, utts)
    reasons = Counter(r.split(":")[0].split(" (")[0] for _, r in summary.failures)
    log.info("kept %d new + %d already finished clips, %d failed%s; %d frames in %.1f s "
             "(%.2f clips/s, %.0f frames/s); manifests: %s",
             summary.kept, summary.resumed, summary.failed,
             f" ({dict(reasons)}; see {failures_path(out_root, shard_index, num_shards)})" if reasons else "",
             summary.frames, summary.seconds, (summary.kept + summary.failed) / max(summary.seconds, 1e-9),
             summary.frames / max(summary.seconds, 1e-9), counts or "none")
    return summary
