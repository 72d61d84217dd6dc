"""Decode a test manifest under every condition of a corruption protocol and score it.

Each batch of clips is read once and decoded under every condition: the clip is corrupted with
its protocol entry (:func:`avsr.corruption.corrupt_utterance`: identical inputs for every model),
passed through the test transform of the model's ``DataConfig`` (centre crop, normalisation),
collated and decoded by a :class:`~avsr.decoding.Recognizer`. Clips are batched longest first
to limit padding. A clip that cannot be read, or whose length differs from the protocol's, is
reported once and left out of every condition (counted in ``n_skipped``); a manifest utterance
missing from the protocol is an error, since its corruption would be undefined.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from tqdm import tqdm

from avsr.config import DataConfig
from avsr.corruption import OccluderBank, Protocol, corrupt_utterance
from avsr.data.dataset import Sample, collate
from avsr.data.manifest import ManifestRow
from avsr.data.transforms import SAMPLES_PER_FRAME, Clip, build_transform
from avsr.decoding.recognizer import Recognizer
from avsr.evaluation.report import HypothesisRow
from avsr.evaluation.wer import error_summary, word_errors

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


@dataclass
class ConditionResult:
    """What one system produced under one condition: ``metrics`` (``results.json`` keys) and rows."""

    metrics: dict
    hypotheses: list[HypothesisRow] = field(default_factory=list)


@dataclass
class _Accumulator:
    utt_ids: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    hyps: list[str] = field(default_factory=list)
    seconds: float = 0.0
    audio_seconds: float = 0.0


def _load(root: Path, row: ManifestRow) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(frames (T, 96, 96) uint8, wave (S,) float32, landmarks (T, 20, 2), mouth opening (T,))``."""
    from avsr.data.media import load_clip

    frames, wave, meta = load_clip(root, row)
    landmarks = np.asarray(meta["landmarks"], dtype=np.float32)
    opening = np.asarray(meta["mouth_opening"], dtype=np.float32)
    if frames.ndim != 3 or len(landmarks) != len(frames) or len(opening) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(landmarks)} landmark / {len(opening)} mouth-opening frames")
    return frames, np.asarray(wave, dtype=np.float32), landmarks, opening


def check_protocol_covers(protocol: Protocol, rows: Sequence[ManifestRow]) -> None:
    """Raise ValueError unless every manifest utterance has a protocol entry (warn about extra entries)."""
    have = set(protocol.utt_ids)
    missing = [r.utt_id for r in rows if r.utt_id not in have]
    if missing:
        raise ValueError(f"{protocol.source}: {len(missing)} of {len(rows)} test utterances have no protocol entry "
                         f"(e.g. {', '.join(missing[:3])}); make the protocol from this manifest")
    extra = len(have) - len(rows)
    if extra > 0:
        log.warning("%s: %d protocol utterances are not in the manifest and are not decoded", protocol.source, extra)


def evaluate_conditions(recognizer: Recognizer, root: str | Path, rows: Sequence[ManifestRow], protocol: Protocol,
                        conditions: Sequence[str], bank: OccluderBank, babble: Optional[Mapping[str, np.ndarray]],
                        data_cfg: DataConfig, system: str, batch_size: int) -> dict[str, ConditionResult]:
    """Decode ``rows`` of the corpus at ``root`` under each of ``conditions``.

    Args:
        recognizer: the model, tokenizer and decoding settings.
        protocol, bank, babble: the corruption protocol, its occluder bank and the waveforms of
            its babble split (``WaveBank.from_manifest(root, protocol.babble_split)``).
        data_cfg: the model's data settings (test crop size and normalisation).
        system: label of this system in the hypothesis rows.
        batch_size: utterances per decoded batch (>= 1).

    Returns:
        condition -> :class:`ConditionResult` with the keys of ``results.json`` and
        ``n_skipped`` (unreadable clips). Raises ValueError for an unknown condition, a bad
        ``batch_size`` or utterances missing from the protocol.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unknown = [c for c in conditions if c not in protocol.conditions]
    if unknown:
        raise ValueError(f"{protocol.source}: unknown condition(s) {', '.join(unknown)} "
                         f"(have: {', '.join(protocol.conditions)})")
    check_protocol_covers(protocol, rows)
    root = Path(root)
    transform = build_transform(data_cfg, train=False)
    encode = recognizer.tokenizer.encode
    acc = {c: _Accumulator() for c in conditions}
    ordered = sorted(rows, key=lambda r: (-r.n_frames, r.utt_id))
    skipped = 0
    chunks = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    for chunk in tqdm(chunks, desc=f"decode {system}", unit="batch", leave=False):
        clips = []
        for row in chunk:
            try:
                frames, wave, landmarks, opening = _load(root, row)
                spec = protocol.entry(row.utt_id, conditions[0])
                if (len(frames), len(wave)) != (spec["n_frames"], spec["n_samples"]):
                    raise ValueError(f"{len(frames)} frames / {len(wave)} samples, the protocol expects "
                                     f"{spec['n_frames']} / {spec['n_samples']}")
            except Exception as exc:  # noqa: BLE001 - media decoders raise many types; report and skip
                log.warning("skipping clip %s: %s", row.file(root, ".mp4"), exc)
                skipped += 1
                continue
            clips.append((row, frames, wave, landmarks, opening))
        if not clips:
            continue
        for cond in conditions:
            samples = []
            for row, frames, wave, landmarks, opening in clips:
                frames_c, wave_c = corrupt_utterance(frames, landmarks, wave, protocol.entry(row.utt_id, cond),
                                                     bank, babble)
                n = len(frames_c) * SAMPLES_PER_FRAME
                wave_c = wave_c[:n] if len(wave_c) >= n else np.pad(wave_c, (0, n - len(wave_c)))
                clip = transform(Clip(video=frames_c, landmarks=landmarks, audio=wave_c), np.random.default_rng(0))
                samples.append(Sample(utt_id=row.utt_id, transcript=row.transcript, video=clip.video,
                                      audio=np.ascontiguousarray(clip.audio, dtype=np.float32),
                                      tokens=np.asarray(encode(row.transcript), dtype=np.int64),
                                      landmarks=np.ascontiguousarray(clip.landmarks, dtype=np.float32),
                                      mouth_opening=opening))
            batch = collate(samples)
            start = time.perf_counter()
            texts = recognizer(batch)
            a = acc[cond]
            a.seconds += time.perf_counter() - start
            a.audio_seconds += float(batch.audio_lengths.sum()) / SAMPLE_RATE
            a.utt_ids += batch.utt_ids
            a.refs += batch.transcripts
            a.hyps += texts
    out = {}
    for cond, a in acc.items():
        metrics = error_summary(a.refs, a.hyps)
        metrics.update(decode_seconds=a.seconds, rtf=a.seconds / a.audio_seconds if a.audio_seconds else 0.0,
                       n_skipped=skipped)
        rows_out = []
        for utt_id, ref, hyp in zip(a.utt_ids, a.refs, a.hyps):
            e = word_errors([ref], [hyp])
            rows_out.append(HypothesisRow(utt_id, system, e.errors, e.n_ref, ref, hyp))
        out[cond] = ConditionResult(metrics, rows_out)
        log.info("%s | %s: WER %.2f%% (%d utterances), RTF %.3f", system, cond, 100 * metrics["wer"],
                 metrics["n_utterances"], metrics["rtf"])
    return out
