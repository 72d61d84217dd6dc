"""Lip-sync targets from video (avsr.lipsync.targets), checked against GRID's word alignments."""

from pathlib import Path

import numpy as np
import pytest

from avsr.data.corpora import read_align
from avsr.data.landmarks import MESH_KEEP
from avsr.data.manifest import read_manifest
from avsr.lipsync.targets import (BLENDSHAPES, corpus_blendshapes, fit_normaliser, load_clip_mesh, normalise,
                                      raw_measures)

_SILENCE = ("sil", "sp")


def _clips(grid_prepared: Path):
    """(utt_id, coefficients (T, 16), face_detected, .align words) of every prepared GRID clip."""
    out = []
    for split in ("train", "test"):
        coeffs = corpus_blendshapes(grid_prepared, split)
        for row in read_manifest(grid_prepared, split):
            _, detected = load_clip_mesh(row.file(grid_prepared, ".npz"))
            out.append((row.utt_id, coeffs[row.utt_id], detected))
    return out


def test_preprocessing_keeps_the_face_mesh_beside_the_crop(grid_prepared):
    row = read_manifest(grid_prepared, "test")[0]
    with np.load(row.file(grid_prepared, ".npz")) as z:
        assert z["face_mesh"].shape == (row.n_frames, len(MESH_KEEP), 3)
        assert np.array_equal(z["face_mesh_ids"], MESH_KEEP)
        mesh = z["face_mesh"][z["face_detected"]]
    assert np.isfinite(mesh).all()
    # depth is in pixel units, far smaller than the face's extent but not zero
    assert 0 < np.ptp(mesh[..., 2]) < np.ptp(mesh[..., 0])


def test_coefficients_do_not_move_with_the_head(grid_prepared):
    row = read_manifest(grid_prepared, "train")[0]
    mesh, _ = load_clip_mesh(row.file(grid_prepared, ".npz"))
    angle = np.deg2rad(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    yaw = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    moved = 1.7 * mesh @ (rot @ yaw).T + np.array([40.0, -25.0, 3.0])
    np.testing.assert_allclose(raw_measures(moved), raw_measures(mesh), atol=1e-4)


def test_jaw_open_is_higher_inside_words_than_in_the_leading_silence(grid_prepared, grid_dir):
    jaw = BLENDSHAPES.index("jawOpen")
    checked = 0
    for utt, c, detected in _clips(grid_prepared):
        words = read_align(grid_dir / "align" / f"{utt}.align")
        lead = [t for t in range(int(words[0][1])) if words[0][2] in _SILENCE and t < len(c) and detected[t]]
        speech = [t for s, e, w in words if w not in _SILENCE for t in range(int(s), min(int(e), len(c)))]
        if len(lead) < 5:  # clips that start with grey frames or speech
            continue
        checked += 1
        assert c[speech, jaw].mean() > c[lead, jaw].mean(), utt
    assert checked >= 6


def test_lips_close_or_press_at_the_start_of_b_and_p_words(grid_prepared, grid_dir):
    """At the first 3 frames of each word starting with /b/ or /p/ (bin, blue, by, place, please),
    max(mouthClose, mean mouthPress) peaks above that clip's median over its speech frames, and
    above what the same frames give at the start of words starting with a vowel or fricative."""
    cols = [BLENDSHAPES.index(n) for n in ("mouthClose", "mouthPressLeft", "mouthPressRight")]
    bilabial, other, above = [], [], []
    for utt, c, _ in _clips(grid_prepared):
        closure = np.maximum(c[:, cols[0]], c[:, cols[1:]].mean(1))
        words = read_align(grid_dir / "align" / f"{utt}.align")
        speech = [t for s, e, w in words if w not in _SILENCE for t in range(int(s), min(int(e), len(c)))]
        median = np.median(closure[speech])
        for s, _, w in words:
            peak = closure[int(s):int(s) + 3].max()
            if w in ("bin", "blue", "by", "place", "please", "b", "p"):
                bilabial.append(peak)
                above.append(peak > median)
            elif w in ("a", "again", "at", "eight", "f", "four", "in", "l", "n", "one", "s", "set", "seven", "six",
                       "soon", "x"):
                other.append(peak)
    assert len(bilabial) >= 10 and len(other) >= 10
    assert np.mean(above) >= 0.9
    assert np.mean(bilabial) > np.mean(other) + 0.1


def test_normalisation_maps_each_speakers_range_to_0_1_and_refuses_a_flat_measure():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(200, len(BLENDSHAPES))).astype(np.float32) * 3 + 10
    stats = fit_normaliser([raw[:100], raw[100:]])
    out = normalise(raw, stats)
    assert out.min() == 0.0 and out.max() == 1.0
    inside = ((raw > stats[0]) & (raw < stats[1])).mean(0)
    assert np.all(np.abs(inside - 0.9) < 0.03)
    flat = raw.copy()
    flat[:, 2] = 1.0
    with pytest.raises(ValueError, match="mouthFunnel"):
        fit_normaliser([flat])
    with pytest.raises(ValueError, match="no face-detected frames"):
        fit_normaliser([raw], [np.zeros(200, bool)])


def test_a_clip_without_a_face_mesh_is_named_in_the_error(tmp_path):
    old = tmp_path / "clip.npz"
    np.savez(old, landmarks=np.zeros((3, 20, 2), np.float32), face_detected=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"clip\.npz: no face_mesh"):
        load_clip_mesh(old)


def test_contact_sheet_has_one_row_per_coefficient(grid_prepared, tmp_path):
    import sys

    import cv2

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import blendshape_contact_sheet as sheet

    out = tmp_path / "sheet.png"
    assert sheet.main(["--data", str(grid_prepared), "--split", "test", "--out", str(out), "--per-side", "2"]) == 0
    img = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (26 + len(BLENDSHAPES) * (96 + sheet.CAPTION_H), sheet.LABEL_W + 4 * 96 + 12)
