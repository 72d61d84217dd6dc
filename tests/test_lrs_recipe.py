"""The LRS2/LRS3 recipes, end to end, as an LRS user runs them.

On LRS-shaped corpora made from real GRID clips (:mod:`lrs_corpus`: 160x160 face crops with AAC audio,
LRS ``.txt`` with and without word timings, landmarks as pickles and ``.npz``, long ``pretrain/`` clips),
this runs exactly the command block of the README's "Train and test on LRS2/LRS3" section, with two
test-only changes: every ``train.py`` line gets a last ``--config`` that shrinks the recipe to ``tiny``
size and a few steps (two curriculum stages of one epoch, then one epoch of whole clips), and the first
audio run is stopped after 2 steps (``train.max_steps=2``) so that the README's ``--resume`` line has a
run to continue. ``torchrun`` lines are left out (no GPUs here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avsr.data.dataset import AVDataset
from avsr.data.manifest import read_manifest
from avsr.data.transforms import build_transform
from avsr.config import load_config
from lrs_corpus import build_lrs2, build_lrs3

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- lrs-commands:begin -->", "<!-- lrs-commands:end -->"
STOP_AFTER = 2  # steps of the first audio run, which the README's --resume line then continues
TINY = """_base_: [{repo}/configs/model/tiny.yaml]
data: {{max_frames: 450, num_buckets: 2, num_workers: 0, curriculum: [[100, 1], [150, 1]], val_holdout: 2}}
text: {{kind: char}}
train: {{epochs: 3, warmup_steps: 2, eval_step: 1000, save_step: 1000, keep_last: 3, average_last: 2, log_step: 1}}
decode: {{beam_size: 2, batch_size: 4}}
"""


def readme_commands(kind: str) -> list[str]:
    """The README's LRS command lines for ``kind`` (``lrs3`` as written, ``lrs2`` by renaming), no comments."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(BEGIN):text.index(END)]
    lines = [ln.strip() for ln in block.split("```bash", 1)[1].split("```", 1)[0].splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    return [ln.replace("lrs3", kind).replace("LRS3", kind.upper()) for ln in lines]


def _workdir(tmp: Path) -> tuple[Path, dict]:
    """A folder where the README's relative paths (configs/, scripts/, *.py) resolve into this checkout
    and its outputs (data/, checkpoints/, results/) stay in ``tmp``; ``python`` is this interpreter."""
    work = tmp / "work"
    (work / "bin").mkdir(parents=True)
    for name in ("configs", "scripts", "preprocessing.py", "train.py", "test.py"):
        (work / name).symlink_to(REPO / name)
    python = work / "bin" / "python"  # a wrapper, not a link: a linked venv interpreter loses its venv
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    return work, env


def _run(line: str, work: Path, env: dict) -> str:
    proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{line}\nexited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.parametrize("kind", ["lrs3", "lrs2"])
def test_readme_lrs_commands_run_end_to_end(kind, grid_dir, tmp_path):
    corpus, landmarks = tmp_path / kind.upper(), tmp_path / f"{kind.upper()}_landmarks"
    counts = (build_lrs3 if kind == "lrs3" else build_lrs2)(grid_dir, corpus, landmarks)
    work, env = _workdir(tmp_path)
    env.update({kind.upper(): str(corpus), f"{kind.upper()}_LANDMARKS": str(landmarks)})
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY.format(repo=REPO))
    commands = [c for c in readme_commands(kind) if not c.startswith("torchrun")]
    assert [c.split()[1] for c in commands] == ["preprocessing.py", "scripts/make_test_protocol.py"] + \
        ["train.py"] * 5 + ["test.py"]
    logs = []
    first_audio = True
    for line in commands:
        if line.startswith("python train.py"):
            line += f" --config {tiny}"
            if first_audio:
                line, first_audio = line + f" train.max_steps={STOP_AFTER}", False
        logs.append(_run(line, work, env))

    data = work / "data" / kind
    # preprocessing: every clip kept, each split's manifest written, word timings kept where the .txt has them
    assert (data / "failures.tsv").read_text().count("\n") == 1, (data / "failures.tsv").read_text()
    for split, n in counts.items():
        assert len(read_manifest(data, split)) == n
    pretrain = read_manifest(data, "pretrain")
    assert all(r.n_frames == 225 and len(r.transcript.split()) == 18 for r in pretrain)
    with np.load(data / f"{pretrain[0].path}.npz") as z:
        assert list(z["words"]) == pretrain[0].transcript.split() and z["word_frames"].shape == (18, 2)

    # the protocol's babble comes from other test speakers only
    protocol = json.loads((data / "test_protocol.json").read_text())
    for utt_id, entry in protocol["utterances"].items():
        speaker = re.match(r"^(.+)_[0-9]+$", utt_id).group(1)
        mixed = {b["utt_id"] for cond in entry["audio"].values() for b in cond["babble"]}
        assert mixed and not any(m.startswith(speaker + "_") for m in mixed), (utt_id, mixed)

    # training: the stopped audio run resumed and went through both curriculum stages to the end
    stopped, resumed = logs[2], logs[3]
    assert f"{STOP_AFTER} steps planned" in stopped and "length curriculum: 100 x 1, 150 x 1" in stopped
    planned = int(re.search(r"(\d+) steps planned", resumed).group(1))
    assert planned > STOP_AFTER
    assert "resum" in resumed.lower()
    exp = work / "checkpoints" / f"{kind}_audio"
    steps = sorted(int(p.stem.split("-")[1]) for p in exp.glob("step-*.pt"))
    assert steps[-1] == planned and (exp / "average.pt").is_file()
    assert "4 clip(s) can be cut at word boundaries" in stopped
    for mode in ("video", "audiovisual", "audiovisual_relscore"):
        assert (work / "checkpoints" / f"{kind}_{mode}" / "average.pt").is_file()

    # test: one report, four systems, every protocol condition
    results = json.loads((work / "results" / kind / "results.json").read_text())
    report = (work / "results" / kind / "report.md").read_text()
    assert len(results["systems"]) == 4, results.keys()
    for system in results["systems"].values():
        assert set(system["conditions"]) == set(protocol["conditions"])
    assert "| occlusion | -5 |" in report and "audiovisual_relscore" in report


def test_pretrain_clips_are_cut_at_word_boundaries(grid_dir, tmp_path):
    """A curriculum stage shorter than a pretrain clip gives a run of whole words that fits, with the
    matching transcript, audio and landmarks; whole clips after the last stage."""
    corpus, landmarks = tmp_path / "LRS3", tmp_path / "LRS3_landmarks"
    build_lrs3(grid_dir, corpus, landmarks)
    work, env = _workdir(tmp_path)
    out = tmp_path / "data"
    _run(f"python preprocessing.py --layout lrs3 --input {corpus} --output {out} --landmarks-dir {landmarks} "
         "--trust-landmark-pickles --no-progress", work, env)
    rows = read_manifest(out, "pretrain")
    cfg = load_config(None, ["data.hflip_prob=0"])
    ds = AVDataset(out, rows, lambda s: [1 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ' ".index(c) for c in s],
                   build_transform(cfg.data, train=True), curriculum=[[60, 2]], max_frames=300)
    assert ds.cuttable == [True] * len(rows)
    for epoch in (0, 1):
        for i, row in enumerate(ds.rows):
            s = ds[(i, epoch)]
            words = s.transcript.split()
            full = row.transcript.split()
            assert 0 < len(s.video) <= 60 and len(s.audio) == 640 * len(s.video) and len(s.mouth_opening) == len(s.video)
            assert any(full[k:k + len(words)] == words for k in range(len(full))), (words, full)
            assert len(s.tokens) == len(s.transcript)
    whole = ds[(0, 2)]
    assert len(whole.video) == 225 and whole.transcript == ds.rows[0].transcript
