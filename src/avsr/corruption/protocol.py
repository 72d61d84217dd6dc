"""The reproducible corrupted-test protocol: one seeded JSON spec of every corruption of a test set.

Nobody publishes corrupted AVSR test sets reproducibly; here a protocol file lists, for every
test utterance, the visual spec of each visual condition (every occluder, segment and
parameter) and the audio spec of each SNR (babble utterance ids, offsets, SNR), so every model is
tested on bit-identical inputs. Conditions (:func:`condition_names`)::

    clean, occlusion, noise_blur, occlusion_noise_blur,
    babble_snr{-5,0,5,10,15}             (clean video, babble at that SNR)
    occlusion+babble_snr{-5,0,5,10,15}   (occluded video, babble at that SNR)

Within one utterance the conditions share their draws: ``occlusion+babble_snr0`` uses the very
occluders of ``occlusion`` and the very babble of ``babble_snr0``; ``occlusion_noise_blur`` has the
occluders of ``occlusion`` and the segments of ``noise_blur``; the babble SNRs differ only in gain.
So differences between conditions come from the corruption, not from different draws.

Each utterance has its own generator seeded by (protocol seed, SHA-256 of its id), so adding or
removing utterances leaves the others' corruptions unchanged. Babble comes from other utterances
of ``babble_split`` (the test split by default: GRID s1 has a single speaker, so test babble is
the other s1 test utterances, never the utterance itself); with ``speaker_regex`` every utterance
of the same speaker is excluded too (speaker-disjoint babble on multi-speaker corpora).

File layout (JSON)::

    {"format": "avsr-corruption-protocol", "version": 1, "seed": 0, "split": "test",
     "occluder_bank": {"name": ..., "fingerprint": ...},
     "babble": {"split": "test", "speakers": 6, "speaker_regex": null},
     "conditions": {"occlusion+babble_snr0": {"visual": "occlusion", "audio": "babble_snr0"}, ...},
     "utterances": {"<utt_id>": {"n_frames": 75, "n_samples": 48000,
                                 "visual": {"occlusion": {...}, "noise_blur": {...}, ...},
                                 "audio": {"babble_snr0": {...}, ...}}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from avsr.corruption.audio import apply_audio_spec, sample_audio_spec
from avsr.corruption.occluders import OccluderBank
from avsr.corruption.visual import apply_visual_spec, sample_visual_spec
from avsr.utils import atomic_write_text

PROTOCOL_FORMAT = "avsr-corruption-protocol"
PROTOCOL_VERSION = 1
PROTOCOL_SNRS = (-5, 0, 5, 10, 15)
VISUAL_CONDITIONS = ("clean", "occlusion", "noise_blur", "occlusion_noise_blur")


def _snr_name(snr: float) -> str:
    return f"babble_snr{int(snr) if float(snr).is_integer() else snr}"


def condition_map(snrs: Sequence[float] = PROTOCOL_SNRS) -> dict[str, dict[str, Optional[str]]]:
    """Condition name -> ``{"visual": visual spec name or None, "audio": audio spec name or None}``."""
    out: dict[str, dict[str, Optional[str]]] = {}
    for v in VISUAL_CONDITIONS:
        out[v] = {"visual": None if v == "clean" else v, "audio": None}
    for s in snrs:
        out[_snr_name(s)] = {"visual": None, "audio": _snr_name(s)}
    for s in snrs:
        out[f"occlusion+{_snr_name(s)}"] = {"visual": "occlusion", "audio": _snr_name(s)}
    return out


def condition_names(snrs: Sequence[float] = PROTOCOL_SNRS) -> list[str]:
    """The protocol's condition names in report order, e.g. ``babble_snr-5``, ``occlusion+babble_snr0``."""
    return list(condition_map(snrs))


@dataclass(frozen=True)
class Utterance:
    """What the protocol needs to know about one test utterance."""

    utt_id: str
    n_frames: int  # video frames at 25 fps
    n_samples: int  # audio samples at 16 kHz


def utterance_rng(seed: int, utt_id: str) -> np.random.Generator:
    """The generator of ``utt_id``'s draws: independent of the other utterances in the set."""
    digest = int.from_bytes(hashlib.sha256(utt_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


def _visual_specs(n_frames: int, rng: np.random.Generator, bank: OccluderBank) -> dict[str, dict[str, Any]]:
    occlusion = sample_visual_spec(n_frames, rng, bank, "occlusion")
    noise_blur = sample_visual_spec(n_frames, rng, bank, "noise_blur")
    return {
        "occlusion": occlusion,
        "noise_blur": noise_blur,
        "occlusion_noise_blur": {"kind": "occlusion_noise_blur", "occluders": occlusion["occluders"],
                                 "segments": noise_blur["segments"]},
    }


def visual_specs(utt_id: str, n_frames: int, seed: int, bank: OccluderBank) -> dict[str, dict[str, Any]]:
    """The visual specs ``{"occlusion", "noise_blur", "occlusion_noise_blur"}`` that
    :func:`make_protocol` gives ``utt_id`` with ``seed`` and ``bank`` (for previews without a protocol file)."""
    return _visual_specs(n_frames, utterance_rng(seed, utt_id), bank)


def make_protocol(utterances: Sequence[Utterance], seed: int, bank: OccluderBank, babble_ids: Sequence[str], *,
                  split: str = "test", babble_split: str = "test", babble_speakers: int = 6,
                  speaker_regex: Optional[str] = None, snrs: Sequence[float] = PROTOCOL_SNRS) -> dict[str, Any]:
    """Build the protocol dict (see the module docstring) for ``utterances``.

    Args:
        utterances: the test set.
        seed: protocol seed.
        bank: occluder bank (its fingerprint is recorded).
        babble_ids: utterance ids of ``babble_split`` that babble is drawn from.
        speaker_regex: optional regex whose first group is the speaker in an utterance id; babble
            then excludes the test utterance's speaker entirely.

    Raises ``ValueError`` for an empty test set, duplicate ids, a ``speaker_regex`` without a group
    or that does not match an id, or an utterance left with fewer than ``babble_speakers``
    babble candidates.
    """
    if not utterances:
        raise ValueError("the protocol needs at least one utterance")
    if len({u.utt_id for u in utterances}) != len(utterances):
        raise ValueError("duplicate utterance ids in the test set")
    speaker_of = _speaker_fn(speaker_regex)
    by_speaker: dict[str, list[str]] = {}
    for b in babble_ids:
        by_speaker.setdefault(speaker_of(b), []).append(b)
    babble_ids = tuple(sorted(babble_ids))  # draws must not depend on the manifest's row order
    entries: dict[str, Any] = {}
    for u in sorted(utterances, key=lambda u: u.utt_id):
        rng = utterance_rng(seed, u.utt_id)
        visual = _visual_specs(u.n_frames, rng, bank)
        exclude = {u.utt_id, *by_speaker.get(speaker_of(u.utt_id), [])} if speaker_regex else {u.utt_id}
        if len([b for b in babble_ids if b not in exclude]) < babble_speakers:
            raise ValueError(f"{u.utt_id}: fewer than {babble_speakers} babble utterances in '{babble_split}' "
                             f"once its own {'speaker' if speaker_regex else 'utterance'} is excluded")
        babble = sample_audio_spec(u.n_samples, rng, "babble", 0.0, babble_ids=babble_ids,
                                   babble_speakers=babble_speakers, exclude=sorted(exclude))
        audio = {_snr_name(s): {**babble, "snr_db": float(s)} for s in snrs}
        entries[u.utt_id] = {"n_frames": u.n_frames, "n_samples": u.n_samples, "visual": visual, "audio": audio}
    return {
        "format": PROTOCOL_FORMAT,
        "version": PROTOCOL_VERSION,
        "seed": int(seed),
        "split": split,
        "occluder_bank": {"name": bank.name, "fingerprint": bank.fingerprint},
        "babble": {"split": babble_split, "speakers": babble_speakers, "speaker_regex": speaker_regex},
        "conditions": condition_map(snrs),
        "utterances": entries,
    }


def _speaker_fn(speaker_regex: Optional[str]):
    if speaker_regex is None:
        return lambda utt_id: utt_id
    pattern = re.compile(speaker_regex)
    if pattern.groups < 1:
        raise ValueError(f"speaker_regex '{speaker_regex}' needs a group that captures the speaker")

    def speaker_of(utt_id: str) -> str:
        m = pattern.search(utt_id)
        if m is None:
            raise ValueError(f"speaker_regex '{speaker_regex}' does not match utterance id '{utt_id}'")
        return m.group(1)

    return speaker_of


def save_protocol(protocol: Mapping[str, Any], path: str | Path) -> None:
    """Write ``protocol`` as JSON (one key per line, insertion order: stable for a given input), atomically."""
    atomic_write_text(path, json.dumps(protocol, indent=1) + "\n")


class Protocol:
    """A loaded protocol file (see :func:`load_protocol`)."""

    def __init__(self, data: Mapping[str, Any], source: str = "<dict>") -> None:
        if data.get("format") != PROTOCOL_FORMAT:
            raise ValueError(f"{source}: not a corruption protocol (format {data.get('format')!r})")
        if data.get("version") != PROTOCOL_VERSION:
            raise ValueError(f"{source}: protocol version {data.get('version')} not supported "
                             f"(this code reads version {PROTOCOL_VERSION})")
        for key in ("conditions", "utterances", "occluder_bank", "babble"):
            if key not in data:
                raise ValueError(f"{source}: protocol has no '{key}'")
        self.data = data
        self.source = source

    @property
    def conditions(self) -> list[str]:
        """Condition names in report order."""
        return list(self.data["conditions"])

    @property
    def utt_ids(self) -> list[str]:
        return sorted(self.data["utterances"])

    @property
    def babble_split(self) -> str:
        """The split whose utterances make the babble (open it with ``WaveBank.from_manifest``)."""
        return str(self.data["babble"]["split"])

    def entry(self, utt_id: str, condition: str) -> dict[str, Any]:
        """``{"n_frames", "n_samples", "visual": spec or None, "audio": spec or None}`` for one test input.

        Raises ``KeyError`` naming the protocol for an unknown utterance or condition.
        """
        try:
            cond = self.data["conditions"][condition]
        except KeyError:
            raise KeyError(f"{self.source}: unknown condition '{condition}' "
                           f"(have: {', '.join(self.conditions)})") from None
        try:
            utt = self.data["utterances"][utt_id]
        except KeyError:
            raise KeyError(f"{self.source}: utterance '{utt_id}' is not in the protocol") from None
        return {
            "n_frames": utt["n_frames"],
            "n_samples": utt["n_samples"],
            "visual": utt["visual"][cond["visual"]] if cond["visual"] else None,
            "audio": utt["audio"][cond["audio"]] if cond["audio"] else None,
        }

    def check_bank(self, bank: OccluderBank) -> None:
        """Raise ``ValueError`` unless ``bank`` is the occluder bank the protocol was made with."""
        want = self.data["occluder_bank"]
        if bank.fingerprint != want["fingerprint"]:
            raise ValueError(f"{self.source}: made with occluder bank '{want['name']}' ({want['fingerprint']}), "
                             f"got '{bank.name}' ({bank.fingerprint}); corrupted inputs would differ")


def load_protocol(path: str | Path) -> Protocol:
    """Read a protocol file; raises ``ValueError`` naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"protocol file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a protocol must be a JSON object")
    return Protocol(data, source=str(path))


def corrupt_utterance(frames: np.ndarray, landmarks: np.ndarray, wave: np.ndarray, spec_entry: Mapping[str, Any],
                      bank: OccluderBank, babble_source: Optional[Mapping[str, np.ndarray]]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Apply one protocol entry (:meth:`Protocol.entry`) to a test utterance; deterministic.

    Args:
        frames: ``(T, 96, 96)`` uint8 mouth ROIs; landmarks: ``(T, 20, 2)`` float32 (x, y) ROI pixels.
        wave: ``(S,)`` float32 16 kHz speech.
        spec_entry: the entry of this utterance and condition.
        bank: the protocol's occluder bank; babble_source: waveforms of the protocol's babble split.

    Returns ``(frames (T, 96, 96) uint8, wave (S,) float32)``, new arrays (copies when clean).
    Raises ``ValueError`` when the clip's frame or sample count differs from the protocol's.
    """
    if frames.shape[0] != spec_entry["n_frames"] or wave.shape[0] != spec_entry["n_samples"]:
        raise ValueError(f"clip has {frames.shape[0]} frames / {wave.shape[0]} samples, the protocol expects "
                         f"{spec_entry['n_frames']} / {spec_entry['n_samples']}: was it made from another manifest?")
    return (apply_visual_spec(frames, landmarks, spec_entry["visual"], bank),
            apply_audio_spec(wave, spec_entry["audio"], babble_source))
