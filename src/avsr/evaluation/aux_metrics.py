"""Metrics of the auxiliary tasks: mouth-opening curves (Pearson r, MAE, R²) and speech (STOI, ESTOI).

Curve metrics are given two ways, because they answer different questions:

- ``pooled``: all frames of all utterances concatenated — also scores the level of the curve
  across utterances and speakers (a speaker who opens the mouth wider must get a higher curve);
- ``utterance_mean``: the metric of each utterance, averaged — scores the shape over time within an
  utterance, whatever its offset and scale (the R3MOE/lip-sync view).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

CURVE_METRICS = ("pearson", "mae", "r2")


def pearson_r(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson correlation of two equal-length 1-D arrays; NaN when either is constant or empty.

    Raises ValueError when the shapes differ.
    """
    pred, target = _pair(pred, target)
    if pred.size < 2:
        return math.nan
    p, t = pred - pred.mean(), target - target.mean()
    denom = math.sqrt(float((p * p).sum()) * float((t * t).sum()))
    return float((p * t).sum() / denom) if denom > 0 else math.nan


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error (target units); NaN when empty. Raises ValueError when the shapes differ."""
    pred, target = _pair(pred, target)
    return float(np.abs(pred - target).mean()) if pred.size else math.nan


def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (can be negative); NaN when the target is constant."""
    pred, target = _pair(pred, target)
    ss_tot = float(((target - target.mean()) ** 2).sum()) if target.size else 0.0
    return 1.0 - float(((target - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} values but target has {target.size}")
    return pred, target


def _all(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"pearson": pearson_r(pred, target), "mae": mae(pred, target), "r2": r2_score(pred, target)}


def dtw_warp(values: np.ndarray, query_feats: np.ndarray, ref_feats: np.ndarray) -> np.ndarray:
    """Per-frame ``values`` ``(Tq, ...)`` of a query sequence, carried onto the frames of a reference
    through the DTW path between their features (``query_feats`` ``(Tq, D)``, ``ref_feats``
    ``(Tr, D)``, Euclidean frame cost, tslearn's ``dtw_path``): frame ``j`` of the result is the
    mean of the values of the query frames the path matches to reference frame ``j``. Used to score
    a curve predicted from a TTS rendition against the recorded track of the same sentence.

    Returns ``(Tr, ...)``. Raises ``ValueError`` when the lengths or feature sizes do not fit.
    """
    from tslearn.metrics import dtw_path

    values, query_feats, ref_feats = np.asarray(values), np.asarray(query_feats), np.asarray(ref_feats)
    if len(values) != len(query_feats) or not len(ref_feats) or query_feats.shape[1:] != ref_feats.shape[1:]:
        raise ValueError(f"{len(values)} values for {len(query_feats)} query frames of {query_feats.shape[1:]} "
                         f"features against {len(ref_feats)} reference frames of {ref_feats.shape[1:]}")
    path, _ = dtw_path(query_feats.astype(np.float64), ref_feats.astype(np.float64))
    q, r = np.array(path).T
    total = np.zeros((len(ref_feats),) + values.shape[1:])
    np.add.at(total, r, values[q])
    return total / np.bincount(r, minlength=len(ref_feats)).reshape((-1,) + (1,) * (values.ndim - 1))


def curve_metrics(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                  utt_ids: Optional[Sequence[str]] = None) -> dict:
    """Pearson r, MAE and R² of predicted vs target curves, pooled and per utterance.

    Args:
        preds, targets: one 1-D array per utterance (same lengths pairwise), e.g. mouth opening at
            25 fps; trim padding first.
        utt_ids: names of the utterances (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{"pooled": {pearson, mae, r2}, "utterance_mean": {pearson, mae, r2}, "utterances":
        {utt_id: {pearson, mae, r2}}, "n_utterances": int, "n_frames": int}``; per-utterance means
        skip NaN values (constant curves).

    Raises:
        ValueError: when the lists differ in length or are empty, or a pair differs in length.
    """
    if len(preds) != len(targets) or not preds:
        raise ValueError(f"need equally many (>0) predictions and targets, got {len(preds)} and {len(targets)}")
    utt_ids = list(utt_ids) if utt_ids is not None else [str(i) for i in range(len(preds))]
    if len(utt_ids) != len(preds):
        raise ValueError(f"got {len(utt_ids)} utterance ids for {len(preds)} curves")
    per_utt = {u: _all(p, t) for u, p, t in zip(utt_ids, preds, targets)}
    mean = {}
    for key in CURVE_METRICS:
        vals = [m[key] for m in per_utt.values() if not math.isnan(m[key])]
        mean[key] = float(np.mean(vals)) if vals else math.nan
    pooled = _all(np.concatenate([np.ravel(p) for p in preds]), np.concatenate([np.ravel(t) for t in targets]))
    return {"pooled": pooled, "utterance_mean": mean, "utterances": per_utt,
            "n_utterances": len(preds), "n_frames": int(sum(np.size(t) for t in targets))}


def speech_intelligibility(refs: Sequence[np.ndarray], ests: Sequence[np.ndarray], sample_rate: int = 16000,
                           utt_ids: Optional[Sequence[str]] = None) -> dict:
    """STOI and extended STOI (pystoi; Taal et al. 2011, Jensen & Taal 2016) of estimated vs real speech.

    Args:
        refs, ests: one 1-D float waveform per utterance at ``sample_rate``; an estimate is trimmed
            or zero-padded to its reference's length.

    Returns:
        ``{"stoi": mean, "estoi": mean, "utterances": {utt_id: {"stoi", "estoi"}}, "n_utterances"}``.

    Raises:
        ValueError: when the lists differ in length or are empty.
    """
    from pystoi import stoi

    if len(refs) != len(ests) or not refs:
        raise ValueError(f"need equally many (>0) references and estimates, got {len(refs)} and {len(ests)}")
    utt_ids = list(utt_ids) if utt_ids is not None else [str(i) for i in range(len(refs))]
    per_utt = {}
    for u, ref, est in zip(utt_ids, refs, ests):
        ref = np.asarray(ref, dtype=np.float64).reshape(-1)
        est = np.asarray(est, dtype=np.float64).reshape(-1)[: ref.size]
        est = np.pad(est, (0, ref.size - est.size))
        per_utt[u] = {"stoi": float(stoi(ref, est, sample_rate)),
                      "estoi": float(stoi(ref, est, sample_rate, extended=True))}
    return {"stoi": float(np.mean([m["stoi"] for m in per_utt.values()])),
            "estoi": float(np.mean([m["estoi"] for m in per_utt.values()])),
            "utterances": per_utt, "n_utterances": len(refs)}
