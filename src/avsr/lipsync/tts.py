"""Offline text-to-speech for lip-sync data augmentation (after Chen et al., ICASSP 2023).

The engine is eSpeak NG (formant synthesis, GPL, packaged by every Linux distribution and by
Homebrew; it downloads nothing and is deterministic: the same text, voice, rate and pitch give the
same samples). A *voice* is ``<language>+<variant>``: an English accent of eSpeak NG's ``gmw``
family (``espeak-ng --voices=en``) and one of its voice variants (``espeak-ng --voices=variant``:
``m1``..``m7``, ``f1``..``f5``). :data:`TRAIN_VOICES` and :data:`HELDOUT_VOICES` share neither an
accent nor a variant, so the held-out voices test a voice the model never heard.

Each training transcript is rendered ``N`` times (:func:`synthesize_corpus`): rendition ``k`` of
an utterance draws its voice, rate and pitch from a generator seeded by ``(seed, utt_id, k)``, so a
rendition does not change when the corpus or ``N`` grows. Renditions are cached as 16 kHz mono
16-bit ``.wav`` files named by their settings, written atomically; a rerun skips what exists.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from avsr.audio_features import SAMPLE_RATE
from avsr.utils import atomic_path

log = logging.getLogger(__name__)

ENGINE = "espeak-ng"
#: Voices renditions of training sentences are drawn from (8 accents x variants)
TRAIN_VOICES = ("en-us+m1", "en-us+f2", "en-gb+m3", "en-gb+f4", "en-gb-x-rp+m5", "en-029+f1",
                "en-gb-scotland+m2", "en-gb-x-gbclan+f3")
#: Voices kept out of training: accents and variants that no training voice has
HELDOUT_VOICES = ("en-us-nyc+m7", "en-gb-x-gbcwmd+f5")
RATE_WPM = (140, 200)  #: speaking rate range, words per minute (eSpeak NG's default: 175)
PITCH = (35, 65)  #: base pitch range, eSpeak NG's 0..99 scale (default: 50)
INSTALL_HINT = ("install eSpeak NG: `sudo apt-get install espeak-ng` (Debian, Ubuntu), `sudo dnf install "
                "espeak-ng` (Fedora), `brew install espeak-ng` (macOS), or a release from "
                "https://github.com/espeak-ng/espeak-ng/releases")


class TTSEngineMissing(RuntimeError):
    """The TTS engine is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Rendition:
    """One synthesised rendition of an utterance's transcript."""

    utt_id: str
    k: int  #: rendition index of this utterance
    voice: str
    rate: int  #: words per minute
    pitch: int  #: 0..99
    path: Path  #: the cached 16 kHz mono ``.wav``


def _engine() -> str:
    exe = shutil.which(ENGINE)
    if exe is None:
        raise TTSEngineMissing(f"the TTS engine {ENGINE} was not found on PATH; {INSTALL_HINT}")
    return exe


@lru_cache(maxsize=None)
def _known_voices(exe: str) -> tuple[frozenset[str], frozenset[str]]:
    """English languages (not the MBROLA ones, which need MBROLA) and voice variants this
    eSpeak NG installation offers, from its ``--voices`` listings."""
    def files(arg: str) -> list[tuple[str, str]]:
        lines = subprocess.run([exe, f"--voices={arg}"], capture_output=True, text=True, check=True).stdout
        rows = [line.split() for line in lines.splitlines()[1:]]  # Pty Language Age/Gender Name File ...
        found = [(r[1], next((t for t in r[3:] if "/" in t), "")) for r in rows if len(r) > 4]
        return [(lang, f) for lang, f in found if f and not f.startswith("mb/")]
    return (frozenset(lang for lang, f in files("en") if not f.startswith("!v/")),
            frozenset(Path(f).name for _, f in files("variant")))


def check_voice(voice: str) -> None:
    """Raises ``ValueError`` unless ``voice`` is ``<language>+<variant>`` of this installation
    (``TTSEngineMissing`` without the engine)."""
    language, _, variant = voice.partition("+")
    languages, variants = _known_voices(_engine())
    if language not in languages or (variant and variant not in variants):
        raise ValueError(f"unknown {ENGINE} voice '{voice}': languages {sorted(languages)}, "
                         f"variants {sorted(variants)}")


def synthesize(text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
    """Speech for ``text``: ``(S,)`` float32 at 16 kHz (the engine's 22.05 kHz resampled).

    Raises:
        TTSEngineMissing: when eSpeak NG is not installed (the message says how to install it).
        ValueError: on an empty text, an unknown voice, or a rate or pitch out of eSpeak NG's range
            (80..450 words per minute, 0..99).
    """
    if not text.strip():
        raise ValueError("nothing to say: empty text")
    if not (80 <= rate <= 450 and 0 <= pitch <= 99):
        raise ValueError(f"rate {rate} must be in 80..450 words per minute and pitch {pitch} in 0..99")
    check_voice(voice)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tts.wav"
        done = subprocess.run([_engine(), "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(out), "--", text],
                              capture_output=True, text=True)
        if done.returncode or not out.is_file():
            raise RuntimeError(f"{ENGINE} failed on {text!r} ({voice}): {done.stderr.strip()}")
        wave, sr = sf.read(str(out), dtype="float32", always_2d=False)
    if not len(wave):
        raise RuntimeError(f"{ENGINE} produced no audio for {text!r} ({voice})")
    return AF.resample(torch.from_numpy(wave), sr, SAMPLE_RATE).numpy()


def rendition_settings(utt_id: str, k: int, voices: Sequence[str], seed: int = 0) -> tuple[str, int, int]:
    """``(voice, rate, pitch)`` of rendition ``k`` of ``utt_id``: drawn from ``voices``,
    :data:`RATE_WPM` and :data:`PITCH` by a generator seeded with ``(seed, utt_id, k)``."""
    rng = np.random.default_rng([seed, zlib.crc32(utt_id.encode()), k])
    return (voices[int(rng.integers(len(voices)))], int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
            int(rng.integers(PITCH[0], PITCH[1] + 1)))


def synthesize_corpus(transcripts: Mapping[str, str], out_dir: str | Path, renditions: int,
                      voices: Sequence[str] = TRAIN_VOICES, seed: int = 0) -> list[Rendition]:
    """``renditions`` TTS renditions of every ``{utt_id: transcript}``, cached in ``out_dir`` as
    ``<utt_id>.<voice>.r<rate>.p<pitch>.wav`` (atomic writes; existing files are reused, so an
    interrupted run resumes). A transcript the engine cannot say is logged and skipped.

    Returns:
        The renditions, per utterance in order of ``k``.

    Raises:
        TTSEngineMissing: when eSpeak NG is not installed.
        ValueError: when ``renditions < 1`` or a voice is unknown.
    """
    if renditions < 1:
        raise ValueError(f"renditions must be >= 1, got {renditions}")
    for voice in voices:
        check_voice(voice)
    out_dir = Path(out_dir)
    made: list[Rendition] = []
    for utt_id, text in tqdm(transcripts.items(), desc="tts", unit="utt", leave=False, disable=len(transcripts) < 50):
        for k in range(renditions):
            voice, rate, pitch = rendition_settings(utt_id, k, voices, seed)
            path = out_dir / f"{utt_id}.{voice}.r{rate}.p{pitch}.wav"
            if not path.is_file():
                try:
                    wave = synthesize(text, voice, rate, pitch)
                except (ValueError, RuntimeError) as exc:
                    log.warning("skipping TTS of %s: %s", utt_id, exc)
                    continue
                with atomic_path(path) as tmp:
                    sf.write(str(tmp), wave, SAMPLE_RATE, subtype="PCM_16")
            made.append(Rendition(utt_id, k, voice, rate, pitch, path))
    return made
