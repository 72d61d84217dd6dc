"""Batched joint CTC/attention beam search with optional language-model shallow fusion.

Every step extends ``B`` utterances x ``K`` beams at once: one incremental decoder call (cached
keys/values, reordered with ``index_select``), one incremental LM call, vectorised CTC prefix
scores (:class:`~avsr.decoding.ctc.CTCPrefixScorer`) and one ``topk`` per utterance. There is no
Python loop over hypotheses. A hypothesis ``y`` scores (Watanabe et al. 2017, Eq. 43; ESPnet's
weighting)::

    (1 - ctc_weight) log P_att(y) + ctc_weight log P_ctc(y) + lm_weight log P_lm(y) + length_penalty |y|

summed over its tokens and the final ``<eos>`` (so ``|y|`` counts ``<eos>`` too). Rules:

- Pre-beam (ESPnet): when ``pre_beam = int(pre_beam_ratio * beam_size)`` is smaller than the
  vocabulary, only the ``pre_beam`` best tokens of each hypothesis by the attention + LM + length
  score get CTC prefix scores; the others are dropped.
- Selection (ESPnet's batch beam search): the ``beam_size`` best extensions of an utterance over
  all its running hypotheses; those ending in ``<eos>`` leave the beam for the ended list, so the
  next step extends the rest. The CTC blank is never a hypothesis token.
- Maximum length: ``max(1, int(max_len_ratio * T_enc))`` tokens before ``<eos>``; at that length
  only ``<eos>`` may follow.
- End detection: an utterance stops once none of its running hypotheses can overtake its
  ``nbest``-th ended one. Every score term is a log-probability (``<= 0``), so a running score
  can only grow through a positive length bonus, bounded by ``length_penalty`` times the tokens
  still allowed: with ``length_penalty <= 0`` this is exact, the n-best is what an exhaustive run
  to the maximum length would return. Finished utterances leave the batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from avsr.decoding.ctc import NEG_INF, CTCPrefixScorer
from avsr.models.decoder import DecoderCache

log = logging.getLogger(__name__)


class IncrementalDecoder(Protocol):
    """The attention decoder's incremental interface (``AVSRModel.decoder``)."""

    def forward_step(self, ys: Tensor, memory: Tensor, memory_mask: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """``ys`` ``(N, l)`` int64 prefixes (``<sos>`` first), ``memory`` ``(N, T, D)``, ``memory_mask``
        ``(N, T)`` bool (True = valid) -> next-token log-probs ``(N, V)`` and the new cache."""
        ...


class IncrementalLM(Protocol):
    """A language model with an incremental step (:class:`~avsr.decoding.lm.TransformerLM`)."""

    def forward_step(self, ys: Tensor, cache: Any) -> tuple[Tensor, Any]: ...


@dataclass(frozen=True)
class Hypothesis:
    """One decoded hypothesis: ``tokens`` without ``<sos>``/``<eos>``, and its total ``score``."""

    tokens: tuple[int, ...]
    score: float


def select_rows(tree: Any, index: Tensor) -> Any:
    """Rows ``index`` of a cache: its own ``select(index)`` method when it has one (e.g.
    :class:`~avsr.models.decoder.DecoderCache`), else ``index_select(0, index)`` on every tensor of a
    nested list/tuple/dict (None stays None)."""
    if tree is None:
        return None
    if isinstance(tree, Tensor):
        return tree.index_select(0, index)
    if callable(getattr(tree, "select", None)):
        return tree.select(index)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
        return type(tree)(*(select_rows(t, index) for t in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(select_rows(t, index) for t in tree)
    if isinstance(tree, dict):
        return {k: select_rows(v, index) for k, v in tree.items()}
    raise TypeError(f"cannot reorder a decoder cache holding {type(tree).__name__}")


def reorder_cache(cache: Any, index: Tensor, within_utterances: bool) -> Any:
    """Rows ``index`` of a decoder cache.

    ``within_utterances`` says every row moves to a row of the same utterance (a beam reorder):
    then the cross-attention keys/values of a :class:`~avsr.models.decoder.DecoderCache`, which
    are equal for all hypotheses of an utterance, are kept as they are instead of copied.
    """
    if within_utterances and isinstance(cache, DecoderCache):
        pick = [t.index_select(0, index) for t in cache.self_k], [t.index_select(0, index) for t in cache.self_v]
        return DecoderCache(pick[0], pick[1], cache.memory_k, cache.memory_v)
    return select_rows(cache, index)


class BeamSearch:
    """Joint CTC/attention beam search over a batch of encoded utterances (rules in the module doc).

    Args:
        decoder: the attention decoder (:class:`IncrementalDecoder`); unused when ``ctc_weight == 1``.
        vocab_size, sos_id, eos_id, blank_id: the tokenizer's id layout.
        beam_size: hypotheses kept per utterance (paper: 40).
        ctc_weight: weight of the CTC prefix score in ``[0, 1]`` (paper: 0.1).
        lm: optional :class:`IncrementalLM` over the same ids; ``lm_weight`` its fusion weight.
        length_penalty: bonus added per output token (``<eos>`` included); negative penalises length.
        max_len_ratio: longest hypothesis as a fraction of the encoder frames (> 0).
        pre_beam_ratio: CTC-scored candidates per hypothesis, as a multiple of ``beam_size``.
        nbest: hypotheses returned per utterance (``<= beam_size``).

    Raises ValueError for an out-of-range argument.
    """

    def __init__(self, decoder: Optional[IncrementalDecoder], vocab_size: int, sos_id: int, eos_id: int,
                 blank_id: int = 0, *, beam_size: int = 40, ctc_weight: float = 0.1,
                 lm: Optional[IncrementalLM] = None, lm_weight: float = 0.0, length_penalty: float = 0.0,
                 max_len_ratio: float = 1.0, pre_beam_ratio: float = 1.5, nbest: int = 1) -> None:
        if beam_size < 1 or not 1 <= nbest <= beam_size:
            raise ValueError(f"need beam_size >= 1 and 1 <= nbest <= beam_size, got {beam_size} and {nbest}")
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must lie in [0, 1], got {ctc_weight}")
        if decoder is None and ctc_weight < 1.0:
            raise ValueError("an attention decoder is needed unless ctc_weight == 1")
        if lm_weight < 0.0 or (lm_weight > 0.0 and lm is None):
            raise ValueError(f"lm_weight must be >= 0 and needs an LM, got {lm_weight} with lm={lm is not None}")
        if max_len_ratio <= 0.0 or pre_beam_ratio <= 0.0:
            raise ValueError(f"max_len_ratio and pre_beam_ratio must be positive, got {max_len_ratio} and "
                             f"{pre_beam_ratio}")
        if not all(0 <= i < vocab_size for i in (sos_id, eos_id, blank_id)) or blank_id == eos_id:
            raise ValueError(f"sos {sos_id}, eos {eos_id}, blank {blank_id} must be ids below {vocab_size}, "
                             "with blank != eos")
        self.decoder = decoder
        self.vocab_size = vocab_size
        self.sos_id, self.eos_id, self.blank_id = sos_id, eos_id, blank_id
        self.beam_size = beam_size
        self.ctc_weight = ctc_weight
        self.lm = lm if lm_weight > 0.0 else None
        self.lm_weight = lm_weight
        self.length_penalty = length_penalty
        self.max_len_ratio = max_len_ratio
        self.pre_beam = min(vocab_size, int(pre_beam_ratio * beam_size))
        self.nbest = nbest

    def max_lengths(self, enc_lengths: Tensor) -> Tensor:
        """``(B,)`` int64 most tokens (``<eos>`` excluded) allowed per utterance."""
        return (enc_lengths.double() * self.max_len_ratio).floor().long().clamp(min=1)

    @torch.inference_mode()
    def __call__(self, enc: Tensor, enc_lengths: Tensor,
                 ctc_log_probs: Optional[Tensor] = None) -> list[list[Hypothesis]]:
        """Decode a batch.

        Args:
            enc: ``(B, T, D)`` encoder output (the decoder's memory).
            enc_lengths: ``(B,)`` int64 valid frames, each in ``[1, T]``.
            ctc_log_probs: ``(B, T, V)`` CTC log-posteriors; required when ``ctc_weight > 0``.

        Returns:
            per utterance, its ended hypotheses best first (at most ``nbest``; empty only if every
            hypothesis was scored ``-inf``).
        """
        B, T, _ = enc.shape
        if enc_lengths.shape != (B,):
            raise ValueError(f"enc_lengths must be ({B},), got {tuple(enc_lengths.shape)}")
        if self.ctc_weight > 0 and (ctc_log_probs is None or ctc_log_probs.shape[:2] != (B, T)):
            raise ValueError("ctc_weight > 0 needs ctc_log_probs of shape (B, T, V) matching enc")
        if B == 0:
            return []
        device, K, V = enc.device, self.beam_size, self.vocab_size
        enc_lengths = enc_lengths.to(device)
        ctc = CTCPrefixScorer(ctc_log_probs, enc_lengths, self.blank_id, self.eos_id) if self.ctc_weight > 0 else None
        maxlen = self.max_lengths(enc_lengths)
        longest = int(maxlen.max())
        # step 0 extends one empty prefix per utterance; afterwards K hypotheses per utterance
        # sit in consecutive rows (utterance-major), so a within-utterance reorder never
        # changes the memory rows.
        memory = enc
        memory_mask = torch.arange(T, device=device)[None] < enc_lengths[:, None]
        ys = torch.full((B, longest + 2), self.sos_id, dtype=torch.int64, device=device)
        score = enc.new_zeros((B, 1), dtype=torch.float32)
        ctc_state = ctc.initial_state(1) if ctc is not None else None
        dec_cache: Any = None
        lm_cache: Any = None
        ended_score = torch.full((B, self.nbest), NEG_INF, device=device)
        ended_tokens = torch.zeros((B, self.nbest, longest + 2), dtype=torch.int64, device=device)
        ended_len = torch.zeros((B, self.nbest), dtype=torch.int64, device=device)
        utt = torch.arange(B, device=device)  # original index of each utterance still decoding
        results: list[list[Hypothesis]] = [[] for _ in range(B)]
        bonus = max(self.length_penalty, 0.0)

        for i in range(longest + 1):
            nb, kc = score.shape
            prefix = ys[:, :i + 1]
            step = enc.new_full((nb * kc, V), self.length_penalty, dtype=torch.float32)
            if self.ctc_weight < 1.0:
                att, dec_cache = self.decoder.forward_step(prefix, memory, memory_mask, dec_cache)
                step.add_(att.float(), alpha=1.0 - self.ctc_weight)
            if self.lm is not None:
                lm_lp, lm_cache = self.lm.forward_step(prefix, lm_cache)
                step.add_(lm_lp.float(), alpha=self.lm_weight)
            step = step.view(nb, kc, V)
            at_max = (maxlen == i)[:, None, None]
            step[..., :self.eos_id].masked_fill_(at_max, NEG_INF)
            step[..., self.eos_id + 1:].masked_fill_(at_max, NEG_INF)
            cand = None
            if ctc is not None:
                if self.pre_beam < V and self.ctc_weight < 1.0:
                    cand = step.topk(self.pre_beam, dim=-1).indices  # (nb, kc, C)
                    step = step.gather(2, cand)
                psi = ctc.score(ctc_state, cand)
                step = step + self.ctc_weight * (psi - ctc_state.psi[..., None]).float()
            else:
                step[..., self.blank_id] = NEG_INF
            C = step.shape[-1]
            total = (score[..., None] + step).view(nb, kc * C)
            top_score, top = total.topk(min(K, kc * C), dim=-1)  # (nb, k)
            k = top.shape[1]
            parent = torch.div(top, C, rounding_mode="floor")
            token = cand.view(nb, kc * C).gather(1, top) if cand is not None else top - parent * C
            flat_parent = (parent + torch.arange(nb, device=device)[:, None] * kc).view(-1)
            ys = ys.index_select(0, flat_parent)
            ys[:, i + 1] = token.view(-1)

            is_end = (token == self.eos_id) & torch.isfinite(top_score)
            if bool(is_end.any()):
                pool_score = torch.cat([ended_score, top_score.masked_fill(~is_end, NEG_INF)], 1)
                pool_tokens = torch.cat([ended_tokens, ys.view(nb, k, -1)], 1)
                pool_len = torch.cat([ended_len, ended_len.new_full((nb, k), i)], 1)
                ended_score, best = pool_score.topk(self.nbest, dim=1)
                ended_tokens = pool_tokens.gather(1, best[..., None].expand(-1, -1, pool_tokens.shape[2]))
                ended_len = pool_len.gather(1, best)
            score = top_score.masked_fill(token == self.eos_id, NEG_INF)

            best_running = score.max(1).values
            reachable = best_running + bonus * (maxlen - i).clamp(min=0).to(score.dtype)
            done = (best_running == NEG_INF) | (maxlen <= i) | (reachable <= ended_score[:, -1])
            rows_changed = k != kc
            if bool(done.any()):
                fin = done.nonzero().squeeze(1)
                self._collect(results, utt[fin], ended_score[fin], ended_tokens[fin], ended_len[fin])
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                utt, maxlen, score, parent, token = utt[keep], maxlen[keep], score[keep], parent[keep], token[keep]
                ended_score, ended_tokens, ended_len = ended_score[keep], ended_tokens[keep], ended_len[keep]
                rows = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)
                ys, flat_parent = ys[rows], flat_parent[rows]
                if ctc is not None:
                    ctc.index_utterances(keep)
                    ctc_state = ctc_state.index_utterances(keep)
                    psi, top = psi[keep], top[keep]
                rows_changed = True
            if rows_changed:
                memory, memory_mask = memory.index_select(0, flat_parent), memory_mask.index_select(0, flat_parent)
            dec_cache = reorder_cache(dec_cache, flat_parent, within_utterances=not rows_changed)
            lm_cache = select_rows(lm_cache, flat_parent)
            if ctc is not None:
                ctc_state = ctc.extend(ctc_state, parent, token, psi.view(psi.shape[0], -1).gather(1, top))
        return results

    @staticmethod
    def _collect(results: list[list[Hypothesis]], utt: Tensor, scores: Tensor, tokens: Tensor, lengths: Tensor) -> None:
        """Store the ended hypotheses of the finished utterances ``utt`` (original indices)."""
        scores, tokens, lengths = scores.cpu(), tokens.cpu(), lengths.cpu()
        for j, u in enumerate(utt.tolist()):
            results[u] = [Hypothesis(tuple(tokens[j, n, 1:1 + int(lengths[j, n])].tolist()), float(scores[j, n]))
                          for n in range(scores.shape[1]) if math.isfinite(float(scores[j, n]))]
