#!/usr/bin/env python
"""Reference-parity study (``make parity``): the AV-RelScore code's reliability scorer and fusion,
each against ours, on GRID s1.

Trains ``audiovisual_relscore`` exactly as ``make demo`` does (``configs/grid/audiovisual_relscore.yaml``,
from the demo's audio model and the video model's visual frontend) with one option changed at a time:

- ``reference_scorer``: ``model.relscore_variant=reference`` (Conv1d C->2C->2C->C, BatchNorm), channel fusion;
- ``time_fusion``: ``model.fusion=time`` (video then audio frames through one Conformer, first T
  outputs kept), our scorer. Its fusion starts from the audio model by a plain copy of the shared
  ``Linear(C -> d)`` (there are no per-modality columns to map), unlike channel fusion's exact start.

and tests them beside the demo's ``audiovisual`` and ``audiovisual_relscore`` checkpoints on the
committed s1 test protocol (clean, babble at 0 dB, occlusion + babble at 0 dB). Needs the demo's
work folder (``runs/grid``: preprocessed clips and checkpoints; run ``make demo`` first). Resumes
like the demo. Writes ``results/grid_parity/`` (test.py's report) and ``benchmarks/grid_parity.json``.

    .venv/bin/python scripts/parity.py [--work runs/grid]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from demo import _git_commit, _read_json, _run, _write_json, start_script  # noqa: E402

VARIANTS = {"reference_scorer": ["model.relscore_variant=reference"], "time_fusion": ["model.fusion=time"]}
CONDITIONS = ("clean", "babble_snr0", "occlusion+babble_snr0")
log = logging.getLogger("parity")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "runs/grid"), help="make demo's work folder")
    p.add_argument("--results", default=str(REPO / "results/grid_parity"))
    p.add_argument("--bench", default=str(REPO / "benchmarks/grid_parity.json"))
    args = p.parse_args(argv)
    start_script()
    from avsr.training.checkpoint import final_model

    work, results = Path(args.work).resolve(), Path(args.results).resolve()
    # the models make demo reports: each mode's DONE.json names it (the averaged model where the recipe averages)
    done = {m: work / "exp" / m / "DONE.json" for m in ("audio", "video", "audiovisual", "audiovisual_relscore")}
    missing = [str(d) for d in done.values() if not d.is_file()]
    if missing:
        log.error("run make demo first: missing %s", ", ".join(missing))
        return 2
    demo = {m: Path(json.loads(d.read_text(encoding="utf-8"))["checkpoint"]) for m, d in done.items()}
    minutes, systems = {}, [demo["audiovisual"], demo["audiovisual_relscore"]]
    for name, overrides in VARIANTS.items():
        exp = work / "exp" / f"relscore_{name}"
        ckpt = exp / f"relscore_{name}.pt"  # its stem labels the system in the report
        if not ckpt.is_file():
            t0 = time.perf_counter()
            cmd = ["train.py", "--config", "configs/grid/audiovisual_relscore.yaml", f"data.root={work / 'grid'}",
                   f"train.exp_dir={exp}", f"train.init_from={demo['audio']}",
                   f"train.init_visual_from={demo['video']}", *overrides]
            _run(cmd + (["--resume"] if any(exp.glob("step-*.pt")) else []))
            shutil.copyfile(final_model(exp), ckpt)
            minutes[name] = round((time.perf_counter() - t0) / 60, 2)
        systems.append(ckpt)
    out = results / "results.json"
    if _read_json(out) is None:
        _run(["test.py", "--checkpoint", *map(str, systems), "--data", str(work / "grid"), "--split", "test",
              "--protocol", str(REPO / "configs/protocol/grid_s1_test.json"), "--conditions", *CONDITIONS,
              "--out", str(results), "--gpu", "-1", "--data_name", "GRID s1_test"])
    tested = json.loads(out.read_text(encoding="utf-8"))["systems"]
    bench = {"commit": _git_commit(), "conditions": list(CONDITIONS), "train_minutes": minutes,
             "wer": {label: {c: round(r["conditions"][c]["wer"], 4) for c in CONDITIONS} for label, r in tested.items()}}
    _write_json(Path(args.bench), bench)
    print(json.dumps(bench["wer"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
