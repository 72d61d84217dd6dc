"""The lip-sync model (avsr.lipsync.model): cores, causality, streaming, and the training recipe's heads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from avsr.audio_features import LogMelStream, log_mel
from avsr.data.manifest import read_manifest
from avsr.lipsync.model import CORES, LipSyncModel, LipSyncStream, load_lipsync_model, save_lipsync_model, to_video_rate
from avsr.lipsync.train import LipSyncData, LipSyncTrainConfig, evaluate_lipsync_model, train_lipsync_model

SMALL = dict(channels=16, hidden=8, attention_heads=2)


def _wave(seconds: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(16000 * seconds), generator=gen) * 0.1


def test_streamed_log_mel_equals_offline_log_mel() -> None:
    wave = _wave(1.3)[: 16000 + 4877]
    stream, parts, start = LogMelStream(), [], 0
    for n in (1, 159, 160, 0, 321, 7, 2500, 100000):
        parts.append(stream.push(wave[start:start + n]))
        start += n
    parts.append(stream.flush())
    assert len(parts[0]) == 0 and len(parts[1]) == 0  # frame 0 needs samples up to 320
    torch.testing.assert_close(torch.cat(parts), log_mel(wave)[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("core", CORES)
def test_every_core_gives_curves_and_visemes_per_mel_frame(core: str) -> None:
    for stride in (1, 4) if core != "causal_gru" else (1,):
        model = LipSyncModel(curves=("mouth_opening", "jawOpen"), visemes="ABCDEFGHX", core=core, stride=stride,
                             **SMALL)
        out = model(torch.randn(3, 43, 80), torch.tensor([43, 40, 9]))
        assert out["curves"].shape == (3, 43, 2) and out["visemes"].shape == (3, 43, 9)
        assert out["lengths"].tolist() == [43, 40, 9]
        if stride == 4:  # one output per step of 4 mel frames
            assert torch.equal(out["curves"][:, 0], out["curves"][:, 3]) and torch.equal(out["curves"][:, 40], out["curves"][:, 42])
    with pytest.raises(ValueError, match="mel must be"):
        model(torch.randn(2, 40, 64), torch.tensor([40, 40]))


@pytest.mark.parametrize("kwargs", [{"core": "lstm"}, {"lookahead": 1}, {"core": "causal_gru", "lookahead": 4},
                                    {"kernel": 4}, {"dropout": 1.0}, {"hidden": 0}, {"curves": ()},
                                    {"core": "attention", "hidden": 10, "attention_heads": 4},
                                    {"core": "attention", "num_layers": 2}, {"stride": 3},
                                    {"core": "causal_gru", "stride": 2}])
def test_bad_model_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LipSyncModel(**kwargs)


@pytest.mark.parametrize("core, stride", [("bigru", 1), ("attention", 1), ("bigru", 4), ("attention", 2)])
def test_offline_cores_do_not_depend_on_the_batch_padding(core: str, stride: int) -> None:
    torch.manual_seed(0)
    model = LipSyncModel(core=core, stride=stride, **SMALL).eval()
    mel = torch.randn(2, 60, 80)
    batch = model(mel, torch.tensor([60, 37]))["curves"]
    alone = model(mel[1:, :37], torch.tensor([37]))["curves"]
    torch.testing.assert_close(batch[1, :37], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_causal_core_hears_no_audio_past_its_lookahead(lookahead: int) -> None:
    """Output frame t ignores audio from sample 160 (t + lookahead) + 320 on; the offline core does not."""
    torch.manual_seed(0)
    causal = LipSyncModel(core="causal_gru", lookahead=lookahead, **SMALL).eval()
    bidir = LipSyncModel(core="bigru", **SMALL).eval()
    assert causal.lookahead_ms == pytest.approx(10 * lookahead + 20)
    t, wave = 40, _wave(1.0)
    cut = 160 * (t + lookahead) + 320
    changed = wave.clone()
    changed[cut:] = _wave(1.0, seed=1)[cut:]
    for model, should_match in ((causal, True), (bidir, False)):
        a = model(*log_mel(wave))["curves"]
        b = model(*log_mel(changed))["curves"]
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6) is should_match
    just_before = wave.clone()
    just_before[cut - 100] += 1.0  # inside the window of mel frame t + lookahead
    a, b = causal(*log_mel(wave))["curves"], causal(*log_mel(just_before))["curves"]
    assert not torch.allclose(a[:, t], b[:, t], atol=1e-7)


@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_streaming_in_10_ms_hops_equals_offline(lookahead: int) -> None:
    torch.manual_seed(0)
    model = LipSyncModel(curves=("mouth_opening", "jawOpen"), visemes="ABCDX", core="causal_gru", lookahead=lookahead,
                         **SMALL).eval()
    model.set_stats(torch.randn(80) * 0.1, torch.rand(80) + 0.5, torch.tensor([0.1, 0.5]), torch.tensor([0.05, 0.2]))
    wave = _wave(2.0)[:31_999]
    offline = model(*log_mel(wave))
    stream, parts = LipSyncStream(model), []
    for start in range(0, len(wave), 160):
        parts.append(stream.push(wave[start:start + 160]))
        # latency: once audio up to sample s is in, every frame t with 160 (t + lookahead) + 320 <= s is out
        s = min(len(wave), start + 160)
        mel_ready = min(s // 160, max(0, (s - 320) // 160 + 1))
        assert sum(len(p["curves"]) for p in parts) == max(0, mel_ready - lookahead)
    parts.append(stream.flush())
    for key in ("curves", "visemes"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), offline[key][0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="causal"):
        LipSyncStream(LipSyncModel(core="bigru", **SMALL))


def test_checkpoint_round_trip_and_bad_file(tmp_path) -> None:
    args = dict(curves=["jawOpen"], visemes=["A", "B", "X"], core="causal_gru", lookahead=1, **SMALL)
    model = LipSyncModel(**args).eval()
    save_lipsync_model(tmp_path / "m.pt", model, args, {"metrics": {"r": 0.5}})
    loaded, ckpt = load_lipsync_model(tmp_path / "m.pt")
    mel = torch.randn(1, 30, 80)
    torch.testing.assert_close(loaded(mel, torch.tensor([30]))["curves"], model(mel, torch.tensor([30]))["curves"])
    assert ckpt["metrics"] == {"r": 0.5} and loaded.lookahead == 1 and loaded.visemes == ("A", "B", "X")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_lipsync_model(tmp_path / "bad.pt")


def _tone_data(n: int, seed: int) -> LipSyncData:
    """1 s clips of silence and 440 Hz tone bursts in 0.2 s blocks: curve 1 and viseme 1 on tone frames."""
    rng = np.random.default_rng(seed)
    data = LipSyncData(("mouth_opening",), ("X", "A"))
    for i in range(n):
        on = rng.random(5) < 0.5
        frames = np.repeat(on, 5)  # 25 fps
        t = np.arange(16000) / 16000
        wave = 0.3 * np.sin(2 * np.pi * 440 * t) * np.repeat(on, 3200) + 1e-3 * rng.standard_normal(len(t))
        mel, _ = log_mel(torch.from_numpy(wave.astype(np.float32)))
        data.utt_ids.append(f"u{i}")
        data.mels.append(mel[0])
        data.curves.append(torch.from_numpy(frames.astype(np.float32))[:, None])
        data.masks.append(torch.ones(len(frames), dtype=torch.bool))
        data.visemes.append(torch.from_numpy(frames.astype(np.int64)))
    return data


def test_curve_and_viseme_heads_learn_a_toy_task_with_rdrop_and_mean_teacher() -> None:
    train, test = _tone_data(16, 0), _tone_data(8, 1)
    args = dict(curves=["mouth_opening"], visemes=["X", "A"], core="causal_gru", lookahead=1, **SMALL)
    cfg = LipSyncTrainConfig(steps=50, batch_size=8, lr=1e-2, rdrop_weight=0.5, mean_teacher_weight=0.5,
                             rampup_steps=10, ema_decay=0.9)
    model, history = train_lipsync_model(train, args, cfg)
    report = evaluate_lipsync_model(model, test)
    assert report["curves"]["mouth_opening"]["pooled"]["pearson"] > 0.9
    assert report["viseme_accuracy"] > 0.9
    assert np.mean(history["loss"][-10:]) < 0.5 * np.mean(history["loss"][:10])
    with pytest.raises(ValueError, match="curves"):
        train_lipsync_model(train, dict(args, curves=["jawOpen"]), cfg)


def test_mel_axis_warp_moves_a_formant_and_keeps_identity_and_shape() -> None:
    from avsr.lipsync.train import warp_mel_axis

    mel = torch.full((2, 7, 80), -5.0)
    mel[:, :, 40] = 3.0  # one "formant" at bin 40
    out = warp_mel_axis(mel, torch.tensor([1.0, 1.25]))
    assert out.shape == mel.shape
    torch.testing.assert_close(out[0], mel[0])
    assert int(out[1, 0].argmax()) == 32  # bin k reads bin 1.25 k: the peak moves down to 40 / 1.25
    assert float(out[1, :, 79].max()) == -5.0  # past the top: the last bin repeated
    with pytest.raises(ValueError, match="freq_warp"):
        LipSyncTrainConfig(freq_warp=0.6)


def test_speed_perturbed_copies_keep_audio_and_targets_in_step(grid_prepared) -> None:
    from avsr.lipsync.train import load_lipsync_data, MOUTH_OPENING

    plain = load_lipsync_data(grid_prepared, "test")
    data = load_lipsync_data(grid_prepared, "test", speed_perturb=(0.9, 1.0, 1.1))
    assert len(data) == 3 * len(plain)
    assert data.utt_ids[:3] == [plain.utt_ids[0], plain.utt_ids[0] + "_sp0.9", plain.utt_ids[0] + "_sp1.1"]
    for k, factor in ((1, 0.9), (2, 1.1)):
        n = round(len(plain.curves[0]) / factor)
        assert data.curves[k].shape == (n, 1) and data.masks[k].shape == (n,) and data.visemes[k].shape == (n,)
        assert len(data.mels[k]) == 4 * n  # the audio has 640 samples per new frame: 4 mel frames each
        # the mouth opens and closes when the sound comes and goes: the copy's opening curve follows
        # the speeded energy as the original's follows the original energy
        energy = lambda mel: to_video_rate(mel.exp().sum(1, keepdim=True)).squeeze(1).log().numpy()  # noqa: E731
        r_plain = np.corrcoef(energy(plain.mels[0])[: len(plain.curves[0])], plain.curve(MOUTH_OPENING)[0])[0, 1]
        r_copy = np.corrcoef(energy(data.mels[k])[:n], data.curve(MOUTH_OPENING)[k])[0, 1]
        assert r_copy > 0.3 and abs(r_copy - r_plain) < 0.1
    torch.testing.assert_close(data.mels[0], plain.mels[0])


def test_to_video_rate_averages_each_frames_four_mel_frames() -> None:
    x = torch.arange(10, dtype=torch.float32)[:, None]
    assert to_video_rate(x).squeeze(1).tolist() == [1.5, 5.5]
    assert to_video_rate(x, 1).shape == (1, 1)


# ---------------------------------------------------------------- avsr lipsync

@pytest.fixture(scope="module")
def rhubarb_model(tmp_path_factory) -> Path:
    """An (untrained) causal model with every curve and Rhubarb's shapes, saved as a checkpoint."""
    from avsr.lipsync.train import CURVES
    from avsr.lipsync.visemes import RHUBARB_SHAPES

    torch.manual_seed(0)
    args = dict(curves=list(CURVES), visemes=list(RHUBARB_SHAPES), core="causal_gru", lookahead=1, **SMALL)
    path = tmp_path_factory.mktemp("lipsync_model") / "lipsync.pt"
    save_lipsync_model(path, LipSyncModel(**args).eval(), args)
    return path


def _cli(*argv) -> int:
    from avsr.cli import main

    return main([str(a) for a in argv])


def test_lipsync_cli_writes_every_format_that_tools_read(rhubarb_model, grid_prepared, tmp_path) -> None:
    """Rhubarb TSV/JSON, CSV and JSON from a real GRID clip; OpenFaceFX's importers read the Rhubarb
    and CSV files; streaming in 10 ms hops writes the same files as offline."""
    from openfacefx.importers import import_cues
    from openfacefx.importers_csv import read_csv

    from avsr.lipsync.export import read_curves_csv, read_rhubarb_tsv
    from avsr.lipsync.targets import BLENDSHAPES

    wav = read_manifest(grid_prepared, "test")[0].file(grid_prepared, ".wav")
    seconds = len(sf.read(str(wav))[0]) / 16000
    for name, fmt in (("t.tsv", None), ("t.rhubarb.json", "rhubarb-json"), ("t.csv", None), ("t.json", None)):
        for streaming in (False, True):
            out = tmp_path / ("s_" if streaming else "") / name
            assert _cli("lipsync", "--model", rhubarb_model, wav, "--out", out, "--fps", 30,
                        *(["--format", fmt] if fmt else []), *(["--streaming"] if streaming else [])) == 0
        assert (tmp_path / name).read_text() == (tmp_path / "s_" / name).read_text()
    cues = read_rhubarb_tsv((tmp_path / "t.tsv").read_text())
    assert cues[0][0] == 0 and cues[-1][1] == pytest.approx(seconds, abs=0.02)
    assert all(a[1] == b[0] for a, b in zip(cues, cues[1:]))
    track, _ = import_cues(str(tmp_path / "t.tsv"))
    assert track.channels
    doc = json.loads((tmp_path / "t.rhubarb.json").read_text())
    assert set(doc) == {"metadata", "mouthCues"} and doc["metadata"]["soundFile"] == str(wav)
    assert [(c["start"], c["value"]) for c in doc["mouthCues"]] == [(round(s, 2), v) for s, _, v in cues]
    assert import_cues(str(tmp_path / "t.rhubarb.json"), fmt="json-cues")[0].channels
    names, times, curves = read_curves_csv((tmp_path / "t.csv").read_text())
    assert names == list(BLENDSHAPES) and len(times) == round(seconds * 30) and np.allclose(np.diff(times), 1 / 30, atol=1e-3)
    from openfacefx.edits import sample

    imported, _ = read_csv(str(tmp_path / "t.csv"), fps=30, timecode_col="time")  # from-csv --timecode-col time
    assert imported.channels and {c.name for c in imported.channels} <= set(BLENDSHAPES)
    for channel in imported.channels:  # its thinned keys follow our values, clamped to [0, 1]
        error = np.abs(sample(channel, times) - np.clip(curves[:, BLENDSHAPES.index(channel.name)], 0, 1))
        assert error.max() < 0.06 and error.mean() < 0.01, channel.name
    full = json.loads((tmp_path / "t.json").read_text())
    assert full["fps"] == 30 and len(full["curves"]["jawOpen"]) == round(seconds * 30)
    assert full["visemes"]["source"] == "model" and full["visemes"]["cues"][-1]["end"] == pytest.approx(seconds, abs=0.04)


def test_lipsync_cli_times_visemes_from_a_dialog(rhubarb_model, grid_prepared, tmp_path) -> None:
    """--dialog with the aligner: the cues are the transcript's Rhubarb shapes, silence around them."""
    from avsr.lipsync.aligner import PhoneCTC, save_aligner
    from avsr.lipsync.export import read_rhubarb_tsv
    from avsr.lipsync.visemes import RHUBARB, transcript_phones

    row = read_manifest(grid_prepared, "test")[0]
    torch.manual_seed(0)
    save_aligner(PhoneCTC().eval(), tmp_path / "aligner.pt")
    out = tmp_path / "d.tsv"
    assert _cli("lipsync", "--model", rhubarb_model, row.file(grid_prepared, ".wav"), "--out", out,
                "--dialog", row.transcript, "--aligner", tmp_path / "aligner.pt") == 0
    def collapse(seq):
        return [v for i, v in enumerate(seq) if i == 0 or v != seq[i - 1]]

    got = collapse([v for _, _, v in read_rhubarb_tsv(out.read_text()) if v != "X"])
    expected = iter(collapse([RHUBARB[p] for p in transcript_phones(row.transcript)]))
    assert got and all(any(v == e for e in expected) for v in got)  # the transcript's shapes, in order
    assert _cli("lipsync", "--model", rhubarb_model, row.file(grid_prepared, ".wav"), "--out", out,
                "--dialog", row.transcript) == 1  # no aligner: that input fails, named


def test_lipsync_cli_names_a_silent_truncated_or_non_audio_file(rhubarb_model, grid_prepared, tmp_path, capfd) -> None:
    wav = read_manifest(grid_prepared, "test")[0].file(grid_prepared, ".wav")
    silent, truncated, text = tmp_path / "silent.wav", tmp_path / "truncated.wav", tmp_path / "notes.wav"
    sf.write(str(silent), np.zeros(16000, np.float32), 16000)
    truncated.write_bytes(wav.read_bytes()[:30])
    text.write_text("not audio at all\n")
    good = tmp_path / "good.wav"
    good.write_bytes(wav.read_bytes())
    capfd.readouterr()
    assert _cli("lipsync", "--model", rhubarb_model, silent, truncated, text, good, "--out", tmp_path / "{name}.tsv") == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 3
    for path, word in ((silent, "silent"), (truncated, ""), (text, "")):
        assert any(str(path) in e and word in e for e in errors), errors
    assert (tmp_path / "good.tsv").is_file() and not (tmp_path / "silent.tsv").exists()
    assert _cli("lipsync", "--model", rhubarb_model, good, "--out", tmp_path / "x.txt") == 2  # no format


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_streaming_step_matches_pytorch_hop_by_hop(rhubarb_model, tmp_path, fmt) -> None:
    """`avsr export --part lipsync`: onnxruntime (or TorchScript), hop by hop with the state carried,
    gives the PyTorch stream's outputs within 1e-4; an offline core is refused."""
    from avsr.export import LIPSYNC_INPUTS, LipSyncAudioStep, _run_step

    out = tmp_path / f"lipsync.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert _cli("export", "--checkpoint", rhubarb_model, "--part", "lipsync", "--format", fmt, "--out", out) == 0
    model, _ = load_lipsync_model(rhubarb_model)
    stream, run = LipSyncStream(model), _run_step(fmt, out)
    wave = _wave(1.0)
    state = [t.numpy() for t in LipSyncAudioStep(model).initial_state(wave[:160])]
    got, start = [], 160
    for n in (1, 7, 2, 30, 59):  # 10 ms hops per call, raw audio in
        curves, visemes, *state = run(wave[None, start:start + 160 * n].numpy(), *state)
        got.append(curves[0])
        start += 160 * n
    assert start == len(wave) and state[0].shape == (1, 480)
    ref = torch.cat([stream.push(wave)["curves"], stream.flush()["curves"]]).numpy()
    lag = model.lookahead  # the exported step's output j is frame j - lookahead
    got = np.concatenate(got)
    assert len(got) == len(wave) // 160 - 1  # the last frame's window needs 10 ms past the end
    np.testing.assert_allclose(got[lag:], ref[: len(got) - lag], atol=1e-4)
    assert LIPSYNC_INPUTS[:2] == ("audio", "audio_state")
    offline = tmp_path / "offline.pt"
    args = dict(curves=["jawOpen"], core="bigru", **SMALL)
    save_lipsync_model(offline, LipSyncModel(**args), args)
    assert _cli("export", "--checkpoint", offline, "--part", "lipsync", "--format", fmt, "--out", tmp_path / "x") == 2


def _dark_pixels(img: np.ndarray) -> int:
    from avsr.lipsync.preview import DARK

    return int((np.abs(img.astype(int) - np.array(DARK)).sum(-1) < 30).sum())


def test_drawn_mouth_opens_with_jaw_open_and_closes_with_mouth_close() -> None:
    from avsr.lipsync.preview import draw_mouth

    rest, half, wide = (_dark_pixels(draw_mouth({"jawOpen": j})) for j in (0.0, 0.5, 1.0))
    assert rest < half < wide
    assert _dark_pixels(draw_mouth({"jawOpen": 1.0, "mouthClose": 1.0})) < wide / 3
    narrow = draw_mouth({"jawOpen": 0.5, "mouthPucker": 1.0})
    assert _dark_pixels(narrow) < half
    assert _dark_pixels(draw_mouth({"mouth_opening": 1.0})) == wide  # the opening stands in for the jaw


def test_lipsync_cli_preview_has_the_crop_the_drawn_mouth_and_the_audio(rhubarb_model, grid_dir, tmp_path) -> None:
    import av

    video = sorted((grid_dir / "video").glob("*.mpg"))[0]
    out = tmp_path / "p.mp4"
    assert _cli("lipsync", "--model", rhubarb_model, video, "--out", tmp_path / "t.json", "--preview", out) == 0
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1
        frames = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
    assert len(frames) == 75 and frames[0].shape == (192, 384)  # GRID: 3 s at 25 fps; crop | drawn mouth
    left, right = np.array([f[:, :192] for f in frames]), np.array([f[:, 192:] for f in frames])
    assert left.std(axis=0).mean() > 2 and right.std() > 2  # the crop moves; the mouth is drawn


def test_transcribe_writes_the_transcript_visemes_and_curves_in_one_file(tiny_checkpoint, rhubarb_model, grid_dir,
                                                                         tmp_path) -> None:
    from avsr.lipsync.aligner import PhoneCTC, save_aligner

    video = sorted((grid_dir / "video").glob("*.mpg"))[0]
    torch.manual_seed(0)
    save_aligner(PhoneCTC().eval(), tmp_path / "aligner.pt")
    for aligner in ([], ["--aligner", tmp_path / "aligner.pt"]):
        out = tmp_path / f"track{len(aligner)}.json"
        assert _cli("transcribe", "--checkpoint", tiny_checkpoint, video, "--json", tmp_path / "r.json",
                    "--lipsync", out, "--lipsync-model", rhubarb_model, *aligner) == 0
        text = json.loads((tmp_path / "r.json").read_text())["results"][0]["text"]
        doc = json.loads(out.read_text())
        assert doc["text"] == text and len(doc["curves"]["jawOpen"]) == 75
        assert doc["visemes"]["source"] == ("dialog" if aligner and text.strip() else "words")
    assert _cli("transcribe", "--checkpoint", tiny_checkpoint, video, "--lipsync", out) == 2  # no model


def test_video_input_is_required_used_and_padding_invariant() -> None:
    """A model with video input needs its features, refuses none; the features change the output;
    the causal core refuses video; an audio-only model refuses features."""
    torch.manual_seed(0)
    mel = log_mel(_wave(1.0))[0]  # (1, 100, 80)
    video = torch.randn(1, 25, 6)
    for core, stride in (("bigru", 4), ("attention", 1)):
        model = LipSyncModel(curves=["jawOpen"], core=core, stride=stride, video_dim=6, **SMALL).eval()
        with torch.no_grad():
            a = model(mel, torch.tensor([100]), video)["curves"]
            b = model(mel, torch.tensor([100]), torch.zeros_like(video))["curves"]
            batch = model(torch.cat([torch.nn.functional.pad(mel, (0, 0, 0, 20)), log_mel(_wave(1.2, 1))[0]]),
                          torch.tensor([100, 120]), torch.cat([torch.nn.functional.pad(video, (0, 0, 0, 5)),
                                                               torch.randn(1, 30, 6)]))["curves"]
        assert float((a - b).abs().max()) > 1e-3
        torch.testing.assert_close(batch[:1, :100], a, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="takes video"):
            model(mel, torch.tensor([100]))
    with pytest.raises(ValueError, match="offline cores"):
        LipSyncModel(curves=["jawOpen"], core="causal_gru", video_dim=6, **SMALL)
    with pytest.raises(ValueError, match="audio-only"):
        LipSyncModel(curves=["jawOpen"], **SMALL)(mel, torch.tensor([100]), video)


def test_lipsync_with_video_trains_saves_and_runs_from_the_cli(tiny_checkpoint, grid_prepared, grid_dir, tmp_path,
                                                               capfd) -> None:
    """`scripts/train_lipsync.py --video-frontend` on real GRID clips stores the AVSR visual
    frontend in the lip-sync checkpoint (features equal after reloading); `avsr lipsync --use-video`
    runs it on a real clip's video, and refuses the wrong pairing of flag and model with one line."""
    import subprocess
    import sys

    from avsr.data.media import read_video
    from avsr.lipsync.video import MouthFeatures, load_mouth_features

    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/train_lipsync.py", "--root", str(grid_prepared), "--out", str(out),
           "--curves", "mouth_opening,jawOpen", "--steps", "3", "--batch-size", "2", "--channels", "8",
           "--hidden", "8", "--video-frontend", str(tiny_checkpoint)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   cwd=Path(__file__).parents[1])
    model, ckpt = load_lipsync_model(out / "lipsync.pt")
    mouth = load_mouth_features(ckpt)
    assert model.video_dim == mouth.dim > 0
    row = read_manifest(grid_prepared, "test")[0]
    crops = read_video(row.file(grid_prepared, ".mp4"), gray=True)[0]
    torch.testing.assert_close(mouth(crops), MouthFeatures.from_avsr_checkpoint(tiny_checkpoint)(crops))
    assert mouth(crops).shape == (len(crops), mouth.dim)
    video_in = grid_dir / "video" / f"{row.utt_id}.mpg"  # the speaker's face video with its audio
    assert _cli("lipsync", "--model", out / "lipsync.pt", video_in, "--use-video", "--out", tmp_path / "t.csv") == 0
    assert (tmp_path / "t.csv").read_text().startswith("time,jawOpen\n")
    capfd.readouterr()
    assert _cli("lipsync", "--model", out / "lipsync.pt", video_in, "--out", tmp_path / "u.csv") == 2
    assert "--use-video" in capfd.readouterr().err
    assert _cli("lipsync", "--model", out / "lipsync.pt", tmp_path / "t.csv", "--use-video", "--out", tmp_path / "v.csv") == 1
    audio_only = tmp_path / "audio_only.pt"
    args = dict(curves=["jawOpen"], core="bigru", **SMALL)
    save_lipsync_model(audio_only, LipSyncModel(**args), args)
    assert _cli("lipsync", "--model", audio_only, video_in, "--use-video", "--out", tmp_path / "w.csv") == 2
    assert "trained without video" in capfd.readouterr().err
