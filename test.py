#!/usr/bin/env python
"""Evaluate checkpoints on a test manifest under every condition of a corruption protocol.

Writes ``<out>/results.json`` (WER, CER, S/D/I, utterances, words, decode seconds and real-time
factor per system and condition), ``<out>/hypotheses/<condition>.tsv``, ``<out>/report.md`` (rows:
conditions and babble SNRs; columns: systems, i.e. model modes) and ``<out>/wer_vs_snr.png``;
formats in ``avsr.evaluation.report``.

Auxiliary heads, for a checkpoint whose model has them (``avsr.models.heads``), are scored beside
WER in an ``aux`` block of its metrics and an "Auxiliary heads" table of the report:

- mouth opening (head ``"mouth"``): Pearson r, MAE (curve units: inner-lip gap / mouth width) and
  R², pooled over all frames and as the mean over utterances, against the landmark curve on the
  frames with a detected face, in every condition (cheap: one small head on the encoder pass the
  decoding already made);
- lip-to-speech (head ``"l2s"``): STOI and ESTOI of the synthesised speech (Griffin-Lim,
  ``--griffin-lim-iters`` iterations, default 32) against the clean audio, the speaker reference
  being the clean audio's first second. Griffin-Lim and STOI cost about as much as decoding a clip,
  and the head sees only the video, so that babble conditions repeat their visual condition's
  score: it runs only in ``--aux-conditions`` (default ``clean``; ``all`` or ``none`` also work).

Models without heads give exactly the results they gave before (no ``aux`` block). Examples::

    python test.py --checkpoint checkpoints/av/best.pt --data data/grid \\
        --protocol configs/protocol/grid_s1_test.json --out results/av
    python test.py --checkpoint a.pt b.pt ... --decode.beam_size=10 --decode.method=greedy
    python test.py --merge results/audio results/av --out results/all     # one report of earlier runs

Decoding settings are each checkpoint's ``decode`` section with the overrides ``--section.key=value``,
``--section.key value`` or ``section.key=value`` (any ``avsr.config`` key, e.g. ``--decode.ctc_weight 0.3``,
``decode.lm_path=lm.pt``).
The seed's flags keep working: ``--data``, ``--data_name``, ``--checkpoint``, ``--batch_size``, ``--gpu``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (must be set before torch is imported; see train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from avsr.config import Config, ConfigError, load_config  # noqa: E402
from avsr.evaluation.report import HypothesisRow, merge_results, read_hypotheses, system_labels, write_report  # noqa: E402

log = logging.getLogger("test")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=[], help="checkpoint(s) to evaluate, one system each")
    p.add_argument("--data", help="preprocessed corpus root (holds <split>.tsv)")
    p.add_argument("--data_name", default=None,
                   help="corpus name shown in the report (default: the config's data.name, else --data's folder name)")
    p.add_argument("--split", default=None, help="manifest split to decode (default: the config's data.test_split)")
    p.add_argument("--protocol", help="corruption protocol JSON (scripts/make_test_protocol.py)")
    p.add_argument("--conditions", nargs="+", default=None, help="only these protocol conditions (default: all)")
    p.add_argument("--occluder-dir", default="", help="occluder folder the protocol was made with (default: built-in)")
    p.add_argument("--limit", type=int, default=None, help="decode only the first N utterances (by id)")
    p.add_argument("--batch_size", type=int, default=None, help="utterances per batch (decode.batch_size)")
    p.add_argument("--gpu", default=None,
                   help="CUDA device index, or -1 for the CPU (default: GPU 0 when CUDA is available)")
    p.add_argument("--aux-conditions", nargs="+", default=["clean"], metavar="CONDITION",
                   help="conditions where a lip-to-speech head's speech is synthesised (Griffin-Lim) and scored "
                        "with STOI/ESTOI: protocol condition names, 'all' or 'none' (default: clean)")
    p.add_argument("--griffin-lim-iters", type=int, default=32,
                   help="Griffin-Lim iterations per synthesised clip (default: 32)")
    p.add_argument("--merge", nargs="+", default=[], help="result folders of earlier runs to merge into this report")
    p.add_argument("--out", required=True, help="output folder, e.g. results/<exp>")
    args, rest = p.parse_known_args(argv)
    # a positional ``key.sub=value`` right after --checkpoint/--merge lands in their lists
    for name in ("checkpoint", "merge"):
        values = getattr(args, name)
        rest += [v for v in values if "=" in v]
        setattr(args, name, [v for v in values if "=" not in v])
    overrides = []
    i = 0
    while i < len(rest):
        item = rest[i]
        key = item.split("=", 1)[0].removeprefix("--")
        if "." not in key or not (item.startswith("--") or "=" in item):
            p.error(f"unrecognised argument {item!r} (config overrides look like --decode.beam_size=10)")
        if "=" in item:
            overrides.append(item.removeprefix("--"))
        elif i + 1 < len(rest):
            overrides.append(f"{item[2:]}={rest[i + 1]}")
            i += 1
        else:
            p.error(f"override {item} has no value")
        i += 1
    if args.checkpoint and not (args.data and args.protocol):
        p.error("--checkpoint needs --data and --protocol")
    if not args.checkpoint and not args.merge:
        p.error("give --checkpoint(s) to evaluate and/or --merge result folders")
    if args.griffin_lim_iters < 1:
        p.error(f"--griffin-lim-iters must be >= 1, got {args.griffin_lim_iters}")
    if len(args.aux_conditions) > 1 and {"all", "none"} & set(args.aux_conditions):
        p.error("--aux-conditions: 'all' and 'none' stand alone")
    return args, overrides


def pick_device(gpu: str | None) -> torch.device:
    """``--gpu``: None -> cuda:0 if available else CPU; "-1"/"cpu" -> CPU; "N" -> cuda:N (error without CUDA)."""
    if gpu is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if gpu in ("-1", "cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--gpu {gpu}: CUDA is not available here (use --gpu -1 for the CPU)")
    return torch.device(f"cuda:{int(gpu.split(',')[0])}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``key.sub=value`` overrides, validated as :func:`avsr.config.load_config` does."""
    checked = load_config(None, overrides)
    for item in overrides:
        *parents, leaf = item.split("=", 1)[0].split(".")
        src, dst = checked, cfg
        for name in parents:
            src, dst = getattr(src, name), getattr(dst, name)
        setattr(dst, leaf, getattr(src, leaf))
    return cfg


def speech_conditions_of(aux_conditions: list[str], protocol_conditions: list[str],
                         conditions: list[str]) -> list[str]:
    """The evaluated conditions where lip-to-speech is scored, from ``--aux-conditions``
    (names, ``all`` or ``none``); ValueError for a name the protocol does not have."""
    if aux_conditions == ["none"]:
        return []
    if aux_conditions == ["all"]:
        return list(conditions)
    unknown = [c for c in aux_conditions if c not in protocol_conditions]
    if unknown and aux_conditions != ["clean"]:  # the default is skipped quietly by a protocol without it
        raise ValueError(f"--aux-conditions: unknown condition(s) {', '.join(unknown)} "
                         f"(have: {', '.join(protocol_conditions)})")
    return [c for c in conditions if c in aux_conditions]


def evaluate(args: argparse.Namespace, overrides: list[str]) -> tuple[dict, dict[str, list[HypothesisRow]]]:
    """Decode every checkpoint; the results structure and the hypothesis rows per condition."""
    from avsr.corruption import OccluderBank, WaveBank, load_protocol
    from avsr.data.manifest import read_manifest
    from avsr.decoding import Recognizer
    from avsr.evaluation.runner import evaluate_conditions
    from avsr.training.checkpoint import load_model

    device = pick_device(args.gpu)
    protocol = load_protocol(args.protocol)
    bank = OccluderBank.from_config(args.occluder_dir)
    protocol.check_bank(bank)
    babble = WaveBank.from_manifest(args.data, protocol.babble_split)
    conditions = args.conditions or protocol.conditions
    speech_conditions = speech_conditions_of(args.aux_conditions, protocol.conditions, conditions)
    loaded = []
    for path in args.checkpoint:
        model, tokenizer, cfg = load_model(path, device)
        cfg = apply_overrides(cfg, overrides)
        if args.batch_size is not None:
            cfg.decode.batch_size = args.batch_size
        loaded.append((path, model, tokenizer, cfg))
    split = args.split or loaded[0][3].data.test_split
    rows = read_manifest(args.data, split)
    if args.limit is not None:
        rows = sorted(rows, key=lambda r: r.utt_id)[:args.limit]
    labels = system_labels([c.model.mode for *_, c in loaded], args.checkpoint)
    name = args.data_name or loaded[0][3].data.name or Path(args.data).name
    results = {"data": {"root": str(args.data), "split": split, "name": name,
                        "protocol": str(args.protocol)},
               "conditions": list(conditions), "systems": {}}
    hyps: dict[str, list[HypothesisRow]] = {c: [] for c in conditions}
    for label, (path, model, tokenizer, cfg) in zip(labels, loaded):
        log.info("evaluating %s (%s) on %d utterances x %d conditions, device %s", path, label, len(rows),
                 len(conditions), device)
        recognizer = Recognizer(model, tokenizer, cfg.decode)
        out = evaluate_conditions(recognizer, args.data, rows, protocol, conditions, bank, babble, cfg.data,
                                  label, cfg.decode.batch_size, speech_conditions, args.griffin_lim_iters)
        results["systems"][label] = {"checkpoint": str(path), "mode": cfg.model.mode, "decode": asdict(cfg.decode),
                                     "conditions": {c: r.metrics for c, r in out.items()}}
        for c, r in out.items():
            hyps[c] += r.hypotheses
    return results, hyps


def load_results(folder: str | Path) -> tuple[dict, dict[str, list[HypothesisRow]]]:
    """``results.json`` and hypothesis rows of an earlier run; ValueError naming the folder if absent."""
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"no results.json in {folder}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    hyps = {c: read_hypotheses(folder / "hypotheses" / f"{c}.tsv") for c in results["conditions"]
            if (folder / "hypotheses" / f"{c}.tsv").is_file()}
    return results, hyps


def main(argv: list[str] | None = None) -> int:
    from avsr.utils import set_num_threads, setup_logging

    args, overrides = parse_args(argv)
    setup_logging()
    set_num_threads()
    try:
        parts = [evaluate(args, overrides)] if args.checkpoint else []
        parts += [load_results(d) for d in args.merge]
        results, renames = merge_results([r for r, _ in parts])
        if len({json.dumps(r.get("data", {}).get("split")) for r, _ in parts}) > 1:
            log.warning("merging results of different splits; the report shows the first one's")
        hyps: dict[str, list[HypothesisRow]] = {}
        for (_, part_hyps), rename in zip(parts, renames):
            for cond, rows in part_hyps.items():
                hyps.setdefault(cond, []).extend(
                    HypothesisRow(r.utt_id, rename.get(r.system, r.system), r.errors, r.n_words, r.reference,
                                  r.hypothesis) for r in rows)
        report = write_report(args.out, results, hyps)
    except (ConfigError, ValueError, KeyError, OSError) as exc:
        log.error("%s", exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return 1
    log.info("wrote %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
