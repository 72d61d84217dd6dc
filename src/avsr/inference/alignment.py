"""Token and word times from CTC: Viterbi forced alignment of decoded tokens to CTC posteriors.

The decoded token ids (from greedy CTC or beam search) are aligned to the frame-level CTC
log-probabilities with :func:`torchaudio.functional.forced_align` (the best CTC path that spells
exactly those tokens); a token's time span is the run of frames on which the path emits it, and
its score the mean posterior probability over those frames. Words are runs of tokens between
word boundaries (a token whose text starts with a space, or a space token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torchaudio.functional as AF

from avsr.text import Tokenizer


class AlignmentError(ValueError):
    """The tokens cannot be aligned: the CTC output is too short for them (with their repeats)."""


@dataclass(frozen=True)
class TokenSpan:
    """Token ``token`` emitted on frames ``[start, end)``; ``score`` = mean posterior probability."""

    token: int
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class TimedToken:
    """One decoded token: id, its text (with a leading space at a word start), times in seconds."""

    id: int
    text: str
    start: float
    end: float
    score: float


@dataclass(frozen=True)
class TimedWord:
    """One word of the transcript with the times (seconds) of its first and last token."""

    word: str
    start: float
    end: float


def align_tokens(log_probs: torch.Tensor, tokens: Sequence[int], blank: int = 0) -> list[TokenSpan]:
    """Viterbi forced alignment of ``tokens`` to CTC output.

    Args:
        log_probs: ``(T, V)`` float CTC log-probabilities (log-softmax over ``V``) of one utterance.
        tokens: token ids to align (no blanks), in order.
        blank: CTC blank id.

    Returns:
        One :class:`TokenSpan` per token, frames in ``[0, T)``, in order; ``[]`` for no tokens.

    Raises:
        AlignmentError: when ``T`` is shorter than the tokens plus their repeats (CTC needs a
            blank between two equal tokens) or a token id is the blank.
        ValueError: when ``log_probs`` is not 2-D.
    """
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be (T, V), got shape {tuple(log_probs.shape)}")
    if len(tokens) == 0:
        return []
    if blank in tokens:
        raise AlignmentError(f"token ids to align contain the blank id {blank}")
    repeats = sum(int(a == b) for a, b in zip(tokens[:-1], tokens[1:]))
    n_frames = log_probs.shape[0]
    if n_frames < len(tokens) + repeats:
        raise AlignmentError(f"{len(tokens)} tokens ({repeats} repeats) do not fit in {n_frames} CTC frames")
    targets = torch.tensor([list(tokens)], dtype=torch.int32)
    path, scores = AF.forced_align(log_probs.detach().float().cpu()[None], targets, blank=blank)
    spans = AF.merge_tokens(path[0], scores[0].exp(), blank=blank)
    return [TokenSpan(s.token, s.start, s.end, float(s.score)) for s in spans]


def token_texts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the transcript, a leading space marking a word start.

    Computed from decodes of growing prefixes, so it works for any tokenizer whose
    ``decode`` is prefix-stable (SentencePiece pieces, characters); otherwise a token's own
    decode is used.
    """
    texts, prev = [], ""
    for k in range(len(ids)):
        cur = tokenizer.decode(list(ids[: k + 1]))
        texts.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode([ids[k]]))
        prev = cur
    return texts


def group_words(tokens: Sequence[TimedToken]) -> list[TimedWord]:
    """Words of timed tokens: a new word starts at a token whose text starts with whitespace
    (or after a whitespace-only token); word text is the tokens' text without spaces."""
    words: list[TimedWord] = []
    open_word = False
    for tok in tokens:
        if not tok.text.strip():
            open_word = False
            continue
        if open_word and not tok.text[0].isspace():
            last = words[-1]
            words[-1] = TimedWord(last.word + tok.text, last.start, tok.end)
        else:
            words.append(TimedWord(tok.text.strip(), tok.start, tok.end))
            open_word = True
    return words
