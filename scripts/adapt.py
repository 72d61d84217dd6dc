#!/usr/bin/env python
"""Speaker adaptation study (``make adapt``): the s1 models of ``make demo`` on GRID s4, a speaker
none of them has seen (``grid_s4_vid2speech``: 25 adaptation clips, 25 test clips, fixed split).

For every mode (``audio``, ``video``, ``audiovisual``, ``audiovisual_relscore``):

1. ``zero_shot``: the s1 model as it is;
2. ``adapt_frozen_frontends``: fine-tuned on s4 adapt from the s1 checkpoint with its frontends
   frozen (``configs/grid/<mode>.yaml`` + ``configs/grid/adapt_frozen_frontends.yaml``);
3. ``adapt_all``: the same with every part trained (``adapt_all.yaml``);
4. ``scratch``: the same architecture trained from scratch on s4 adapt with the same steps
   (``adapt_scratch.yaml``);

each tested on s4 test, clean and babble at 0 dB (``configs/protocol/grid_s4_test.json``: babble
from the other s4 test clips). The audio → mouth-opening model (``make demo``'s aux model, retrained
here the same way, 1,000 steps on s1) gives Pearson r on s4 test zero-shot, fine-tuned on s4 adapt,
and trained on s4 adapt alone. Nothing is tuned on s4 test.

The s1 models come from ``--work`` (default ``runs/grid``, make demo's); missing ones are trained
there as make demo trains them. Every stage resumes. Writes ``<results>/report.md``, one
``test.py`` report per variant, and ``benchmarks/grid_s4_adapt.json``. ``--quick`` runs the same
path on a few clips with a few steps (results in ``results/grid_s4_adapt_quick``).

    .venv/bin/python scripts/adapt.py [--work runs/grid] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402
from demo import MODES, _git_commit, _pct, _r, _read_json, _run, _write_json, start_script  # noqa: E402

VARIANTS = {"adapt_frozen_frontends": "configs/grid/adapt_frozen_frontends.yaml",
            "adapt_all": "configs/grid/adapt_all.yaml",
            "scratch": "configs/grid/adapt_scratch.yaml"}
CONDITIONS = ("clean", "babble_snr0")
MOUTH_S1_STEPS, MOUTH_S4_STEPS, MOUTH_ADAPT_LR = 1000, 300, 1e-3
log = logging.getLogger("adapt")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--s4-dir", default="../shared/data/real/grid_s4_vid2speech",
                   help="GRID s4 folder (video/, align/, split_adapt.txt, split_test.txt)")
    p.add_argument("--grid-dir", default="../shared/data/real/grid_s1_tvr28", help="GRID s1, for missing s1 models")
    p.add_argument("--work", default=None, help="make demo's work folder (default: runs/grid[_quick])")
    p.add_argument("--results", default=None, help="report folder (default: results/grid_s4_adapt[_quick])")
    p.add_argument("--bench", default=None,
                   help="results file (default: benchmarks/grid_s4_adapt.json; with --quick: <results>/grid_s4_adapt.json)")
    p.add_argument("--quick", action="store_true", help="a few clips and steps (the path, not the numbers)")
    p.add_argument("--adapt-clips", type=int, default=3, help="--quick: s4 adaptation clips used")
    p.add_argument("--test-clips", type=int, default=7,
                   help="--quick: s4 test clips used (babble at 0 dB needs 6 others per clip)")
    p.add_argument("--steps", type=int, default=2, help="--quick: optimiser steps per model")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.work = Path(args.work or REPO / f"runs/grid{suffix}").resolve()
    args.results = Path(args.results or REPO / f"results/grid_s4_adapt{suffix}").resolve()
    args.bench = Path(args.bench or (args.results / "grid_s4_adapt.json" if args.quick
                                     else REPO / "benchmarks/grid_s4_adapt.json"))
    return args


def s1_models(args: argparse.Namespace) -> dict[str, str]:
    """make demo's s1 checkpoint of every mode, training the missing ones as make demo does."""
    demo_args = demo.parse_args(["--grid-dir", args.grid_dir, "--work", str(args.work), "--modes", *args.modes]
                                + (["--quick", "--steps", str(args.steps)] if args.quick else []))
    demo_args.unseen_dir = None  # make demo's business
    if not all((args.work / "exp" / m / "DONE.json").is_file() for m in args.modes):
        log.info("training the missing s1 models in %s as make demo does", args.work)
        demo.preprocess_stage(demo_args, args.work)
    return {m: rec["checkpoint"] for m, rec in demo.train_stage(demo_args, args.work).items()}


def preprocess_s4(args: argparse.Namespace) -> Path:
    """s4 adapt and test clips (all, or the first ``--adapt-clips``/``--test-clips`` under --quick)
    under ``<work>/s4``."""
    from avsr.config import PreprocessConfig
    from avsr.data.corpora import discover
    from avsr.data.preprocess import preprocess

    utts = discover("grid", args.s4_dir)
    if args.quick:
        utts = [u for split, n in (("adapt", args.adapt_clips), ("test", args.test_clips))
                for u in [v for v in utts if v.split == split][:n]]
    root = args.work / "s4"
    done = preprocess(utts, root, PreprocessConfig(), workers=2, progress=False)
    log.info("s4: %d clips kept, %d failed%s", done.kept + done.resumed, len(done.failures),
             "".join(f"\n  {u.utt_id}: {why}" for u, why in done.failures))
    return root


def train_variant(args: argparse.Namespace, root: Path, variant: str, mode: str, init: str) -> dict:
    """Train ``mode`` on s4 adapt with the ``variant`` overlay (resumable); checkpoint and minutes."""
    exp = args.work / "adapt" / variant / mode
    done = exp / "DONE.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    cmd = ["train.py", "--config", f"configs/grid/{mode}.yaml", "--config", VARIANTS[variant],
           f"data.root={root}", f"train.exp_dir={exp}"]
    if variant != "scratch":
        cmd.append(f"train.init_from={init}")
    if args.quick:
        cmd += [f"train.max_steps={args.steps}", f"train.save_step={args.steps}", "train.warmup_steps=1"]
    t0 = time.perf_counter()
    _run(cmd + (["--resume"] if any(exp.glob("step-*.pt")) else []))
    record = {"checkpoint": str(exp / "last.pt"), "minutes": round((time.perf_counter() - t0) / 60, 2)}
    _write_json(done, record)
    return record


def test_variant(args: argparse.Namespace, root: Path, protocol: Path, variant: str, ckpts: dict[str, str]) -> dict:
    """``test.py`` on s4 test for the checkpoints of one variant: ``{mode: {condition: WER}}``."""
    folder = args.results / variant
    done = _read_json(folder / "results.json")
    if done is None or set(done.get("systems", {})) != set(ckpts):
        _run(["test.py", "--checkpoint", *ckpts.values(), "--data", str(root), "--split", "test",
              "--protocol", str(protocol), "--conditions", *CONDITIONS, "--out", str(folder), "--gpu", "-1",
              "--data_name", f"GRID s4 test ({variant})"])
        done = _read_json(folder / "results.json")
    return {m: {c: _r(done["systems"][m]["conditions"][c]["wer"]) for c in CONDITIONS} for m in ckpts}


def mouth_stage(args: argparse.Namespace, root: Path) -> dict:
    """Mouth-opening Pearson r (pooled) on s4 test: s1 model, fine-tuned on s4 adapt, s4 adapt only."""
    cache = args.work / "adapt" / "mouth.json"
    if (cached := _read_json(cache)) is not None:
        return cached
    from avsr.lipsync.train import (MOUTH_OPENING_ARGS, LipSyncTrainConfig, evaluate_lipsync_model, load_lipsync_data,
                                    train_lipsync_model)

    steps_s1, steps_s4 = (args.steps, args.steps) if args.quick else (MOUTH_S1_STEPS, MOUTH_S4_STEPS)
    adapt, test = load_lipsync_data(root, "adapt"), load_lipsync_data(root, "test")
    s1, _ = train_lipsync_model(load_lipsync_data(args.work / "grid", "train"), MOUTH_OPENING_ARGS,
                                LipSyncTrainConfig(steps=steps_s1))
    adapted, _ = train_lipsync_model(adapt, MOUTH_OPENING_ARGS, LipSyncTrainConfig(steps=steps_s4, lr=MOUTH_ADAPT_LR), init=s1)
    scratch, _ = train_lipsync_model(adapt, MOUTH_OPENING_ARGS, LipSyncTrainConfig(steps=steps_s4))
    out = {name: _r(evaluate_lipsync_model(model, test)["curves"]["mouth_opening"]["pooled"]["pearson"])
           for name, model in (("zero_shot", s1), ("adapted", adapted), ("scratch", scratch))}
    out["steps"] = {"s1": steps_s1, "s4_adapt": steps_s4, "adapt_lr": MOUTH_ADAPT_LR}
    _write_json(cache, out)
    return out


def write_report(args: argparse.Namespace, bench: dict) -> Path:
    names = ["zero_shot", *VARIANTS]
    lines = [f"# GRID s4 adaptation{' (QUICK: a few clips and steps; the numbers mean nothing)' if args.quick else ''}",
             "", f"Commit `{bench['commit']}`; {bench['steps']} steps per adapted or scratch model; "
             f"{bench['minutes']['total_this_run']:.1f} min (this run). WER (%) on s4 test:", "",
             "| mode | condition | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for mode, rows in bench["wer"].items():
        for c in CONDITIONS:
            lines.append(f"| {mode} | {c} | " + " | ".join(_pct(rows[n][c]) for n in names) + " |")
    r = bench["mouth_opening_r"]
    lines += ["", "Mouth opening from audio, Pearson r on s4 test: zero-shot "
              f"{r['zero_shot']}, adapted {r['adapted']}, scratch {r['scratch']}.", ""]
    path = args.results / "report.md"
    from avsr.utils import atomic_write_text

    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    start_script()
    t0 = time.perf_counter()
    wer: dict = {m: {} for m in args.modes}
    minutes: dict = {}
    try:
        s1 = s1_models(args)
        root = preprocess_s4(args)
        protocol = demo.protocol_for(root, "test", REPO / "configs/protocol/grid_s4_test.json", args.work, args.quick)
        for mode, res in test_variant(args, root, protocol, "zero_shot", s1).items():
            wer[mode]["zero_shot"] = res
        for variant in VARIANTS:
            trained = {m: train_variant(args, root, variant, m, s1[m]) for m in args.modes}
            minutes[variant] = {m: rec["minutes"] for m, rec in trained.items()}
            ckpts = {m: rec["checkpoint"] for m, rec in trained.items()}
            for mode, res in test_variant(args, root, protocol, variant, ckpts).items():
                wer[mode][variant] = res
        mouth = mouth_stage(args, root)
    except (RuntimeError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    minutes["total_this_run"] = round((time.perf_counter() - t0) / 60, 2)
    from avsr.config import load_config

    steps = load_config([REPO / f"configs/grid/{args.modes[0]}.yaml", REPO / VARIANTS["adapt_all"]]).train.max_steps
    bench = {"commit": _git_commit(), "wer": wer,
             "mouth_opening_r": {k: mouth[k] for k in ("zero_shot", "adapted", "scratch")},
             "steps": args.steps if args.quick else steps, "minutes": minutes}
    _write_json(args.bench, bench)
    print((write_report(args, bench)).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
