"""Corruption modelling and the test protocol, on real preprocessed GRID s1 crops (``grid_prepared``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from avsr.config import CorruptionConfig
from avsr.corruption import (
    AudioCorruptor,
    OccluderBank,
    Utterance,
    VisualCorruptor,
    WaveBank,
    apply_audio_spec,
    apply_visual_spec,
    condition_names,
    corrupt_utterance,
    load_protocol,
    make_protocol,
    measure_snr_db,
    mix_at_snr,
    occluder_alpha,
    sample_audio_spec,
    sample_visual_spec,
)
from avsr.data.manifest import read_manifest
from avsr.data.media import load_clip, read_gray_video

REPO = Path(__file__).resolve().parents[1]
EXPECTED_CONDITIONS = [
    "clean", "occlusion", "noise_blur", "occlusion_noise_blur",
    "babble_snr-5", "babble_snr0", "babble_snr5", "babble_snr10", "babble_snr15",
    "occlusion+babble_snr-5", "occlusion+babble_snr0", "occlusion+babble_snr5", "occlusion+babble_snr10",
    "occlusion+babble_snr15",
]


@pytest.fixture(scope="module")
def bank() -> OccluderBank:
    return OccluderBank.builtin()


@pytest.fixture(scope="module")
def clips(grid_prepared: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(utt_id, frames (T, 96, 96) uint8, landmarks (T, 20, 2) float32, wave (S,) float32) of the test split."""
    out = []
    for row in read_manifest(grid_prepared, "test"):
        frames, wave, meta = load_clip(grid_prepared, row)
        out.append((row.utt_id, frames, meta["landmarks"], wave))
    assert len(out) >= 2, "grid_prepared should hold a few test clips"
    return out


@pytest.fixture(scope="module")
def protocol_path(grid_prepared: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("protocol") / "spec.json"
    cmd = [sys.executable, str(REPO / "scripts" / "make_test_protocol.py"), "--data", str(grid_prepared),
           "--split", "test", "--seed", "0", "--out", str(out), "--babble-speakers", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def _script(name: str):
    """``scripts/<name>.py`` as a module (its ``main(argv)`` runs in this process)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _centroid(alpha: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(alpha.shape)
    m = alpha.sum()
    return np.array([(xs * alpha).sum() / m, (ys * alpha).sum() / m])


def _hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- occluder bank


def test_builtin_bank_is_offline_rgba_and_stable(bank):
    assert len(bank) >= 10
    for key in bank:
        patch = bank[key]
        assert patch.dtype == np.uint8 and patch.ndim == 3 and patch.shape[2] == 4
        assert max(patch.shape[:2]) <= 128
        cover = (patch[..., 3] > 127).mean()
        assert 0.3 < cover < 0.95, f"{key}: mask covers {cover:.2f} of its box"
        gray, alpha = bank.gray(key)
        assert gray.shape == alpha.shape == patch.shape[:2] and alpha.max() <= 1.0
    assert OccluderBank.builtin().fingerprint == bank.fingerprint


def test_bank_from_dir_reads_rgba_pngs_and_skips_others(tmp_path, bank):
    rgba = cv2.cvtColor(bank["coin_large"], cv2.COLOR_RGBA2BGRA)
    cv2.imwrite(str(tmp_path / "coin.png"), rgba)
    cv2.imwrite(str(tmp_path / "no_alpha.png"), rgba[..., :3])
    loaded = OccluderBank.from_dir(tmp_path)
    assert loaded.ids == ("coin",)
    assert np.array_equal(loaded["coin"], bank["coin_large"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no 8-bit RGBA PNG"):
        OccluderBank.from_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        OccluderBank.from_dir(tmp_path / "missing")
    with pytest.raises(KeyError, match="not in bank"):
        loaded["cat"]


# --------------------------------------------------------------------------- visual


def test_spec_counts_segments_and_parameters_in_range(bank):
    rng = np.random.default_rng(0)
    for T in (30, 75, 151):
        for _ in range(60):
            spec = sample_visual_spec(T, rng, bank, "occlusion_noise_blur")
            assert 1 <= len(spec["occluders"]) <= 3 and 1 <= len(spec["segments"]) <= 3
            for o in spec["occluders"]:
                assert 0 <= o["start"] < o["end"] <= T
                assert 0.3 - 0.5 / T <= (o["end"] - o["start"]) / T <= 0.5 + 0.5 / T
                assert 20 <= o["size"] <= 45 and 0 <= o["landmark"] < 20 and o["image"] in bank
                assert abs(o["angle"]) <= 15 and 0.9 <= o["scale"] <= 1.1 and max(map(abs, o["shift"])) <= 2
            for s in spec["segments"]:
                assert 0 <= s["start"] < s["end"] <= T
                assert 0.1 - 0.5 / T <= (s["end"] - s["start"]) / T <= 0.5 + 0.5 / T
                if s["type"] == "noise":
                    assert 0.0 <= s["var"] <= 0.2
                else:
                    assert s["type"] == "blur" and 0.1 <= s["sigma"] <= 2.0
            assert json.loads(json.dumps(spec)) == spec
    with pytest.raises(ValueError, match="unknown visual corruption kind"):
        sample_visual_spec(75, rng, bank, "rain")


def test_occluder_mask_follows_its_landmark_on_every_frame(clips, bank):
    """The pasted alpha mask's centroid sits on landmarks[t] (+ the spec's small shift) on each frame t."""
    rng = np.random.default_rng(1)
    checked = 0
    for _, frames, landmarks, _ in clips:
        T = frames.shape[0]
        for _ in range(8):
            for occ in sample_visual_spec(T, rng, bank, "occlusion")["occluders"]:
                alpha = occluder_alpha(occ, landmarks, bank)
                assert alpha.shape == (occ["end"] - occ["start"], 96, 96)
                full = alpha[:, 1:-1, 1:-1].sum(axis=(1, 2))
                for i, t in enumerate(range(occ["start"], occ["end"])):
                    if full[i] < alpha[i].sum() - 1e-3 or alpha[i].sum() == 0:
                        continue  # touches the ROI border: the visible part's centroid moves
                    want = landmarks[t, occ["landmark"]] + np.asarray(occ["shift"])
                    assert np.linalg.norm(_centroid(alpha[i]) - want) < 1.0, (t, occ)
                    checked += 1
    assert checked > 200


def test_pasted_pixels_track_landmarks_of_the_same_frame(clips):
    """On real frames, with the lip landmarks of each frame moved along a different path in x and y,
    the pixels an opaque white disk overwrote are centred on landmarks[t] of that very frame t: reading
    landmarks[t - start] (the reference scripts' bug) or swapping x and y would miss by many pixels."""
    disk = np.zeros((64, 64, 4), np.uint8)
    cv2.circle(disk, (32, 32), 30, (255, 255, 255, 255), -1)
    bank = OccluderBank({"disk": disk})
    _, frames, landmarks, _ = clips[0]
    T = frames.shape[0]
    t_idx = np.arange(T)
    moved = landmarks.copy()
    moved[:, :, 0] += (9 * np.sin(2 * np.pi * t_idx / 23))[:, None]
    moved[:, :, 1] += (5 * np.cos(2 * np.pi * t_idx / 17) + 4)[:, None]
    frames = np.minimum(frames, 200).astype(np.uint8)  # room for the white disk to show
    for k in (0, 6, 14, 18):
        occ = {"image": "disk", "landmark": k, "size": 24, "start": 20, "end": 55, "hflip": False, "angle": 0.0,
               "scale": 1.0, "shift": [0.0, 0.0], "contrast": 1.0, "brightness": 0.0}
        out = apply_visual_spec(frames, moved, {"kind": "occlusion", "occluders": [occ], "segments": []}, bank)
        assert out.shape == frames.shape and out.dtype == np.uint8
        unchanged = np.ones(T, bool)
        unchanged[20:55] = False
        assert np.array_equal(out[unchanged], frames[unchanged])
        for t in range(20, 55):
            est = (out[t].astype(np.float64) - frames[t]) / (255.0 - frames[t])  # the alpha that was pasted
            assert est.sum() > 0.8 * math.pi * 12**2
            assert np.linalg.norm(_centroid(est) - moved[t, k]) < 1.0, t


def test_noise_and_blur_touch_only_their_segments(clips, bank):
    _, frames, landmarks, _ = clips[0]
    spec = {"kind": "noise_blur", "occluders": [],
            "segments": [{"type": "noise", "start": 5, "end": 20, "var": 0.1, "seed": 3},
                         {"type": "blur", "start": 40, "end": 60, "sigma": 2.0}]}
    out = apply_visual_spec(frames, landmarks, spec, bank)
    inside = np.zeros(frames.shape[0], bool)
    inside[5:20] = inside[40:60] = True
    assert np.array_equal(out[~inside], frames[~inside])
    noise = out[5:20].astype(np.float64) / 255 - frames[5:20] / 255
    assert 0.15 < noise.std() < math.sqrt(0.1)  # clipping at 0 and 1 only shrinks it
    lap = lambda x: np.abs(cv2.Laplacian(x.astype(np.float32), cv2.CV_32F)).mean()  # noqa: E731
    assert all(lap(out[t]) < 0.8 * lap(frames[t]) for t in range(40, 60))


def test_bad_visual_inputs_raise_clear_errors(clips, bank):
    _, frames, landmarks, _ = clips[0]
    spec = sample_visual_spec(len(frames), np.random.default_rng(0), bank, "occlusion")
    with pytest.raises(ValueError, match="uint8"):
        apply_visual_spec(frames.astype(np.float32), landmarks, spec, bank)
    with pytest.raises(ValueError, match="landmarks must be"):
        apply_visual_spec(frames, landmarks[:-1], spec, bank)
    with pytest.raises(ValueError, match="do not fit"):
        apply_visual_spec(frames[:10], landmarks[:10], {"segments": [{"type": "blur", "start": 5, "end": 20,
                                                                      "sigma": 1.0}]}, bank)
    holes = landmarks.copy()
    holes[:] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        apply_visual_spec(frames, holes, spec, bank)
    with pytest.raises(KeyError, match="not in bank"):
        apply_visual_spec(frames, landmarks, {"occluders": [{**spec["occluders"][0], "image": "nope"}]}, bank)


def test_visual_corruptor_probability_shape_and_dtype(clips, bank):
    _, frames, landmarks, _ = clips[0]
    never = VisualCorruptor(CorruptionConfig(visual_prob=0.0), bank)
    assert never(frames, landmarks, np.random.default_rng(0)) is frames
    always = VisualCorruptor(CorruptionConfig(visual_prob=1.0), bank)
    outs = [always(frames, landmarks, np.random.default_rng(s)) for s in range(6)]
    for out in outs:
        assert out.shape == frames.shape and out.dtype == np.uint8 and not np.array_equal(out, frames)
    assert np.array_equal(always(frames, landmarks, np.random.default_rng(3)), outs[3])
    with pytest.raises(ValueError, match="visual_prob"):
        VisualCorruptor(CorruptionConfig(visual_prob=1.5), bank)
    with pytest.raises(ValueError, match="visual_kinds"):
        VisualCorruptor(CorruptionConfig(visual_kinds=["snow"]), bank)


# --------------------------------------------------------------------------- audio


def test_mix_at_snr_is_exact_on_real_speech_and_babble(clips):
    source = WaveBank.from_arrays({u: w for u, _, _, w in clips})
    utt, _, _, speech = clips[0]
    others = [u for u in source if u != utt]
    rng = np.random.default_rng(0)
    for snr in (-5, 0, 5, 10, 15, 7.3):
        for kind in ("babble", "white"):
            spec = sample_audio_spec(len(speech), rng, kind, snr, babble_ids=others, babble_speakers=3)
            mixed = apply_audio_spec(speech, spec, source)
            assert mixed.dtype == np.float32 and mixed.shape == speech.shape
            assert abs(measure_snr_db(speech, mixed) - snr) < 0.1
    white = np.random.default_rng(1).standard_normal(len(speech))
    assert abs(measure_snr_db(speech, mix_at_snr(speech, white, -5.0)) + 5.0) < 0.1
    with pytest.raises(ValueError, match="zero power"):
        mix_at_snr(np.zeros(100, np.float32), np.ones(100), 0.0)


def test_intermittent_noise_only_in_its_spans(clips):
    utt, _, _, speech = clips[0]
    rng = np.random.default_rng(2)
    for _ in range(5):
        spec = sample_audio_spec(len(speech), rng, "white", 5.0, intermittent=True)
        assert 1 <= len(spec["spans"]) <= 3
        active = np.zeros(len(speech), bool)
        for s, e in spec["spans"]:
            assert 0.1 * len(speech) - 1 <= e - s <= 0.5 * len(speech) + 1
            active[s:e] = True
        mixed = apply_audio_spec(speech, spec)
        assert np.array_equal(mixed[~active], speech[~active])
        assert abs(measure_snr_db(speech, mixed, active) - 5.0) < 0.1


def test_audio_corruptor_draws_from_config_and_excludes(clips):
    source = WaveBank.from_arrays({u: w for u, _, _, w in clips})
    _, _, _, speech = clips[0]
    keep = clips[1][3].astype(np.float64)
    cfg = CorruptionConfig(audio_noise_prob=1.0, audio_noise_types=["babble"], snr_db=[0.0, 10.0],
                           babble_speakers=1)
    corrupt = AudioCorruptor(cfg, source)
    for seed in range(4):
        out = corrupt(speech, np.random.default_rng(seed), exclude=[u for u in source if u != clips[1][0]])
        assert out.shape == speech.shape and out.dtype == np.float32
        assert min(abs(measure_snr_db(speech, out) - s) for s in (0.0, 10.0)) < 0.1
        # the only allowed babble is clips[1]: the added noise is a scaled cyclic shift of it
        residual = out.astype(np.float64) - speech
        corr = np.fft.irfft(np.fft.rfft(residual) * np.conj(np.fft.rfft(keep)), n=len(keep))
        assert corr.max() / (np.linalg.norm(residual) * np.linalg.norm(keep)) > 0.999
    assert AudioCorruptor(CorruptionConfig(audio_noise_prob=0.0), source)(speech, np.random.default_rng(0)) is speech
    with pytest.raises(ValueError, match="babble source"):
        AudioCorruptor(CorruptionConfig(audio_noise_types=["babble"]), None)
    with pytest.raises(ValueError, match="noise_file"):
        AudioCorruptor(CorruptionConfig(audio_noise_types=["file"]), source)


def test_noise_file_is_read_and_resampled(tmp_path, clips):
    import av

    path = tmp_path / "hum.wav"
    t = np.arange(44100) / 44100
    with av.open(str(path), "w") as out:  # 1 s of 44.1 kHz stereo hum
        stream = out.add_stream("pcm_s16le", rate=44100, layout="stereo")
        pcm = (0.3 * np.sin(2 * np.pi * 100 * t) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([pcm, pcm]).reshape(1, -1), format="s16", layout="stereo")
        frame.rate = 44100
        for p in stream.encode(frame):
            out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    cfg = CorruptionConfig(audio_noise_prob=1.0, audio_noise_types=["file"], noise_file=str(path), snr_db=[10.0])
    corrupt = AudioCorruptor(cfg)
    assert abs(len(corrupt.noise_files["hum"]) - 16000) <= 32
    _, _, _, speech = clips[0]
    out = corrupt(speech, np.random.default_rng(0))
    assert abs(measure_snr_db(speech, out) - 10.0) < 0.1


# --------------------------------------------------------------------------- protocol


def test_protocol_file_is_seeded_complete_and_in_range(protocol_path, grid_prepared, tmp_path, bank):
    make = _script("make_test_protocol")
    args = ["--data", str(grid_prepared), "--split", "test", "--babble-speakers", "2"]
    assert make.main(args + ["--seed", "0", "--out", str(tmp_path / "again.json")]) == 0
    assert (tmp_path / "again.json").read_bytes() == protocol_path.read_bytes()
    assert make.main(args + ["--seed", "1", "--out", str(tmp_path / "seed1.json")]) == 0
    assert (tmp_path / "seed1.json").read_bytes() != protocol_path.read_bytes()
    assert make.main(args + ["--babble-speakers", "50", "--out", str(tmp_path / "bad.json")]) == 1
    assert not (tmp_path / "bad.json").exists()
    protocol = load_protocol(protocol_path)
    protocol.check_bank(bank)
    assert protocol.conditions == EXPECTED_CONDITIONS == condition_names()
    rows = read_manifest(grid_prepared, "test")
    assert protocol.utt_ids == sorted(r.utt_id for r in rows)
    for r in rows:
        occl = protocol.entry(r.utt_id, "occlusion")["visual"]
        assert 1 <= len(occl["occluders"]) <= 3
        for o in occl["occluders"]:
            assert 0.3 - 0.5 / r.n_frames <= (o["end"] - o["start"]) / r.n_frames <= 0.5 + 0.5 / r.n_frames
        assert protocol.entry(r.utt_id, "occlusion+babble_snr0")["visual"] == occl
        assert protocol.entry(r.utt_id, "clean") == {"n_frames": r.n_frames, "n_samples": r.n_samples,
                                                     "visual": None, "audio": None}
        for snr in (-5, 0, 5, 10, 15):
            audio = protocol.entry(r.utt_id, f"babble_snr{snr}")["audio"]
            assert audio["snr_db"] == snr and audio["type"] == "babble"
            assert len(audio["babble"]) == 2 and r.utt_id not in {b["utt_id"] for b in audio["babble"]}


def test_protocol_replays_bit_identically(protocol_path, grid_prepared, clips, bank):
    protocol = load_protocol(protocol_path)
    source = WaveBank.from_manifest(grid_prepared, protocol.babble_split)
    fresh_bank = OccluderBank.builtin()
    for utt, frames, landmarks, wave in clips:
        for cond in protocol.conditions:
            entry = protocol.entry(utt, cond)
            f1, w1 = corrupt_utterance(frames, landmarks, wave, entry, bank, source)
            f2, w2 = corrupt_utterance(frames.copy(), landmarks.copy(), wave.copy(), entry, fresh_bank,
                                       WaveBank.from_manifest(grid_prepared, "test"))
            assert f1.shape == frames.shape and f1.dtype == np.uint8
            assert w1.shape == wave.shape and w1.dtype == np.float32
            assert np.array_equal(f1, f2) and np.array_equal(w1, w2), (utt, cond)
            assert np.array_equal(f1, frames) == (entry["visual"] is None)
            if entry["audio"]:
                assert abs(measure_snr_db(wave, w1) - entry["audio"]["snr_db"]) < 0.1
            else:
                assert np.array_equal(w1, wave)
    with pytest.raises(ValueError, match="occluder bank"):
        protocol.check_bank(OccluderBank({"one": bank["coin_large"]}))
    with pytest.raises(ValueError, match="protocol expects"):
        corrupt_utterance(frames[:-1], landmarks[:-1], wave, protocol.entry(utt, "occlusion"), bank, source)


def test_load_protocol_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_protocol(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_protocol(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a corruption protocol"):
        load_protocol(tmp_path / "other.json")


def test_speaker_regex_keeps_babble_speaker_disjoint(bank):
    utts = [Utterance(f"s{s}_{i}", 30, 16000) for s in range(1, 4) for i in range(3)]
    ids = [u.utt_id for u in utts]
    proto = make_protocol(utts, 0, bank, ids, babble_speakers=4, speaker_regex=r"^(s\d+)_")
    for utt, entry in proto["utterances"].items():
        for audio in entry["audio"].values():
            assert all(b["utt_id"].split("_")[0] != utt.split("_")[0] for b in audio["babble"])
    with pytest.raises(ValueError, match="fewer than 7 babble"):
        make_protocol(utts, 0, bank, ids, babble_speakers=7, speaker_regex=r"^(s\d+)_")
    # adding an utterance leaves the others' draws unchanged
    bigger = make_protocol(utts + [Utterance("s9_0", 30, 16000)], 0, bank, ids, babble_speakers=4,
                           speaker_regex=r"^(s\d+)_")
    assert all(bigger["utterances"][u]["visual"] == e["visual"] for u, e in proto["utterances"].items())


class _ProtocolDataset(torch.utils.data.Dataset):
    """Hashes of every (utterance, condition) corruption, computed wherever the dataset runs."""

    def __init__(self, root: Path, protocol_path: Path) -> None:
        self.root, self.protocol = root, load_protocol(protocol_path)
        self.rows = read_manifest(root, "test")
        self.keys = [(r, c) for r in self.rows for c in self.protocol.conditions]
        self.bank = self.babble = None  # built on first use, in the process that runs the item

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> str:
        row, cond = self.keys[i]
        if self.bank is None:
            self.bank, self.babble = OccluderBank.builtin(), WaveBank.from_manifest(self.root, "test")
        frames, wave, meta = load_clip(self.root, row)
        out = corrupt_utterance(frames, meta["landmarks"], wave, self.protocol.entry(row.utt_id, cond),
                                self.bank, self.babble)
        return _hash(*out)


_SUBPROCESS = """
import sys, json
sys.path.insert(0, {tests!r})
from test_corruption import _ProtocolDataset
ds = _ProtocolDataset({root!r}, {proto!r})
print(json.dumps([ds[i] for i in range(len(ds))]))
"""


def test_protocol_is_deterministic_across_processes_and_workers(grid_prepared, protocol_path):
    ds = _ProtocolDataset(grid_prepared, protocol_path)
    here = [ds[i] for i in range(len(ds))]
    assert len(set(here)) > len(here) // 2  # the conditions really differ
    code = _SUBPROCESS.format(tests=str(Path(__file__).parent), root=str(grid_prepared), proto=str(protocol_path))
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == here
    fresh = _ProtocolDataset(grid_prepared, protocol_path)  # its bank is built inside each worker
    loader = torch.utils.data.DataLoader(fresh, batch_size=None, num_workers=2, shuffle=False)
    assert list(loader) == here


# --------------------------------------------------------------------------- preview script


def test_show_corruption_writes_sheet_and_video(grid_prepared, protocol_path, tmp_path, capsys):
    png, mp4 = tmp_path / "sheet.png", tmp_path / "clip.mp4"
    utt = read_manifest(grid_prepared, "test")[0]
    show = _script("show_corruption")
    args = ["--data", str(grid_prepared), "--split", "test", "--protocol", str(protocol_path), "--columns", "5"]
    assert show.main(args + ["--utt", utt.utt_id, "--png", str(png), "--mp4", str(mp4)]) == 0
    sheet = cv2.imread(str(png))
    assert sheet.shape[1] > 5 * 192 and sheet.shape[0] > 4 * 192  # 5 columns, 4 conditions, 2x enlarged
    video = read_gray_video(mp4)
    assert video.shape == (utt.n_frames, 192, 4 * 192)
    assert show.main(args + ["--utt", "nope", "--png", str(tmp_path / "no.png")]) == 1
    assert "nope" in capsys.readouterr().err and not (tmp_path / "no.png").exists()
