"""CTC decoding: greedy best path, and the vectorised CTC prefix scorer of joint decoding.

The prefix scorer follows the hybrid CTC/attention decoding of Watanabe et al., "Hybrid
CTC/Attention Architecture for End-to-End Speech Recognition" (IEEE JSTSP 2017, Sec. IV-B,
Algorithm 2); ESPnet's ``CTCPrefixScoreTH`` computes the same quantities. Notation, for a prefix
``g`` of one utterance with frame log-posteriors ``x_t(c)``:

- ``r^n_t(g)``, ``r^b_t(g)``: log-probability that the first ``t + 1`` frames emit ``g`` and that
  frame ``t`` is a non-blank (``n``) or a blank (``b``);
- ``phi_t(g, c) = log(e^{r^n_t(g)} + e^{r^b_t(g)})``, or ``r^b_t(g)`` when ``c`` repeats the last
  token of ``g`` (a repeated label needs a blank in between);
- ``psi(g + c) = logsumexp_t (phi_{t-1}(g, c) + x_t(c))``: the prefix probability of ``g + c``;
  ``psi(g + <eos>) = log(e^{r^n_{T-1}(g)} + e^{r^b_{T-1}(g)})``, the full CTC probability of ``g``.

Unlike ESPnet, which runs a Python loop over frames for every candidate, the recursions for
``r^n`` and ``r^b`` are first-order linear recurrences in probability space and are solved for
all frames at once with cumulative sums and ``logcumsumexp`` (in float64, which keeps the
cumulative sums exact to ~1e-11 for utterances of thousands of frames). Prefix scores ``psi``
are computed for every candidate; the forward variables only for the hypotheses the beam keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")


def ctc_greedy_search(log_probs: Tensor, lengths: Tensor, blank_id: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: frame-wise argmax, repeats merged, blanks removed.

    Args:
        log_probs: ``(B, T, V)`` float CTC log-posteriors (or logits: only the argmax matters).
        lengths: ``(B,)`` int64 valid frames per utterance.
        blank_id: the CTC blank.

    Returns:
        ``B`` lists of token ids. Raises ValueError when shapes disagree.
    """
    if log_probs.dim() != 3 or lengths.shape != (log_probs.shape[0],):
        raise ValueError(f"expected log_probs (B, T, V) and lengths (B,), got {tuple(log_probs.shape)} "
                         f"and {tuple(lengths.shape)}")
    best = log_probs.argmax(-1)  # (B, T)
    keep = best != blank_id
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    keep &= torch.arange(best.shape[1], device=best.device)[None] < lengths.to(best.device)[:, None]
    best, keep = best.cpu(), keep.cpu()
    return [best[b][keep[b]].tolist() for b in range(best.shape[0])]


@dataclass
class CTCPrefixState:
    """CTC forward variables of ``B x K`` hypotheses (``K`` per utterance), all ``length`` tokens long.

    - ``r_nonblank``, ``r_blank``: ``(T + 1, B, K)`` float64; row ``t + 1`` holds ``r^n_t``, ``r^b_t``
      and row 0 the initial condition (``r^b_{-1} = 0`` for the empty prefix, ``-inf`` otherwise)
    - ``psi``: ``(B, K)`` float64 prefix log-probability of each hypothesis (0 for the empty one)
    - ``last``: ``(B, K)`` int64 last token of each hypothesis (-1 for the empty one)
    - ``length``: tokens per hypothesis; a prefix of ``L`` labels cannot end before frame ``L - 1``,
      so rows ``<= L - 1`` of ``r_nonblank`` and ``<= L`` of ``r_blank`` are ``-inf`` and skipped
    """

    r_nonblank: Tensor
    r_blank: Tensor
    psi: Tensor
    last: Tensor
    length: int = 0

    def index_utterances(self, keep: Tensor) -> "CTCPrefixState":
        """The state of the utterances ``keep`` (``(B',)`` int64) only."""
        return CTCPrefixState(self.r_nonblank.index_select(1, keep), self.r_blank.index_select(1, keep),
                              self.psi.index_select(0, keep), self.last.index_select(0, keep), self.length)


class CTCPrefixScorer:
    """Vectorised CTC prefix scores for ``B`` utterances with ``K`` hypotheses each.

    Args:
        log_probs: ``(B, T, V)`` CTC log-posteriors (``log_softmax`` output; finite on valid frames).
        lengths: ``(B,)`` int64 valid frames; frames beyond are ignored.
        blank_id, eos_id: the CTC blank and the ``<sos/eos>`` id (scored as "the prefix ends here").

    Raises ValueError for mismatched shapes, a length outside ``[1, T]`` or a non-finite
    log-probability on a valid frame. Usage: :meth:`initial_state`, then per decoding step
    :meth:`score` for candidate tokens and :meth:`extend` for the hypotheses kept.

    Precision: the forward variables are float64 (their cumulative sums reach thousands of nats);
    the ``(T, B, K, C)`` log-sum-exp of :meth:`score` runs in float32 on values shifted by each
    hypothesis' maximum, which keeps every term's relative precision (~1e-6 absolute on ``psi``).
    """

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank_id: int, eos_id: int) -> None:
        if log_probs.dim() != 3 or lengths.shape != (log_probs.shape[0],):
            raise ValueError(f"expected log_probs (B, T, V) and lengths (B,), got {tuple(log_probs.shape)} "
                             f"and {tuple(lengths.shape)}")
        B, T, V = log_probs.shape
        if not (0 <= blank_id < V and 0 <= eos_id < V) or blank_id == eos_id:
            raise ValueError(f"blank_id {blank_id} and eos_id {eos_id} must be distinct ids below {V}")
        lengths = lengths.to(log_probs.device, torch.int64)
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must lie in [1, {T}], got {lengths.tolist()}")
        valid = torch.arange(T, device=log_probs.device)[:, None] < lengths[None]  # (T, B)
        x = log_probs.detach().transpose(0, 1).to(torch.float64)  # (T, B, V)
        if not bool(torch.isfinite(x[valid]).all()):
            raise ValueError("CTC log-probabilities must be finite on valid frames")
        self.x = x.masked_fill(~valid[..., None], 0.0).contiguous()
        self.x32 = self.x.float()
        self.blank_cum = self.x[:, :, blank_id].cumsum(0)  # (T, B) log P(all blanks up to t)
        self.valid = valid
        self.lengths = lengths
        self.blank_id = blank_id
        self.eos_id = eos_id

    @property
    def num_frames(self) -> int:
        return self.x.shape[0]

    def index_utterances(self, keep: Tensor) -> None:
        """Drop every utterance not in ``keep`` (``(B',)`` int64), in place."""
        self.x = self.x.index_select(1, keep)
        self.x32 = self.x32.index_select(1, keep)
        self.blank_cum = self.blank_cum.index_select(1, keep)
        self.valid = self.valid.index_select(1, keep)
        self.lengths = self.lengths.index_select(0, keep)

    def initial_state(self, beam: int) -> CTCPrefixState:
        """``K = beam`` copies of the empty prefix per utterance."""
        T, B, _ = self.x.shape
        r_nb = self.x.new_full((T + 1, B, beam), NEG_INF)
        r_b = torch.cat([self.x.new_zeros(1, B), self.blank_cum], 0)[..., None].expand(T + 1, B, beam).clone()
        psi = self.x.new_zeros(B, beam)
        last = torch.full((B, beam), -1, dtype=torch.int64, device=self.x.device)
        return CTCPrefixState(r_nb, r_b, psi, last, 0)

    def score(self, state: CTCPrefixState, candidates: Optional[Tensor] = None) -> Tensor:
        """Prefix log-probabilities ``psi(g + c)`` of candidate extensions.

        Args:
            state: the ``B x K`` hypotheses ``g``.
            candidates: ``(B, K, C)`` int64 token ids, or None for the whole vocabulary (``C = V``).

        Returns:
            ``(B, K, C)`` float64: ``psi(g + c)`` (``-inf`` for the blank; for ``<eos>`` the
            probability that ``g`` is the whole transcript). Subtract ``state.psi`` for the
            score increment.
        """
        T, B, V = self.x.shape
        K = state.psi.shape[1]
        start = min(state.length, T)  # g + c cannot emit c before frame len(g)
        valid = self.valid[start:, :, None]  # (T', B, 1)
        phi = torch.logaddexp(state.r_nonblank[start:T], state.r_blank[start:T]).masked_fill_(~valid, NEG_INF)
        top = phi.amax(0) if start < T else phi.new_zeros(B, K)  # (B, K)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        phi32 = (phi - top).float()  # (T', B, K) phi_{t-1}, shifted
        if candidates is None:
            cand = torch.arange(V, device=self.x.device).expand(B, K, V)
            x_c = self.x32[start:, :, None, :]  # (T', B, 1, V)
        else:
            cand = candidates
            C = candidates.shape[-1]
            x_c = self.x32[start:].gather(2, candidates.reshape(1, B, K * C).expand(T - start, B, K * C))
            x_c = x_c.view(T - start, B, K, C)
        psi = torch.logsumexp(phi32[..., None] + x_c, dim=0).double() + top[..., None]  # (B, K, C)
        # a repeated label: only paths whose previous frame is a blank
        x_last = self.x[start:].gather(2, state.last.clamp(min=0)[None].expand(T - start, B, K))
        r_b = state.r_blank[start:T].masked_fill(~valid, NEG_INF)
        psi_repeat = torch.logsumexp(r_b + x_last, dim=0)  # (B, K)
        psi = torch.where(cand == state.last[..., None], psi_repeat[..., None], psi)
        # <eos>: the prefix is the whole label sequence
        end = self.lengths[None, :, None].expand(1, B, K)
        psi_end = torch.logaddexp(state.r_nonblank.gather(0, end), state.r_blank.gather(0, end))[0]  # (B, K)
        psi = torch.where(cand == self.eos_id, psi_end[..., None], psi)
        return psi.masked_fill_(cand == self.blank_id, NEG_INF)

    def extend(self, state: CTCPrefixState, parent: Tensor, token: Tensor, psi: Tensor) -> CTCPrefixState:
        """The state of the hypotheses ``parent + token`` kept by the beam.

        Args:
            state: the current ``B x K`` hypotheses.
            parent: ``(B, K')`` int64 index in ``[0, K)`` of each new hypothesis' prefix.
            token: ``(B, K')`` int64 appended token (the values for ``<eos>`` or blank are
                meaningless and must not be extended further).
            psi: ``(B, K')`` float64 the new prefixes' :meth:`score`.
        """
        T = self.num_frames
        start = min(state.length, T)  # frames before len(g) cannot emit the new label
        rows = parent[None].expand(T + 1 - start, *parent.shape)
        r_nb = state.r_nonblank[start:].gather(2, rows)[:-1]  # (T', B, K') r^n_{t-1}, t >= start
        r_b = state.r_blank[start:].gather(2, rows)[:-1]
        last = state.last.gather(1, parent)
        phi = torch.where((token == last)[None], r_b, torch.logaddexp(r_nb, r_b))  # phi_{t-1}
        x_tok = self.x[start:].gather(2, token[None].expand(T - start, *token.shape))  # (T', B, K')
        # r^n_t = logsumexp_{s<=t} (phi_{s-1} + sum_{u=s..t} x_u): a linear recurrence solved by cumsum
        cum = x_tok.cumsum(0)
        new_nb = cum + torch.logcumsumexp(phi + x_tok - cum, dim=0)
        # r^b_t = logsumexp_{s<t} (r^n_s + sum_{u=s+1..t} x_u(blank))
        blank_cum = self.blank_cum[start:, :, None]
        acc = torch.logcumsumexp(new_nb - blank_cum, dim=0)
        r_nonblank = new_nb.new_full((T + 1, *token.shape), NEG_INF)
        r_blank = r_nonblank.clone()
        r_nonblank[start + 1:] = new_nb
        r_blank[start + 2:] = blank_cum[1:] + acc[:-1]
        return CTCPrefixState(r_nonblank, r_blank, psi, token.clone(), state.length + 1)
