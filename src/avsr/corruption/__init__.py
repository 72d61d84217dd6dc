"""Corruption modelling (train time) and the reproducible corrupted-test protocol.

* :mod:`~avsr.corruption.occluders`: :class:`OccluderBank` of RGBA object cut-outs.
* :mod:`~avsr.corruption.visual`: occluders that follow the lip landmarks, noise and blur segments;
  :class:`VisualCorruptor` for datasets.
* :mod:`~avsr.corruption.audio`: babble / white / file noise at an SNR; :class:`AudioCorruptor`.
* :mod:`~avsr.corruption.protocol`: the seeded JSON test protocol and :func:`corrupt_utterance`.
"""

from avsr.corruption.audio import (
    AUDIO_NOISE_TYPES,
    AudioCorruptor,
    WaveBank,
    apply_audio_spec,
    measure_snr_db,
    mix_at_snr,
    sample_audio_spec,
)
from avsr.corruption.occluders import OccluderBank
from avsr.corruption.protocol import (
    PROTOCOL_SNRS,
    Protocol,
    Utterance,
    condition_names,
    corrupt_utterance,
    load_protocol,
    make_protocol,
    save_protocol,
)
from avsr.corruption.visual import (
    VISUAL_KINDS,
    VisualCorruptor,
    apply_visual_spec,
    occluder_alpha,
    sample_visual_spec,
)

__all__ = [
    "AUDIO_NOISE_TYPES", "AudioCorruptor", "WaveBank", "apply_audio_spec", "measure_snr_db", "mix_at_snr",
    "sample_audio_spec", "OccluderBank", "PROTOCOL_SNRS", "Protocol", "Utterance", "condition_names",
    "corrupt_utterance", "load_protocol", "make_protocol", "save_protocol", "VISUAL_KINDS", "VisualCorruptor",
    "apply_visual_spec", "occluder_alpha", "sample_visual_spec",
]
