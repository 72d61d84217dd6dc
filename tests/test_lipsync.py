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


def test_pronunciations_come_from_the_lexicon_and_letters_take_their_names():
    from avsr.lipsync.visemes import PHONES, RHUBARB, SILENCE, VISEME15, pronounce, transcript_phones

    assert pronounce("bin") == ["B", "IH", "N"]
    assert pronounce("A") == ["EY"]  # the letter, not the article /AH/
    assert transcript_phones("PLACE RED AT F") == ["P", "L", "EY", "S", "R", "EH", "D", "AE", "T", "EH", "F"]
    with pytest.raises(ValueError, match="'blorptastic' is not in the CMU"):
        pronounce("blorptastic")
    # every phone and silence has a shape in both tables; bilabials are the closed shapes
    assert set(RHUBARB) == set(VISEME15) == {*PHONES, SILENCE}
    assert {RHUBARB[p] for p in ("P", "B", "M")} == {"A"} and {VISEME15[p] for p in ("P", "B", "M")} == {"PP"}


def test_phone_spans_become_frame_labels_with_silence_around_and_in_long_pauses():
    from avsr.lipsync.aligner import phone_frames

    # 50 fps spike spans; video frame t takes 50 fps frame 2t. A phone starts halfway between the
    # previous spike and its own, the first 2 frames (40 ms) before its spike; the 30-frame gap
    # before AA is a pause (> 25): N holds 2 frames, AA starts 2 frames before its spike.
    spans = [("B", 10, 12), ("IH", 14, 16), ("N", 18, 20), ("AA", 50, 52)]
    labels = phone_frames(spans, 40)
    assert labels[:4] == ["sil"] * 4
    assert labels[4:11] == ["B", "B", "B", "IH", "IH", "N", "N"]
    assert labels[11:24] == ["sil"] * 13
    assert labels[24:27] == ["AA"] * 3 and labels[27:] == ["sil"] * 13


def test_exports_round_trip():
    from avsr.lipsync.export import (cues_from_frames, curves_csv, read_curves_csv, read_rhubarb_tsv,
                                     resample_curves, rhubarb_json, rhubarb_tsv)

    labels = ["X"] * 5 + ["A"] * 3 + ["C"] * 10 + ["X"] * 7
    cues = cues_from_frames(labels, 25.0)
    assert [c[2] for c in cues] == ["X", "A", "C", "X"] and cues[-1][1] == pytest.approx(1.0)
    tsv = rhubarb_tsv(cues)
    assert tsv.splitlines()[1] == "0.20\tA" and tsv.splitlines()[-1] == "1.00\tX"
    assert read_rhubarb_tsv(tsv) == [(round(s, 2), round(e, 2), v) for s, e, v in cues]
    import json

    doc = json.loads(rhubarb_json(cues, "speech.wav"))
    assert doc["metadata"] == {"soundFile": "speech.wav", "duration": 1.0}
    assert doc["mouthCues"][2] == {"start": 0.32, "end": 0.72, "value": "C"}
    curves = np.linspace(0, 1, 50)[:, None] * np.array([[1.0, 0.5]])
    at60 = resample_curves(curves, 25, 60)
    assert at60.shape == (120, 2) and at60[0, 0] == 0.0 and at60[-1, 0] == pytest.approx(1.0, abs=0.01)
    names, times, back = read_curves_csv(curves_csv(at60, ["jawOpen", "mouthClose"], 60))
    assert names == ["jawOpen", "mouthClose"] and times[1] == pytest.approx(1 / 60, abs=1e-4)
    np.testing.assert_allclose(back, at60, atol=1e-4)
    with pytest.raises(ValueError, match="empty track"):
        cues_from_frames([])


def test_forced_alignment_gives_every_phone_in_order_inside_the_clip(grid_prepared):
    """The pipeline from audio to a viseme track: a phone aligner trained briefly on the prepared
    GRID clips aligns a clip's transcript; this checks the mechanics, not the timing quality
    (which needs the full training: scripts/train_aligner.py)."""
    import torch

    from avsr.lipsync.aligner import align, frame_visemes, load_aligner_data, phone_frames, train_phone_ctc
    from avsr.lipsync.visemes import RHUBARB, transcript_phones

    torch.set_num_threads(1)
    data = load_aligner_data(grid_prepared, "train")
    model = train_phone_ctc(data, steps=60, batch_size=4)
    mel, text = data.mels[0], data.texts[0]
    spans = align(model, mel, text)
    assert [p for p, _, _ in spans] == transcript_phones(text)
    starts = [s for _, s, _ in spans]
    assert starts == sorted(starts) and all(s < e for _, s, e in spans) and spans[-1][2] <= len(mel) // 2 + 1
    frames = phone_frames(spans, len(mel) // 4)
    assert len(frames) == len(mel) // 4 and set(frames) <= {*transcript_phones(text), "sil"}
    shapes = frame_visemes(frames, RHUBARB)
    assert set(shapes) <= set("ABCDEFGHX")
    with pytest.raises(ValueError, match="cannot hold"):
        align(model, mel[:20], text)


def test_aligner_script_trains_saves_and_reports_both_checks(grid_prepared, grid_dir, tmp_path):
    import json
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_aligner

    from avsr.lipsync.aligner import load_aligner

    torch.set_num_threads(1)
    bench = tmp_path / "a.json"
    assert train_aligner.main(["--data", str(grid_prepared), "--grid-dir", str(grid_dir), "--steps", "20",
                               "--holdout", "2", "--out", str(tmp_path / "al.pt"), "--bench", str(bench)]) == 0
    load_aligner(tmp_path / "al.pt")
    report = json.loads(bench.read_text())
    assert report["train_clips"] == 4 and report["validation_holdout"]["clips"] == 2 and report["test"]["clips"] == 3
    assert report["test"]["word_onset_ms"]["words"] == 18
    assert 0.0 <= report["test"]["video_check_viseme15_PP_vs_aa"] <= 1.0


def test_word_timed_visemes_close_the_mouth_where_the_video_does(grid_prepared, grid_dir):
    """Visemes from word times alone, as the recogniser's own alignment gives them (here GRID's word
    alignments stand in for it): every phone in order, silence before the first word, and the
    lip-sync issue's video check (a smaller landmark mouth opening on Rhubarb A frames than on C/D
    frames of the same clip in at least 90% of clips)."""
    from avsr.lipsync.aligner import frame_visemes, opening_check, phone_frames, word_phone_spans
    from avsr.lipsync.visemes import RHUBARB, transcript_phones

    visemes, opening = {}, {}
    for split in ("train", "test"):
        for row in read_manifest(grid_prepared, split):
            words = [(w, s / 25, e / 25) for s, e, w in read_align(grid_dir / "align" / f"{row.utt_id}.align")
                     if w not in _SILENCE]
            spans = word_phone_spans(words)
            assert [p for p, _, _ in spans] == transcript_phones(" ".join(w for w, _, _ in words))
            with np.load(row.file(grid_prepared, ".npz")) as z:
                opening[row.utt_id] = z["mouth_opening"]
            frames = phone_frames(spans, len(opening[row.utt_id]))
            assert set(frames[: int(words[0][1] * 25) - 1]) <= {"sil"}, row.utt_id
            visemes[row.utt_id] = frame_visemes(frames, RHUBARB)
    score, clips = opening_check(visemes, opening, ["A"], ["C", "D"])
    assert clips >= 5 and score >= 0.9, (score, clips)


def test_word_timed_visemes_spell_a_non_word_and_reject_words_out_of_order():
    from avsr.lipsync.aligner import word_phone_spans

    spans = word_phone_spans([("bin", 0.5, 0.8), ("bluz", 0.8, 1.2)])
    assert [p for p, _, _ in spans] == ["B", "IH", "N", "B", "L", "AH", "Z"]
    assert spans[0][1] == int(0.5 * 50 + 0.5 * 0.3 * 50 / 3) and all(s < t for (_, s, _), (_, t, _) in
                                                                    zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="before the word before it"):
        word_phone_spans([("bin", 0.5, 0.8), ("blue", 0.1, 0.3)])
    with pytest.raises(ValueError, match="no letter"):
        word_phone_spans([("42", 0.0, 0.2)])
