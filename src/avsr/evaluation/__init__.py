"""Evaluation: WER/CER on normalised text (:mod:`.wer`), reports and plots (:mod:`.report`), decoding a
manifest under every condition of a corruption protocol (:mod:`.runner`); auxiliary-task metrics
and curves live in :mod:`.aux_metrics` and :mod:`.curves`."""

from avsr.evaluation.wer import ErrorCounts, char_errors, error_summary, normalize_text, word_errors

__all__ = ["ErrorCounts", "char_errors", "error_summary", "normalize_text", "word_errors"]
