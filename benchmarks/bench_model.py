#!/usr/bin/env python
"""Model cost on this machine: parameters, training-step and inference time, peak memory.

For ``configs/model/base.yaml`` and ``configs/model/tiny.yaml`` in ``audiovisual_relscore`` mode
(each measured in its own subprocess so peak RSS is its own):

- ``train_step_s``: median wall seconds of forward + backward + AdamW step (``fused=True``, the
  fast CPU kernel: ~0.04 s instead of ~0.3 s for the base model's 68 M parameters) on a batch of
  2 clips of 3 s (75 frames of 88x88, 48000 samples, 20 target tokens), fp32;
  ``train_step_cpu_s`` the CPU seconds of those steps (less sensitive to other jobs);
  ``train_step_bf16_s`` the same under CPU bf16 autocast; for ``tiny`` also the GRID demo batch
  (8 clips).
- ``infer_s_per_clip``: one clip through the encoder, CTC head and 20 greedy incremental
  decoder steps, in eval mode without gradients.
- ``peak_rss_gb``: ``ru_maxrss`` of the subprocess after the fp32 training and inference runs.

And our Conformer against ``torchaudio.models.Conformer`` of the base size (12 x d256, 4 heads,
FFN 2048, kernel 31), training steps interleaved in one process. The run waits for a quiet
machine and records its load, wall and CPU time (``benchmarks/quiet.py``); medians of several steps
are reported.

    python benchmarks/bench_model.py --out benchmarks     # writes benchmarks/model.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FRAMES, SAMPLES, TOKENS = 75, 48000, 20
VOCAB = {"base": 1000, "tiny": 30}  # LRS-scale word pieces / GRID characters
TARGETS = {"base_train_step_s": 1.9, "base_peak_rss_gb": 3.2, "conformer_vs_torchaudio": 1.5}
# glibc settings that make conv training ~1.6x faster here (see the Makefile and GRID-NOTES)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def _batch(b: int, vocab: int):
    from avsr.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    return Batch(
        video=torch.randn(b, FRAMES, 1, 88, 88, generator=g),
        video_lengths=torch.full((b,), FRAMES),
        audio=0.1 * torch.randn(b, SAMPLES, generator=g),
        audio_lengths=torch.full((b,), SAMPLES),
        tokens=torch.randint(2, vocab - 1, (b, TOKENS), generator=g),
        token_lengths=torch.full((b,), TOKENS),
    )


def _train_steps(step, n: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of ``n`` calls of ``step`` after a warm-up; CPU seconds go to ``cpu``."""
    step()  # warm-up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return times


def _model_step(model, opt, batch, bf16: bool):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def worker(name: str, steps: int) -> dict:
    """Measure one model config (run in a subprocess)."""
    from avsr.config import load_config
    from avsr.models import build_model
    from avsr.models.masking import lengths_to_mask

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "model" / f"{name}.yaml", ["model.mode=audiovisual_relscore"]).model
    vocab = VOCAB[name]
    model = build_model(cfg, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    res: dict = {"params": sum(p.numel() for p in model.parameters()), "vocab_size": vocab}
    batch = _batch(2, vocab)
    cpu: list[float] = []
    times = _train_steps(_model_step(model, opt, batch, bf16=False), steps, cpu)
    res["train_step_s"], res["train_step_s_all"] = statistics.median(times), times
    res["train_step_cpu_s"] = statistics.median(cpu)

    model.eval()
    clip = _batch(1, vocab)

    @torch.no_grad()
    def infer():
        enc = model.encode(clip.video, clip.video_lengths, clip.audio, clip.audio_lengths)
        model.ctc_head(enc.enc)
        mask = lengths_to_mask(enc.enc_lengths, enc.enc.shape[1])
        ys, cache = torch.full((1, 1), model.sos_id), None
        for _ in range(TOKENS):
            log_probs, cache = model.decoder.forward_step(ys, enc.enc, mask, cache)
            ys = torch.cat([ys, log_probs.argmax(-1, keepdim=True)], dim=1)

    res["infer_s_per_clip"] = statistics.median(_train_steps(infer, steps))
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    model.train()
    res["train_step_bf16_s"] = statistics.median(_train_steps(_model_step(model, opt, batch, bf16=True), steps))
    if name == "tiny":
        big = _batch(8, vocab)
        res["train_step_batch8_s"] = statistics.median(_train_steps(_model_step(model, opt, big, bf16=False), steps))
    return res


def conformer_vs_torchaudio(steps: int) -> dict:
    """Training-step seconds of our Conformer and torchaudio's at the base size, interleaved."""
    import torchaudio

    from avsr.models import Conformer

    torch.manual_seed(0)
    size = dict(input_dim=256, num_heads=4, ffn_dim=2048, num_layers=12, depthwise_conv_kernel_size=31, dropout=0.1)
    models = {"ours": Conformer(**size), "torchaudio": torchaudio.models.Conformer(**size)}
    x = torch.randn(2, FRAMES, 256)
    lengths = torch.tensor([FRAMES, FRAMES - 10])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()}

    def step(k):
        y, _ = models[k](x, lengths)
        opts[k].zero_grad(set_to_none=True)
        y.pow(2).mean().backward()
        opts[k].step()

    times: dict[str, list[float]] = {k: [] for k in models}
    for k in models:
        step(k)
    for _ in range(steps):
        for k in models:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size": size,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        "ours_step_s": med["ours"],
        "torchaudio_step_s": med["torchaudio"],
        "ratio": med["ours"] / med["torchaudio"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="output folder (writes model.json)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per figure (after one warm-up)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("AVSR_THREADS", "2")))
    parser.add_argument("--worker", choices=sorted(VOCAB), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0

    from quiet import BenchRun

    run = BenchRun.start()
    report: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "setup": {"mode": "audiovisual_relscore", "batch": 2, "frames": FRAMES, "samples": SAMPLES,
                  "tokens": TOKENS, "optimizer": "AdamW(fused=True)", "steps": args.steps},
        "configs": {},
    }
    env = {**MALLOC_ENV, **os.environ}
    for name in ("base", "tiny"):
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"benchmark worker for {name} failed with exit code {proc.returncode}")
        report["configs"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {report['configs'][name]}", flush=True)
    report["conformer"] = conformer_vs_torchaudio(args.steps)
    base = report["configs"]["base"]
    report["targets"] = TARGETS
    report["meets_targets"] = {
        "base_train_step_s": base["train_step_s"] <= TARGETS["base_train_step_s"],
        "base_peak_rss_gb": base["peak_rss_gb"] <= TARGETS["base_peak_rss_gb"],
        "conformer_vs_torchaudio": report["conformer"]["ratio"] <= TARGETS["conformer_vs_torchaudio"],
    }
    out = Path(args.out) / "model.json"
    run.write(out, report, threads=args.threads)
    print(f"conformer: {report['conformer']}\nmeets targets: {report['meets_targets']}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
