"""The AVSR network (Hong et al., CVPR 2023): frontends, reliability scoring, Conformer, CTC/attention.

One concern per module: :mod:`.frontends`, :mod:`.reliability`, :mod:`.conformer`,
:mod:`.decoder`, :mod:`.losses`, assembled by :mod:`.avsr`.
"""

from avsr.models.avsr import (
    AVSREncoder,
    AVSRModel,
    CTCHead,
    EncoderOutput,
    ModelOutput,
    build_model,
    load_encoder,
)
from avsr.models.conformer import Conformer
from avsr.models.decoder import DecoderCache, TransformerDecoder
from avsr.models.frontends import AudioResNetFrontend, LogMelFrontend, VisualFrontend
from avsr.models.reliability import ReliabilityScorer

__all__ = [
    "AVSREncoder",
    "AVSRModel",
    "AudioResNetFrontend",
    "CTCHead",
    "Conformer",
    "DecoderCache",
    "EncoderOutput",
    "LogMelFrontend",
    "ModelOutput",
    "ReliabilityScorer",
    "TransformerDecoder",
    "VisualFrontend",
    "build_model",
    "load_encoder",
]
