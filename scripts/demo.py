#!/usr/bin/env python
"""The main job (``make demo``): real GRID video in, four trained models and the paper's table out.

Stages (each resumable: a rerun skips what is finished and resumes a killed training run):

1. **preprocess** GRID s1 (``--grid-dir``, fixed split ``split_train.txt``/``split_test.txt``) and
   the unseen speakers of ``grid_lipnet_samples`` (``--unseen-dir``; evaluation only, never trained
   or tuned on; ``bbaf2n`` is speaker s1 and in s1's train split, so it is left out) into ``--work``
   (mediapipe landmarks, 96x96 mouth crops, 16 kHz audio, mouth-opening targets);
2. **protocol**: the committed corruption specs ``configs/protocol/grid_s1_test.json`` and
   ``grid_unseen.json`` (written by the first run; a spec that does not match the manifest is
   rebuilt under ``--work`` with a warning);
3. **train** ``audio``, ``video``, ``audiovisual`` and ``audiovisual_relscore`` with
   ``configs/grid/*.yaml`` through ``train.py`` (the lip-reading model starts from the audio
   model's encoder and decoder; the AV modes start from the audio model, take the visual frontend
   of the video model and half of its weights where the two models share parts, and train with
   corruption modelling). ``--jobs 2`` (default) keeps both cores busy: audio and video train as
   2-process DDP runs, the two AV modes side by side; each mode's console output is in
   ``<work>/exp/<mode>/console.log``;
4. **test**: ``test.py`` on the s1 test split under every protocol condition, and on the unseen
   speakers (clean and babble at 0 dB);
5. **aux**: audio → mouth-opening model (Pearson r on s1 test and unseen speakers) and lip-to-speech
   (STOI/ESTOI on s1 test), :mod:`avsr.lipsync.train` and :mod:`avsr.lip2speech`;
6. **report**: ``<results>/report.md`` (tables, targets, WER-vs-SNR plot, contact sheet of
   corrupted test crops) and the results file ``benchmarks/grid_s1.json``; the table is printed.

``--quick`` (``make demo QUICK=1``) runs the same path on a subset (``--train-clips``,
``--test-clips``) with step budgets (``--steps``) and writes to ``results/grid_quick`` (its results
file inside it, leaving ``benchmarks/grid_s1.json`` alone).

    .venv/bin/python scripts/demo.py --grid-dir ../shared/data/real/grid_s1_tvr28 [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
MODES = ("audio", "video", "audiovisual", "audiovisual_relscore")
S1_IN_LIPNET = "bbaf2n"  # GRID s1 and in s1's train split: not an unseen speaker
UNSEEN_CONDITIONS = ("clean", "babble_snr0")
WER_KEYS = ("clean", "occlusion", "noise_blur", "occlusion_noise_blur", "babble_snr-5", "babble_snr0",
            "babble_snr5", "babble_snr10", "babble_snr15", "occlusion+babble_snr0", "occlusion+babble_snr-5")
# Which earlier model each mode starts from (configs/grid/*.yaml name the same, as paths): the
# lip-reading model takes the audio model's encoder and decoder (all but the frontend); the AV modes
# take the audio model and the lip-reading model's visual frontend, and blend the two models' shared
# parts (train.init_visual_share).
INIT_FROM = {"video": {"train.init_from": "audio"},
             "audiovisual": {"train.init_from": "audio", "train.init_visual_from": "video"},
             "audiovisual_relscore": {"train.init_from": "audio", "train.init_visual_from": "video"}}
# Issue targets on s1 test (WER as a fraction); "<" compares two systems.
TARGETS = [("audio", "clean", 0.03), ("video", "clean", 0.15), ("audiovisual_relscore", "clean", 0.03),
           ("audiovisual_relscore", "babble_snr0", 0.10)]
log = logging.getLogger("demo")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid-dir", default=os.environ.get("GRID_DIR", "../shared/data/real/grid_s1_tvr28"),
                   help="GRID s1 folder (video/, align/ or transcripts.tsv, split_train.txt, split_test.txt)")
    p.add_argument("--unseen-dir", default=None,
                   help="unseen-speaker GRID clips (default: grid_lipnet_samples beside --grid-dir); "
                        "'none' skips them")
    p.add_argument("--work", default=None, help="preprocessed data and checkpoints (default: runs/grid[_quick])")
    p.add_argument("--results", default=None, help="report folder (default: results/grid[_quick])")
    p.add_argument("--bench", default=None,
                   help="results file (default: benchmarks/grid_s1.json; with --quick: <results>/grid_s1.json)")
    p.add_argument("--quick", action="store_true", help="the same path on a subset with small step budgets")
    p.add_argument("--train-clips", type=int, default=60, help="--quick: s1 train clips used")
    p.add_argument("--test-clips", type=int, default=10, help="--quick: s1 test clips used")
    p.add_argument("--steps", type=int, default=40, help="--quick: optimiser steps per mode")
    p.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    p.add_argument("--jobs", type=int, default=2,
                   help="training processes at a time, each on $AVSR_THREADS / JOBS threads: the modes of "
                        "a round (the two AV modes) train side by side, a mode alone in its round trains "
                        "as DDP over JOBS processes; 1: one mode after the other on all threads")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to train and test")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- helpers
def start_script() -> None:
    """What every study script (demo, parity, adapt) does first: idle OpenMP threads sleep (set
    before torch loads, as ``train.py`` does), the library on the path, logging, 2 CPU threads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(REPO / "src"))
    from avsr.utils import set_num_threads, setup_logging

    setup_logging()
    set_num_threads()


def _run(cmd: list[str]) -> None:
    """Run a project CLI with this interpreter from the repository root; RuntimeError if it fails."""
    log.info("$ %s", " ".join(cmd))
    rc = subprocess.call([sys.executable, *cmd], cwd=REPO)
    if rc != 0:
        raise RuntimeError(f"'{' '.join(cmd)}' failed with exit status {rc}")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_json(path: Path, data: dict) -> None:
    from avsr.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None else round(float(x), nd)


# ----------------------------------------------------------------------------- stages
def preprocess_stage(args: argparse.Namespace, work: Path) -> dict:
    """Preprocess s1 (subset under --quick) and the unseen speakers; counts and failures."""
    from avsr.config import PreprocessConfig
    from avsr.data.corpora import discover
    from avsr.data.preprocess import preprocess

    utts = discover("grid", args.grid_dir)
    if args.quick:
        by_split: dict[str, list] = {}
        for u in sorted(utts, key=lambda u: u.utt_id):
            by_split.setdefault(u.split, []).append(u)
        utts = by_split.get("train", [])[: args.train_clips] + by_split.get("test", [])[: args.test_clips]
    s1 = preprocess(utts, work / "grid", PreprocessConfig(), workers=args.workers, progress=True)
    out = {"s1": {"kept": s1.kept + s1.resumed, "failed": [f"{u.utt_id}: {why}" for u, why in s1.failures],
                  "frames_per_s": round(s1.frames / s1.seconds, 1) if s1.kept and s1.seconds > 0 else None}}
    if args.unseen_dir is not None:
        unseen = [u for u in discover("grid", args.unseen_dir, split="unseen") if u.utt_id != S1_IN_LIPNET]
        s_u = preprocess(unseen, work / "unseen", PreprocessConfig(), workers=1, progress=False)
        out["unseen"] = {"kept": s_u.kept + s_u.resumed, "excluded": [S1_IN_LIPNET],
                         "failed": [f"{u.utt_id}: {why}" for u, why in s_u.failures],
                         "frames_per_s": round(s_u.frames / s_u.seconds, 1) if s_u.kept and s_u.seconds > 0 else None}
    for name, part in out.items():
        rate = f", {part['frames_per_s']:.0f} frames/s" if part.get("frames_per_s") else " (cached)"
        log.info("preprocessed %s: %d clips kept, %d failed%s%s", name, part["kept"], len(part["failed"]), rate,
                 "".join(f"\n  {f}" for f in part["failed"]))
    return out


def protocol_for(root: Path, split: str, committed: Path, work: Path, quick: bool) -> Path:
    """The committed protocol when it matches ``<root>/<split>.tsv`` (same utterances and lengths,
    babble material present), else one written under ``work``; a full run writes the committed
    file when it does not exist yet. ``--quick`` always uses its own (its babble is the subset's)."""
    from avsr.data.manifest import read_manifest

    have = {r.utt_id: (r.n_frames, r.n_samples) for r in read_manifest(root, split)}
    if committed.is_file() and not quick:
        spec = json.loads(committed.read_text(encoding="utf-8"))
        utts = spec.get("utterances", {})
        if spec.get("babble", {}).get("split") == split and \
                {u: (e["n_frames"], e["n_samples"]) for u, e in utts.items()} == have:
            return committed
        log.warning("%s does not match %s/%s.tsv (other clips or lengths): writing a protocol under %s",
                    committed, root, split, work)
    target = committed if not quick and not committed.is_file() else work / committed.name
    if not target.is_file():
        _run(["scripts/make_test_protocol.py", "--data", str(root), "--split", split, "--seed", "0",
              "--out", str(target)])
    return target


def _train_waves(modes: list[str]) -> list[list[str]]:
    """``modes`` in rounds: each mode trains in the round after the latest of the models it starts
    from (``INIT_FROM``), so the modes of one round can train at the same time:
    ``[[audio], [video], [audiovisual, audiovisual_relscore]]``."""
    depth: dict[str, int] = {}
    for mode in modes:  # MODES order: a mode's starting models come before it
        parents = [depth[p] for p in INIT_FROM.get(mode, {}).values() if p in depth]
        depth[mode] = 1 + max(parents) if parents else 0
    return [[m for m in modes if depth[m] == d] for d in range(max(depth.values(), default=-1) + 1)]


def _train_together(cmds: dict[str, list[str]], logs: dict[str, Path], threads: int) -> dict[str, float]:
    """Run the commands (``python`` arguments) of one round at the same time, each process on
    ``threads`` CPU threads with its console output in ``logs[mode]``; minutes of each. Measured on
    2 cores: two 1-thread AV runs side by side take 2.1 s per step each against 1.3-1.5 s for one
    2-thread run (the round ~1.4x sooner), and a 2-process DDP run of 1 thread each trains the
    lip reader ~1.5x and the audio model ~1.2x faster than one 2-thread process. RuntimeError
    naming the failed modes."""
    env = {**os.environ, "AVSR_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    procs, t0, minutes = {}, time.perf_counter(), {}
    for mode, cmd in cmds.items():
        log.info("$ %s  (%d thread(s), console output in %s)", " ".join(cmd), threads, logs[mode])
        with open(logs[mode], "ab") as out:
            procs[mode] = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                           env=env)
    while len(minutes) < len(procs):
        for mode, proc in procs.items():
            if mode not in minutes and proc.poll() is not None:
                minutes[mode] = (time.perf_counter() - t0) / 60
                log.info("%s: training finished (exit status %d) after %.1f min", mode, proc.returncode, minutes[mode])
        time.sleep(1.0)
    failed = [f"{m} (exit status {p.returncode}, see {logs[m]})" for m, p in procs.items() if p.returncode != 0]
    if failed:
        raise RuntimeError("training failed: " + ", ".join(failed))
    return minutes


def train_stage(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Train every mode (resuming a killed run); per mode its checkpoint (the averaged model where the
    recipe averages, ``train.average_last``, else the best on validation) and minutes. With ``--jobs``
    above 1 the modes of a round (``_train_waves``) train side by side and a mode alone in its round
    trains as DDP (:func:`_parallel_command`), sharing the CPU threads."""
    from avsr.training.checkpoint import final_model

    out: dict[str, dict] = {}
    for wave in _train_waves(list(args.modes)):
        todo = []
        for mode in wave:
            done = work / "exp" / mode / "DONE.json"
            if done.is_file():
                out[mode] = json.loads(done.read_text(encoding="utf-8"))
                log.info("%s: already trained (%s)", mode, out[mode]["checkpoint"])
            else:
                todo.append(mode)
        jobs = max(1, args.jobs)
        for group in (todo[i:i + jobs] for i in range(0, len(todo), jobs)):
            if jobs == 1:  # one after the other on all threads, output on the console
                t0 = time.perf_counter()
                _run(_train_command(args, work, group[0], out))
                took = {group[0]: (time.perf_counter() - t0) / 60}
            else:
                took = _train_together({m: _parallel_command(args, work, m, out, jobs // len(group)) for m in group},
                                       {m: work / "exp" / m / "console.log" for m in group},
                                       max(1, int(os.environ.get("AVSR_THREADS", "2")) // jobs))
            for mode in group:
                exp = work / "exp" / mode
                # minutes of this run's part only, after a resume
                record = {"checkpoint": str(final_model(exp)), "minutes": round(took[mode], 2)}
                _write_json(exp / "DONE.json", record)
                out[mode] = record
    return out


def _parallel_command(args: argparse.Namespace, work: Path, mode: str, trained: dict[str, dict],
                      ranks: int) -> list[str]:
    """``mode``'s command line for one of ``--jobs`` processes: with ``ranks > 1`` a DDP run over
    ``ranks`` processes (``torch.distributed.run``, gloo on CPU) with ``data.max_frames / ranks``
    per rank, so the global batch and the step count stay the recipe's; one DataLoader worker each."""
    from avsr.config import load_config

    extra = ["data.num_workers=1"]
    if ranks == 1:
        return _train_command(args, work, mode, trained, extra)
    max_frames = load_config(REPO / "configs" / "grid" / f"{mode}.yaml").data.max_frames
    cmd = _train_command(args, work, mode, trained, [*extra, f"data.max_frames={max_frames // ranks}"])
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cmd]


def _train_command(args: argparse.Namespace, work: Path, mode: str, trained: dict[str, dict],
                   extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The ``train.py`` command line of ``mode``, starting from the ``trained`` models it names, with
    the ``extra`` overrides (``--resume`` when a killed run left checkpoints)."""
    exp = work / "exp" / mode
    overrides = [f"data.root={work / 'grid'}", f"train.exp_dir={exp}"]
    for key, part in INIT_FROM.get(mode, {}).items():
        if part in trained:
            overrides.append(f"{key}={trained[part]['checkpoint']}")
        else:
            overrides.append(f"{key}=''")  # that model is not part of this run: start from scratch
            if mode.startswith("audiovisual"):
                overrides.append("train.init_visual_share=0")  # nothing to blend
    if args.quick:
        overrides += [f"train.max_steps={args.steps}", f"train.eval_step={max(args.steps // 2, 1)}",
                      f"train.save_step={max(args.steps // 2, 1)}", f"train.warmup_steps={max(args.steps // 4, 1)}",
                      "data.val_holdout=4"]
    exp.mkdir(parents=True, exist_ok=True)
    return ["train.py", "--config", f"configs/grid/{mode}.yaml", *overrides, *extra,
            *(["--resume"] if any(exp.glob("step-*.pt")) else [])]


def test_stage(args: argparse.Namespace, work: Path, results: Path, trained: dict[str, dict],
               protocols: dict[str, Path]) -> dict[str, dict]:
    """``test.py`` on s1 test (all conditions) and the unseen speakers; their results.json."""
    ckpts = [trained[m]["checkpoint"] for m in args.modes]
    runs = {"s1_test": (work / "grid", "test", None)}
    if "unseen" in protocols:
        runs["unseen"] = (work / "unseen", "unseen", UNSEEN_CONDITIONS)
    out = {}
    for name, (root, split, conditions) in runs.items():
        folder = results / name
        done = _read_json(folder / "results.json")
        if done is None or set(done.get("systems", {})) != set(args.modes):
            cmd = ["test.py", "--checkpoint", *ckpts, "--data", str(root), "--split", split,
                   "--protocol", str(protocols[name]), "--out", str(folder), "--gpu", "-1",
                   "--data_name", f"GRID {name}"]
            if conditions:
                cmd += ["--conditions", *conditions]
            _run(cmd)
            done = _read_json(folder / "results.json")
        out[name] = done
    return out


def aux_stage(args: argparse.Namespace, work: Path) -> dict:
    """Audio → mouth opening (Pearson r) and lip-to-speech (STOI/ESTOI); cached in ``work``."""
    cache = work / "aux.json"
    if (cached := _read_json(cache)) is not None:
        return cached
    from avsr.lip2speech import train_eval_lip2speech
    from avsr.lipsync.train import (MOUTH_OPENING_ARGS, LipSyncTrainConfig, evaluate_lipsync_model, load_lipsync_data,
                                    train_lipsync_model)

    t0 = time.perf_counter()
    steps = 60 if args.quick else 1000
    model, _ = train_lipsync_model(load_lipsync_data(work / "grid", "train"), MOUTH_OPENING_ARGS, LipSyncTrainConfig(steps=steps))
    evals = {"s1_test": (work / "grid", "test")}
    if (work / "unseen" / "unseen.tsv").is_file():
        evals["unseen"] = (work / "unseen", "unseen")
    mouth = {}
    for name, (root, split) in evals.items():
        m = evaluate_lipsync_model(model, load_lipsync_data(root, split))["curves"]["mouth_opening"]
        mouth[name] = {"pooled": {k: _r(v) for k, v in m["pooled"].items()},
                       "utterance_mean": {k: _r(v) for k, v in m["utterance_mean"].items()},
                       "n_utterances": m["n_utterances"]}
    l2s = train_eval_lip2speech(work / "grid", 20 if args.quick else 250, griffin_lim_iters=8 if args.quick else 32)
    out = {"mouth_opening": {"model_args": MOUTH_OPENING_ARGS, "steps": steps, **mouth},
           "lip2speech": l2s, "minutes": round((time.perf_counter() - t0) / 60, 2)}
    _write_json(cache, out)
    return out


def contact_sheet(work: Path, results: Path, protocol: Path) -> Optional[Path]:
    """A contact sheet of the first s1 test clip under the visual conditions of ``protocol``."""
    png = results / "contact_sheet.png"
    try:
        _run(["scripts/show_corruption.py", "--data", str(work / "grid"), "--split", "test",
              "--protocol", str(protocol), "--png", str(png)])
    except RuntimeError as exc:
        log.warning("no contact sheet: %s", exc)
        return None
    return png


# ----------------------------------------------------------------------------- report
def results_file(commit: str, minutes: dict, tested: dict[str, dict], aux: dict, modes: list[str]) -> dict:
    """The ``benchmarks/grid_s1.json`` structure (WER as fractions)."""
    def wers(res: Optional[dict], keys) -> dict:
        if res is None:
            return {}
        out = {}
        for mode in modes:
            conds = res["systems"].get(mode, {}).get("conditions", {})
            out[mode] = {k: _r(conds[k]["wer"]) for k in keys if k in conds}
        return out

    mouth = aux["mouth_opening"]
    return {
        "commit": commit, "minutes": minutes,
        "wer": wers(tested.get("s1_test"), WER_KEYS),
        "wer_unseen": wers(tested.get("unseen"), UNSEEN_CONDITIONS),
        "mouth_opening_pearson": {k: mouth[k]["pooled"]["pearson"] for k in ("s1_test", "unseen") if k in mouth},
        "lip2speech": {k: aux["lip2speech"]["test"][k] for k in ("stoi", "estoi")},
    }


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def wer_table(wer: dict[str, dict], keys) -> list[str]:
    modes = list(wer)
    lines = ["| condition | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    for k in keys:
        if any(k in wer[m] for m in modes):
            lines.append(f"| {k} | " + " | ".join(_pct(wer[m].get(k)) for m in modes) + " |")
    return lines


def target_lines(bench: dict) -> list[str]:
    wer = bench["wer"]
    rows = []
    for mode, cond, limit in TARGETS:
        got = wer.get(mode, {}).get(cond)
        rows.append((f"{mode} {cond} ≤ {100 * limit:.0f}%", _pct(got), got is not None and got <= limit))
    a, av, rel = (wer.get(m, {}).get("occlusion+babble_snr0") for m in ("audio", "audiovisual", "audiovisual_relscore"))
    if None not in (a, av, rel):
        rows.append(("occlusion+babble 0 dB: relscore < audiovisual", f"{_pct(rel)} vs {_pct(av)}", rel < av))
        rows.append(("occlusion+babble 0 dB: both AV < audio", f"{_pct(av)}, {_pct(rel)} vs {_pct(a)}",
                     av < a and rel < a))
    for name, limit in (("s1_test", 0.85), ("unseen", 0.65)):
        got = bench["mouth_opening_pearson"].get(name)
        rows.append((f"audio→mouth-opening Pearson r ({name}) ≥ {limit}", "—" if got is None else f"{got:.3f}",
                     got is not None and got >= limit))
    out = ["| target | measured | met |", "|---|---|---|"]
    out += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in rows]
    return out


def write_report(results: Path, bench: dict, aux: dict, prep: dict, sheet: Optional[Path], quick: bool) -> Path:
    from avsr.utils import atomic_write_text

    mouth = aux["mouth_opening"]
    l2s = aux["lip2speech"]
    lines = [f"# GRID benchmark{' (QUICK subset: not comparable)' if quick else ''}", "",
             f"Commit `{bench['commit'][:12]}`. Minutes on this machine: "
             + ", ".join(f"{k} {v:.1f}" for k, v in bench["minutes"].items() if not isinstance(v, dict))
             + " (training per mode: " + ", ".join(f"{m} {v:.1f}" for m, v in bench["minutes"]["train"].items())
             + ").", "",
             f"Data: {prep['s1']['kept']} GRID s1 clips preprocessed "
             f"({len(prep['s1']['failed'])} skipped: {'; '.join(prep['s1']['failed']) or 'none'}). "
             "s1 test = 50 clips / 300 words (one word = 0.33% WER); unseen speakers = 10 clips / 60 words "
             "(one word = 1.7%): differences of a point or two are noise.", "",
             "## WER (%) on GRID s1 test, by corruption condition (protocol `configs/protocol/grid_s1_test.json`)", "",
             *wer_table(bench["wer"], WER_KEYS), "",
             "![WER vs SNR](s1_test/wer_vs_snr.png)", ""]
    if bench["wer_unseen"]:
        lines += ["## WER (%) on unseen speakers (`grid_lipnet_samples`, evaluation only)", "",
                  *wer_table(bench["wer_unseen"], UNSEEN_CONDITIONS), ""]
    lines += ["## Auxiliary tasks", "",
              "| task | set | pooled | per-utterance mean |", "|---|---|---:|---:|"]
    for name in ("s1_test", "unseen"):
        if name in mouth:
            lines.append(f"| audio→mouth-opening Pearson r | {name} | {mouth[name]['pooled']['pearson']:.3f} | "
                         f"{mouth[name]['utterance_mean']['pearson']:.3f} |")
    lines += [f"| lip-to-speech STOI / ESTOI | s1_test | {l2s['test']['stoi']:.3f} / {l2s['test']['estoi']:.3f} | |",
              f"| Griffin-Lim of the real mel (ceiling) | s1_test | {l2s['griffin_lim_of_real_mel']['stoi']:.3f} / "
              f"{l2s['griffin_lim_of_real_mel']['estoi']:.3f} | |", "",
              f"Lip-to-speech: {l2s['visual_features']}; {l2s['loss']}.", "",
              "## Targets (issue: GRID benchmark)", "", *target_lines(bench), ""]
    if sheet is not None:
        lines += ["## What the model sees", "", f"![contact sheet]({sheet.name})", ""]
    lines += ["Per-condition details (CER, S/D/I, decode time, real-time factor) and hypotheses: "
              "`s1_test/` and `unseen/`."]
    path = results / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    start_script()
    suffix = "_quick" if args.quick else ""
    work = Path(args.work or REPO / f"runs/grid{suffix}").resolve()
    results = Path(args.results or REPO / f"results/grid{suffix}").resolve()
    bench_path = Path(args.bench) if args.bench else (results / "grid_s1.json" if args.quick
                                                      else REPO / "benchmarks" / "grid_s1.json")
    if args.unseen_dir is None:
        args.unseen_dir = str(Path(args.grid_dir).parent / "grid_lipnet_samples")
    if args.unseen_dir == "none" or not Path(args.unseen_dir).is_dir():
        if args.unseen_dir != "none":
            log.warning("no unseen-speaker clips at %s: skipping that evaluation", args.unseen_dir)
        args.unseen_dir = None
    if not Path(args.grid_dir).is_dir():
        log.error("GRID s1 not found at %s: download GRID (https://zenodo.org/records/3625687) and set GRID_DIR "
                  "(see README, 'The GRID benchmark')", args.grid_dir)
        return 2
    minutes: dict = {}
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        prep = preprocess_stage(args, work)
        minutes["preprocess"] = round((time.perf_counter() - t0) / 60, 2)
        protocols = {"s1_test": protocol_for(work / "grid", "test", REPO / "configs/protocol/grid_s1_test.json",
                                             work, args.quick)}
        if args.unseen_dir is not None:
            protocols["unseen"] = protocol_for(work / "unseen", "unseen", REPO / "configs/protocol/grid_unseen.json",
                                               work, args.quick)
        t0 = time.perf_counter()
        trained = train_stage(args, work)
        minutes["train"] = {m: trained[m]["minutes"] for m in args.modes}  # each mode's own wall time
        minutes["train_wall"] = round((time.perf_counter() - t0) / 60, 2)  # the stage's: modes may train side by side
        t0 = time.perf_counter()
        tested = test_stage(args, work, results, trained, protocols)
        minutes["test"] = round((time.perf_counter() - t0) / 60, 2)
        aux = aux_stage(args, work)
        minutes["aux"] = aux["minutes"]
    except (RuntimeError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    sheet = contact_sheet(work, results, protocols["s1_test"])
    minutes["total_this_run"] = round((time.perf_counter() - t_all) / 60, 2)
    bench = results_file(_git_commit(), minutes, tested, aux, args.modes)
    _write_json(bench_path, bench)
    report = write_report(results, bench, aux, prep, sheet, args.quick)
    print("\n".join(["", "WER (%) on GRID s1 test", *wer_table(bench["wer"], WER_KEYS), "",
                     *target_lines(bench), ""]))
    log.info("wrote %s and %s", report, bench_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
