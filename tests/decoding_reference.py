"""Reference (unbatched) joint CTC/attention beam search, for tests and the decoding benchmark.

Written to be obviously right rather than fast: one utterance, a Python loop over hypotheses
and candidate tokens, a full decoder (and LM) forward of every prefix with no cache, and CTC
prefix scores from ESPnet-style frame-by-frame recursions (``CTCPrefixScore``, Watanabe et al.
2017, Algorithm 2) in NumPy. It applies the rules of :mod:`avsr.decoding.beam_search`
(pre-beam, blank never emitted, forced ``<eos>`` at the maximum length, the same stopping rule),
so :class:`~avsr.decoding.beam_search.BeamSearch` must return the same hypotheses and scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NEG_INF = -np.inf


@dataclass
class _RefHyp:
    tokens: tuple[int, ...]
    score: float
    r: np.ndarray  # (T, 2) float64: r^n_t, r^b_t of the prefix
    psi: float  # prefix log-probability


def _ctc_initial(x: np.ndarray, blank: int) -> np.ndarray:
    r = np.full((x.shape[0], 2), NEG_INF)
    r[:, 1] = np.cumsum(x[:, blank])
    return r


def _ctc_extend(x: np.ndarray, hyp: _RefHyp, cands: np.ndarray, blank: int) -> tuple[np.ndarray, np.ndarray]:
    """``psi`` ``(C,)`` and ``r`` ``(T, 2, C)`` of ``hyp + c`` for every candidate ``c``, frame by frame."""
    T = x.shape[0]
    r = np.full((T, 2, len(cands)), NEG_INF)
    xs = x[:, cands]  # (T, C)
    empty = len(hyp.tokens) == 0
    if empty:
        r[0, 0] = xs[0]
    phi = np.logaddexp(hyp.r[:, 0], hyp.r[:, 1])[:, None].repeat(len(cands), 1)  # (T, C)
    if not empty:
        same = cands == hyp.tokens[-1]
        phi[:, same] = hyp.r[:, 1:2]
    psi = r[0, 0].copy()
    for t in range(1, T):
        r[t, 0] = np.logaddexp(r[t - 1, 0], phi[t - 1]) + xs[t]
        r[t, 1] = np.logaddexp(r[t - 1, 0], r[t - 1, 1]) + x[t, blank]
        psi = np.logaddexp(psi, phi[t - 1] + xs[t])
    return psi, r


def reference_beam_search(decoder, enc: torch.Tensor, ctc_log_probs: torch.Tensor | None, *, vocab_size: int,
                          sos_id: int, eos_id: int, blank_id: int = 0, beam_size: int, ctc_weight: float,
                          lm=None, lm_weight: float = 0.0, length_penalty: float = 0.0, max_len_ratio: float = 1.0,
                          pre_beam_ratio: float = 1.5, nbest: int = 1) -> list[tuple[tuple[int, ...], float]]:
    """Decode one utterance: ``enc`` ``(T, D)`` (all frames valid), ``ctc_log_probs`` ``(T, V)``.

    Returns up to ``nbest`` ``(tokens, score)`` pairs, best first.
    """
    T = enc.shape[0]
    x = ctc_log_probs.double().numpy() if ctc_log_probs is not None and ctc_weight > 0 else None
    maxlen = max(1, math.floor(T * max_len_ratio))
    pre_beam = min(vocab_size, int(pre_beam_ratio * beam_size))
    memory, mask = enc[None], torch.ones(1, T, dtype=torch.bool)
    running = [_RefHyp((), 0.0, _ctc_initial(x, blank_id) if x is not None else None, 0.0)]
    ended: list[tuple[tuple[int, ...], float]] = []
    bonus = max(length_penalty, 0.0)
    for i in range(maxlen + 1):
        cands = []
        for hyp in running:
            ys = torch.tensor([[sos_id, *hyp.tokens]])
            base = torch.full((vocab_size,), float(length_penalty))
            with torch.no_grad():
                if ctc_weight < 1.0:
                    base += (1.0 - ctc_weight) * decoder.forward_step(ys, memory, mask, None)[0][0].float()
                if lm is not None and lm_weight > 0:
                    base += lm_weight * lm.forward_step(ys, None)[0][0].float()
            if i == maxlen:
                ids = np.array([eos_id])
            elif x is not None and pre_beam < vocab_size and ctc_weight < 1.0:
                ids = torch.topk(base, pre_beam).indices.numpy()
            else:
                ids = np.arange(vocab_size)
            ids = ids[ids != blank_id]
            if x is not None:
                content = ids[ids != eos_id]
                psi, r = _ctc_extend(x, hyp, content, blank_id)
                by_id = {int(c): (psi[k], r[:, :, k]) for k, c in enumerate(content)}
                by_id[eos_id] = (np.logaddexp(hyp.r[-1, 0], hyp.r[-1, 1]), None)
            for c in ids.tolist():
                s = float(base[c])
                new_psi, new_r = (by_id[c] if x is not None else (0.0, None))
                if x is not None:
                    s += ctc_weight * float(new_psi - hyp.psi)
                cands.append((hyp.score + s, hyp, c, new_r, float(new_psi)))
        cands = [c for c in cands if c[0] > -math.inf]
        cands.sort(key=lambda c: -c[0])
        running = []
        for total, hyp, c, r, psi in cands[:beam_size]:
            if c == eos_id:
                ended.append((hyp.tokens, total))
            else:
                running.append(_RefHyp(hyp.tokens + (c,), total, r, psi))
        ended.sort(key=lambda e: -e[1])
        ended = ended[:nbest]
        threshold = ended[-1][1] if len(ended) == nbest else -math.inf
        if not running or i >= maxlen or max(h.score for h in running) + bonus * (maxlen - i) <= threshold:
            break
    return ended
