"""Data pipeline: frame-budget sampler, train/test transforms, dataset and collate."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from avsr.config import DataConfig
from avsr.data.batch import IGNORE_ID
from avsr.data.dataset import AVDataset, collate
from avsr.data.manifest import ManifestRow, read_manifest, write_manifest
from avsr.data.sampler import FrameBudgetSampler
from avsr.data.transforms import (
    MIRROR_MOUTH_20,
    CenterCrop,
    Clip,
    HorizontalFlip,
    RandomCrop,
    SpeedPerturb,
    TimeMask,
    build_transform,
)

# ----------------------------------------------------------------------------- sampler

LENGTHS = [int(x) for x in np.random.default_rng(0).integers(20, 120, size=97)]


def _flat(batches):
    return [i for b in batches for i, _ in b]


def test_sampler_batches_respect_budget_and_cover_each_clip_once():
    s = FrameBudgetSampler(LENGTHS, max_frames=400, num_buckets=4, seed=1)
    batches = list(s)
    assert all(len(b) * max(LENGTHS[i] for i, _ in b) <= 400 for b in batches)
    assert sorted(_flat(batches)) == list(range(len(LENGTHS)))
    # bucketing keeps lengths in a batch close: far less padding than random batching
    pad = sum(len(b) * max(LENGTHS[i] for i, _ in b) - sum(LENGTHS[i] for i, _ in b) for b in batches)
    assert pad < 0.15 * sum(LENGTHS)


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = FrameBudgetSampler(LENGTHS, 400, seed=3), FrameBudgetSampler(LENGTHS, 400, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert all(e == 2 for batch in a for _, e in batch)
    b.set_epoch(3)
    assert _flat(a) != _flat(b)
    c = FrameBudgetSampler(LENGTHS, 400, seed=4)
    c.set_epoch(2)
    assert _flat(a) != _flat(c)


def test_sampler_ddp_shares_are_disjoint_and_equal():
    shares = [FrameBudgetSampler(LENGTHS, 300, seed=5, rank=r, world_size=3) for r in range(3)]
    lists = [list(s) for s in shares]
    assert len({len(x) for x in lists}) == 1 and len(lists[0]) == len(shares[0])
    seen = [set(_flat(x)) for x in lists]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    total = len(FrameBudgetSampler(LENGTHS, 300, seed=5).epoch_batches(0))
    assert len(lists[0]) == total // 3


def test_sampler_curriculum_and_length_limit():
    s = FrameBudgetSampler(LENGTHS, 400, seed=0, curriculum=[[60, 2], [90, 1]])
    for epoch, limit in ((0, 60), (1, 60), (2, 90)):
        s.set_epoch(epoch)
        assert sorted(_flat(s)) == [i for i, n in enumerate(LENGTHS) if n <= limit]
    s.set_epoch(3)
    assert sorted(_flat(s)) == list(range(len(LENGTHS)))
    # clips that can be cut (word timings) stay in every stage, counted at the stage's limit
    cut = [n > 60 and i % 2 == 0 for i, n in enumerate(LENGTHS)]
    c = FrameBudgetSampler(LENGTHS, 120, seed=0, curriculum=[[60, 1]], cuttable=cut)
    used = sorted(_flat(c))
    assert used == [i for i, n in enumerate(LENGTHS) if n <= 60 or cut[i]]
    assert all(len(b) * max(min(LENGTHS[i], 60) for i in b) <= 120 for b in c.epoch_batches(0))
    with pytest.raises(ValueError, match="two positive integers"):
        FrameBudgetSampler(LENGTHS, 400, curriculum=[[60]])
    short = FrameBudgetSampler(LENGTHS, 100, seed=0)
    assert sorted(_flat(short)) == [i for i, n in enumerate(LENGTHS) if n <= 100]


def test_sampler_max_clips_caps_batch_size():
    s = FrameBudgetSampler([10] * 50, 10_000, max_clips=7)
    assert max(len(b) for b in s) == 7


def test_sampler_resumes_at_the_batch_it_stopped():
    s = FrameBudgetSampler(LENGTHS, 300, seed=9, rank=1, world_size=2)
    s.set_epoch(4)
    full = list(s)
    state = s.state_dict(batches_done=3)
    r = FrameBudgetSampler(LENGTHS, 300, seed=9, rank=1, world_size=2)
    r.load_state_dict(state)
    assert len(r) == len(full) - 3
    assert list(r) == full[3:]
    assert list(r) == full  # the skip applies to one iteration only
    with pytest.raises(ValueError, match="world size"):
        FrameBudgetSampler(LENGTHS, 300, seed=9, world_size=4).load_state_dict(state)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=[], max_frames=10), "empty"),
    (dict(lengths=[5], max_frames=0), "positive"),
    (dict(lengths=[5], max_frames=10, rank=2, world_size=2), "rank"),
    (dict(lengths=[5], max_frames=10, max_clips=0), "max_clips"),
])
def test_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrameBudgetSampler(**kwargs)


def test_sampler_too_few_batches_for_ranks_is_a_clear_error():
    s = FrameBudgetSampler([50, 50], 100, num_buckets=1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than the 2 ranks"):
        list(s)


def test_hold_out_is_seeded_disjoint_and_order_independent():
    from avsr.data.dataset import hold_out

    rows = [ManifestRow(f"u{i:02d}", f"train/u{i:02d}", 75, 48000, "A") for i in range(20)]
    kept, held = hold_out(rows, 5, seed=3)
    assert len(held) == 5 and len(kept) == 15 and not {r.utt_id for r in kept} & {r.utt_id for r in held}
    assert hold_out(rows[::-1], 5, seed=3)[1] == held
    assert hold_out(rows, 5, seed=4)[1] != held
    with pytest.raises(ValueError, match="cannot hold out"):
        hold_out(rows, 20, seed=0)


# ----------------------------------------------------------------------------- transforms

def _marked_clip(t=3, size=96, seed=0):
    """Frames that are 0 except a unique bright value under each landmark."""
    rng = np.random.default_rng(seed)
    cells = np.stack([rng.choice((size - 20) ** 2, size=20, replace=False) for _ in range(t)])  # distinct points
    lm = (np.stack([cells % (size - 20), cells // (size - 20)], axis=-1) + 10).astype(np.float32)
    video = np.zeros((t, size, size), np.uint8)
    for f in range(t):
        for k in range(20):
            x, y = lm[f, k].astype(int)
            video[f, y, x] = 10 + k
    return Clip(video=video, landmarks=lm, audio=None)


def _values_under_landmarks(clip):
    t = len(clip.video)
    return np.array([[clip.video[f, int(round(y)), int(round(x))] for x, y in clip.landmarks[f]] for f in range(t)])


@pytest.mark.parametrize("seed", range(4))
def test_crop_and_flip_move_landmarks_with_the_pixels(seed):
    clip = _marked_clip(seed=seed)
    rng = np.random.default_rng(seed)
    out = HorizontalFlip(p=1.0)(RandomCrop(88)(clip, rng), rng)
    assert out.video.shape == (3, 88, 88)
    assert ((out.landmarks >= 0) & (out.landmarks <= 87)).all()
    # each point still sits on its own mark; after the flip, index k holds the mirrored point's mark
    assert (_values_under_landmarks(out) == 10 + MIRROR_MOUTH_20[None, :]).all()


def test_flip_keeps_left_right_semantics_of_mouth_corners():
    clip = _marked_clip()
    clip.landmarks[:, 12, 0], clip.landmarks[:, 16, 0] = 30.0, 60.0  # inner corners: 12 left of 16 in the image
    out = HorizontalFlip(p=1.0)(clip, np.random.default_rng(0))
    # mirrored image: the point now at index 12 is the old 16 (x = 95 - 60), still left of index 16
    assert np.allclose(out.landmarks[:, 12, 0], 95 - 60.0) and np.allclose(out.landmarks[:, 16, 0], 95 - 30.0)
    assert HorizontalFlip(p=0.0)(clip, np.random.default_rng(0)) is clip


def test_center_crop_takes_the_middle():
    clip = _marked_clip()
    out = CenterCrop(88)(clip, np.random.default_rng(0))
    assert np.array_equal(out.video, clip.video[:, 4:92, 4:92])
    assert np.allclose(out.landmarks, clip.landmarks - 4)
    with pytest.raises(ValueError, match="cannot crop"):
        CenterCrop(100)(clip, np.random.default_rng(0))


def test_time_mask_replaces_spans_with_the_mean_frame():
    video = np.random.default_rng(0).random((75, 8, 8)).astype(np.float32)
    out = TimeMask(10)(Clip(video), np.random.default_rng(1)).video
    changed = [t for t in range(75) if not np.array_equal(out[t], video[t])]
    assert 0 < len(changed) <= 30
    assert all(np.allclose(out[t], video.mean(0)) for t in changed)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturbation_changes_tempo_and_pitch_and_keeps_audio_video_sync(factor):
    t, sr = 75, 16000
    frames = np.arange(t, dtype=np.uint8)[:, None, None].repeat(8, 1).repeat(8, 2)  # frame k has value k
    # a 200 Hz tone that starts at frame 40: the onset must land on the video frame that shows frame 40
    audio = np.sin(2 * np.pi * 200 * np.arange(t * 640) / sr).astype(np.float32)
    audio[:40 * 640] = 0
    clip = Clip(video=frames, landmarks=np.zeros((t, 20, 2), np.float32), audio=audio,
                mouth_opening=np.arange(t, dtype=np.float32))
    out = SpeedPerturb([factor])(clip, np.random.default_rng(0))
    n = round(t / factor)
    assert out.video.shape == (n, 8, 8) and out.landmarks.shape == (n, 20, 2) and out.audio.shape == (n * 640,)
    assert np.array_equal(out.mouth_opening, out.video[:, 0, 0].astype(np.float32))
    assert out.video[0, 0, 0] == 0 and out.video[-1, 0, 0] == t - 1
    onset = int(np.argmax(np.abs(out.audio) > 0.5)) // 640  # first loud output frame
    assert abs(int(out.video[onset, 0, 0]) - 40) <= 1
    tone = out.audio[(onset + 2) * 640:]
    peak_hz = np.argmax(np.abs(np.fft.rfft(tone))) * sr / len(tone)
    assert abs(peak_hz - 200 * factor) < 5
    with pytest.raises(ValueError, match="SpeedPerturb"):
        SpeedPerturb([])


def test_pipelines_output_normalised_crops_and_are_reproducible():
    cfg = DataConfig()
    clip = Clip(video=np.full((20, 96, 96), 107, np.uint8), landmarks=np.full((20, 20, 2), 48.0, np.float32),
                audio=np.random.default_rng(0).standard_normal(20 * 640).astype(np.float32) * 0.1)
    test = build_transform(cfg, train=False)(clip, np.random.default_rng(0))
    assert test.video.shape == (20, 88, 88) and test.video.dtype == np.float32
    assert np.allclose(test.video, (107 / 255 - 0.421) / 0.165, atol=1e-5)
    train = build_transform(cfg, train=True)
    a, b = train(clip, np.random.default_rng(5)), train(clip, np.random.default_rng(5))
    assert np.array_equal(a.video, b.video) and np.array_equal(a.audio, b.audio)
    assert a.audio.shape == clip.audio.shape


# ----------------------------------------------------------------------------- dataset

def _char_encode(text):
    return [ord(c) - 30 for c in text]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """A 4-clip corpus written with the project's writers (moving bright square, tone audio)."""
    from avsr.data.media import write_gray_video, write_wav

    root = tmp_path_factory.mktemp("synthetic")
    (root / "train").mkdir()
    rows = []
    for i, t in enumerate([30, 42, 25, 38]):
        frames = np.full((t, 96, 96), 60, np.uint8)
        for f in range(t):
            frames[f, 40:56, 20 + f:36 + f] = 200
        base = root / "train" / f"u{i}"
        write_gray_video(base.with_suffix(".mp4"), frames, crf=0)
        wave = 0.3 * np.sin(np.arange(t * 640 - 100) * 2 * np.pi * 220 / 16000).astype(np.float32)
        write_wav(base.with_suffix(".wav"), wave)
        lm = np.tile(np.linspace(30, 66, 40, dtype=np.float32).reshape(1, 20, 2), (t, 1, 1))
        np.savez(base.with_suffix(".npz"), landmarks=lm, mouth_opening=np.full(t, 0.1, np.float32),
                 face_detected=np.ones(t, bool))
        rows.append(ManifestRow(f"u{i}", f"train/u{i}", t, t * 640, f"WORD {i}"))
    write_manifest(root, "train", rows)
    return root


def test_dataset_sample_shapes_and_alignment(synthetic_root):
    rows = read_manifest(synthetic_root, "train")
    ds = AVDataset(synthetic_root, rows, _char_encode, build_transform(DataConfig(), train=False))
    s = ds[(1, 0)]
    assert s.video.shape == (42, 88, 88) and s.video.dtype == np.float32
    assert s.audio.shape == (42 * 640,)  # the short WAV is padded to the video length
    assert s.landmarks.shape == (42, 20, 2) and s.mouth_opening.shape == (42,)
    assert s.tokens.tolist() == _char_encode("WORD 1")
    assert ds.lengths == [30, 42, 25, 38]


def test_dataset_augmentation_is_keyed_by_seed_epoch_index(synthetic_root):
    rows = read_manifest(synthetic_root, "train")
    train = build_transform(DataConfig(), train=True)
    a = AVDataset(synthetic_root, rows, _char_encode, train, seed=7)
    b = AVDataset(synthetic_root, rows, _char_encode, train, seed=7)
    assert np.array_equal(a[(2, 3)].video, b[(2, 3)].video)
    assert not all(np.array_equal(a[(2, 3)].video, a[(2, e)].video) for e in (4, 5, 6))


def test_corruptors_see_the_uncropped_roi_and_its_landmarks(synthetic_root):
    rows = read_manifest(synthetic_root, "train")
    seen = {}

    def visual(frames, landmarks, rng):
        seen["video"], seen["lm"] = frames.shape, landmarks.shape
        return np.zeros_like(frames)

    def audio(wave, rng, exclude=()):
        seen["exclude"] = exclude
        return wave * 0

    ds = AVDataset(synthetic_root, rows, _char_encode, build_transform(DataConfig(), train=False),
                   visual_corrupt=visual, audio_corrupt=audio)
    s = ds[0]
    assert seen == {"video": (30, 96, 96), "lm": (30, 20, 2), "exclude": ("u0",)}
    assert np.allclose(s.video, -0.421 / 0.165) and not s.audio.any()


def test_bad_clip_is_reported_once_and_dropped(synthetic_root, tmp_path, caplog):
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(synthetic_root, root)
    (root / "train" / "u2.mp4").write_bytes(b"not a video at all")
    rows = read_manifest(root, "train")
    ds = AVDataset(root, rows, _char_encode, build_transform(DataConfig(), train=False))
    with caplog.at_level(logging.WARNING, logger="avsr.data.dataset"):
        assert ds[2] is None and ds[(2, 1)] is None
    lines = [r.getMessage() for r in caplog.records if "u2.mp4" in r.getMessage()]
    assert len(lines) == 1 and "skipping bad clip" in lines[0]
    batch = collate([ds[0], ds[2], ds[1]])
    assert batch.utt_ids == ["u0", "u1"]
    assert collate([ds[2]]) is None


def test_collate_pads_every_field(synthetic_root):
    rows = read_manifest(synthetic_root, "train")
    ds = AVDataset(synthetic_root, rows, _char_encode, build_transform(DataConfig(), train=False))
    b = collate([ds[0], ds[1]])
    assert b.video.shape == (2, 42, 1, 88, 88) and b.audio.shape == (2, 42 * 640)
    assert b.video_lengths.tolist() == [30, 42] and b.audio_lengths.tolist() == [30 * 640, 42 * 640]
    assert b.tokens.dtype == torch.int64 and b.token_lengths.tolist() == [6, 6]
    assert b.landmarks.shape == (2, 42, 20, 2) and b.mouth_opening.shape == (2, 42)
    assert (b.video[0, 30:] == 0).all() and (b.mouth_opening[0, 30:] == 0).all()
    long = collate([ds[0], AVDataset(synthetic_root, rows, lambda t: [5] * 9, ds.transform)[1]])
    assert (long.tokens[0, 6:] == IGNORE_ID).all()


def test_dataset_on_real_grid_clips(grid_prepared):
    """Real preprocessed GRID clips load into a batch the model contract expects."""
    from avsr.data.sampler import FrameBudgetSampler
    from avsr.training.loop import make_loader

    rows = read_manifest(grid_prepared, "train")
    ds = AVDataset(grid_prepared, rows, _char_encode, build_transform(DataConfig(), train=True), seed=1)
    sampler = FrameBudgetSampler(ds.lengths, max_frames=160, seed=1)
    batches = list(make_loader(ds, sampler, num_workers=2, seed=1))
    assert sum(len(b) for b in batches) == len(rows)
    for b in batches:
        assert b.video.shape[2:] == (1, 88, 88) and b.video.shape[0] * b.video.shape[1] <= 160
        assert (b.audio_lengths == 640 * b.video_lengths).all()
        assert torch.isfinite(b.video).all() and b.video.std() > 0.1  # real images, normalised
        for i, t in enumerate(b.video_lengths.tolist()):  # the lips stay inside the 88x88 crop
            assert ((b.landmarks[i, :t] >= 0) & (b.landmarks[i, :t] <= 87)).all()


_FORKED_WORKERS = """
import sys, cv2, numpy as np
from avsr.config import CorruptionConfig, DataConfig
from avsr.corruption.occluders import OccluderBank
from avsr.corruption.visual import VisualCorruptor
from avsr.data.dataset import AVDataset
from avsr.data.manifest import read_manifest
from avsr.data.sampler import FrameBudgetSampler
from avsr.data.transforms import build_transform
from avsr.training.loop import make_loader

root = sys.argv[1]
cv2.setNumThreads(2)  # as avsr.utils.set_num_threads, then keep OpenCV's pool busy in this process
img = np.random.rand(1024, 1024).astype(np.float32)
for _ in range(5):
    cv2.GaussianBlur(img, (7, 7), 1.0)
rows = read_manifest(root, "train")
ds = AVDataset(root, rows, lambda t: [2] * len(t), build_transform(DataConfig(), train=True),
               visual_corrupt=VisualCorruptor(CorruptionConfig(visual_prob=1.0), OccluderBank.builtin()))
batches = list(make_loader(ds, FrameBudgetSampler(ds.lengths, 150, num_buckets=1), num_workers=2, seed=0))
print(sum(len(b) for b in batches))
"""


def test_loader_workers_with_visual_corruption_do_not_hang_after_opencv_ran_in_the_parent(grid_prepared):
    """OpenCV's thread pool does not survive fork(): workers used to hang in their first clip."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _FORKED_WORKERS, str(grid_prepared)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung workers too
        proc.communicate()
        pytest.fail("DataLoader workers hung")
    assert proc.returncode == 0, err[-2000:]
    assert int(out.split()[-1]) == len(read_manifest(grid_prepared, "train"))
