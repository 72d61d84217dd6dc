#!/usr/bin/env python
"""GPU check: the project's GPU paths run, and what a ``base`` step costs there -> ``benchmarks/gpu.json``.

On a CUDA machine, each check below runs on its own (one failing is recorded with its error and the
rest go on; exit status 1 if any failed), all within ~5 minutes on one GPU:

- ``autocast_bf16`` / ``autocast_fp16``: a ``base`` ``audiovisual_relscore`` train step (forward, backward,
  optimiser) under ``torch.autocast`` (fp16 with a ``GradScaler``); loss finite, parameters changed.
- ``ddp_torchrun_nccl``: ``torchrun --nproc_per_node=1 train.py`` (NCCL process group, the model's
  batch norms converted to ``SyncBatchNorm`` by :func:`avsr.training.distributed.wrap_model`) for a few
  steps on a synthetic corpus written here (noise frames, GRID-grammar transcripts).
- ``dataparallel``: ``train.py --dataparallel`` on the same corpus (one process per visible GPU under
  torchrun when there are several), and ``torch.nn.DataParallel`` over the encoder's
  ``(video, audio)`` forward and backward on every visible GPU.
- ``sync_batchnorm``: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on ``base``: how many layers it
  converts (the DDP run logs the same count from inside ``train.py``).
- ``beam_decoding``: :class:`avsr.decoding.Recognizer` (beam 10 and 40, CTC weight 0.1) on the GPU for
  a batch of 3 s utterances; ms per utterance.
- ``step_time``: median train-step seconds, frames per second and peak GPU memory (GiB) of ``base``
  ``audiovisual_relscore`` under bf16 at LRS-like batches (clips x frames at 25 fps).

Without CUDA it says so and exits 0, writing nothing. Run: ``bash scripts/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
SYMBOLS = " '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # + blank, unk, <sos/eos>: the decoding benchmark's 41 ids
V = len(SYMBOLS) + 3
LRS_BATCHES = ((8, 150), (16, 150), (4, 450))  # clips x frames: 6 s and 18 s clips
GRID_WORDS = ("bin lay place set blue green red white at by in with a b c d e f g h i j k l m n o p q r s t u v "
              "x y z zero one two three four five six seven eight nine soon now again please").upper().split()


def _model():
    import torch

    from avsr.config import load_config
    from avsr.models import build_model

    cfg = load_config(REPO / "configs" / "model" / "base.yaml", ["model.mode=audiovisual_relscore"])
    torch.manual_seed(0)
    return build_model(cfg.model, V), cfg


def _batch(clips: int, frames: int, device):
    import torch

    from avsr.data.batch import Batch

    g = torch.Generator().manual_seed(clips * 1000 + frames)
    n_tokens = max(frames // 3, 1)
    return Batch(video=torch.randn(clips, frames, 1, 88, 88, generator=g),
                 video_lengths=torch.full((clips,), frames, dtype=torch.long),
                 audio=torch.randn(clips, frames * 640, generator=g) * 0.1,
                 audio_lengths=torch.full((clips,), frames * 640, dtype=torch.long),
                 tokens=torch.randint(1, V - 1, (clips, n_tokens), generator=g),
                 token_lengths=torch.full((clips,), n_tokens, dtype=torch.long)).to(device)


def _train_step(model, opt, batch, dtype, scaler=None) -> float:
    import torch

    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        loss = model(batch).loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return float(loss)


def check_autocast(dtype_name: str) -> dict:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    model, _ = _model()
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    first = model.ctc_head.linear.weight.detach().clone()
    losses = [_train_step(model, opt, _batch(8, 75, "cuda"), dtype, scaler) for _ in range(3)]
    changed = not torch.equal(first, model.ctc_head.linear.weight.detach())
    ok = all(math.isfinite(x) for x in losses) and changed
    return {"ok": ok, "losses": [round(x, 4) for x in losses], "parameters_changed": changed}


def write_corpus(root: Path, clips: int = 24, frames: int = 75) -> Path:
    """A synthetic preprocessed corpus (noise mouth ROIs, tone-plus-noise audio, GRID-grammar text)."""
    import numpy as np

    from avsr.data.manifest import ManifestRow, write_manifest
    from avsr.data.media import write_gray_video, write_wav

    rng = np.random.default_rng(0)
    words = random.Random(0)
    rows = []
    (root / "train").mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        utt = f"syn{i:03d}"
        base = root / "train" / utt
        write_gray_video(base.with_suffix(".mp4"), rng.integers(0, 255, (frames, 96, 96), dtype=np.uint8))
        t = np.arange(frames * 640) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t) + 0.05 * rng.standard_normal(t.size)
        write_wav(base.with_suffix(".wav"), wave.astype(np.float32))
        text = " ".join(words.choice(GRID_WORDS) for _ in range(6))
        (base.with_suffix(".txt")).write_text(text + "\n")
        lips = np.zeros((frames, 20, 2), np.float32)
        np.savez(base.with_suffix(".npz"), landmarks=lips, mouth_opening=np.zeros(frames, np.float32),
                 face_detected=np.ones(frames, bool))
        rows.append(ManifestRow(utt, f"train/{utt}", frames, frames * 640, text))
    write_manifest(root, "train", rows)
    return root


def _train_cli(root: Path, exp: Path, launcher: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, *launcher, str(REPO / "train.py"), "--config", str(REPO / "configs/grid/audiovisual_relscore.yaml"),
           "--config", str(REPO / "configs/model/base.yaml"), f"data.root={root}", f"train.exp_dir={exp}",
           "train.init_from=''", "train.init_visual_from=''", "train.init_visual_share=0", "data.val_holdout=4",
           "data.num_workers=1", "train.max_steps=4", "train.eval_step=4", "train.save_step=4", "train.log_step=1",
           "train.warmup_steps=1", "train.average_last=0", "train.precision=bf16", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    log = proc.stdout + proc.stderr
    return {"ok": proc.returncode == 0, "exit": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "log_tail": log[-1500:] if proc.returncode else "",
            "nccl": "nccl" in log, "sync_batchnorm_layers": _count_sync_bn(log)}


def _count_sync_bn(log: str):
    for line in log.splitlines():
        if "SyncBatchNorm" in line:
            return line.strip()[-120:]
    return None


def check_ddp(root: Path, work: Path) -> dict:
    return _train_cli(root, work / "ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"], [])


def check_dataparallel(root: Path, work: Path) -> dict:
    import torch

    out = {"train_py": _train_cli(root, work / "dp", [], ["--dataparallel"])}
    model, _ = _model()
    enc = model.encoder.cuda().train()
    n = torch.cuda.device_count()
    dp = torch.nn.DataParallel(enc)
    b = _batch(2 * n, 75, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        feats, lengths = dp(b.video, b.video_lengths, b.audio, b.audio_lengths)
    feats.float().pow(2).mean().backward()
    grads = sum(p.grad is not None for p in enc.parameters())
    out["nn_dataparallel"] = {"gpus": n, "output_shape": list(feats.shape), "parameters_with_grad": grads,
                              "ok": grads > 0 and tuple(feats.shape[:2]) == (2 * n, 75)}
    out["ok"] = out["train_py"]["ok"] and out["nn_dataparallel"]["ok"]
    return out


def check_sync_batchnorm() -> dict:
    import torch

    model, _ = _model()
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    n = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    return {"ok": n > 0, "sync_batchnorm_layers": n}


def check_beam() -> dict:
    import torch

    from avsr.config import DecodeConfig
    from avsr.decoding import Recognizer
    from avsr.text.tokenizer import CharTokenizer

    model, _ = _model()
    model = model.cuda().eval()
    tok = CharTokenizer(SYMBOLS)
    assert tok.vocab_size == V
    out = {}
    for beam in (10, 40):
        rec = Recognizer(model, tok, DecodeConfig(method="beam", beam_size=beam, ctc_weight=0.1))
        batch = _batch(8, 75, "cuda")
        rec.decode_tokens(batch)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hyps = rec.decode_tokens(batch)
        torch.cuda.synchronize()
        out[f"beam{beam}"] = {"ms_per_utterance": round((time.perf_counter() - t0) * 1000 / len(hyps), 1),
                              "utterances": len(hyps)}
    out["ok"] = True
    return out


def check_step_time() -> dict:
    import torch

    model, _ = _model()
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = []
    for clips, frames in LRS_BATCHES:
        torch.cuda.reset_peak_memory_stats()
        batch = _batch(clips, frames, "cuda")
        times = []
        for i in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _train_step(model, opt, batch, torch.bfloat16)
            torch.cuda.synchronize()
            if i:  # the first step pays for cuDNN autotuning
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        rows.append({"clips": clips, "frames": frames, "median_step_s": round(step, 4),
                     "frames_per_s": round(clips * frames / step, 1),
                     "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        del batch
    return {"ok": True, "precision": "bf16", "model": "base", "mode": "audiovisual_relscore", "batches": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "gpu.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False): nothing to check, "
              "nothing written")
        return 0
    from avsr.utils import atomic_write_text

    report = {"gpu": {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                      "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
              "checks": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus")
        checks = {"autocast_bf16": lambda: check_autocast("bf16"), "autocast_fp16": lambda: check_autocast("fp16"),
                  "ddp_torchrun_nccl": lambda: check_ddp(corpus, work), "dataparallel": lambda: check_dataparallel(corpus, work),
                  "sync_batchnorm": check_sync_batchnorm, "beam_decoding": check_beam, "step_time": check_step_time}
        for name, fn in checks.items():
            t0 = time.perf_counter()
            try:
                res = fn()
            except Exception as exc:  # one failing check is recorded; the others still run
                res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-1500:]}
            res["seconds"] = round(time.perf_counter() - t0, 1)
            report["checks"][name] = res
            print(f"gpu_check: {name}: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']} s)", flush=True)
            torch.cuda.empty_cache()
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: wrote {args.out}")
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
