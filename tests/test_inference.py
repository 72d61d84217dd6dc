"""Inference on media files: windows, CTC alignment, the JSON schema, the overlay video, the CLI
end to end on real GRID clips with the tiny checkpoint trained in the test suite, and features."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from avsr.inference.alignment import AlignmentError, TimedToken, TimedWord, align_tokens, group_words, token_texts
from avsr.inference.result import SCHEMA_PATH, TranscriptionResult, results_document
from avsr.inference.visualize import write_overlay
from avsr.inference.windows import plan_windows, stitch
from avsr.text import CharTokenizer
from media_utils import write_av

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# A validator for the subset of JSON Schema (draft 2020-12) that docs/transcribe_schema.json uses.
# Unknown keywords are an error, so the schema cannot grow beyond what this checks.
_ANNOTATIONS = {"$schema", "$id", "title", "description", "$defs"}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[name])


def validate(doc, schema: dict, root: dict | None = None, where: str = "$") -> list[str]:
    """Errors of ``doc`` against ``schema`` (empty = valid)."""
    root = root or schema
    errors: list[str] = []
    for key, rule in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            assert rule.startswith("#/$defs/"), rule
            errors += validate(doc, root["$defs"][rule.split("/")[-1]], root, where)
        elif key == "type":
            names = rule if isinstance(rule, list) else [rule]
            if not any(_type_ok(doc, n) for n in names):
                errors.append(f"{where}: {doc!r:.40} is not of type {rule}")
        elif key == "const":
            if doc != rule:
                errors.append(f"{where}: {doc!r} != const {rule!r}")
        elif key == "enum":
            if doc not in rule:
                errors.append(f"{where}: {doc!r} not in {rule}")
        elif key == "required":
            if isinstance(doc, dict):
                errors += [f"{where}: missing '{k}'" for k in rule if k not in doc]
        elif key == "properties":
            if isinstance(doc, dict):
                for k, sub in rule.items():
                    if k in doc:
                        errors += validate(doc[k], sub, root, f"{where}.{k}")
        elif key == "additionalProperties":
            assert rule is False
            if isinstance(doc, dict):
                errors += [f"{where}: unexpected '{k}'" for k in doc if k not in schema.get("properties", {})]
        elif key == "items":
            if isinstance(doc, list):
                for i, item in enumerate(doc):
                    errors += validate(item, rule, root, f"{where}[{i}]")
        elif key in ("minimum", "maximum", "exclusiveMinimum"):
            if _type_ok(doc, "number"):
                bad = {"minimum": doc < rule, "maximum": doc > rule, "exclusiveMinimum": doc <= rule}[key]
                if bad:
                    errors.append(f"{where}: {doc} violates {key} {rule}")
        elif key == "minLength":
            if isinstance(doc, str) and len(doc) < rule:
                errors.append(f"{where}: shorter than {rule}")
        elif key == "minItems":
            if isinstance(doc, list) and len(doc) < rule:
                errors.append(f"{where}: fewer than {rule} items")
        else:
            raise AssertionError(f"schema keyword '{key}' at {where} is not supported by the test validator")
    return errors


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


# --------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("n", [1, 249, 250, 251, 600, 1003])
def test_windows_cover_the_clip_and_own_each_frame_once(n):
    windows = plan_windows(n, 250, 25)
    assert windows[0].start == 0 and windows[-1].end == n
    assert all(w.length == min(n, 250) for w in windows)
    owned = np.concatenate([np.arange(w.keep_start, w.keep_end) for w in windows])
    np.testing.assert_array_equal(owned, np.arange(n))
    for a, b in zip(windows, windows[1:]):
        assert a.end - b.start >= 25  # neighbours overlap by at least the overlap
        # the boundary is the middle of the overlap: each side keeps >= 12 frames of context
        assert a.keep_end - b.start >= 12 and a.end - b.keep_start >= 12


def test_stitch_keeps_owned_frames_of_each_window():
    n = 600
    windows = plan_windows(n, 250, 25)
    truth = np.arange(4 * n, dtype=np.float32)
    parts = [truth[4 * w.start: 4 * w.end] for w in windows]  # rate 4, e.g. 100 fps mel
    np.testing.assert_array_equal(stitch(parts, windows, rate=4), truth)
    with pytest.raises(ValueError, match="needs"):
        stitch([p[:10] for p in parts], windows, rate=4)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(100, 25, 25)


# --------------------------------------------------------------------------------------------
# CTC forced alignment and word grouping


def _peaky(spans: list[tuple[int, int, int]], n_frames: int, vocab: int) -> torch.Tensor:
    """Log-probs with token ``k`` most likely on frames ``[a, b)`` for each ``(k, a, b)``, blank elsewhere."""
    probs = torch.full((n_frames, vocab), 0.02)
    probs[:, 0] = 0.9
    for k, a, b in spans:
        probs[a:b, 0] = 0.02
        probs[a:b, k] = 0.9
    return (probs / probs.sum(-1, keepdim=True)).log()


def test_forced_alignment_finds_the_token_frames():
    truth = [(3, 2, 4), (5, 7, 8), (5, 10, 12), (2, 15, 16)]  # a repeated token (5, 5) needs a blank between
    lp = _peaky(truth, 20, 8)
    spans = align_tokens(lp, [k for k, _, _ in truth])
    assert [(s.token, s.start, s.end) for s in spans] == truth
    assert all(0.5 < s.score <= 1.0 for s in spans)
    # forced: tokens the posteriors do not favour are still placed, in order, with low scores
    forced = align_tokens(lp, [4, 6])
    assert [s.token for s in forced] == [4, 6] and forced[0].end <= forced[1].start
    assert all(s.score < 0.1 for s in forced)
    assert align_tokens(lp, []) == []
    with pytest.raises(AlignmentError, match="do not fit"):
        align_tokens(lp[:4], [5, 5, 5])


def test_token_texts_and_words_with_a_char_tokenizer():
    tok = CharTokenizer.train(["BIN BLUE AT F TWO NOW"])
    ids = tok.encode("BIN BLUE")
    texts = token_texts(tok, ids)
    assert "".join(texts) == "BIN BLUE"
    timed = [TimedToken(i, t, 0.1 * k, 0.1 * k + 0.04, 0.9) for k, (i, t) in enumerate(zip(ids, texts))]
    words = group_words(timed)
    assert [w.word for w in words] == ["BIN", "BLUE"]
    assert words[0].start == pytest.approx(0.0) and words[0].end == pytest.approx(0.24)
    assert words[1].start == pytest.approx(0.4) and words[1].end == pytest.approx(0.74)


# --------------------------------------------------------------------------------------------
# JSON document and overlay video (no model needed)


def _fake_result(n: int = 40) -> TranscriptionResult:
    rng = np.random.default_rng(0)
    t = np.arange(n)
    return TranscriptionResult(
        path="clip.mp4", mode="audiovisual_relscore", text="BIN BLUE",
        tokens=[TimedToken(5, "BIN", 0.2, 0.28, 0.8), TimedToken(6, " BLUE", 0.6, 0.64, 0.7)],
        words=[TimedWord("BIN", 0.2, 0.28), TimedWord("BLUE", 0.6, 0.64)], n_frames=n,
        windows=[(0.0, n / 25)], face_detected=t % 7 != 0,
        mouth_opening=(0.1 + 0.05 * np.sin(t / 3)).astype(np.float32),
        reliability={"audio": np.linspace(0.2, 0.9, n, dtype=np.float32),
                     "video": np.linspace(0.9, 0.2, n, dtype=np.float32)},
        crops=rng.integers(0, 255, (n, 96, 96), dtype=np.uint8),
        audio=(0.1 * rng.standard_normal(640 * n)).astype(np.float32))


def test_json_document_matches_the_schema(schema):
    doc = json.loads(json.dumps(results_document([_fake_result()], [("bad.mp4", "bad.mp4: no face found")],
                                                 "ckpt.pt", "audiovisual_relscore")))
    assert validate(doc, schema) == []
    assert len(doc["results"][0]["reliability"]["audio"]) == doc["results"][0]["n_frames"]
    # the validator (and so the schema) rejects what it should
    broken = json.loads(json.dumps(doc))
    broken["results"][0]["tokens"][0]["score"] = 1.5
    del broken["results"][0]["words"]
    broken["results"][0]["extra"] = 1
    broken["mode"] = "lipreading"
    errors = validate(broken, schema)
    assert len(errors) == 4, errors


def test_overlay_video_has_every_frame_and_the_audio(tmp_path):
    result = _fake_result(30)
    out = tmp_path / "overlay.mp4"
    write_overlay(result, out)
    with av.open(str(out)) as c:
        assert c.streams.audio, "the input audio is muxed in"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 30 and frames[0].shape == (96 * 4 + 2 * 96, 96 * 4, 3)
    # the reliability lane has coloured curve pixels; the crop is gray
    lane = frames[15][96 * 4 + 96:]
    assert (np.ptp(lane.astype(int), axis=-1) > 60).any()
    crop = frames[15][: 96 * 4].astype(int)
    assert np.ptp(crop, axis=-1).mean() < 12


# --------------------------------------------------------------------------------------------
# End to end on real GRID clips


def _random_checkpoint(path: Path, mode: str) -> str:
    """An untrained tiny model of ``mode`` (for input handling, where the weights do not matter)."""
    from avsr.config import Config, ModelConfig, to_dict
    from avsr.models import build_model
    from avsr.training.checkpoint import tokenizer_to_tensor

    torch.manual_seed(0)
    tok = CharTokenizer.train(["BIN BLUE AT F TWO NOW"])
    cfg = Config(model=ModelConfig(mode=mode, visual_width=4, frontend_dim=16, audio_width=4, d_model=16,
                                   num_heads=2, ffn_dim=32, num_layers=1, conv_kernel=7, decoder_layers=1,
                                   decoder_ffn_dim=32))
    model = build_model(cfg.model, tok.vocab_size)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "tokenizer": tokenizer_to_tensor(tok)}, path)
    return str(path)


def _checkpoint_mode(path) -> str:
    from avsr.training.checkpoint import load_checkpoint

    return load_checkpoint(path)["config"]["model"]["mode"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, AVSR_THREADS="2", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "avsr.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def grid_clip(grid_dir) -> Path:
    """A real GRID s1 test-split clip (75 frames at 25 fps, with audio)."""
    name = (grid_dir / "split_test.txt").read_text().split()[0]
    return grid_dir / "video" / name


def test_transcribe_cli_end_to_end(tiny_checkpoint, grid_clip, tmp_path, schema):
    from avsr.data.media import read_video

    mode = _checkpoint_mode(tiny_checkpoint)
    out = tmp_path / "out.json"
    proc = _run_cli("transcribe", "--checkpoint", tiny_checkpoint, grid_clip, "--json", out,
                    "--mouth-csv", tmp_path / "mouth.csv", "--visualize", tmp_path / "overlay.mp4", "--beam-size", "3")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert validate(doc, schema) == []
    assert doc["errors"] == [] and len(doc["results"]) == 1
    res = doc["results"][0]
    assert res["mode"] == mode == doc["mode"]
    n = len(read_video(grid_clip, fps=25.0, gray=True)[0])
    assert res["n_frames"] == n and res["duration"] == pytest.approx(n / 25)
    assert proc.stdout.strip() == f"{grid_clip}\t{res['text']}"
    # token and word times lie in the clip, in order, and spell the transcript
    starts = [t["start"] for t in res["tokens"]]
    assert starts == sorted(starts) and all(0 <= t["start"] < t["end"] <= res["duration"] + 1e-6 for t in res["tokens"])
    assert "".join(t["text"] for t in res["tokens"]) == res["text"]
    assert [w["word"] for w in res["words"]] == res["text"].split()
    # per-frame curves: the face was tracked, the mouth curve is measured, reliability iff scored
    assert len(res["face_detected"]) == n and sum(res["face_detected"]) > 0.9 * n
    mouth = np.array(res["mouth_opening"]["landmarks"], dtype=float)
    assert mouth.shape == (n,) and np.isfinite(mouth).all() and 0 <= mouth.min() and mouth.max() < 1 and mouth.std() > 0
    for name in ("audio", "video"):
        curve = res["reliability"][name]
        if mode == "audiovisual_relscore":
            assert len(curve) == n and all(0 <= v <= 1 for v in curve)
        else:
            assert curve is None
    rows = (tmp_path / "mouth.csv").read_text().splitlines()
    assert rows[0] == "time_s,mouth_opening" and len(rows) == n + 1
    with av.open(str(tmp_path / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == n


def test_long_input_is_windowed_and_stitched(tiny_checkpoint, grid_clip):
    from avsr.inference import Recognizer

    rec = Recognizer.from_checkpoint(tiny_checkpoint, window_s=1.2, overlap_s=0.4, beam_size=1)
    res = rec.transcribe(grid_clip)
    assert len(res.windows) == 4 and res.windows[0] == (0.0, 1.2) and res.windows[-1][1] == res.duration
    starts = [t.start for t in res.tokens]
    assert starts == sorted(starts) and all(0 <= s < res.duration for s in starts)
    assert res.text == "".join(t.text for t in res.tokens)
    for curve in res.reliability.values():
        assert curve.shape == (res.n_frames,) and np.isfinite(curve).all()
    # the overlap is decoded twice but each token is kept once: windowed and whole-clip greedy
    # decoding see the same frames in the owned parts, so they agree on most tokens
    whole = Recognizer.from_checkpoint(tiny_checkpoint, beam_size=1).transcribe(grid_clip)
    assert len(whole.windows) == 1
    assert abs(len(res.tokens) - len(whole.tokens)) <= max(3, len(whole.tokens) // 3)


def test_no_face_several_faces_and_not_a_video_fail_clearly(grid_clip, tmp_path):
    from avsr.data.media import read_audio, read_video

    frames, _ = read_video(grid_clip, fps=25.0)
    wave = read_audio(grid_clip)
    no_face = tmp_path / "no_face.mp4"  # the real clip with the face blurred away
    write_av(no_face, np.stack([cv2.GaussianBlur(f, (0, 0), 25) for f in frames]), wave)
    two_faces = tmp_path / "two_faces.mp4"  # the real clip beside its mirror image
    write_av(two_faces, np.concatenate([frames, frames[:, :, ::-1]], axis=2), wave)
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video\n")
    ckpt = _random_checkpoint(tmp_path / "video.pt", "video")
    inputs = [no_face, two_faces, not_video]
    proc = _run_cli("transcribe", "--checkpoint", ckpt, *inputs, "--json", tmp_path / "out.json")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 3, proc.stderr
    assert f"{no_face}: no face found" in errors[0]
    assert f"{two_faces}: 2 faces in view" in errors[1]
    assert f"{not_video}: not a readable audio/video file" in errors[2]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["results"] == [] and [e["path"] for e in doc["errors"]] == [str(p) for p in inputs]


def test_audio_only_and_video_only_inputs_in_matching_modes(grid_clip, tmp_path):
    from avsr.data.media import read_audio, read_video, write_wav
    from avsr.inference import InputError, Recognizer

    wav = tmp_path / "speech.wav"
    write_wav(wav, read_audio(grid_clip))
    silent = tmp_path / "silent.mp4"
    write_av(silent, read_video(grid_clip, fps=25.0)[0], None)

    audio_rec = Recognizer.from_checkpoint(_random_checkpoint(tmp_path / "a.pt", "audio"), beam_size=1)
    res = audio_rec.transcribe(wav)
    assert res.mode == "audio" and res.n_frames == 75 and res.crops is None and res.face_detected is None
    assert len(res.audio) == 640 * 75
    video_rec = Recognizer.from_checkpoint(_random_checkpoint(tmp_path / "v.pt", "video"), beam_size=1)
    res = video_rec.transcribe(silent)
    assert res.mode == "video" and res.crops.shape[1:] == (96, 96) and res.audio is None
    assert res.n_frames == len(res.crops) == len(res.mouth_opening)
    with pytest.raises(InputError, match="no video stream"):
        video_rec.transcribe(wav)
    with pytest.raises(InputError, match="no audio stream"):
        audio_rec.transcribe(silent)


# --------------------------------------------------------------------------------------------
# Features of a manifest


def test_extract_features_writes_one_array_per_clip(tiny_checkpoint, grid_prepared, tmp_path):
    from avsr.cli import main
    from avsr.data.manifest import read_manifest
    from avsr.training.checkpoint import load_checkpoint

    cfg = load_checkpoint(tiny_checkpoint)["config"]["model"]
    rows = read_manifest(grid_prepared, "test")
    part = "visual_frontend" if cfg["mode"] != "audio" else "audio_frontend"
    for name, dim in (("encoder", cfg["d_model"]), (part, cfg["frontend_dim"])):
        out = tmp_path / name
        assert main(["extract-features", "--checkpoint", str(tiny_checkpoint), "--root", str(grid_prepared),
                     "--split", "test", "--part", name, "--out", str(out)]) == 0
        assert sorted(p.stem for p in out.glob("*.npy")) == sorted(r.utt_id for r in rows)
        for r in rows:
            feats = np.load(out / f"{r.utt_id}.npy")
            assert feats.dtype == np.float32 and feats.shape == (r.n_frames, dim)
            assert np.isfinite(feats).all() and feats.std() > 0


def test_auxiliary_heads_give_mouth_curve_and_speech(grid_clip):
    """A model with the mouth-opening and lip-to-speech heads (untrained: shapes and plumbing only),
    windowed so that the 100 fps mel is stitched too."""
    from avsr.config import Config, ModelConfig
    from avsr.inference import Recognizer, mouth_curve
    from avsr.models import build_model
    from avsr.models.heads import attach_aux_heads

    torch.manual_seed(0)
    tok = CharTokenizer.train(["BIN BLUE AT F TWO NOW"])
    cfg = Config(model=ModelConfig(mode="video", visual_width=4, frontend_dim=16, d_model=16, num_heads=2,
                                   ffn_dim=32, num_layers=1, conv_kernel=7, decoder_layers=1, decoder_ffn_dim=32,
                                   mouth_opening_weight=1.0, lip2speech_weight=1.0))
    cfg.decode.beam_size = 1  # greedy CTC: this test is about the heads
    model = build_model(cfg.model, tok.vocab_size)
    attach_aux_heads(model, cfg.model)
    rec = Recognizer(model, tok, cfg, window_s=1.2, overlap_s=0.4)
    assert rec.has_mouth_head and rec.has_speech_head
    res = rec.transcribe(grid_clip)
    n = res.n_frames
    assert len(res.windows) > 1
    assert res.mouth_opening_pred.shape == (n,) and np.isfinite(res.mouth_opening_pred).all()
    assert res.speech.shape == (640 * n,) and np.isfinite(res.speech).all() and np.abs(res.speech).max() > 0
    curve, source = mouth_curve(res)
    assert source == "predicted" and curve is res.mouth_opening_pred
    assert res.mouth_opening is not None  # the landmark curve is kept beside the prediction
    no_speech = rec.transcribe(grid_clip, speech=False)
    assert no_speech.speech is None
