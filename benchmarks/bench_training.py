#!/usr/bin/env python
"""Training throughput on this machine -> ``<out>/training.json``.

1. Training step (forward, backward, AdamW step) in video frames per second for the ``tiny``
   (configs/model/tiny.yaml) and ``base`` (the paper's size, config defaults) models, in
   ``audio`` and ``audiovisual_relscore`` modes, on batches of real preprocessed GRID clips.
   Median over the timed steps (4 tiny, 2 base) after one warm-up step.
2. The DataLoader's own throughput with the default worker count (``data.num_workers``) and train
   transforms, for configs/grid/audio.yaml (no corruption) and audiovisual_relscore.yaml (visual
   corruption and audio noise), in frames per second and as a multiple of what the training step
   of the same mode consumes.

    python benchmarks/bench_training.py --out benchmarks [--data <preprocessed root>] [--quick]

Without ``--data`` a few real GRID s1 clips are preprocessed into a temporary folder first.
On a 2-core CPU the workers share the cores with the training step, so the standalone
DataLoader rate is an upper bound of what it delivers during training.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: sleeping, not spinning, idle threads
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRID_AUDIO = REPO / "configs" / "grid" / "audio.yaml"
GRID_AV = REPO / "configs" / "grid" / "audiovisual_relscore.yaml"
TINY = REPO / "configs" / "model" / "tiny.yaml"

log = logging.getLogger("bench_training")


def prepare_corpus(out: Path, n: int) -> Path:
    """Preprocess the first ``n`` GRID s1 training clips into ``out`` (split ``train``)."""
    from avsr.config import PreprocessConfig
    from avsr.data.corpora import grid_corpus
    from avsr.data.preprocess import preprocess
    from avsr.utils import real_data_dir

    utts = [u for u in grid_corpus(real_data_dir() / "grid_s1_tvr28") if u.split == "train"][:n]
    preprocess(utts, out, PreprocessConfig(), workers=1, progress=False)
    return out


def _batches(root: Path, cfg, clips_per_batch: int, n_batches: int, tokenizer):
    """``n_batches`` training batches of ``clips_per_batch`` real clips (train transforms, no corruption)."""
    from avsr.data.dataset import AVDataset, collate
    from avsr.data.manifest import read_manifest
    from avsr.data.transforms import build_transform

    rows = read_manifest(root, "train")
    ds = AVDataset(root, rows, tokenizer.encode, build_transform(cfg.data, train=True), seed=0)
    out = []
    for b in range(n_batches):
        idx = [(b * clips_per_batch + i) % len(ds) for i in range(clips_per_batch)]
        out.append(collate([ds[i] for i in idx]))
    return out


def time_training(root: Path, size: str, mode: str, clips: int, steps: int) -> dict:
    """Median seconds and frames/s of one optimiser step of the ``size`` model in ``mode``."""
    from avsr.config import load_config
    from avsr.data.manifest import read_manifest
    from avsr.models import build_model
    from avsr.text import build_tokenizer
    from avsr.training.loop import build_optimizer

    cfg = load_config(TINY if size == "tiny" else None, [f"model.mode={mode}", "text.kind=char"])
    tokenizer = build_tokenizer(cfg.text, [r.transcript for r in read_manifest(root, "train")])
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer.vocab_size).train()
    opt = build_optimizer(model, cfg.train)
    batches = _batches(root, cfg, clips, steps + 1, tokenizer)
    times = []
    for batch in batches:
        t = time.perf_counter()
        out = model(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    median = statistics.median(times[1:])
    frames = statistics.mean(int(b.video_lengths.sum()) for b in batches)
    return {"model": size, "mode": mode, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "clips_per_step": clips, "timed_steps": steps, "median_step_s": round(median, 3),
            "frames_per_s": round(frames / median, 1)}


def time_loader(root: Path, config: Path, batches: int) -> dict:
    """Frames/s the training DataLoader of ``config`` delivers with its workers (and corruption)."""
    from avsr.config import load_config
    from avsr.data.dataset import AVDataset
    from avsr.data.manifest import read_manifest
    from avsr.data.sampler import FrameBudgetSampler
    from avsr.data.transforms import build_transform
    from avsr.training.loop import build_corruptors, make_loader

    cfg = load_config(config, [f"data.root={root}"])
    rows = read_manifest(root, "train")
    visual, audio = build_corruptors(cfg, root)
    ds = AVDataset(root, rows, lambda t: [2] * len(t), build_transform(cfg.data, train=True), seed=0,
                   visual_corrupt=visual, audio_corrupt=audio)
    sampler = FrameBudgetSampler(ds.lengths, cfg.data.max_frames, cfg.data.num_buckets, seed=0)
    loader = make_loader(ds, sampler, cfg.data.num_workers, seed=0)
    frames = n = 0
    epoch = 0
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    while n < batches:
        try:
            b = next(it)
        except StopIteration:
            epoch += 1
            sampler.set_epoch(epoch)
            it = iter(loader)
            continue
        frames += int(b.video_lengths.sum())
        n += 1
    elapsed = time.perf_counter() - t
    return {"config": str(config.relative_to(REPO)), "mode": cfg.model.mode, "num_workers": cfg.data.num_workers,
            "batches": n, "clips_per_batch": cfg.data.max_frames // 75,
            "visual_corruption_prob": cfg.corruption.visual_prob, "audio_noise_prob": cfg.corruption.audio_noise_prob,
            "frames_per_s": round(frames / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks")
    p.add_argument("--data", type=Path, help="preprocessed corpus root with a train split (default: prepare GRID clips)")
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = p.parse_args(argv)
    from avsr.utils import set_num_threads, setup_logging

    from quiet import BenchRun

    setup_logging(logging.WARNING)
    set_num_threads()
    run = BenchRun.start()
    steps = {"tiny": 2 if args.quick else 4, "base": 1 if args.quick else 2}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        root = args.data or prepare_corpus(Path(tmp) / "grid", 16)
        training = []
        for size, clips in (("tiny", 8), ("base", 2)):
            for mode in ("audio", "audiovisual_relscore"):
                r = time_training(root, size, mode, clips, steps[size])
                print(f"train {size:4s} {mode:21s} {r['frames_per_s']:8.1f} frames/s  ({r['median_step_s']} s/step)")
                training.append(r)
        loaders = {}
        for config in (GRID_AUDIO, GRID_AV):
            ld = time_loader(root, config, 6 if args.quick else 16)
            loaders[ld["mode"]] = ld
            print(f"dataloader {ld['mode']:21s} {ld['frames_per_s']:8.1f} frames/s ({ld['num_workers']} workers)")
    for r in training:  # each mode against the loader of its own config (corruption only for video modes)
        r["loader_over_step"] = round(loaders[r["mode"]]["frames_per_s"] / r["frames_per_s"], 2)
    result = {
        "benchmark": "training",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "device": "cpu",
        "training_step": training,
        "dataloader": list(loaders.values()),
        "target": "for every training step above, its config's DataLoader delivers >= 3x the frames/s it consumes",
        "target_met": min(r["loader_over_step"] for r in training) >= 3.0,
        "notes": "standalone rates; on a 2-core CPU the workers and the training step share the cores, and "
                 "other jobs on the machine (see run) slow every figure",
    }
    run.write(args.out / "training.json", result)
    print(f"wrote {args.out / 'training.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
