"""Validation during training: loss and greedy-CTC word error rate over a manifest split.

Under DDP every rank scores its share of the split and the sums (loss, utterances, word errors,
reference words) are all-reduced, so the WER is the corpus WER of the whole split on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import jiwer
import torch

from avsr.data.batch import Batch
from avsr.decoding.ctc import ctc_greedy_search
from avsr.training.distributed import DistEnv, all_reduce_sum


@dataclass
class ValResult:
    """Corpus-level validation metrics: mean loss per utterance, WER in [0, inf) (not percent)."""

    loss: float
    wer: float
    utterances: int
    words: int


def word_errors(refs: list[str], hyps: list[str]) -> tuple[int, int]:
    """``(substitutions + deletions + insertions, reference words)`` of the pairs (jiwer)."""
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if not pairs:
        return 0, 0
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    return out.substitutions + out.deletions + out.insertions, sum(len(r.split()) for r, _ in pairs)


@torch.no_grad()
def validate(model: torch.nn.Module, batches: Iterable[Optional[Batch]], tokenizer, env: DistEnv,
             autocast_dtype: Optional[torch.dtype] = None) -> ValResult:
    """Score ``model`` (the unwrapped module; evaluated in eval mode, its mode restored after).

    ``batches`` yields :class:`Batch` es (``None`` = a batch of unreadable clips, skipped).
    Hypotheses are greedy CTC paths (``ModelOutput.ctc_log_probs`` over ``enc_lengths``)
    decoded with ``tokenizer``; references are the batch transcripts.
    """
    was_training = model.training
    model.eval()
    loss_sum = utts = errors = words = 0.0
    for batch in batches:
        if batch is None:
            continue
        batch = batch.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(batch)
        n = len(batch)
        loss_sum += float(out.loss) * n
        utts += n
        paths = ctc_greedy_search(out.ctc_log_probs.float(), out.enc_lengths, tokenizer.blank_id)
        e, w = word_errors(batch.transcripts, [tokenizer.decode(p) for p in paths])
        errors += e
        words += w
    model.train(was_training)
    loss_sum, utts, errors, words = all_reduce_sum([loss_sum, utts, errors, words], env)
    return ValResult(loss=loss_sum / max(utts, 1), wer=errors / max(words, 1), utterances=int(utts), words=int(words))
