"""Decode a test manifest under every condition of a corruption protocol and score it.

Each batch of clips is read once and decoded under every condition: the clip is corrupted with
its protocol entry (:func:`avsr.corruption.corrupt_utterance`: identical inputs for every model),
passed through the test transform of the model's ``DataConfig`` (centre crop, normalisation),
collated and decoded by a :class:`~avsr.decoding.Recognizer`. Clips are batched longest first
to limit padding. A clip that cannot be read, or whose length differs from the protocol's, is
reported once and left out of every condition (counted in ``n_skipped``); a manifest utterance
missing from the protocol is an error, since its corruption would be undefined. Conditions that
give a model identical inputs (an audio model under visual corruption, a lip reader under babble)
are decoded once and share that result, timings included.

Auxiliary heads (:mod:`avsr.models.heads`), scored from the same encoder pass as the decoding
(outside the timed decode, so ``decode_seconds`` and ``rtf`` are those of recognition alone):

- mouth opening (a ``"mouth"`` head), every condition: the predicted curve (mean of the
  per-modality heads, and each head alone) against the landmark curve of preprocessing, on the
  frames with a detected face (the ``.npz``'s ``face_detected``), with
  :func:`~avsr.evaluation.aux_metrics.curve_metrics`;
- lip-to-speech (an ``"l2s"`` head), only the conditions in ``speech_conditions`` (Griffin-Lim
  costs about as much as the decoding): log-mel from the (corrupted) video with the first second
  of the clean audio as speaker reference, as Kim et al. 2023 test; Griffin-Lim
  (:func:`avsr.audio_features.mel_to_wave`) per clip; STOI/ESTOI against the clean audio with
  :func:`~avsr.evaluation.aux_metrics.speech_intelligibility`.

A model without these heads gets metrics without an ``aux`` block, exactly as before.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from avsr.config import DataConfig
from avsr.corruption import OccluderBank, Protocol, corrupt_utterance
from avsr.data.dataset import Sample, collate
from avsr.data.manifest import ManifestRow
from avsr.data.transforms import SAMPLES_PER_FRAME, Clip, build_transform
from avsr.decoding.recognizer import Recognizer
from avsr.evaluation.aux_metrics import CURVE_METRICS, curve_metrics, speech_intelligibility
from avsr.evaluation.report import HypothesisRow
from avsr.evaluation.wer import error_summary, word_errors
from avsr.models.heads import MOUTH_HEAD, SPEECH_HEAD, aux_predictions, reference_mel

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
GRIFFIN_LIM_ITERS = 32  # enough for STOI to rank systems; mel_to_wave's default of 64 doubles the cost


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
    # mouth opening on face-detected frames: curve name ("mean" or a modality) -> per-utterance arrays
    mouth_ids: list[str] = field(default_factory=list)
    mouth_preds: dict[str, list[np.ndarray]] = field(default_factory=dict)
    mouth_targets: list[np.ndarray] = field(default_factory=list)
    # lip-to-speech: clean and synthesised 16 kHz waveforms
    speech_ids: list[str] = field(default_factory=list)
    speech_refs: list[np.ndarray] = field(default_factory=list)
    speech_ests: list[np.ndarray] = field(default_factory=list)


def _load(root: Path, row: ManifestRow) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(frames (T, 96, 96) uint8, wave (S,) float32, landmarks (T, 20, 2), mouth opening (T,),
    face detected (T,) bool)``; a corpus without ``face_detected`` counts every frame as detected."""
    from avsr.data.media import load_clip

    frames, wave, meta = load_clip(root, row)
    landmarks = np.asarray(meta["landmarks"], dtype=np.float32)
    opening = np.asarray(meta["mouth_opening"], dtype=np.float32)
    face = np.asarray(meta.get("face_detected", np.ones(len(opening), bool)), dtype=bool)
    if frames.ndim != 3 or len(landmarks) != len(frames) or len(opening) != len(frames) or len(face) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(landmarks)} landmark / {len(opening)} mouth-opening / "
                         f"{len(face)} face-detection frames")
    return frames, np.asarray(wave, dtype=np.float32), landmarks, opening, face


def _fit(wave: np.ndarray, n: int) -> np.ndarray:
    """``wave`` cut or zero-padded to ``n`` samples."""
    return wave[:n] if len(wave) >= n else np.pad(wave, (0, n - len(wave)))


def _finite(x: float) -> Optional[float]:
    """``x``, or None (JSON ``null``) when it is NaN or infinite (e.g. Pearson r of a constant curve)."""
    return float(x) if math.isfinite(x) else None


def _curve_summary(metrics: dict) -> dict:
    """``pooled`` and ``utterance_mean`` of :func:`curve_metrics` with NaN as None."""
    return {k: {m: _finite(metrics[k][m]) for m in CURVE_METRICS} for k in ("pooled", "utterance_mean")}


@torch.inference_mode()
def _score_aux(model: torch.nn.Module, encoded, a: _Accumulator, ids: Sequence[str], openings: Sequence[np.ndarray],
               faces: Sequence[np.ndarray], clean_waves: Optional[Sequence[np.ndarray]], griffin_lim_iters: int) -> None:
    """Add one decoded batch's auxiliary-head outputs to ``a``.

    ``encoded``: the batch's :class:`~avsr.models.EncoderOutput`; ``openings``/``faces``: target
    curve ``(T,)`` and face mask ``(T,)`` per clip; ``clean_waves``: uncorrupted ``(640 T,)``
    waveforms, or None to skip lip-to-speech.
    """
    from avsr.audio_features import log_mel, mel_to_wave

    reference = None
    if clean_waves is not None:
        device = encoded.enc.device
        lengths = torch.tensor([len(w) for w in clean_waves], dtype=torch.long, device=device)
        wave = torch.from_numpy(np.stack([_fit(w, int(lengths.max())) for w in clean_waves])).to(device)
        reference = reference_mel(*log_mel(wave, lengths))
    out = aux_predictions(model, encoded, reference)
    frames = encoded.enc_lengths.cpu().tolist()
    if "mouth_opening_pred" in out:
        head = model.aux_heads[MOUTH_HEAD]
        curves = {"mean": out["mouth_opening_pred"]}
        curves.update({name: head.predict(encoded, name) for name in head.heads})
        curves = {k: v.float().cpu().numpy() for k, v in curves.items()}
        for b, (utt_id, opening, face) in enumerate(zip(ids, openings, faces)):
            n = min(frames[b], len(opening))
            keep = face[:n]
            if not keep.any():
                continue  # no landmark target anywhere in the clip
            a.mouth_ids.append(utt_id)
            a.mouth_targets.append(opening[:n][keep])
            for name, c in curves.items():
                a.mouth_preds.setdefault(name, []).append(c[b, :n][keep])
    if "mel" in out:
        for b, (utt_id, clean) in enumerate(zip(ids, clean_waves)):
            n = frames[b]
            wave = mel_to_wave(out["mel"][b, : 4 * n].float(), n_iter=griffin_lim_iters).cpu().numpy()
            a.speech_ids.append(utt_id)
            a.speech_refs.append(clean[: SAMPLES_PER_FRAME * n])
            a.speech_ests.append(wave)


def _aux_metrics(a: _Accumulator, griffin_lim_iters: int) -> Optional[dict]:
    """The ``aux`` block of one condition (format in :mod:`avsr.evaluation.report`), or None without heads."""
    aux = {}
    if a.mouth_ids:
        mean = curve_metrics(a.mouth_preds["mean"], a.mouth_targets, a.mouth_ids)
        aux["mouth_opening"] = {**_curve_summary(mean), "n_utterances": mean["n_utterances"],
                                "n_frames": mean["n_frames"],
                                "sources": {name: _curve_summary(curve_metrics(p, a.mouth_targets, a.mouth_ids))
                                            for name, p in a.mouth_preds.items() if name != "mean"}}
    if a.speech_ids:
        s = speech_intelligibility(a.speech_refs, a.speech_ests, SAMPLE_RATE, a.speech_ids)
        aux["lip2speech"] = {"stoi": _finite(s["stoi"]), "estoi": _finite(s["estoi"]),
                             "n_utterances": s["n_utterances"], "griffin_lim_iters": griffin_lim_iters}
    return aux or None


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


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


def _input_key(protocol: Protocol, condition: str, mode: str, speech: bool) -> tuple:
    """What the inputs of a ``mode`` model under ``condition`` depend on: the corruption of each
    stream the model reads (an audio model reads no video), and whether speech is synthesised."""
    spec = protocol.data["conditions"][condition]
    return (spec["visual"] if mode != "audio" else None, spec["audio"] if mode != "video" else None, speech)


def evaluate_conditions(recognizer: Recognizer, root: str | Path, rows: Sequence[ManifestRow], protocol: Protocol,
                        conditions: Sequence[str], bank: OccluderBank, babble: Optional[Mapping[str, np.ndarray]],
                        data_cfg: DataConfig, system: str, batch_size: int,
                        speech_conditions: Sequence[str] = (), griffin_lim_iters: int = GRIFFIN_LIM_ITERS,
                        ) -> dict[str, ConditionResult]:
    """Decode ``rows`` of the corpus at ``root`` under each of ``conditions``.

    Args:
        recognizer: the model, tokenizer and decoding settings.
        protocol, bank, babble: the corruption protocol, its occluder bank and the waveforms of
            its babble split (``WaveBank.from_manifest(root, protocol.babble_split)``).
        data_cfg: the model's data settings (test crop size and normalisation).
        system: label of this system in the hypothesis rows.
        batch_size: utterances per decoded batch (>= 1).
        speech_conditions: protocol conditions where a lip-to-speech head's speech is synthesised
            and scored (those not in ``conditions`` are ignored); default none.
        griffin_lim_iters: Griffin-Lim iterations per synthesised clip (>= 1).

    Returns:
        condition -> :class:`ConditionResult` with the keys of ``results.json`` and
        ``n_skipped`` (unreadable clips), plus ``aux`` where the model has auxiliary heads (see
        the module docstring). Raises ValueError for an unknown condition (also in
        ``speech_conditions``), a bad ``batch_size`` or ``griffin_lim_iters``, or utterances
        missing from the protocol.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if griffin_lim_iters < 1:
        raise ValueError(f"griffin_lim_iters must be >= 1, got {griffin_lim_iters}")
    unknown = [c for c in [*conditions, *speech_conditions] if c not in protocol.conditions]
    if unknown:
        raise ValueError(f"{protocol.source}: unknown condition(s) {', '.join(dict.fromkeys(unknown))} "
                         f"(have: {', '.join(protocol.conditions)})")
    model = recognizer.model
    has_mouth = MOUTH_HEAD in model.aux_heads
    speech = set(speech_conditions) if SPEECH_HEAD in model.aux_heads else set()
    check_protocol_covers(protocol, rows)
    root = Path(root)
    transform = build_transform(data_cfg, train=False)
    encode = recognizer.tokenizer.encode
    # conditions that give this model identical inputs (an audio model under visual corruption,
    # a lip reader under babble) are decoded once and share one result
    decoded = {}
    for cond in conditions:
        decoded.setdefault(_input_key(protocol, cond, model.cfg.mode, cond in speech), cond)
    same_as = {c: decoded[_input_key(protocol, c, model.cfg.mode, c in speech)] for c in conditions}
    acc = {c: _Accumulator() for c in dict.fromkeys(same_as.values())}
    ordered = sorted(rows, key=lambda r: (-r.n_frames, r.utt_id))
    skipped = 0
    chunks = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    for chunk in tqdm(chunks, desc=f"decode {system}", unit="batch", leave=False):
        clips = []
        for row in chunk:
            try:
                frames, wave, landmarks, opening, face = _load(root, row)
                spec = protocol.entry(row.utt_id, conditions[0])
                if (len(frames), len(wave)) != (spec["n_frames"], spec["n_samples"]):
                    raise ValueError(f"{len(frames)} frames / {len(wave)} samples, the protocol expects "
                                     f"{spec['n_frames']} / {spec['n_samples']}")
            except Exception as exc:  # noqa: BLE001 - media decoders raise many types; report and skip
                log.warning("skipping clip %s: %s", row.file(root, ".mp4"), exc)
                skipped += 1
                continue
            clips.append((row, frames, wave, landmarks, opening, face))
        if not clips:
            continue
        for cond in acc:
            samples = []
            for row, frames, wave, landmarks, opening, _ in clips:
                frames_c, wave_c = corrupt_utterance(frames, landmarks, wave, protocol.entry(row.utt_id, cond),
                                                     bank, babble)
                wave_c = _fit(wave_c, len(frames_c) * SAMPLES_PER_FRAME)
                clip = transform(Clip(video=frames_c, landmarks=landmarks, audio=wave_c), np.random.default_rng(0))
                samples.append(Sample(utt_id=row.utt_id, transcript=row.transcript, video=clip.video,
                                      audio=np.ascontiguousarray(clip.audio, dtype=np.float32),
                                      tokens=np.asarray(encode(row.transcript), dtype=np.int64),
                                      landmarks=np.ascontiguousarray(clip.landmarks, dtype=np.float32),
                                      mouth_opening=opening))
            batch = collate(samples)
            start = time.perf_counter()
            tokens, encoded = recognizer.decode_batch(batch)
            texts = [recognizer.tokenizer.decode(t) for t in tokens]
            a = acc[cond]
            a.seconds += time.perf_counter() - start
            if has_mouth or cond in speech:
                clean = [_fit(c[2], len(c[1]) * SAMPLES_PER_FRAME) for c in clips] if cond in speech else None
                _score_aux(model, encoded, a, batch.utt_ids, [c[4] for c in clips], [c[5] for c in clips], clean,
                           griffin_lim_iters)
            a.audio_seconds += float(batch.audio_lengths.sum()) / SAMPLE_RATE
            a.utt_ids += batch.utt_ids
            a.refs += batch.transcripts
            a.hyps += texts
    out = {}
    for cond, a in acc.items():
        metrics = error_summary(a.refs, a.hyps)
        metrics.update(decode_seconds=a.seconds, rtf=a.seconds / a.audio_seconds if a.audio_seconds else 0.0,
                       n_skipped=skipped)
        aux = _aux_metrics(a, griffin_lim_iters)
        if aux is not None:
            metrics["aux"] = aux
        rows_out = []
        for utt_id, ref, hyp in zip(a.utt_ids, a.refs, a.hyps):
            e = word_errors([ref], [hyp])
            rows_out.append(HypothesisRow(utt_id, system, e.errors, e.n_ref, ref, hyp))
        out[cond] = ConditionResult(metrics, rows_out)
        log.info("%s | %s: WER %.2f%% (%d utterances), RTF %.3f", system, cond, 100 * metrics["wer"],
                 metrics["n_utterances"], metrics["rtf"])
        if aux is not None:
            mouth, l2s = aux.get("mouth_opening", {}).get("pooled", {}), aux.get("lip2speech", {})
            log.info("%s | %s: mouth opening r %s, MAE %s; lip-to-speech STOI %s, ESTOI %s", system, cond,
                     *(_fmt(d.get(k)) for d, k in ((mouth, "pearson"), (mouth, "mae"), (l2s, "stoi"), (l2s, "estoi"))))
    for cond, source in same_as.items():
        if cond != source:
            out[cond] = out[source]
            log.info("%s | %s: the inputs of %s for this model, its result", system, cond, source)
    return {c: out[c] for c in conditions}
