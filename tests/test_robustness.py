"""Reliability and security (issue 8; the case table is docs/robustness.md): malicious checkpoints,
disk full and SIGKILL during a checkpoint write, a dying DataLoader worker, bad clips in training,
a face that leaves the frame, mismatched audio and bad transcripts in preprocessing, transcripts
without a clip, and manifest paths that escape the data root. Media come from real GRID clips."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import deadline, one_thread
from media_utils import write_av

from avsr.config import PreprocessConfig, load_config, to_dict
from avsr.data.corpora import discover
from avsr.data.dataset import AVDataset
from avsr.data.manifest import ManifestError, read_manifest
from avsr.data.media import load_clip, read_audio, read_video
from avsr.data.preprocess import failures_path, preprocess
from avsr.training.checkpoint import (
    CheckpointManager,
    latest_checkpoint,
    load_checkpoint,
)

PY = sys.executable
MICRO_AUDIO = [  # the micro audio model of tests/test_training.py, without configs/
    "model.mode=audio", "model.audio_frontend=logmel", "model.audio_width=16", "model.frontend_dim=64",
    "model.d_model=64", "model.num_heads=2", "model.ffn_dim=128", "model.num_layers=2", "model.conv_kernel=15",
    "model.decoder_layers=1", "model.decoder_ffn_dim=128", "model.mouth_opening_weight=0.0",
    "model.lip2speech_weight=0.0", "text.kind=char", "corruption.visual_prob=0", "corruption.audio_noise_prob=0",
    "data.val_split=none", "data.val_holdout=0", "train.log_step=1", "train.eval_step=1000",
]


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((256,), float(step))}, "config": to_dict(load_config()),
            "tokenizer": torch.zeros(4, dtype=torch.uint8), "step": step, "epoch": 0}


# ----------------------------------------------------------------------------- untrusted checkpoints
class _Payload:
    """Unpickling this creates ``path``: code that runs on load."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _loaders():
    from avsr.decoding.lm import load_lm
    from avsr.models import load_encoder
    from avsr.lipsync.model import load_lipsync_model
    from avsr.training.checkpoint import load_model

    return {"load_checkpoint": load_checkpoint, "load_model": load_model, "load_lm": load_lm,
            "load_lipsync_model": load_lipsync_model, "load_encoder": load_encoder}


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_model", "load_lm", "load_lipsync_model", "load_encoder"])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, loader):
    """A pickle payload hidden among real checkpoint keys: one-line error naming the file, nothing run."""
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    state = {**_state(1), "lm_config": {}, "model_args": {}}
    state["model"] = {"w": torch.zeros(2), "hook": _Payload(sentinel)}
    torch.save(state, evil)
    with pytest.raises(ValueError) as info:
        _loaders()[loader](str(evil))
    msg = str(info.value)
    assert str(evil) in msg and "pickled code" in msg and "\n" not in msg
    assert "weights_only` set to `False`" not in msg  # no advice to load it unsafely
    assert not sentinel.exists()
    torch.load(evil, weights_only=False)  # control: the file really is malicious
    assert sentinel.exists()


# ----------------------------------------------------------------------------- faults in checkpoint writes
def _half_writer(real_save, then):
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        then(f)
    return save


def _disk_full(f):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))


@pytest.mark.parametrize("where", ["step file", "last.pt copy"])
def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, where):
    """ENOSPC half-way through writing a checkpoint (or through the copy that stands in for the
    last.pt hard link): the previous checkpoint still loads, no temporary file is left."""
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(_state(1), 1)
    if where == "step file":
        monkeypatch.setattr(torch, "save", _half_writer(torch.save, _disk_full))
    else:
        def no_links(src, dst):
            raise OSError(errno.EXDEV, "cross-device link")

        def half_copy(src, dst, **kwargs):
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            _disk_full(dst)

        monkeypatch.setattr(os, "link", no_links)
        monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(OSError) as info:
        manager.save(_state(2), 2)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert load_checkpoint(tmp_path / "step-1.pt")["step"] == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    if where == "step file":
        assert names == ["last.pt", "step-1.pt"]
    else:  # the step file was complete before the copy failed
        assert names == ["last.pt", "step-1.pt", "step-2.pt"] and load_checkpoint(tmp_path / "step-2.pt")["step"] == 2
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == (1 if where == "step file" else 2)


_KILLED_WRITER = """
import io, os, signal, sys
import torch
from avsr.config import load_config, to_dict
from avsr.training.checkpoint import CheckpointManager

def state(step):
    return {"model": {"w": torch.full((100000,), float(step))}, "config": to_dict(load_config()),
            "tokenizer": torch.zeros(4, dtype=torch.uint8), "step": step, "epoch": 0}

manager = CheckpointManager(sys.argv[1])
manager.save(state(1), 1)
real_save = torch.save
def half_then_sigkill(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf)
    with open(f, "wb") as fh:
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_sigkill
manager.save(state(2), 2)
"""


def test_sigkill_during_a_checkpoint_write_keeps_last_pt_intact(tmp_path):
    """The process dies half-way through step-2.pt: last.pt is still step 1, and the next run
    (which starts with ``remove_partial``) clears the half file and saves normally."""
    exp = tmp_path / "exp"
    proc = subprocess.run([PY, "-c", _KILLED_WRITER, str(exp)], capture_output=True, text=True, timeout=120,
                          check=False, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = list(exp.glob(".step-2.*.part.pt"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size  # killed mid-write
    assert not (exp / "step-2.pt").exists()
    assert load_checkpoint(exp / "last.pt")["step"] == 1
    assert latest_checkpoint(exp) == exp / "step-1.pt"
    manager = CheckpointManager(exp)
    manager.remove_partial()
    assert sorted(p.name for p in exp.iterdir()) == ["last.pt", "step-1.pt"]
    manager.save(_state(2), 2)
    assert load_checkpoint(exp / "last.pt")["step"] == 2


# ----------------------------------------------------------------------------- training on damaged data
def test_dataloader_worker_crash_is_a_clear_error_not_a_hang(grid_prepared, tmp_path, monkeypatch):
    """A worker process that dies (here ``os._exit(1)``; in practice the OOM killer or a decoder
    segfault) stops training with an error that says what happened and what to do."""
    from avsr.training.loop import DataLoaderWorkerError, Trainer

    load = AVDataset.__getitem__

    def die_in_worker(self, key):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(1)
        return load(self, key)

    monkeypatch.setattr(AVDataset, "__getitem__", die_in_worker)
    cfg = load_config(None, [f"data.root={grid_prepared}", f"train.exp_dir={tmp_path / 'exp'}", *MICRO_AUDIO,
                             "data.num_workers=1", "train.max_steps=2"])
    with deadline(120), one_thread():
        trainer = Trainer(cfg)
        with pytest.raises(DataLoaderWorkerError) as info:
            trainer.fit()
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError) and "\n" not in msg
    assert "DataLoader worker process died while loading the training data" in msg
    assert "exited unexpectedly" in msg and "data.num_workers=0" in msg


def test_training_skips_missing_and_garbled_clips_naming_them(grid_prepared, tmp_path, caplog):
    """One clip's video deleted, another's header garbled: training runs its steps and names both."""
    from avsr.training.loop import Trainer

    root = tmp_path / "corpus"
    shutil.copytree(grid_prepared, root)
    missing, garbled = root / "train" / "bbal6n.mp4", root / "train" / "lgbf8n.mp4"
    missing.unlink()
    data = bytearray(garbled.read_bytes())
    data[:4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    garbled.write_bytes(bytes(data))
    cfg = load_config(None, [f"data.root={root}", f"train.exp_dir={tmp_path / 'exp'}", *MICRO_AUDIO,
                             "data.num_workers=0", "data.max_frames=1000", "data.num_buckets=1",
                             "train.max_steps=2", "train.epochs=5", "train.save_step=2", "train.warmup_steps=1"])
    with caplog.at_level(logging.WARNING, logger="avsr.data.dataset"), one_thread():
        last = Trainer(cfg).fit()
    assert load_checkpoint(last)["step"] == 2
    skipped = [r.getMessage() for r in caplog.records if "skipping bad clip" in r.getMessage()]
    assert len(skipped) == 2  # each reported once, though loaded in both steps
    assert any(str(missing) in m and "MediaError" in m for m in skipped)
    assert any(str(garbled) in m and "MediaError" in m for m in skipped)


# ----------------------------------------------------------------------------- preprocessing of damaged clips
def _reasons(out: Path) -> dict[str, str]:
    lines = failures_path(out).read_text(encoding="utf-8").splitlines()[1:]
    return {line.split("\t")[0]: line.split("\t")[3] for line in lines}


def test_face_leaving_the_frame_longer_than_max_gap_is_reported(tmp_path, grid_dir):
    """25 black frames (> max_gap_frames=15) mid-clip: skipped as 'face lost'; 5 are interpolated."""
    src = grid_dir / "video" / "bbaf2n.mpg"
    rgb, _ = read_video(src, fps=25.0)
    wave = read_audio(src)
    corpus = tmp_path / "videos"
    corpus.mkdir()
    for name, span in (("lost", slice(30, 55)), ("brief", slice(30, 35))):
        frames = rgb.copy()
        frames[span] = 0
        write_av(corpus / f"{name}.mp4", frames, wave)
        (corpus / f"{name}.txt").write_text("bin blue at f two now\n")
    out = tmp_path / "out"
    summary = preprocess(discover("videos", corpus), out, PreprocessConfig(), progress=False)
    assert summary.kept == 1
    reason = _reasons(out)["lost"]
    found = re.fullmatch(r"face lost for (\d+) frames in a row \(max_gap_frames=15\)", reason)
    assert found and 20 <= int(found.group(1)) <= 30, reason
    assert str(corpus / "lost.mp4") in failures_path(out).read_text()
    row, = read_manifest(out, "train")
    frames, _, meta = load_clip(out, row)
    assert row.utt_id == "brief" and len(frames) == 75
    ok = meta["face_detected"]
    assert not ok[31:34].any() and ok[:28].all() and ok[38:].all() and np.isfinite(meta["landmarks"]).all()


def test_audio_length_mismatch_audio_only_and_bad_transcripts(tmp_path, grid_dir):
    """Audio half the video's length is padded to it; audio running on far past the video (double
    its length: the video stream stopped early), an audio-only file, an empty and a non-Latin
    transcript are reported in failures.tsv; accented Latin letters are normalised (``ü`` -> ``U``)."""
    src = grid_dir / "video" / "bbal6n.mpg"
    rgb, _ = read_video(src, fps=25.0)
    wave = read_audio(src)
    corpus = tmp_path / "videos"
    corpus.mkdir()
    clips = {"short_audio": (rgb, wave[: len(wave) // 2], "bin blue"),
             "long_audio": (rgb, np.tile(wave, 2), "bin blue"), "audio_only": (None, wave, "bin blue"),
             "empty_text": (rgb, wave, "  \n"), "non_ascii": (rgb, wave, "bin blüe"),
             "non_latin": (rgb, wave, "бин блю")}
    for name, (frames, audio, text) in clips.items():
        write_av(corpus / f"{name}.mp4", frames, audio)
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    summary = preprocess(discover("videos", corpus), out, PreprocessConfig(), progress=False)
    assert summary.kept == 2
    reasons = _reasons(out)
    assert reasons.pop("long_audio").startswith("video stopped early: its last frame is frame 74 (3.00 s) but the "
                                                "audio runs to 6.")
    assert reasons == {"audio_only": "no video stream", "empty_text": "empty transcript",
                       "non_latin": "transcript has characters outside [A-Z' ] after normalisation: letters "
                                    "'БИЛНЮ' have no A-Z spelling (another script?): transliterate the transcript "
                                    "into English letters (or leave the clip out)"}
    assert {r.utt_id: r.transcript for r in read_manifest(out, "train")}["non_ascii"] == "BIN BLUE"
    for row in read_manifest(out, "train"):
        frames, audio, _ = load_clip(out, row)
        assert len(frames) == 75 and len(audio) == row.n_samples == 48000, row
        if row.utt_id == "short_audio":  # real speech, then zero padding
            assert np.abs(audio[:20000]).max() > 0.05 and np.abs(audio[-20000:]).max() < 1e-3


def test_transcripts_without_a_clip_are_named_in_a_warning(tmp_path, grid_dir, caplog):
    """GRID align/ and transcripts.tsv entries, and videos-layout .txt/tsv lines, with no video."""
    root = tmp_path / "grid"
    (root / "video").mkdir(parents=True)
    (root / "align").mkdir()
    (root / "video" / "bbaf2n.mpg").symlink_to(grid_dir / "video" / "bbaf2n.mpg")
    for i in ("bbaf2n", "bbaf5a"):
        (root / "align" / f"{i}.align").symlink_to(grid_dir / "align" / f"{i}.align")
    (root / "transcripts.tsv").write_text("bbaf2n.mpg\tBIN BLUE AT F TWO NOW\nbbal6n.mpg\tBIN BLUE AT L SIX NOW\n")
    with caplog.at_level(logging.WARNING, logger="avsr.data.corpora"):
        utts = discover("grid", root)
    assert [u.utt_id for u in utts] == ["bbaf2n"]
    msg, = [r.getMessage() for r in caplog.records]
    assert "2 transcript(s) without a clip" in msg and "bbaf5a (align/bbaf5a.align)" in msg
    assert "bbal6n (transcripts.tsv: bbal6n.mpg)" in msg and "bbaf2n" not in msg

    caplog.clear()
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mpg").symlink_to(grid_dir / "video" / "bbaf2n.mpg")
    (videos / "a.txt").write_text("BIN BLUE\n")
    (videos / "gone.txt").write_text("SET RED\n")
    (videos / "transcripts.tsv").write_text("a\tBIN BLUE\nlost.mp4\tSET RED\n")
    with caplog.at_level(logging.WARNING, logger="avsr.data.corpora"):
        assert [u.utt_id for u in discover("videos", videos)] == ["a"]
    msg, = [r.getMessage() for r in caplog.records]
    assert "gone (gone.txt)" in msg and "lost (transcripts.tsv: lost.mp4)" in msg


def test_duplicate_utterance_ids_in_a_corpus_are_a_clear_error(tmp_path, grid_dir):
    """Two videos that map to one output id (``a.mpg``, ``a.mp4``): refused before anything is written."""
    from avsr.data.corpora import CorpusError

    videos = tmp_path / "videos"
    videos.mkdir()
    for ext in (".mpg", ".mp4"):
        (videos / f"a{ext}").symlink_to(grid_dir / "video" / "bbaf2n.mpg")
    (videos / "a.txt").write_text("BIN BLUE\n")
    with pytest.raises(CorpusError, match=r"utterance id train/a is used by both .*a\.mp4 and .*a\.mpg"):
        discover("videos", videos)


# ----------------------------------------------------------------------------- manifest paths
def test_absolute_manifest_path_is_refused(tmp_path):
    (tmp_path / "train.tsv").write_text("utt_id\tpath\tn_frames\tn_samples\ttranscript\n"
                                        f"a\t{tmp_path.parent / 'elsewhere' / 'a'}\t75\t48000\tX\n")
    with pytest.raises(ManifestError, match="escapes the data root"):
        read_manifest(tmp_path, "train")


def test_symlink_out_of_the_data_root_is_refused_and_skipped(grid_prepared, tmp_path, caplog):
    """A clip file that links outside the root is never read; the dataset names it and goes on.
    A link that stays inside the root is fine."""
    from avsr.data.transforms import build_transform

    root = tmp_path / "corpus"
    shutil.copytree(grid_prepared, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = root / "train" / "bbaf2n.mp4"
    shutil.move(target, outside / "secret.mp4")
    target.symlink_to(outside / "secret.mp4")
    inside = root / "train" / "bbaf5a.mp4"
    shutil.move(inside, root / "bbaf5a_moved.mp4")
    inside.symlink_to(root / "bbaf5a_moved.mp4")

    rows = {r.utt_id: r for r in read_manifest(root, "train")}  # the path itself stays inside
    with pytest.raises(ManifestError, match="escapes the data root") as info:
        rows["bbaf2n"].file(root, ".mp4")
    assert str(outside / "secret.mp4") in str(info.value)
    assert rows["bbaf5a"].file(root, ".mp4") == (root / "bbaf5a_moved.mp4").resolve()

    ds = AVDataset(root, list(rows.values()), lambda t: [1] * len(t), build_transform(load_config().data, train=False))
    index = {r.utt_id: i for i, r in enumerate(ds.rows)}
    with caplog.at_level(logging.WARNING, logger="avsr.data.dataset"):
        assert ds[index["bbaf2n"]] is None
        assert ds[index["bbaf5a"]] is not None
    msg, = [r.getMessage() for r in caplog.records]
    assert "skipping bad clip" in msg and str(target) in msg and "escapes the data root" in msg


def test_variable_frame_rate_video_is_resampled_to_25fps(tmp_path, grid_dir):
    """A VFR file (the same 3 s of real GRID video, frames at irregular times: runs at 50 fps and
    dropped frames, the last one shown at 2.96 s) gives 25 fps crops for its duration (74-75
    frames) and exactly 640 audio samples per frame."""
    import av
    from fractions import Fraction

    src = grid_dir / "video" / "bbaf2n.mpg"
    rgb, _ = read_video(src, fps=25.0)
    wave = read_audio(src)
    times = []  # presentation times (s): frame i of the source shown at 40 ms * i, with jitter
    for i in range(len(rgb)):
        if i % 7 == 3:
            continue  # dropped
        times.append(0.04 * i)
        if i % 5 == 0:
            times.append(0.04 * i + 0.02)  # a doubled frame 20 ms later
    corpus = tmp_path / "videos"
    corpus.mkdir()
    path = corpus / "vfr.mkv"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=50, options={"preset": "ultrafast", "crf": "12"})
        vs.width, vs.height, vs.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
        vs.time_base = Fraction(1, 1000)
        aus = c.add_stream("aac", rate=16000, layout="mono")
        for t in times:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[min(int(round(t / 0.04 - 0.25)), len(rgb) - 1)]),
                                               format="rgb24")
            frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
            c.mux(vs.encode(frame))
        c.mux(vs.encode(None))
        af = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="flt", layout="mono")
        af.sample_rate = 16000
        c.mux(aus.encode(af))
        c.mux(aus.encode(None))
    with av.open(str(path)) as c:
        pts = [f.pts for f in c.decode(video=0)]
    gaps = np.diff(pts)
    assert gaps.min() < gaps.max() / 2, "the test file is not variable-rate"
    (corpus / "vfr.txt").write_text("bin blue at f two now\n")
    out = tmp_path / "out"
    summary = preprocess(discover("videos", corpus), out, PreprocessConfig(), progress=False)
    assert summary.kept == 1, summary.failures
    row, = read_manifest(out, "train")
    frames, audio, meta = load_clip(out, row)
    assert len(frames) in (74, 75) and frames.shape[1:] == (96, 96) and len(audio) == 640 * len(frames)
    assert meta["face_detected"].mean() > 0.9


def test_a_corrupt_audio_packet_becomes_silence_of_its_length_and_too_many_are_refused(s4_dir, caplog, monkeypatch):
    import avsr.data.media as media

    clip = s4_dir / "video" / "bbaf2a.mpg"  # MP2 packet 104 of 112 does not decode (GRID s4 test split)
    with caplog.at_level(logging.WARNING, logger="avsr.data.media"):
        wave = read_audio(clip)
    assert "1 of 112 audio packets undecodable" in caplog.text
    # the concealed packet keeps its place: within one MP2 frame (1152 samples at 44.1 kHz, the
    # decoder's delay) of the 112 packets' duration, where dropping it would lose two
    packet = 1152 / 44100 * 16000
    assert 112 * packet - len(wave) < packet and np.abs(wave[-16000:]).max() > 0.1
    monkeypatch.setattr(media, "MAX_BAD_AUDIO_PACKETS", 0.0)
    with pytest.raises(media.MediaError, match="1 of 112 packets"):
        read_audio(clip)
