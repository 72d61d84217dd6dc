#!/usr/bin/env python
"""Train an AVSR model on a preprocessed corpus (one process, one GPU, or ``torchrun`` DDP).

Examples::

    python train.py --config configs/grid/audio.yaml data.root=data/grid train.exp_dir=checkpoints/grid_audio
    python train.py --config configs/grid/audio.yaml train.exp_dir=checkpoints/grid_audio --resume
    torchrun --nproc_per_node=4 train.py --config configs/lrs3/audiovisual_relscore.yaml data.root=/data/lrs3

Everything is a config key (``key.sub=value`` overrides win over the YAML). The seed project's
flags are kept as aliases: ``--data`` (data.root), ``--data_name`` (data.name), ``--checkpoint_dir``
(train.exp_dir), ``--checkpoint`` (train.init_from), ``--visual_front_checkpoint`` /
``--audio_front_checkpoint`` (train.init_visual_frontend / train.init_audio_frontend: frontends from
the LRW models of Ma et al., see ``avsr.models.lrw``), ``--batch_size`` (data.max_clips; batches are
still bounded by data.max_frames), ``--epochs``, ``--eval_step``, ``--lr`` (train.*), ``--gpu``
(train.device: ``-1``/``cpu``, ``N`` = cuda:N, ``0,1`` = those GPUs) and ``--dataparallel`` (with
several GPUs and no torchrun, relaunches itself under ``torchrun`` with one process per GPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ALIASES = {
    "data": "data.root",
    "data_name": "data.name",
    "checkpoint_dir": "train.exp_dir",
    "checkpoint": "train.init_from",
    "batch_size": "data.max_clips",
    "epochs": "train.epochs",
    "eval_step": "train.eval_step",
    "lr": "train.lr",
    "visual_front_checkpoint": "train.init_visual_frontend",
    "audio_front_checkpoint": "train.init_audio_frontend",
}

log = logging.getLogger("train")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append",
                   help="YAML config (may name _base_ files); repeat to merge several, later ones win")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=5e-4")
    p.add_argument("--seed", type=int, help="random seed (config key 'seed')")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue a killed run: the newest checkpoint of train.exp_dir, or PATH")
    p.add_argument("--dataparallel", action="store_true",
                   help="seed-CLI compatibility: use every visible GPU (relaunches under torchrun)")
    p.add_argument("--gpu", help="seed-CLI compatibility: -1/cpu, a GPU index, or a comma-separated list")
    for flag, key in ALIASES.items():
        p.add_argument(f"--{flag}", help=f"alias of {key}")
    args = p.parse_intermixed_args(argv)
    # `--resume key=value` reads the override as a path: give it back to the overrides
    if args.resume not in (None, "auto") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    return args


def _overrides(args: argparse.Namespace) -> list[str]:
    """Alias flags as ``key=value`` (before the explicit overrides, which therefore win)."""
    out = [f"{key}={getattr(args, flag)}" for flag, key in ALIASES.items() if getattr(args, flag) is not None]
    if args.seed is not None:
        out.append(f"seed={args.seed}")
    if args.gpu is not None:
        gpu = args.gpu.strip()
        if gpu in ("-1", "cpu"):
            out.append("train.device=cpu")
        elif "," in gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            out.append("train.device=cuda")
        else:
            out.append(f"train.device=cuda:{int(gpu)}")
    return out + list(args.overrides)


def _relaunch_under_torchrun(argv: list[str]) -> bool:
    """For ``--dataparallel`` outside torchrun with several GPUs: run one process per GPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if "LOCAL_RANK" in os.environ or n < 2:
        if "LOCAL_RANK" not in os.environ:
            log.info("--dataparallel: %d GPU(s) visible, running in one process", n)
        return False
    from torch.distributed.run import main as torchrun

    log.info("--dataparallel: relaunching under torchrun with %d processes (DistributedDataParallel)", n)
    torchrun(["--standalone", f"--nproc_per_node={n}", str(Path(__file__).resolve()),
              *[a for a in argv if a != "--dataparallel"]])
    return True


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU, spinning
    # torch threads stalled training steps ~7x here (must be set before torch is imported).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from avsr.config import load_config
    from avsr.training.distributed import cleanup_distributed, init_distributed
    from avsr.training.loop import DataLoaderWorkerError, NonFiniteLossError, Trainer
    from avsr.utils import set_num_threads, setup_logging

    setup_logging()
    overrides = _overrides(args)
    if args.dataparallel and _relaunch_under_torchrun(argv):
        return 0
    try:
        cfg = load_config(args.config, overrides)
        env = init_distributed(cfg.train.device)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    set_num_threads()
    exp_dir = Path(cfg.train.exp_dir)
    setup_logging(logging.INFO if env.is_main else logging.WARNING,
                  log_file=exp_dir / "train.log" if env.is_main else None)
    try:
        last = Trainer(cfg, env, resume=args.resume).fit()
        if env.is_main:
            log.info("done: %s", last)
        return 0
    except (ValueError, FileNotFoundError, NonFiniteLossError, DataLoaderWorkerError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
