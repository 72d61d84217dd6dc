"""Word and character error rates on normalised text (jiwer).

Normalisation (:func:`normalize_text`), applied to references and hypotheses alike, is the
project's one text normalisation, :func:`avsr.text.normalize.normalise` (the one that makes the
training transcripts), with every apostrophe deleted: upper case; digits spelled out
(``9`` -> ``NINE``); ``{LG}``-style tags and accents removed; dashes, ``/`` and ``_`` become spaces,
so ``WELL-KNOWN`` counts as two words; every other punctuation character (``. , ? ! ' " ( )`` ...)
is deleted, so ``DON'T`` and ``DONT`` match; whitespace collapsed. Training transcripts keep
apostrophes inside words, so the two differ by apostrophes alone.

WER is corpus level: the edit operations (substitutions ``S``, deletions ``D``, insertions
``I``) of every utterance's minimum-edit alignment, summed, over the number of reference words
``N``: ``(S + D + I) / N``. CER is the same over characters, spaces included. An empty
hypothesis therefore scores WER 1 (all deletions); WER can exceed 1 through insertions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jiwer

from avsr.text.normalize import normalise


def normalize_text(text: str) -> str:
    """``text`` normalised as in the module docstring (``"Don't  stop-now."`` -> ``"DONT STOP NOW"``):
    :func:`avsr.text.normalize.normalise` with ``apostrophes=False``. Never raises."""
    return normalise(text, apostrophes=False)


@dataclass(frozen=True)
class ErrorCounts:
    """Corpus-level error counts of word (or character) alignments."""

    substitutions: int
    deletions: int
    insertions: int
    n_ref: int  # reference words (characters)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """``errors / n_ref``; 0 when both are 0, ``inf`` for errors against an empty reference."""
        if self.n_ref == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return self.errors / self.n_ref

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                           self.insertions + other.insertions, self.n_ref + other.n_ref)


def _counts(refs: list[str], hyps: list[str], unit: str) -> ErrorCounts:
    if not refs:
        return ErrorCounts(0, 0, 0, 0)
    out = jiwer.process_words(refs, hyps) if unit == "word" else jiwer.process_characters(refs, hyps)
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, out.hits + out.substitutions + out.deletions)


def word_errors(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> ErrorCounts:
    """Corpus-level word error counts; ``.rate`` is the WER.

    Raises ValueError when the two sequences differ in length.
    """
    refs, hyps = _prepare(references, hypotheses, normalize)
    return _counts(refs, hyps, "word")


def char_errors(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> ErrorCounts:
    """Corpus-level character error counts (spaces included); ``.rate`` is the CER."""
    refs, hyps = _prepare(references, hypotheses, normalize)
    return _counts(refs, hyps, "char")


def _prepare(references: Sequence[str], hypotheses: Sequence[str], normalize: bool) -> tuple[list[str], list[str]]:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise ValueError("pass sequences of sentences, not single strings")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    f = normalize_text if normalize else (lambda s: " ".join(s.split()))
    return [f(r) for r in references], [f(h) for h in hypotheses]


def error_summary(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """``wer``, ``cer``, ``substitutions``, ``deletions``, ``insertions`` (words), ``n_utterances``,
    ``n_words`` of normalised text, as plain Python numbers (for results.json)."""
    w = word_errors(references, hypotheses)
    c = char_errors(references, hypotheses)
    return {"wer": w.rate, "cer": c.rate, "substitutions": w.substitutions, "deletions": w.deletions,
            "insertions": w.insertions, "n_utterances": len(references), "n_words": w.n_ref}
