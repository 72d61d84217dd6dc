"""Audio corruption: babble, white or file noise mixed at an SNR in dB, optionally intermittent.

As for :mod:`avsr.corruption.visual`, :func:`sample_audio_spec` draws a JSON-able spec and
:func:`apply_audio_spec` renders it deterministically from the spec's numbers alone. Spec format::

    {"type": "babble", "snr_db": 5.0,
     "babble": [{"utt_id": "bbaf2n", "offset": 1234}, ...],   # type "babble"
     "seed": 99,                                            # type "white"
     "source": "fan", "offset": 16000,                      # type "file"
     "spans": [[8000, 20000], ...] or null}                 # intermittent noise, samples [start, end)

Babble (after AV-RelScore, Hong et al. 2023) is the sum of several other utterances, each cut
from its ``offset`` (wrapping around when the source is shorter than the target) and scaled to
unit power before summing, so every talker is equally loud. The SNR is defined on signal power:
``10 log10(P_speech / P_noise)`` with ``P_speech`` the mean square of the whole utterance and
``P_noise`` the mean square of the added noise over the samples where it is present (all of them
unless ``spans`` is set). Mixtures are not clipped, so the SNR is exact; they may exceed [-1, 1].
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import soundfile as sf

from avsr.config import CorruptionConfig

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
AUDIO_NOISE_TYPES = ("babble", "white", "file")
INTERMITTENT_SPANS = (1, 3)  # noise spans per clip when intermittent, inclusive
INTERMITTENT_SPAN_FRAC = (0.1, 0.5)  # fraction of the clip each span covers
FADE_S = 0.01  # raised-cosine fade in/out of each intermittent span, seconds


def signal_power(x: np.ndarray) -> float:
    """Mean square of ``x`` (computed in float64)."""
    x = np.asarray(x, np.float64)
    return float(np.mean(x * x)) if x.size else 0.0


def measure_snr_db(speech: np.ndarray, mixture: np.ndarray, active: Optional[np.ndarray] = None) -> float:
    """SNR in dB of ``mixture`` = ``speech`` + noise, noise power over the ``active`` samples (bool mask)."""
    noise = np.asarray(mixture, np.float64) - np.asarray(speech, np.float64)
    if active is not None:
        noise = noise[active]
    return 10.0 * math.log10(signal_power(speech) / signal_power(noise))


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float,
               active: Optional[np.ndarray] = None) -> np.ndarray:
    """``speech + g * noise`` with the gain ``g`` that makes the SNR exactly ``snr_db``.

    Args:
        speech: ``(S,)`` float waveform.
        noise: ``(S,)`` float waveform (already zero outside ``active`` for intermittent noise).
        snr_db: target ``10 log10(P_speech / P_noise)``.
        active: optional ``(S,)`` bool mask of the samples where noise is present; the noise power
            is measured there only. ``None`` = everywhere.

    Returns ``(S,)`` float32. Raises ``ValueError`` when shapes differ, ``snr_db`` is not finite,
    or the speech or the (active) noise has zero power.
    """
    speech = np.asarray(speech)
    noise = np.asarray(noise)
    if speech.ndim != 1 or speech.shape != noise.shape:
        raise ValueError(f"speech and noise must be 1-D of equal length, got {speech.shape} and {noise.shape}")
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    ps = signal_power(speech)
    pn = signal_power(noise if active is None else noise[np.asarray(active, bool)])
    if ps <= 0.0:
        raise ValueError("speech has zero power: the SNR is undefined")
    if pn <= 0.0:
        raise ValueError("noise has zero power where it is active: the SNR is undefined")
    gain = math.sqrt(ps / (pn * 10.0 ** (snr_db / 10.0)))
    return (speech.astype(np.float64) + gain * noise.astype(np.float64)).astype(np.float32)


class WaveBank(Mapping[str, np.ndarray]):
    """Read-only id -> ``(S,)`` float32 16 kHz waveform mapping, loaded lazily with a small LRU cache.

    Args:
        ids: the waveform ids (e.g. utterance ids), in a fixed order.
        loader: ``loader(id) -> (S,)`` float32 waveform.
        cache_size: waveforms kept in memory (0 disables caching).

    Use :meth:`from_arrays`, :meth:`from_manifest` or :meth:`from_file`.
    """

    def __init__(self, ids: Sequence[str], loader: Callable[[str], np.ndarray], cache_size: int = 256) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError("WaveBank ids must be unique")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.ids: tuple[str, ...] = tuple(ids)
        self._index = set(self.ids)
        self._loader = loader
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._index:
            raise KeyError(f"waveform '{key}' not in this noise source ({len(self.ids)} waveforms)")
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        wave = np.asarray(self._loader(key), np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"noise waveform '{key}' must be non-empty 1-D, got shape {wave.shape}")
        if self._cache_size:
            self._cache[key] = wave
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return wave

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_arrays(cls, waves: Mapping[str, np.ndarray]) -> "WaveBank":
        """A bank over in-memory waveforms (float, 16 kHz)."""
        data = {k: np.asarray(v, np.float32) for k, v in waves.items()}
        return cls(list(data), data.__getitem__, cache_size=0)

    @classmethod
    def from_manifest(cls, root: str | Path, split: str, cache_size: int = 256) -> "WaveBank":
        """The ``.wav`` of every utterance of ``<root>/<split>.tsv``, keyed by utterance id.

        WAVs are read (on first use) as ``avsr.data.media.load_clip`` reads them; a WAV that is
        unreadable or not 16 kHz mono raises ``ValueError`` naming the file.
        """
        from avsr.data.manifest import read_manifest

        rows = {r.utt_id: r for r in read_manifest(root, split)}
        return cls(list(rows), lambda k: _read_wav(rows[k].file(root, ".wav")), cache_size=cache_size)

    @classmethod
    def from_file(cls, path: str | Path) -> "WaveBank":
        """One noise recording (any format PyAV decodes, resampled to 16 kHz mono), keyed by its file stem.

        Raises ``ValueError`` naming the file when it is missing.
        """
        from avsr.data.media import read_audio

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"noise file not found: {path}")
        wave = np.asarray(read_audio(path, sample_rate=SAMPLE_RATE), np.float32)
        return cls.from_arrays({path.stem: wave})


def _read_wav(path: Path) -> np.ndarray:
    """(S,) float32 of a 16 kHz mono WAV of the preprocessed corpus."""
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise ValueError(f"{path}: unreadable audio ({exc})") from None
    if sr != SAMPLE_RATE or wave.ndim != 1:
        raise ValueError(f"{path}: expected {SAMPLE_RATE} Hz mono, got {sr} Hz with shape {wave.shape}")
    return wave


def _cut(source: np.ndarray, offset: int, n: int) -> np.ndarray:
    """``n`` samples of ``source`` from ``offset`` on, wrapping around cyclically."""
    idx = (int(offset) + np.arange(n)) % source.shape[0]
    return source[idx]


def _spans(n_samples: int, rng: np.random.Generator) -> list[list[int]]:
    count = int(rng.integers(INTERMITTENT_SPANS[0], INTERMITTENT_SPANS[1] + 1))
    out = []
    for _ in range(count):
        length = min(n_samples, max(1, round(float(rng.uniform(*INTERMITTENT_SPAN_FRAC)) * n_samples)))
        start = int(rng.integers(0, n_samples - length + 1))
        out.append([start, start + length])
    return sorted(out)


def sample_audio_spec(n_samples: int, rng: np.random.Generator, noise_type: str, snr_db: float, *,
                      babble_ids: Sequence[str] = (), babble_speakers: int = 6, exclude: Sequence[str] = (),
                      noise_ids: Sequence[str] = (), intermittent: bool = False) -> dict[str, Any]:
    """Draw an audio corruption spec (see the module docstring) for an ``n_samples`` utterance.

    ``babble_ids`` are the candidate babble utterances; ``babble_speakers`` of them that are not in
    ``exclude`` (the utterance itself and, where the corpus allows, its speaker's other
    utterances) are drawn without replacement (all of them when fewer). ``noise_ids`` are the
    candidate noise recordings for type ``file``.

    Raises ``ValueError`` for an unknown type, ``n_samples < 1``, or no candidates for babble/file.
    """
    if noise_type not in AUDIO_NOISE_TYPES:
        raise ValueError(f"unknown audio noise type '{noise_type}' (expected one of {', '.join(AUDIO_NOISE_TYPES)})")
    if n_samples < 1:
        raise ValueError(f"an utterance needs at least one sample, got {n_samples}")
    spec: dict[str, Any] = {"type": noise_type, "snr_db": float(snr_db)}
    if noise_type == "babble":
        if babble_speakers < 1:
            raise ValueError(f"babble_speakers must be >= 1, got {babble_speakers}")
        skip = set(exclude)
        # a uniform random order of babble_speakers + |exclude| ids, minus the excluded ones, is a
        # uniform random order of the allowed ids: no O(N) filtering of a large corpus per call
        draw = min(len(babble_ids), babble_speakers + len(skip))
        order = rng.choice(len(babble_ids), size=draw, replace=False)
        picks = [babble_ids[int(i)] for i in order if babble_ids[int(i)] not in skip][:babble_speakers]
        if not picks:
            raise ValueError("babble noise needs at least one babble utterance that is not excluded")
        spec["babble"] = [{"utt_id": u, "offset": int(rng.integers(n_samples))} for u in picks]
    elif noise_type == "white":
        spec["seed"] = int(rng.integers(2**31))
    else:
        if not noise_ids:
            raise ValueError("file noise needs a noise recording (corruption.noise_file)")
        spec["source"] = noise_ids[int(rng.integers(len(noise_ids)))]
        spec["offset"] = int(rng.integers(n_samples))
    spec["spans"] = _spans(n_samples, rng) if intermittent else None
    return spec


def _gate(n: int, spans: Sequence[Sequence[int]]) -> np.ndarray:
    """``(n,)`` float64 gain: 1 inside the spans, 0 outside, with raised-cosine fades inside each span."""
    gate = np.zeros(n, np.float64)
    fade = int(FADE_S * SAMPLE_RATE)
    for start, end in spans:
        if not 0 <= start < end <= n:
            raise ValueError(f"noise span [{start}, {end}) does not fit an utterance of {n} samples")
        g = np.ones(end - start)
        f = min(fade, (end - start) // 2)
        if f:
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(f) + 0.5) / f)
            g[:f] *= ramp
            g[-f:] *= ramp[::-1]
        gate[start:end] = np.maximum(gate[start:end], g)
    return gate


def render_noise(n_samples: int, spec: dict[str, Any], noise_source: Optional[Mapping[str, np.ndarray]]) -> np.ndarray:
    """The un-scaled ``(n_samples,)`` float64 noise of ``spec`` (before gating and SNR scaling)."""
    kind = spec["type"]
    if kind == "white":
        return np.random.default_rng(int(spec["seed"])).standard_normal(n_samples)
    if noise_source is None:
        raise ValueError(f"{kind} noise needs a noise source")
    if kind == "babble":
        total = np.zeros(n_samples, np.float64)
        for item in spec["babble"]:
            part = _cut(np.asarray(noise_source[item["utt_id"]], np.float64), item["offset"], n_samples)
            p = signal_power(part)
            if p > 0:
                total += part / math.sqrt(p)
        return total
    if kind == "file":
        return _cut(np.asarray(noise_source[spec["source"]], np.float64), spec["offset"], n_samples)
    raise ValueError(f"unknown audio noise type '{kind}' (expected one of {', '.join(AUDIO_NOISE_TYPES)})")


def apply_audio_spec(wave: np.ndarray, spec: Optional[dict[str, Any]],
                     noise_source: Optional[Mapping[str, np.ndarray]] = None) -> np.ndarray:
    """Mix the noise of ``spec`` into ``wave``; deterministic.

    Args:
        wave: ``(S,)`` float32 16 kHz speech.
        spec: from :func:`sample_audio_spec` (or a protocol); ``None`` returns an unchanged copy.
        noise_source: id -> waveform mapping (a :class:`WaveBank`) holding the spec's babble
            utterances or noise recording; unused for white noise.

    Returns ``(S,)`` float32. Raises ``ValueError`` for a malformed wave or spec, silent speech or
    silent noise; ``KeyError`` for a babble utterance or recording missing from ``noise_source``.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"wave must be non-empty 1-D, got shape {wave.shape}")
    if spec is None:
        return wave.astype(np.float32, copy=True)
    n = wave.shape[0]
    noise = render_noise(n, spec, noise_source)
    active = None
    if spec.get("spans"):
        gate = _gate(n, spec["spans"])
        noise = noise * gate
        active = gate > 0
    return mix_at_snr(wave, noise, float(spec["snr_db"]), active=active)


class AudioCorruptor:
    """Train-time audio corruption, applied with probability ``cfg.audio_noise_prob``.

    A corrupted utterance gets a noise type drawn uniformly from ``cfg.audio_noise_types``, an SNR
    drawn uniformly from ``cfg.snr_db``, babble from ``cfg.babble_speakers`` utterances of
    ``babble_source`` (never the ids passed as ``exclude``), and is intermittent with probability
    ``cfg.intermittent_prob``.

    Args:
        cfg: the corruption config.
        babble_source: id -> waveform mapping of babble material (e.g.
            ``WaveBank.from_manifest(root, "train")``); required when "babble" is a noise type.

    Raises ``ValueError`` for probabilities outside [0, 1], unknown or empty noise types, an empty
    SNR list, or a missing babble source / noise file for the types asked for.
    """

    def __init__(self, cfg: CorruptionConfig, babble_source: Optional[Mapping[str, np.ndarray]] = None) -> None:
        for name in ("audio_noise_prob", "intermittent_prob"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"corruption.{name} must be in [0, 1], got {getattr(cfg, name)}")
        types = tuple(cfg.audio_noise_types)
        if not types or any(t not in AUDIO_NOISE_TYPES for t in types):
            raise ValueError(f"corruption.audio_noise_types must be a non-empty subset of {list(AUDIO_NOISE_TYPES)}, "
                             f"got {list(types)}")
        if not cfg.snr_db:
            raise ValueError("corruption.snr_db must list at least one SNR")
        if cfg.babble_speakers < 1:
            raise ValueError(f"corruption.babble_speakers must be >= 1, got {cfg.babble_speakers}")
        if "babble" in types and not babble_source:
            raise ValueError("babble noise needs a non-empty babble source")
        if "file" in types and not cfg.noise_file:
            raise ValueError("noise type 'file' needs corruption.noise_file")
        self.cfg = cfg
        self.types = types
        self.snrs = tuple(float(s) for s in cfg.snr_db)
        self.babble_source = babble_source
        self._babble_ids: tuple[str, ...] = tuple(babble_source) if babble_source else ()
        self.noise_files = WaveBank.from_file(cfg.noise_file) if "file" in types else None

    def __call__(self, wave: np.ndarray, rng: np.random.Generator, exclude: Sequence[str] = ()) -> np.ndarray:
        """Corrupt ``wave`` (S,) float32; same shape and dtype. ``exclude``: babble ids not to use.

        Returns ``wave`` itself (not a copy) when the utterance is left clean or is silent.
        """
        wave = np.asarray(wave)
        if rng.random() >= self.cfg.audio_noise_prob:
            return wave
        kind = self.types[int(rng.integers(len(self.types)))]
        snr = self.snrs[int(rng.integers(len(self.snrs)))]
        spec = sample_audio_spec(wave.shape[0], rng, kind, snr, babble_ids=self._babble_ids,
                                 babble_speakers=self.cfg.babble_speakers, exclude=exclude,
                                 noise_ids=self.noise_files.ids if self.noise_files else (),
                                 intermittent=bool(rng.random() < self.cfg.intermittent_prob))
        if signal_power(wave) <= 0.0:
            logger.debug("silent utterance left without noise (SNR undefined)")
            return wave
        source = self.noise_files if kind == "file" else self.babble_source
        return apply_audio_spec(wave, spec, source)
