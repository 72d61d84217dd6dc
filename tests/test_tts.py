"""TTS augmentation of the lip-sync model: eSpeak NG renditions, soft-DTW, TTS pairs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from avsr.lipsync.train import (LipSyncData, LipSyncTrainConfig, load_lipsync_data, load_tts_pairs,
                                soft_dtw_divergence, train_lipsync_model)
from avsr.lipsync.tts import (ENGINE, HELDOUT_VOICES, TRAIN_VOICES, TTSEngineMissing, synthesize,
                              synthesize_corpus)
from conftest import one_thread

needs_engine = pytest.mark.skipif(shutil.which(ENGINE) is None,
                                  reason=f"{ENGINE} is not installed (make tts-engine, or apt-get install espeak-ng)")

# GRID's grammar (Cooke et al. 2006): command colour preposition letter digit adverb
GRID_WORDS = (("bin", "lay", "place", "set"), ("blue", "green", "red", "white"), ("at", "by", "in", "with"),
              tuple("abcdefghijklmnopqrstuvxyz"),
              ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
              ("again", "now", "please", "soon"))


def grid_sentences(n: int, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {f"tts{seed}_{i:03d}": " ".join(words[rng.integers(len(words))] for words in GRID_WORDS)
            for i in range(n)}


def test_soft_dtw_divergence_is_zero_on_itself_and_grows_with_a_time_shift(grid_prepared) -> None:
    """On a real clip's mouth-opening curve (standardised): ~0 against itself, and larger the
    further the copy is shifted in time (circularly, so no frame is lost), with a gradient."""
    with np.load(next((grid_prepared / "train").glob("*.npz"))) as z:
        curve = torch.from_numpy(z["mouth_opening"].astype(np.float32))
    x = ((curve - curve.mean()) / curve.std())[:, None]
    assert abs(float(soft_dtw_divergence(x, x, gamma=0.1))) < 1e-5
    shifted = [float(soft_dtw_divergence(x, torch.roll(x, s, 0), gamma=0.1)) for s in (2, 5, 10, 20)]
    assert all(a < b for a, b in zip(shifted, shifted[1:])) and shifted[0] > 1e-3, shifted
    pred = x.clone().requires_grad_(True)
    soft_dtw_divergence(pred, torch.roll(x, 5, 0), gamma=0.1).backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="gamma"):
        soft_dtw_divergence(x, x, gamma=0.0)


def test_missing_tts_engine_names_what_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TTSEngineMissing, match="espeak-ng.*apt-get install espeak-ng"):
        synthesize("bin blue at f two now", TRAIN_VOICES[0])
    with pytest.raises(TTSEngineMissing, match="install"):
        synthesize_corpus({"u": "bin blue"}, tmp_path / "tts", 1)


@needs_engine
def test_same_seed_gives_byte_identical_tts_audio_and_a_rerun_resumes(tmp_path) -> None:
    texts = grid_sentences(4, seed=1)
    a = synthesize_corpus(texts, tmp_path / "a", 2, seed=7)
    b = synthesize_corpus(texts, tmp_path / "b", 2, seed=7)
    other = synthesize_corpus(texts, tmp_path / "c", 2, seed=8)
    assert len(a) == 8 and [(r.voice, r.rate, r.pitch) for r in a] == [(r.voice, r.rate, r.pitch) for r in b]
    assert all(x.path.read_bytes() == y.path.read_bytes() for x, y in zip(a, b))
    assert [(r.voice, r.rate, r.pitch) for r in a] != [(r.voice, r.rate, r.pitch) for r in other]
    assert {r.voice for r in a + other} <= set(TRAIN_VOICES)
    stamps = [r.path.stat().st_mtime_ns for r in a]
    assert [r.path for r in synthesize_corpus(texts, tmp_path / "a", 2, seed=7)] == [r.path for r in a]
    assert [r.path.stat().st_mtime_ns for r in a] == stamps  # reused, not rewritten
    with pytest.raises(ValueError, match="unknown espeak-ng voice"):
        synthesize_corpus(texts, tmp_path / "d", 1, voices=("en-us+nosuchvariant",))


def _greedy_phones(model, mel: torch.Tensor) -> list[str]:
    from avsr.lipsync.aligner import PHONES

    with torch.no_grad():
        lp, n = model(mel[None], torch.tensor([len(mel)]))
    ids = torch.unique_consecutive(lp[0, : int(n[0])].argmax(-1)).tolist()
    return [PHONES[i - 1] for i in ids if i]


@needs_engine
@pytest.mark.slow
def test_tts_rendition_says_the_transcript_words_in_order(tmp_path) -> None:
    """A phone CTC model (the lip-sync aligner's, :mod:`avsr.lipsync.aligner`) trained on TTS
    renditions of random GRID sentences in the training voices recognises renditions of other
    sentences in the held-out voices: their phones are closer to the transcript's than to those of
    the same words in reverse order."""
    import torchaudio.functional as AF

    from avsr.audio_features import log_mel
    from avsr.lipsync.aligner import AlignerData, train_phone_ctc
    from avsr.lipsync.visemes import transcript_phones
    import soundfile as sf

    def load(renditions, texts):
        mels = [log_mel(torch.from_numpy(sf.read(str(r.path), dtype="float32")[0]))[0][0] for r in renditions]
        return AlignerData([r.utt_id for r in renditions], mels, [texts[r.utt_id] for r in renditions])

    train_texts, test_texts = grid_sentences(150, seed=2), grid_sentences(8, seed=3)
    train = load(synthesize_corpus(train_texts, tmp_path / "train", 1, TRAIN_VOICES), train_texts)
    test = load([r for v in HELDOUT_VOICES for r in synthesize_corpus(test_texts, tmp_path / "test", 1, (v,))],
                test_texts)
    with one_thread():
        model = train_phone_ctc(train, steps=400, batch_size=8)
    right, reversed_ = [], []
    for mel, text in zip(test.mels, test.texts):
        heard = _greedy_phones(model, mel)
        truth = transcript_phones(text)
        backwards = transcript_phones(" ".join(reversed(text.split())))
        right.append(AF.edit_distance(heard, truth) / len(truth))
        reversed_.append(AF.edit_distance(heard, backwards) / len(truth))
    assert np.mean(right) < 0.35 and all(a < b for a, b in zip(right, reversed_)), (right, reversed_)


@needs_engine
def test_tts_pairs_train_with_soft_dtw_and_keep_the_real_tracks(grid_prepared, tmp_path) -> None:
    """TTS renditions of real clips' transcripts pair with those clips' tracks (not aligned in
    time), and a short run with them logs a falling loss."""
    from avsr.data.manifest import read_manifest

    real = load_lipsync_data(grid_prepared, "train", curves=["mouth_opening", "jawOpen"])
    texts = {r.utt_id: r.transcript for r in read_manifest(grid_prepared, "train")}
    renditions = synthesize_corpus(texts, tmp_path / "tts", 2)
    pairs = load_tts_pairs(renditions + [renditions[0].__class__("not_a_clip", 0, TRAIN_VOICES[0], 175, 50,
                                                                 renditions[0].path)], real)
    assert len(pairs) == 2 * len(real) and pairs.utt_ids[0] == f"{renditions[0].utt_id}_tts0"
    i = real.utt_ids.index(renditions[0].utt_id)
    assert torch.equal(pairs.curves[0], real.curves[i]) and abs(len(pairs.mels[0]) - len(real.mels[i])) > 4
    args = dict(curves=["mouth_opening", "jawOpen"], core="attention", channels=16, hidden=16, stride=4)
    with one_thread():
        _, hist = train_lipsync_model(real, args, LipSyncTrainConfig(steps=60, batch_size=2, tts_batch_size=2),
                                      tts=pairs)
    assert np.mean(hist["loss"][-10:]) < np.mean(hist["loss"][:10])
    with pytest.raises(ValueError, match="no TTS rendition pairs"):
        load_tts_pairs(renditions, LipSyncData(("mouth_opening",)))


@needs_engine
def test_train_script_adds_tts_renditions_and_reports_a_missing_engine(grid_prepared, tmp_path, monkeypatch) -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "train_lipsync", Path(__file__).resolve().parents[1] / "scripts" / "train_lipsync.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--root", str(grid_prepared), "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "2",
            "--channels", "8", "--hidden", "8", "--core", "attention", "--curves", "mouth_opening",
            "--speed-perturb", "--tts-renditions", "1"]
    with one_thread():
        assert script.main(args) == 0
    n_train = len((grid_prepared / "train.tsv").read_text().strip().splitlines()) - 1
    assert len(list((tmp_path / "run" / "tts").glob("*.wav"))) == n_train
    monkeypatch.setenv("PATH", str(tmp_path))
    assert script.main(args[:-1] + ["1", "--tts-dir", str(tmp_path / "other")]) == 2
