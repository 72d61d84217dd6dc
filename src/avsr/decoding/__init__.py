"""Decoding: greedy CTC, batched joint CTC/attention beam search, Transformer-LM shallow fusion.

* :mod:`~avsr.decoding.ctc`: :func:`ctc_greedy_search` and the vectorised :class:`CTCPrefixScorer`.
* :mod:`~avsr.decoding.beam_search`: :class:`BeamSearch` over utterances x beams.
* :mod:`~avsr.decoding.lm`: :class:`TransformerLM` (``scripts/train_lm.py`` trains it).
* :mod:`~avsr.decoding.recognizer`: :class:`Recognizer`, a model + tokenizer + ``DecodeConfig`` -> text.
"""

from avsr.decoding.beam_search import BeamSearch, Hypothesis
from avsr.decoding.ctc import CTCPrefixScorer, CTCPrefixState, ctc_greedy_search
from avsr.decoding.lm import LMConfig, TransformerLM, load_lm, save_lm, train_lm
from avsr.decoding.recognizer import Recognizer

__all__ = [
    "BeamSearch", "CTCPrefixScorer", "CTCPrefixState", "Hypothesis", "LMConfig", "Recognizer", "TransformerLM",
    "ctc_greedy_search", "load_lm", "save_lm", "train_lm",
]
