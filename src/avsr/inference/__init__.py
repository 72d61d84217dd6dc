"""Use a trained model on any media file: transcript with token/word times, mouth-opening curve,
per-frame reliability, lip-to-speech audio and an overlay video.

- :class:`Recognizer` (:mod:`.recognizer`): ``Recognizer.from_checkpoint(path).transcribe(video)``
- :class:`TranscriptionResult` and the JSON document (:mod:`.result`, ``docs/transcribe_schema.json``)
- :class:`InputError`: the one-line error for an input that cannot be transcribed (:mod:`.inputs`)
- overlapping windows for long inputs (:mod:`.windows`), CTC forced alignment (:mod:`.alignment`),
  the overlay video (:mod:`.visualize`), features of a manifest (:mod:`.features`)
"""

from avsr.inference.inputs import InputError, PreparedInput, prepare_input
from avsr.inference.recognizer import Recognizer
from avsr.inference.result import TranscriptionResult, mouth_curve, results_document, write_json

__all__ = [
    "InputError",
    "PreparedInput",
    "Recognizer",
    "TranscriptionResult",
    "mouth_curve",
    "prepare_input",
    "results_document",
    "write_json",
]
