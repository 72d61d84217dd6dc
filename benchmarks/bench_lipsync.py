#!/usr/bin/env python
"""Lip-sync benchmark (``make lipsync-bench``) -> ``<out>/lipsync.json``.

Side by side on the same clips: GRID s1 test (50 clips), ``grid_s4_vid2speech`` test (25; a
speaker never trained on) and the unseen speakers of ``grid_lipnet_samples`` (10 clips, 9
speakers; evaluation only), for

- ours, one model per core of :mod:`avsr.lipsync.model` (``avsr_bigru`` and ``avsr_attention`` at
  25 steps per second (stride 4), ``avsr_causal_gru`` at 100 with 1 mel frame of look-ahead), each
  trained on the 450 s1 train clips for the same steps to predict the landmark mouth opening, the 16 ARKit mouth blendshapes and Rhubarb's shapes
  (forced-alignment labels from the phone aligner, :mod:`avsr.lipsync.aligner`);
- with ``--video-frontend`` (an AVSR checkpoint with video, e.g. ``make demo``'s lip reader):
  ``avsr_bigru_video``, the bigru model with the mouth video as a second input through that
  model's frozen visual frontend (:mod:`avsr.lipsync.video`), same data and steps;
- ``energy``: the per-frame mean log-mel energy as the mouth opening (and jaw);
- ``openfacefx`` (OpenFaceFX 0.24, text + audio -> viseme curves, offline): its transcript path
  (``generate_naive``: the transcript's phones spread over the audio's duration, coarticulated),
  retargeted to ARKit for ``jawOpen`` and to Rhubarb's shapes for the cues;
- ``pylipsync`` (pylipsync 0.2.1, a port of uLipSync: MFCC templates of five vowels and silence,
  cosine similarity, volume-weighted), out of the box: its bundled templates (one female voice)
  and default thresholds, no calibration to these speakers, at 25 fps on the 16 kHz audio. Its
  vowels map to Rhubarb's shapes (``PYLIPSYNC_SHAPES``); its mouth opening (and jaw) is the
  openness its vowel targets imply, as for the cues.

Metrics per test set (face-detected frames; "pooled" = every frame of every clip after each
speaker's prediction and truth are standardised on that speaker's frames):

- ``mouth_opening_r``, ``jawOpen_r``: pooled Pearson r of the system's mouth-opening (or jaw) curve
  against the landmark mouth opening, resp. the landmark jawOpen; ``mouth_opening_r_utt_mean``: the
  mean over clips of the per-clip r;
- ``openness_from_output_r``: the openness its mouth shapes imply, the same table for every system
  (:data:`RHUBARB_OPENNESS`, expected value under our viseme posteriors, the cue's shape for
  OpenFaceFX), against the landmark opening; for ``energy``, its envelope;
- ``viseme_accuracy``: frames whose Rhubarb shape is the forced-alignment label;
- ``blendshape_r``: pooled r of each ARKit blendshape the system outputs against its landmark
  measure (:mod:`avsr.lipsync.targets`; OpenFaceFX: the channels its ARKit retarget moves).

Speed (one thread, a quiet machine): real-time factor as audio seconds per second of compute for
60 s of speech, log-mel included; for the causal core also streamed in 10 ms hops, with its
look-ahead (``lookahead_ms``: audio past a frame that the frame waits for) and the compute per hop,
in PyTorch (:class:`avsr.lipsync.model.LipSyncStream`) and as a game engine would run it (the ONNX
export of one hop, raw audio in and the log-mel in the graph, in onnxruntime).

    .venv/bin/python benchmarks/bench_lipsync.py --out benchmarks [--work runs/bench_lipsync]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from avsr.config import PreprocessConfig  # noqa: E402
from avsr.data.corpora import discover  # noqa: E402
from avsr.data.manifest import read_manifest  # noqa: E402
from avsr.data.preprocess import preprocess  # noqa: E402
from avsr.evaluation.aux_metrics import pearson_r  # noqa: E402
from avsr.lipsync.aligner import clip_visemes, load_aligner, load_aligner_data, save_aligner, train_phone_ctc  # noqa: E402
from avsr.lipsync.model import WINDOW_AHEAD_MS, LipSyncStream, load_lipsync_model  # noqa: E402
from avsr.lipsync.train import (CURVES, LIPSYNC_SPEEDS, MOUTH_OPENING, LipSyncTrainConfig, energy_envelope_curves,  # noqa: E402
                                load_lipsync_data, predict, save_lipsync_checkpoint, train_lipsync_model)
from avsr.lipsync.targets import BLENDSHAPES  # noqa: E402
from avsr.lipsync.video import MouthFeatures  # noqa: E402
from avsr.lipsync.visemes import RHUBARB, RHUBARB_SHAPES  # noqa: E402
from avsr.utils import real_data_dir, set_num_threads  # noqa: E402
from quiet import BenchRun  # noqa: E402

log = logging.getLogger("bench_lipsync")

S1_IN_LIPNET = "bbaf2n"  # GRID s1, in s1's train split: not an unseen speaker
CORES = {"avsr_bigru": dict(core="bigru", stride=4), "avsr_causal_gru": dict(core="causal_gru", lookahead=1),
         "avsr_attention": dict(core="attention", stride=4)}
MODEL_ARGS = dict(channels=64, hidden=64, kernel=5, dropout=0.1)
VIDEO_SYSTEM = "avsr_bigru_video"  #: with ``--video-frontend``: bigru with the mouth video as a second input
#: Mouth openness of each Rhubarb shape (0 closed .. 1 wide open), from Rhubarb's descriptions of
#: its shapes (A closed; B slightly open; C open; D wide open; E slightly rounded; F puckered;
#: G upper teeth on lower lip; H tongue raised, open; X rest).
RHUBARB_OPENNESS = {"A": 0.0, "B": 0.25, "C": 0.6, "D": 1.0, "E": 0.5, "F": 0.3, "G": 0.15, "H": 0.45, "X": 0.0}


def prepare(work: Path, data_dir: Path) -> dict[str, tuple[Path, str, dict[str, str]]]:
    """Preprocess the corpora into ``work`` (resumable): ``{name: (root, split, speaker of clip)}``."""
    cfg = PreprocessConfig()
    unseen = [u for u in discover("grid", data_dir / "grid_lipnet_samples", split="unseen") if u.utt_id != S1_IN_LIPNET]
    preprocess(unseen, work / "unseen", cfg, workers=1, progress=False)
    preprocess(discover("grid", data_dir / "grid_s1_tvr28"), work / "grid", cfg, workers=2, progress=False)
    preprocess([u for u in discover("grid", data_dir / "grid_s4_vid2speech") if u.split == "test"], work / "s4",
               cfg, workers=2, progress=False)
    speakers = dict(line.split("\t")[:2] for line in
                    (data_dir / "grid_lipnet_samples" / "speakers.tsv").read_text().splitlines() if "\t" in line)
    speakers = {Path(k).stem: v for k, v in speakers.items()}
    return {"train": (work / "grid", "train", {}), "s1_test": (work / "grid", "test", {}),
            "s4_test": (work / "s4", "test", {}), "unseen": (work / "unseen", "unseen", speakers)}


def start(args: argparse.Namespace) -> tuple[BenchRun, Path, dict[str, tuple[Path, str, dict[str, str]]]]:
    """Logging, threads, the quiet-machine wait and the prepared sets (:func:`prepare`) of a
    lip-sync study with ``--work`` and ``--data`` arguments: ``(run, work, sets)``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_num_threads()
    work = Path(args.work)
    run = BenchRun.start()
    return run, work, prepare(work, Path(args.data) if args.data else real_data_dir())


def _standardise_per_speaker(values: list[np.ndarray], speakers: list[str]) -> np.ndarray:
    out = []
    for spk in sorted(set(speakers)):
        v = np.concatenate([x for x, s in zip(values, speakers) if s == spk])
        out.append((v - v.mean()) / max(float(v.std()), 1e-8))
    return np.concatenate(out)


def _r(pred: list[np.ndarray], truth: list[np.ndarray], masks: list[np.ndarray], speakers: list[str]) -> dict:
    """Pooled r after per-speaker standardisation, and the mean per-clip r."""
    p = [a[: len(m)][m[: len(a)]] for a, m in zip(pred, masks)]
    t = [b[: len(m)][m[: len(b)]][: len(x)] for b, m, x in zip(truth, masks, p)]
    pooled = pearson_r(_standardise_per_speaker(p, speakers), _standardise_per_speaker(t, speakers))
    per_clip = [pearson_r(a, b) for a, b in zip(p, t) if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0]
    return {"pooled": round(float(pooled), 4), "utt_mean": round(float(np.mean(per_clip)), 4)}


def _accuracy(labels: list[list[str]], truth: dict[str, list[str]], utt_ids: list[str]) -> float:
    hits = [a == b for u, lab in zip(utt_ids, labels) if u in truth for a, b in zip(lab, truth[u])]
    return round(float(np.mean(hits)), 4) if hits else None


def score(curves: dict[str, list[np.ndarray]], shapes: list[list[str]] | None, openness: list[np.ndarray], data,
          truth_visemes: dict[str, list[str]], speakers: list[str]) -> dict:
    """The metrics of one system on one test set (see the module docstring)."""
    masks = [m.numpy() for m in data.masks]
    opening = _r(curves[MOUTH_OPENING], data.curve(MOUTH_OPENING), masks, speakers)
    jaw = _r(curves["jawOpen"], data.curve("jawOpen"), masks, speakers) if curves.get("jawOpen") else None
    blendshapes = {c: _r(curves[c], data.curve(c), masks, speakers)["pooled"] for c in BLENDSHAPES if c in curves}
    return {"mouth_opening_r": opening["pooled"], "jawOpen_r": jaw["pooled"] if jaw else None,
            "mouth_opening_r_utt_mean": opening["utt_mean"],
            "openness_from_output_r": _r(openness, data.curve(MOUTH_OPENING), masks, speakers)["pooled"],
            "viseme_accuracy": None if shapes is None else _accuracy(shapes, truth_visemes, data.utt_ids),
            "blendshape_r": blendshapes or None}


def ours(model, data) -> tuple[dict, list[list[str]], list[np.ndarray]]:
    preds = predict(model, data)
    table = np.array([RHUBARB_OPENNESS[v] for v in model.visemes])
    curves = {c: [p["curves"][:, k] for p in preds] for k, c in enumerate(model.curves)}
    shapes = [[model.visemes[i] for i in p["visemes"].argmax(1)] for p in preds]
    return curves, shapes, [p["visemes"] @ table for p in preds]


#: pylipsync's vowels as Rhubarb shapes, after Rhubarb's own phone rules (AA: D wide open; IY and
#: IH: B; OW: E slightly rounded; UW: F puckered) and the silence class as X.
PYLIPSYNC_SHAPES = {"aa": "D", "ee": "B", "ih": "B", "oh": "E", "ou": "F", "silence": "X"}


def pylipsync(data, wavs: list[Path]) -> tuple[dict, list[list[str]], list[np.ndarray]]:
    """pylipsync at 25 fps: per frame the dominant vowel as a Rhubarb shape, and the openness of
    its volume-weighted vowel targets (:data:`RHUBARB_OPENNESS`) as the mouth-opening curve."""
    import soundfile as sf
    from pylipsync import PhonemeAnalyzer

    analyzer = PhonemeAnalyzer()
    opening, shapes = [], []
    for wav, c in zip(wavs, data.curves):
        audio, sr = sf.read(str(wav), dtype="float32", always_2d=False)
        segments = analyzer.extract_phoneme_segments(audio, sr, fps=25)[: len(c)]
        opening.append(np.array([sum(RHUBARB_OPENNESS[PYLIPSYNC_SHAPES[p.name]] * p.target for p in seg.phonemes)
                                 for seg in segments]))
        shapes.append([PYLIPSYNC_SHAPES[seg.dominant_phoneme.name] if any(p.target for p in seg.phonemes) else "X"
                       for seg in segments])
    return {MOUTH_OPENING: opening, "jawOpen": opening}, shapes, opening


def openfacefx(data, durations: list[float], transcripts: list[str]) -> tuple[dict, list[list[str]], list[np.ndarray]]:
    """OpenFaceFX's transcript path at 25 fps: jawOpen from its ARKit retarget, Rhubarb cues."""
    from openfacefx import generate_naive
    from openfacefx.edits import sample
    from openfacefx.export_cues import write_rhubarb_tsv
    from openfacefx.retarget import PRESETS, retarget

    from avsr.lipsync.export import read_rhubarb_tsv

    shapes = []
    arkit_curves: dict[str, list[np.ndarray]] = {c: [] for c in BLENDSHAPES}
    with tempfile.TemporaryDirectory() as tmp:
        for utt, dur, text, c in zip(data.utt_ids, durations, transcripts, data.curves):
            track = generate_naive(text.lower(), dur, fps=100.0)
            t = (np.arange(len(c)) + 0.5) / 25.0
            arkit = {ch.name: ch for ch in retarget(track, PRESETS["arkit"]).channels}
            for name in BLENDSHAPES:
                arkit_curves[name].append(sample(arkit[name], t) if name in arkit else np.zeros(len(t)))
            write_rhubarb_tsv(track, f"{tmp}/{utt}.tsv", retarget_preset="rhubarb")
            cues = read_rhubarb_tsv(Path(f"{tmp}/{utt}.tsv").read_text())
            shapes.append([next((v for s, e, v in cues if s <= x < e), "X") for x in t])
    openness = [np.array([RHUBARB_OPENNESS.get(v, 0.0) for v in s]) for s in shapes]
    moving = {n: v for n, v in arkit_curves.items() if any(float(np.ptp(x)) > 0 for x in v)}
    return {MOUTH_OPENING: arkit_curves["jawOpen"], "jawOpen": arkit_curves["jawOpen"], **moving}, shapes, openness


def onnx_streaming(model, checkpoint: Path, wave: torch.Tensor, hops: tuple[int, ...] = (160, 640)) -> dict[int, float]:
    """Wall seconds to stream ``wave`` in hops of each of ``hops`` samples (10 ms; 40 ms, one 25 fps
    video frame) as a game engine would: raw audio into the causal core's ONNX export, log-mel
    inside the graph (``avsr export --part lipsync`` of ``checkpoint``, which holds ``model``), in
    onnxruntime on one thread."""
    import onnxruntime as ort

    from avsr.export import LIPSYNC_INPUTS, LipSyncAudioStep, export_lipsync

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        export_lipsync(checkpoint, "onnx", f"{tmp}/lipsync.onnx")
        session = ort.InferenceSession(f"{tmp}/lipsync.onnx", opts, providers=["CPUExecutionProvider"])
    audio = wave.numpy()[None]

    def stream(hop: int, end: int) -> float:
        t0 = time.perf_counter()
        state = [t.numpy() for t in LipSyncAudioStep(model).initial_state(wave[:160])]
        for i in range(160, end - hop + 1, hop):
            state = session.run(None, dict(zip(LIPSYNC_INPUTS, (audio[:, i:i + hop], *state))))[2:]
        return time.perf_counter() - t0

    stream(160, 16000 * 5)  # warm-up: onnxruntime's first calls allocate
    return {hop: stream(hop, audio.shape[1]) for hop in hops}


def speed(model, seconds: float = 60.0, checkpoint: Path | None = None) -> dict:
    """One-thread real-time factor offline (and streamed for the causal core, in PyTorch and
    through its ONNX export from ``checkpoint``); ``model=None``: the energy envelope."""
    from avsr.audio_features import log_mel

    torch.set_num_threads(1)
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1)
    times = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            model(*log_mel(wave)) if model is not None else log_mel(wave)[0].mean(-1)
            times.append(time.perf_counter() - t0)
    if model is None:
        torch.set_num_threads(2)
        return {"x_real_time_one_core": round(seconds / float(np.median(times)), 1), "lookahead_ms": WINDOW_AHEAD_MS}
    out = {"x_real_time_one_core": round(seconds / float(np.median(times)), 1),
           "lookahead_ms": model.lookahead_ms if model.causal else None}
    if model.causal:
        stream = LipSyncStream(model)
        t0 = time.perf_counter()
        for i in range(0, len(wave), 160):
            stream.push(wave[i:i + 160])
        stream.flush()
        wall = time.perf_counter() - t0
        out.update(x_real_time_streaming_one_core=round(seconds / wall, 1),
                   compute_ms_per_10ms_hop=round(1000 * wall / (len(wave) / 160), 3))
        if checkpoint is not None:
            walls = onnx_streaming(model, checkpoint, wave)
            out.update(x_real_time_streaming_onnx_one_core=round(seconds / walls[160], 1),
                       compute_ms_per_10ms_hop_onnx=round(1000 * walls[160] / (len(wave) / 160), 3),
                       x_real_time_streaming_onnx_40ms_hops_one_core=round(seconds / walls[640], 1))
    torch.set_num_threads(2)
    return out


def write_preview_strip(path: Path, model, root: Path, split: str, n: int = 8) -> Path:
    """The preview (:mod:`avsr.lipsync.preview`) of the first clip of ``split`` at ``n`` evenly spaced
    frames: the real mouth crop above the mouth drawn from the model's blendshapes and its shape."""
    from avsr.data.media import read_gray_video
    from avsr.lipsync.preview import preview_strip

    d = load_lipsync_data(root, split, curves=list(model.curves))
    d = d.subset([i == 0 for i in range(len(d))])
    pred = predict(model, d)[0]
    crops = read_gray_video(read_manifest(root, split)[0].file(root, ".mp4"))
    t = len(pred["curves"])
    frames = np.linspace(8, min(t, len(crops)) - 8, n).astype(int)
    labels = [model.visemes[i] for i in pred["visemes"].argmax(1)] if model.visemes else None
    return preview_strip(path, pred["curves"], model.curves, frames, labels, crops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="output folder (writes lipsync.json)")
    parser.add_argument("--work", default="runs/bench_lipsync", help="cache: preprocessed clips, aligner, models")
    parser.add_argument("--data", default=None, help="folder holding the GRID folders (default: $AVSR_DATA)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each lip-sync model")
    parser.add_argument("--aligner-steps", type=int, default=2000)
    parser.add_argument("--video-frontend", default=None, metavar="AVSR_CHECKPOINT",
                        help=f"also score {VIDEO_SYSTEM}: the bigru model fed the mouth video through this AVSR "
                             "model's visual frontend (make demo's video model: runs/grid/exp/video/average.pt)")
    parser.add_argument("--preview-png", default=str(REPO / "docs" / "lipsync_preview_strip.png"),
                        help="preview strip of the causal model on the first s1 test clip ('' skips it)")
    args = parser.parse_args(argv)
    run, work, sets = start(args)
    aligner_path = work / f"aligner_{args.aligner_steps}.pt"
    if not aligner_path.is_file():
        save_aligner(train_phone_ctc(load_aligner_data(*sets["train"][:2]), steps=args.aligner_steps), aligner_path)
    aligner = load_aligner(aligner_path)
    labels = {name: clip_visemes(aligner, load_aligner_data(root, split), table=RHUBARB)
              for name, (root, split, _) in sets.items()}
    load = dict(curves=list(CURVES), viseme_names=RHUBARB_SHAPES)
    data = {name: load_lipsync_data(root, split, visemes=labels[name], speaker_of=lambda u, s=spk: s.get(u, ""),
                                    speed_perturb=LIPSYNC_SPEEDS if name == "train" else (), **load)
            for name, (root, split, spk) in sets.items()}
    rows = {name: {r.utt_id: r for r in read_manifest(root, split)} for name, (root, split, _) in sets.items()}
    report: dict = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True).stdout.strip(),
                    "test_sets": {n: len(d) for n, d in data.items() if n != "train"}, "systems": {}, "speed": {},
                    "training": {"clips": len(data["train"]) // (1 + sum(f != 1 for f in LIPSYNC_SPEEDS)),
                                 "speed_perturb": list(LIPSYNC_SPEEDS), "steps": args.steps}}
    systems = [(system, core, data) for system, core in CORES.items()]
    if args.video_frontend:  # the offline core with the mouth video too, through an AVSR visual frontend
        mouth = MouthFeatures.from_avsr_checkpoint(args.video_frontend)
        video_data = {name: load_lipsync_data(root, split, visemes=labels[name], video_features=mouth,
                                              speaker_of=lambda u, s=spk: s.get(u, ""),
                                              speed_perturb=LIPSYNC_SPEEDS if name == "train" else (), **load)
                      for name, (root, split, spk) in sets.items()}
        systems.append((VIDEO_SYSTEM, dict(CORES["avsr_bigru"], video_dim=mouth.dim), video_data))
    for system, core, sys_data in systems:
        path = work / "models" / f"{system}_{args.steps}.pt"
        model_args = dict(curves=list(CURVES), visemes=list(RHUBARB_SHAPES), **MODEL_ARGS, **core)
        if not path.is_file():
            t0 = time.perf_counter()
            model, _ = train_lipsync_model(sys_data["train"], model_args, LipSyncTrainConfig(steps=args.steps))
            save_lipsync_checkpoint(path, model, model_args, LipSyncTrainConfig(steps=args.steps),
                                    {"train_minutes": round((time.perf_counter() - t0) / 60, 2)})
        model, ckpt = load_lipsync_model(path)
        report["training"][system] = {"minutes": ckpt["metrics"]["train_minutes"],
                                      "parameters": sum(p.numel() for p in model.parameters())}
        report["systems"][system] = {}
        for name, d in sys_data.items():
            if name != "train":
                spk = [sets[name][2].get(u, "") for u in d.utt_ids]
                report["systems"][system][name] = score(*ours(model, d), d, labels[name], spk)
        if not model.video_dim:  # the speed of the audio models (the video one adds its frontend)
            report["speed"][system] = speed(model, checkpoint=path)
        log.info("%s: %s", system, report["systems"][system])
    for peer in ("energy", "openfacefx", "pylipsync"):
        report["systems"][peer] = {}
    audio_s, ofx_s, pyl_s = 0.0, 0.0, 0.0
    for name, d in data.items():
        if name == "train":
            continue
        spk = [sets[name][2].get(u, "") for u in d.utt_ids]
        energy = energy_envelope_curves(d)
        report["systems"]["energy"][name] = score({MOUTH_OPENING: energy, "jawOpen": energy}, None, energy, d,
                                                  labels[name], spk)
        durations = [rows[name][u].n_samples / 16000 for u in d.utt_ids]
        t0 = time.perf_counter()
        out = openfacefx(d, durations, [rows[name][u].transcript for u in d.utt_ids])
        ofx_s += time.perf_counter() - t0
        audio_s += sum(durations)
        report["systems"]["openfacefx"][name] = score(*out, d, labels[name], spk)
        t0 = time.perf_counter()
        out = pylipsync(d, [rows[name][u].file(sets[name][0], ".wav") for u in d.utt_ids])
        pyl_s += time.perf_counter() - t0
        report["systems"]["pylipsync"][name] = score(*out, d, labels[name], spk)
    # OpenFaceFX reads no audio here (only its duration): its speed is per second of track made
    report["speed"]["openfacefx"] = {"x_real_time_one_core": round(audio_s / ofx_s, 1), "lookahead_ms": None}
    report["speed"]["pylipsync"] = {"x_real_time_one_core": round(audio_s / pyl_s, 1), "lookahead_ms": 32.0}
    report["speed"]["energy"] = speed(None)
    report["notes"] = {"pylipsync": "pylipsync 0.2.1 out of the box (bundled vowel templates, default thresholds), "
                                    "25 fps; vowels as Rhubarb shapes (PYLIPSYNC_SHAPES); its mouth opening is "
                                    "the openness of its volume-weighted vowel targets; speed over the test clips "
                                    "(librosa MFCC), look-ahead half its 64 ms window",
                       "openfacefx": "transcript path (generate_naive): the words spread over the clip's duration; "
                                     "its mouth-opening curve is its ARKit jawOpen"}
    out = Path(args.out) / "lipsync.json"
    run.write(out, report)
    if args.preview_png:
        causal, _ = load_lipsync_model(work / "models" / f"avsr_causal_gru_{args.steps}.pt")
        write_preview_strip(Path(args.preview_png), causal, *sets["s1_test"][:2])
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
