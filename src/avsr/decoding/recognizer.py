"""Batch -> text with a trained model: greedy CTC or joint CTC/attention beam search (``DecodeConfig``)."""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from avsr.config import DecodeConfig
from avsr.data.batch import Batch
from avsr.decoding.beam_search import BeamSearch, Hypothesis
from avsr.decoding.ctc import ctc_greedy_search
from avsr.decoding.lm import TransformerLM, load_lm
from avsr.models.avsr import EncoderOutput

log = logging.getLogger(__name__)

METHODS = ("beam", "greedy")


@contextlib.contextmanager
def _cpu_threads(n: Optional[int]):
    """Run the block with ``n`` torch CPU threads (``None`` or ``n < 1``: unchanged); restores the count."""
    before = torch.get_num_threads()
    if n is not None and n >= 1 and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Recognizer:
    """Decodes :class:`~avsr.data.batch.Batch` es with ``model`` (an ``AVSRModel``) and ``tokenizer``.

    ``cfg.method`` ``"greedy"``: best-path CTC (the fast path); ``"beam"``: :class:`BeamSearch`
    with ``cfg``'s beam size, CTC weight, length penalty, maximum length ratio, pre-beam ratio
    and, when ``cfg.lm_weight > 0``, the LM of ``cfg.lm_path`` (or ``lm``) in shallow fusion.

    Raises ValueError for an unknown method, or an LM missing or trained with another tokenizer.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: DecodeConfig,
                 lm: Optional[TransformerLM] = None) -> None:
        if cfg.method not in METHODS:
            raise ValueError(f"decode.method must be one of {', '.join(METHODS)}, got '{cfg.method}'")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = next(model.parameters()).device
        self.search: Optional[BeamSearch] = None
        if cfg.method == "beam":
            if cfg.lm_weight > 0 and lm is None:
                if not cfg.lm_path:
                    raise ValueError("decode.lm_weight > 0 needs decode.lm_path")
                lm, tok_bytes = load_lm(cfg.lm_path, map_location=self.device)
                if tok_bytes != tokenizer.to_bytes():
                    raise ValueError(f"{cfg.lm_path}: the LM was trained with another tokenizer than the model's")
                log.info("shallow fusion with %s (weight %g)", cfg.lm_path, cfg.lm_weight)
            if lm is not None:
                lm = lm.to(self.device).eval()
            self.search = BeamSearch(
                model.decoder, tokenizer.vocab_size, tokenizer.sos_id, tokenizer.eos_id, tokenizer.blank_id,
                beam_size=cfg.beam_size, ctc_weight=cfg.ctc_weight, lm=lm if cfg.lm_weight > 0 else None,
                lm_weight=cfg.lm_weight, length_penalty=cfg.length_penalty, max_len_ratio=cfg.max_len_ratio,
                pre_beam_ratio=cfg.pre_beam_ratio)

    @torch.inference_mode()
    def decode_batch(self, batch: Batch) -> tuple[list[list[int]], EncoderOutput]:
        """Best token ids per utterance of ``batch`` (moved to the model's device) and the encoder
        output they were decoded from (inference tensors: use them under ``torch.inference_mode``),
        e.g. for the auxiliary heads (:func:`avsr.models.heads.aux_predictions`)."""
        self.model.eval()
        batch = batch.to(self.device)
        encoded = self.model.encode(batch.video, batch.video_lengths, batch.audio, batch.audio_lengths)
        log_probs = self.model.ctc_head(encoded.enc)
        if self.search is None:
            return ctc_greedy_search(log_probs, encoded.enc_lengths, self.tokenizer.blank_id), encoded
        with _cpu_threads(self.cfg.search_threads if self.device.type == "cpu" else None):
            nbest: list[list[Hypothesis]] = self.search(encoded.enc, encoded.enc_lengths, log_probs)
        return [list(h[0].tokens) if h else [] for h in nbest], encoded

    def decode_tokens(self, batch: Batch) -> list[list[int]]:
        """Best token ids per utterance of ``batch`` (moved to the model's device)."""
        return self.decode_batch(batch)[0]

    def __call__(self, batch: Batch) -> list[str]:
        """Transcripts of ``batch``, in its order."""
        return [self.tokenizer.decode(t) for t in self.decode_tokens(batch)]
