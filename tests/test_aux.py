"""Auxiliary tasks: log-mel / Griffin-Lim, the mouth-opening recipe and heads, lip-to-speech, metrics, export.

Real-data tests run on ``mouth_corpus``: GRID s1 clips preprocessed by ``avsr.data.preprocess``
(mediapipe landmarks → mouth-opening targets), every 11th train-split clip (41) and the whole test
split (50); ~30 s on an idle 2-core CPU, once per session.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avsr.audio_features import LOG_FLOOR_VALUE, log_mel, mel_to_wave
from avsr.evaluation.aux_metrics import curve_metrics, mae, pearson_r, r2_score, speech_intelligibility
from avsr.evaluation.curves import curve_csv, curve_json, plot_curves, resample_curve, write_curve
from avsr.models.heads import (Lip2SpeechDecoder, Lip2SpeechLoss, MouthOpeningHead, mouth_opening_loss,
                               reference_mel)
from avsr.lipsync.model import load_lipsync_model
from avsr.lipsync.train import (MOUTH_OPENING, LipSyncTrainConfig, energy_envelope_curves, evaluate_lipsync_model,
                                load_lipsync_data, train_lipsync_model)

TRAIN_EVERY = 11  # every 11th s1 train clip (41 clips)


@pytest.fixture(scope="session")
def mouth_corpus(grid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preprocessed GRID s1: ``train`` = every 11th train-split clip, ``test`` = the whole test split."""
    from avsr.config import PreprocessConfig
    from avsr.data.corpora import discover
    from avsr.data.preprocess import preprocess

    utts = discover("grid", grid_dir)
    train = [u for u in utts if u.split == "train"][::TRAIN_EVERY]
    test = [u for u in utts if u.split == "test"]
    assert len(test) == 50
    root = tmp_path_factory.mktemp("mouth_corpus")
    summary = preprocess(train + test, root, PreprocessConfig(), workers=2, progress=False)
    assert summary.kept == len(train) + len(test), summary.failures
    return root


@pytest.fixture(scope="session")
def mouth_data(mouth_corpus: Path):
    return load_lipsync_data(mouth_corpus, "train"), load_lipsync_data(mouth_corpus, "test")


# ---------------------------------------------------------------- log-mel and Griffin-Lim

def test_log_mel_frames_and_padding() -> None:
    torch.manual_seed(0)
    wave = torch.randn(2, 640 * 10) * 0.1
    lengths = torch.tensor([640 * 10, 640 * 6])
    mel, mel_lengths = log_mel(wave, lengths)
    assert mel.shape == (2, 40, 80) and mel.dtype == torch.float32
    assert mel_lengths.tolist() == [40, 24]
    alone, _ = log_mel(wave[1, : 640 * 6])
    # padding never leaks into the valid frames; frames past the length hold the floor value
    torch.testing.assert_close(mel[1, :24], alone[0], atol=1e-4, rtol=1e-4)
    assert torch.all(mel[1, 24:] == LOG_FLOOR_VALUE)
    silent, _ = log_mel(torch.zeros(640))
    assert torch.allclose(silent, torch.full_like(silent, LOG_FLOOR_VALUE))


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 640), torch.zeros(100)])
def test_log_mel_rejects_bad_input(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        log_mel(bad)


def test_log_mel_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="lengths"):
        log_mel(torch.zeros(2, 1280), torch.tensor([1280, 1281]))


def test_griffin_lim_of_real_mel_is_intelligible(mouth_corpus: Path) -> None:
    import soundfile as sf

    wave, sr = sf.read(str(mouth_corpus / "test" / "bbal9a.wav"), dtype="float32")
    mel, _ = log_mel(torch.from_numpy(wave))
    rebuilt = mel_to_wave(mel[0], n_iter=32)
    assert rebuilt.shape == (len(wave),)
    scores = speech_intelligibility([wave], [rebuilt.numpy()], sr)
    assert scores["stoi"] >= 0.8, scores
    noise = np.random.default_rng(0).normal(0, 0.05, len(wave)).astype(np.float32)
    assert speech_intelligibility([wave], [noise], sr)["stoi"] < 0.5  # the metric can fail


# ---------------------------------------------------------------- metrics

def test_curve_metrics_against_numpy() -> None:
    rng = np.random.default_rng(0)
    t = rng.random(50)
    p = t + rng.normal(0, 0.1, 50)
    assert pearson_r(p, t) == pytest.approx(np.corrcoef(p, t)[0, 1])
    assert mae(p, t) == pytest.approx(np.abs(p - t).mean())
    assert r2_score(p, t) == pytest.approx(1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum())
    assert math.isnan(pearson_r(np.ones(5), t[:5]))
    with pytest.raises(ValueError):
        pearson_r(p, t[:10])


def test_pooled_and_per_utterance_differ_by_offsets() -> None:
    """Right shapes at wrong levels: perfect per utterance, worse pooled."""
    shape = np.sin(np.linspace(0, 6, 40))
    targets = [shape, shape + 3.0]
    preds = [shape, shape]
    m = curve_metrics(preds, targets, ["a", "b"])
    assert m["utterance_mean"]["pearson"] == pytest.approx(1.0)
    assert m["pooled"]["pearson"] < 0.5
    assert m["utterances"]["b"]["mae"] == pytest.approx(3.0)
    assert m["n_utterances"] == 2 and m["n_frames"] == 80
    with pytest.raises(ValueError):
        curve_metrics([shape], [])


# ---------------------------------------------------------------- curve export

def test_resample_and_export(tmp_path: Path) -> None:
    curve = np.array([0.0, 0.1, 0.3, 0.2, 0.0])
    up = resample_curve(curve, 25, 100)
    assert up.shape == (20,)
    np.testing.assert_allclose(up[::4], curve)  # original samples kept
    assert up[2] == pytest.approx(0.05)  # linear in between
    assert resample_curve(curve, 25, 5).shape == (1,)
    csv_text = curve_csv(curve, 25, out_fps=50)
    lines = csv_text.strip().split("\n")
    assert lines[0] == "time_s,mouth_opening" and len(lines) == 11
    assert lines[2] == "0.020000,0.050000"
    doc = curve_json(curve, 25, out_fps=30)
    assert doc["fps"] == 30 and len(doc["data"]) == 6
    written = json.loads(write_curve(tmp_path / "c.json", curve, 25).read_text())
    assert written == {"fps": 25, "data": pytest.approx(curve.tolist())}
    assert (tmp_path / "c.json").exists() and not list(tmp_path.glob(".*part*"))
    png = plot_curves(tmp_path / "c.png", curve, curve * 0.9, 25, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=".csv or .json"):
        write_curve(tmp_path / "c.txt", curve, 25)
    with pytest.raises(ValueError):
        resample_curve(np.array([0.0, np.nan]), 25, 50)


# ---------------------------------------------------------------- mouth-opening models

def test_landmark_mouth_opening_follows_audio_energy(mouth_data) -> None:
    """Sanity of targets and sync: the mouth opens when there is sound (GRID-NOTES: r ~ 0.6 at lag 0)."""
    _, test = mouth_data
    energy = energy_envelope_curves(test)
    targets = test.curve(MOUTH_OPENING)
    masks = [m.numpy() for m in test.masks]

    def pooled_r(lag: int) -> float:
        e, t = [], []
        for en, tg, mk in zip(energy, targets, masks):
            n = len(tg) - abs(lag)
            a, b = (en[:n], tg[lag:]) if lag >= 0 else (en[-lag:], tg[:n])
            keep = mk[lag:][:n] if lag >= 0 else mk[:n]
            e.append(a[keep])
            t.append(b[keep])
        return pearson_r(np.concatenate(e), np.concatenate(t))

    by_lag = {lag: pooled_r(lag) for lag in range(-4, 5)}
    assert by_lag[0] >= 0.45, by_lag
    assert max(by_lag, key=by_lag.get) in (-1, 0, 1), by_lag


@pytest.mark.slow
def test_audio_to_mouth_opening_learns(mouth_data) -> None:
    """Trained briefly on 41 GRID s1 train clips, the model follows the s1 test mouth (Pearson r >= 0.6),
    well ahead of the audio-energy envelope (an untrained model's r depends on its random init: from
    -0.2 to 0.67 over four seeds, so it is no baseline)."""
    train, test = mouth_data
    args = dict(curves=[MOUTH_OPENING], channels=32, hidden=32)
    model, history = train_lipsync_model(train, args, LipSyncTrainConfig(steps=250, batch_size=16))
    metrics = evaluate_lipsync_model(model, test)["curves"][MOUTH_OPENING]
    assert metrics["n_utterances"] == 50
    assert metrics["pooled"]["pearson"] >= 0.6, metrics["pooled"]
    assert np.mean(history["loss"][-25:]) < 0.5 * np.mean(history["loss"][:25])
    masks = [m.numpy() for m in test.masks]
    energy = pearson_r(np.concatenate([e[m] for e, m in zip(energy_envelope_curves(test), masks)]),
                       np.concatenate([t[m] for t, m in zip(test.curve(MOUTH_OPENING), masks)]))
    assert metrics["pooled"]["pearson"] > energy + 0.1, (metrics["pooled"], energy)


def test_train_script_with_rdrop_and_mean_teacher(mouth_corpus: Path, tmp_path: Path) -> None:
    """The CLI trains the causal core on two curves with R-Drop + mean teacher, writes a loadable
    checkpoint, metrics per curve and curve exports."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_lipsync", Path(__file__).resolve().parents[1] / "scripts" / "train_lipsync.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    rc = script.main(["--root", str(mouth_corpus), "--out", str(out), "--steps", "6", "--batch-size", "4",
                      "--channels", "8", "--hidden", "8", "--rdrop", "1", "--mean-teacher", "1",
                      "--unlabelled-split", "test", "--core", "causal_gru", "--lookahead", "1",
                      "--curves", "mouth_opening,jawOpen", "--export", "1", "--export-fps", "60"])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["splits"]["test"]["curves"]) == {"mouth_opening", "jawOpen"}
    assert set(report["splits"]["test"]["curves"]["jawOpen"]) >= {"pooled", "utterance_mean", "utterances"}
    assert report["lookahead_ms"] == 30.0
    model, _ = load_lipsync_model(out / "lipsync.pt")
    assert model.causal and model.lookahead == 1 and model.curves == ("mouth_opening", "jawOpen") and not model.training
    csv_file = next((out / "curves").glob("*.csv"))
    assert len(csv_file.read_text().strip().split("\n")) == 1 + 180  # 3 s at 60 fps
    assert script.main(["--root", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert script.main(["--root", str(mouth_corpus), "--out", str(out), "--curves", "lipWiggle"]) == 2


# ---------------------------------------------------------------- heads

def test_mouth_opening_head_and_loss() -> None:
    head = MouthOpeningHead(32, hidden=16)
    feats = torch.randn(2, 12, 32)
    lengths = torch.tensor([12, 7])
    curve = head(feats, lengths)
    assert curve.shape == (2, 12) and torch.all(curve[1, 7:] == 0)
    target = torch.rand(2, 13)  # streams may differ by a frame
    loss = mouth_opening_loss(curve, target, lengths)
    loss.backward()
    assert loss.ndim == 0 and head.out.weight.grad is not None
    changed = target.clone()
    changed[1, 7:] += 10.0  # padding is not scored
    assert mouth_opening_loss(curve, changed, lengths).item() == pytest.approx(loss.item())
    with pytest.raises(ValueError):
        MouthOpeningHead(32, kernel=4)
    with pytest.raises(ValueError):
        head(torch.randn(2, 12, 31), lengths)


def _clip_features(root: Path, utt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheap real visual features of a clip ((1, T, 144): 8x8-pooled mouth ROI) and its log-mel."""
    import soundfile as sf

    from avsr.data.media import read_gray_video

    frames = torch.from_numpy(read_gray_video(root / "test" / f"{utt}.mp4")).float() / 255.0
    feats = torch.nn.functional.avg_pool2d(frames[:, None], 8).flatten(1)
    feats = (feats - feats.mean()) / feats.std()
    wave, _ = sf.read(str(root / "test" / f"{utt}.wav"), dtype="float32")
    mel, _ = log_mel(torch.from_numpy(wave))
    return feats[None], mel


def test_lip2speech_decoder_overfits_one_clip(mouth_corpus: Path) -> None:
    torch.manual_seed(0)
    feats, mel = _clip_features(mouth_corpus, "bbal9a")
    t = feats.shape[1]
    lengths = torch.tensor([t])
    decoder = Lip2SpeechDecoder(feats.shape[-1], d_model=32, num_blocks=1, dropout=0.0)
    criterion = Lip2SpeechLoss(feats.shape[-1])
    opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    ref, ref_lengths = reference_mel(mel, torch.tensor([mel.shape[1]]))
    history = []
    for _ in range(60):
        pred, pred_lengths = decoder(feats, lengths, ref, ref_lengths)
        loss = criterion(pred, pred_lengths, mel, torch.tensor([mel.shape[1]]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert pred.shape == (1, 4 * t, 80) and pred_lengths.tolist() == [4 * t]
    assert history[-1] < 0.3 * history[0] and history[-1] < 1.5, history[::10]


def test_lip2speech_decoder_masks_padding() -> None:
    decoder = Lip2SpeechDecoder(16, d_model=32, num_blocks=1).eval()
    feats = torch.randn(2, 10, 16)
    ref = torch.randn(2, 30, 80)
    mel, lengths = decoder(feats, torch.tensor([10, 6]), ref, torch.tensor([30, 20]))
    assert mel.shape == (2, 40, 80) and lengths.tolist() == [40, 24]
    assert torch.all(mel[1, 24:] == LOG_FLOOR_VALUE)
    alone, _ = decoder(feats[1:, :6], torch.tensor([6]), ref[1:, :20], torch.tensor([20]))
    torch.testing.assert_close(mel[1, :24], alone[0], atol=1e-5, rtol=1e-5)


class _TinyAsrEncoder(torch.nn.Module):
    """Stand-in for a frozen ASR encoder on log-mel: (mel (B, F, 80), lengths) -> (feats, lengths)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(80, 8, 4, stride=4)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(self.conv(mel.transpose(1, 2))).transpose(1, 2), lengths // 4


def test_lip2speech_loss_content_warmup_and_ctc() -> None:
    torch.manual_seed(0)
    encoder = _TinyAsrEncoder()
    criterion = Lip2SpeechLoss(16, content_encoder=encoder, content_weight=0.5, content_warmup_steps=100,
                               vocab_size=10, ctc_weight=0.2).train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    pred = torch.randn(2, 40, 80, requires_grad=True)
    target, lengths = torch.randn(2, 40, 80), torch.tensor([40, 32])
    feats, feat_lengths = torch.randn(2, 10, 16, requires_grad=True), torch.tensor([10, 8])
    tokens, token_lengths = torch.tensor([[1, 2, 3], [4, 5, -1]]), torch.tensor([3, 2])
    early = criterion(pred, lengths, target, lengths, feats, feat_lengths, tokens, token_lengths, step=99)
    assert set(early) == {"loss", "l1", "ctc"}
    late = criterion(pred, lengths, target, lengths, feats, feat_lengths, tokens, token_lengths, step=100)
    assert set(late) == {"loss", "l1", "ctc", "content"} and float(late["content"]) > 0
    assert late["loss"].item() == pytest.approx(float(late["l1"] + 0.5 * late["content"] + 0.2 * late["ctc"]), rel=1e-5)
    late["loss"].backward()
    assert pred.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    assert encoder.conv.weight.grad is None
    same = criterion(target, lengths, target, lengths, feats, feat_lengths, tokens, token_lengths, step=100)
    assert float(same["content"]) == 0.0  # identical mel, identical features: the encoder is deterministic
    with pytest.raises(ValueError, match="content_encoder"):
        Lip2SpeechLoss(16, content_weight=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        Lip2SpeechLoss(16, ctc_weight=1.0)
    with pytest.raises(ValueError, match="CTC"):
        criterion(pred, lengths, target, lengths)


# ---------------------------------------------------------------- heads inside the AVSR model

def _real_batch(root: Path, n: int = 2):
    from avsr.config import DataConfig
    from avsr.data.dataset import AVDataset, collate
    from avsr.data.manifest import read_manifest
    from avsr.data.transforms import build_transform
    from avsr.text.tokenizer import CharTokenizer

    rows = read_manifest(root, "test")[:n]
    tok = CharTokenizer.train([r.transcript for r in rows])
    data = AVDataset(root, rows, tok.encode, build_transform(DataConfig(), train=False))
    return collate([data[i] for i in range(n)]), tok.vocab_size


@pytest.mark.parametrize("mode", ["video", "audiovisual"])
def test_avsr_model_trains_aux_heads(mouth_corpus: Path, mode: str) -> None:
    """Weights > 0 add `mouth` (Huber vs the landmark curve) and `l2s` (mel L1) to the loss; 0 adds nothing."""
    from avsr.config import ModelConfig
    from avsr.models import build_model

    torch.manual_seed(0)
    batch, vocab = _real_batch(mouth_corpus)
    small = dict(mode=mode, visual_width=4, visual_stem_kernel_t=3, audio_frontend="logmel", audio_width=8,
                 frontend_dim=16, d_model=16, num_heads=2, ffn_dim=32, num_layers=1, conv_kernel=7,
                 decoder_layers=1, decoder_ffn_dim=32)
    plain = build_model(ModelConfig(**small), vocab)
    assert len(plain.aux_heads) == 0 and set(plain(batch).losses) == {"ctc", "att", "acc"}
    model = build_model(ModelConfig(**small, mouth_opening_weight=0.5, lip2speech_weight=0.2), vocab)
    assert set(model.aux_heads["mouth"].heads) == ({"video"} if mode == "video" else {"video", "audio"})
    out = model(batch)
    assert set(out.losses) == {"ctc", "att", "acc", "mouth", "l2s"}
    expect = 0.1 * out.losses["ctc"] + 0.9 * out.losses["att"] + 0.5 * out.losses["mouth"] + 0.2 * out.losses["l2s"]
    torch.testing.assert_close(out.loss.detach(), expect)
    out.loss.backward()
    for name in ("mouth", "l2s"):
        assert all(p.grad is not None for p in model.aux_heads[name].parameters())
    assert model.encoder.visual_frontend.proj.weight.grad.abs().sum() > 0
    encoded = model.encode(batch.video, batch.video_lengths, batch.audio, batch.audio_lengths)
    assert model.aux_heads["mouth"].predict(encoded).shape == batch.mouth_opening.shape
    mel, lengths = model.aux_heads["l2s"].predict(encoded, *reference_mel(*log_mel(batch.audio, batch.audio_lengths)))
    assert mel.shape == (2, 4 * batch.video.shape[1], 80) and lengths.tolist() == (4 * batch.video_lengths).tolist()
    with pytest.raises(ValueError, match="needs video"):
        build_model(ModelConfig(**{**small, "mode": "audio"}, lip2speech_weight=1.0), vocab)
