#!/usr/bin/env python
"""Auxiliary tasks on real GRID -> ``<out>/aux.json``.

1. Data: GRID s1 (450 train / 50 test clips) and the unseen speakers of ``grid_lipnet_samples``
   (10 clips, 9 speakers; ``bbaf2n`` is s1 and in s1's train split, so it is left out) are
   preprocessed with ``avsr.data.preprocess`` into ``--work`` (kept as a cache: a second run skips
   this). ``grid_lipnet_samples`` is used for evaluation only: nothing is trained or tuned on it.
2. Audio → mouth opening (:mod:`avsr.models.mouth`, recipe :mod:`avsr.mouth_opening`): the
   bidirectional model and the causal streaming variant (2 frames of look-ahead) trained on the
   s1 train split; Pearson r, MAE and R² on s1 test and on the unseen speakers, pooled over all
   frames and averaged per utterance, beside an energy-envelope baseline (per-frame mean log-mel).
   Targets (issue 10): r >= 0.85 on s1 test, >= 0.65 on unseen speakers; the report says which of
   pooled / per-utterance meets them.
3. Lip-to-speech on s1 test: :class:`avsr.models.heads.Lip2SpeechDecoder` (speaker reference =
   the first second of the real mel) trained with the mel L1 loss on fixed, cheap visual features
   (64-component PCA "eigenlips" of the 44x44-downsampled centre crop, fit on s1 train) — a CPU
   budget stand-in for a trained visual frontend; waveform by Griffin-Lim; STOI/ESTOI against the
   real audio, beside Griffin-Lim of the real mel (the ceiling of the vocoder path).

Keep it under ~5 minutes on the 2-core machine once ``--work`` holds the preprocessed clips
(the first run adds ~1-2 minutes of preprocessing).

    .venv/bin/python benchmarks/bench_aux.py --out benchmarks [--work runs/bench_aux]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from avsr.audio_features import log_mel, mel_to_wave
from avsr.config import PreprocessConfig
from avsr.data.corpora import discover
from avsr.data.manifest import read_manifest
from avsr.data.media import read_gray_video
from avsr.data.preprocess import preprocess
from avsr.evaluation.aux_metrics import curve_metrics, speech_intelligibility
from avsr.models.heads import Lip2SpeechDecoder, Lip2SpeechLoss, reference_mel
from avsr.mouth_opening import (MouthData, MouthTrainConfig, energy_envelope_curves, evaluate_mouth_model,
                                load_mouth_data, train_mouth_model)
from avsr.utils import atomic_write_text, real_data_dir, seed_everything, set_num_threads

log = logging.getLogger("bench_aux")

TARGETS = {"s1_test": 0.85, "unseen": 0.65}
S1_IN_LIPNET = "bbaf2n"  # GRID s1, in s1's train split: not an unseen speaker
MOUTH_ARGS = dict(channels=64, hidden=64, kernel=3, dropout=0.1)
EIGENLIPS = 64


def prepare(work: Path, data_dir: Path, workers: int) -> dict:
    """Preprocess GRID s1 and the unseen speakers into ``work`` (resumable); returns what was done."""
    t0 = time.perf_counter()
    unseen = [u for u in discover("grid", data_dir / "grid_lipnet_samples", split="unseen") if u.utt_id != S1_IN_LIPNET]
    s_unseen = preprocess(unseen, work / "unseen", PreprocessConfig(), workers=1, progress=False)
    s_grid = preprocess(discover("grid", data_dir / "grid_s1_tvr28"), work / "grid", PreprocessConfig(),
                        workers=workers, progress=False)
    return {"seconds": round(time.perf_counter() - t0, 1), "new_clips": s_grid.kept + s_unseen.kept,
            "cached_clips": s_grid.resumed + s_unseen.resumed,
            "failed": [f"{u.utt_id}: {why}" for u, why in s_grid.failures + s_unseen.failures],
            "excluded_from_unseen": [S1_IN_LIPNET]}


def _summary(metrics: dict) -> dict:
    return {"pooled": {k: round(v, 4) for k, v in metrics["pooled"].items()},
            "utterance_mean": {k: round(v, 4) for k, v in metrics["utterance_mean"].items()},
            "n_utterances": metrics["n_utterances"]}


def _masked(curves: list[np.ndarray], data: MouthData) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return ([c[m.numpy()] for c, m in zip(curves, data.masks)],
            [t[m].numpy() for t, m in zip(data.targets, data.masks)])


def bench_mouth(train: MouthData, evals: dict[str, MouthData], steps: int, causal_steps: int) -> dict:
    """Train the bidirectional and the causal model; metrics on every evaluation set."""
    out: dict = {"targets_pearson": TARGETS, "energy_baseline": {}}
    for name, data in evals.items():
        out["energy_baseline"][name] = _summary(curve_metrics(*_masked(energy_envelope_curves(data), data)))
    variants = {"bidirectional": (dict(MOUTH_ARGS), steps),
                "causal_lookahead2": (dict(MOUTH_ARGS, causal=True, lookahead=2), causal_steps)}
    for variant, (args, n_steps) in variants.items():
        if n_steps <= 0:
            continue
        t0 = time.perf_counter()
        model, history = train_mouth_model(train, args, MouthTrainConfig(steps=n_steps))
        res = {"model_args": args, "parameters": sum(p.numel() for p in model.parameters()), "steps": n_steps,
               "train_seconds": round(time.perf_counter() - t0, 1),
               "step_time_median_s": round(history["step_time_median_s"], 4)}
        for name, data in evals.items():
            metrics = evaluate_mouth_model(model, data)
            res[name] = _summary(metrics)
            if name == "unseen":
                res[name]["per_utterance_pearson"] = {u: round(m["pearson"], 3) for u, m in metrics["utterances"].items()}
            log.info("%s %s: r pooled %.3f, per-utterance mean %.3f", variant, name,
                     metrics["pooled"]["pearson"], metrics["utterance_mean"]["pearson"])
        res["meets_target"] = {f"{name}_{how}": bool(res[name][how]["pearson"] >= TARGETS[name])
                               for name in evals for how in ("pooled", "utterance_mean")}
        out[variant] = res
    return out


def _eigenlip_inputs(root: Path, split: str) -> tuple[list[np.ndarray], list[torch.Tensor], list[str]]:
    """Per clip: downsampled centre crops ``(T, 1936)`` float32, the real wave, the utterance id."""
    frames_out, waves, ids = [], [], []
    for row in read_manifest(root, split):
        frames = read_gray_video(row.file(root, ".mp4"))[:, 4:92, 4:92].astype(np.float32) / 255.0
        small = frames.reshape(len(frames), 44, 2, 44, 2).mean((2, 4)).reshape(len(frames), -1)
        wave, _ = sf.read(str(row.file(root, ".wav")), dtype="float32")
        frames_out.append(small)
        waves.append(torch.from_numpy(wave[: 640 * len(frames)]))
        ids.append(row.utt_id)
    return frames_out, waves, ids


def bench_lip2speech(root: Path, steps: int, batch_size: int = 16, seed: int = 0) -> dict:
    """Train the lip-to-speech decoder on eigenlip features of s1 train; STOI/ESTOI on s1 test."""
    seed_everything(seed)
    t0 = time.perf_counter()
    tr_frames, tr_waves, _ = _eigenlip_inputs(root, "train")
    te_frames, te_waves, te_ids = _eigenlip_inputs(root, "test")
    stacked = np.concatenate(tr_frames)
    mean = stacked.mean(0)
    _, _, vt = np.linalg.svd(stacked[:: 4] - mean, full_matrices=False)  # PCA on every 4th frame
    basis = vt[:EIGENLIPS].T
    scale = ((stacked - mean) @ basis).std(0)

    def feats(clips: list[np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(((c - mean) @ basis / scale).astype(np.float32)) for c in clips]

    def batch(f: list[torch.Tensor], w: list[torch.Tensor], index: list[int]):
        x = torch.nn.utils.rnn.pad_sequence([f[i] for i in index], batch_first=True)
        lengths = torch.tensor([len(f[i]) for i in index])
        wave = torch.nn.utils.rnn.pad_sequence([w[i] for i in index], batch_first=True)
        mel, mel_lengths = log_mel(wave, torch.tensor([len(w[i]) for i in index]))
        return x, lengths, mel, mel_lengths

    tr_feats, te_feats = feats(tr_frames), feats(te_frames)
    features_seconds = time.perf_counter() - t0
    decoder = Lip2SpeechDecoder(EIGENLIPS, d_model=128, num_blocks=2, dropout=0.1)
    criterion = Lip2SpeechLoss(EIGENLIPS)
    opt = torch.optim.AdamW(decoder.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t1 = time.perf_counter()
    decoder.train()
    for _ in range(steps):
        x, lengths, mel, mel_lengths = batch(tr_feats, tr_waves, torch.randint(len(tr_feats), (batch_size,), generator=gen).tolist())
        pred, pred_lengths = decoder(x, lengths, *reference_mel(mel, mel_lengths))
        loss = criterion(pred, pred_lengths, mel, mel_lengths)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - t1
    decoder.eval()
    generated, rebuilt, test_l1 = [], [], []
    with torch.no_grad():
        for i in range(len(te_feats)):
            x, lengths, mel, mel_lengths = batch(te_feats, te_waves, [i])
            pred, pred_lengths = decoder(x, lengths, *reference_mel(mel, mel_lengths))
            test_l1.append(float(criterion(pred, pred_lengths, mel, mel_lengths)["l1"]))
            generated.append(mel_to_wave(pred[0], n_iter=32).numpy())
            rebuilt.append(mel_to_wave(mel[0], n_iter=32).numpy())
    refs = [w.numpy() for w in te_waves]
    synth = speech_intelligibility(refs, generated, utt_ids=te_ids)
    ceiling = speech_intelligibility(refs, rebuilt, utt_ids=te_ids)
    return {
        "visual_features": f"{EIGENLIPS}-component PCA of the 44x44-downsampled 88x88 centre crop (fit on s1 train)",
        "decoder": {"d_model": 128, "num_blocks": 2,
                    "parameters": sum(p.numel() for p in decoder.parameters())},
        "loss": "mel L1 (no content supervision: no ASR encoder is trained in this benchmark)",
        "steps": steps, "batch_size": batch_size, "features_seconds": round(features_seconds, 1),
        "train_seconds": round(train_seconds, 1), "train_l1_first_last": [round(losses[0], 3), round(float(np.mean(losses[-20:])), 3)],
        "s1_test": {"stoi": round(synth["stoi"], 4), "estoi": round(synth["estoi"], 4),
                    "mel_l1": round(float(np.mean(test_l1)), 4), "n_utterances": synth["n_utterances"]},
        "griffin_lim_of_real_mel": {"stoi": round(ceiling["stoi"], 4), "estoi": round(ceiling["estoi"], 4)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="output folder (writes aux.json)")
    parser.add_argument("--work", default="runs/bench_aux", help="cache of the preprocessed clips")
    parser.add_argument("--data", default=None, help="folder holding grid_s1_tvr28/ (default: $AVSR_DATA)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    parser.add_argument("--mouth-steps", type=int, default=1000)
    parser.add_argument("--causal-steps", type=int, default=600, help="0 skips the causal model")
    parser.add_argument("--l2s-steps", type=int, default=250, help="0 skips lip-to-speech")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_num_threads()
    work = Path(args.work)
    data_dir = Path(args.data) if args.data else real_data_dir()
    t0 = time.perf_counter()
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "python": platform.python_version(), "load_avg_start": os.getloadavg()}}
    report["data"] = prepare(work, data_dir, args.workers)
    train = load_mouth_data(work / "grid", "train")
    evals = {"s1_test": load_mouth_data(work / "grid", "test"), "unseen": load_mouth_data(work / "unseen", "unseen")}
    report["data"].update(s1_train=len(train), s1_test=len(evals["s1_test"]), unseen=len(evals["unseen"]))
    report["mouth_opening"] = bench_mouth(train, evals, args.mouth_steps, args.causal_steps)
    if args.l2s_steps > 0:
        report["lip2speech"] = bench_lip2speech(work / "grid", args.l2s_steps)
        log.info("lip-to-speech s1 test: STOI %.3f, ESTOI %.3f", report["lip2speech"]["s1_test"]["stoi"],
                 report["lip2speech"]["s1_test"]["estoi"])
    report["machine"]["load_avg_end"] = os.getloadavg()
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out) / "aux.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    log.info("wrote %s (%.0f s)", out, report["total_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
