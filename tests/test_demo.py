"""The main job's QUICK path (``make demo QUICK=1``) on a handful of real GRID clips, so CI guards it.

The models are trained for a few steps only: this checks the plumbing and the outputs' shape
(every mode, every condition, every results-file key), never accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_demo_writes_the_report_and_results_file_and_resumes(grid_dir, lipnet_dir, tmp_path):
    demo = _demo()
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--quick", "--grid-dir", str(grid_dir), "--unseen-dir", str(lipnet_dir), "--work", str(work),
            "--results", str(results), "--train-clips", "12", "--test-clips", "7", "--steps", "2"]
    assert demo.main(argv) == 0

    bench = json.loads((results / "grid_s1.json").read_text())
    assert set(bench) == {"commit", "minutes", "wer", "wer_unseen", "mouth_opening_pearson", "lip2speech"}
    assert set(bench["minutes"]["train"]) == set(demo.MODES)
    # audio and video trained as 2-process DDP runs, the two AV modes side by side from the finished
    # lip reader, each with its own console log
    for mode in demo.MODES:
        console = (work / "exp" / mode / "console.log").read_text()
        assert "validation" in console
        assert f"device cpu, {1 if mode.startswith('audiovisual') else 2} rank(s)" in console, mode
    assert bench["minutes"]["train_wall"] < sum(bench["minutes"]["train"].values())
    assert set(bench["wer"]) == set(demo.MODES) == set(bench["wer_unseen"])
    for mode in demo.MODES:
        assert set(bench["wer"][mode]) == set(demo.WER_KEYS)
        assert set(bench["wer_unseen"][mode]) == set(demo.UNSEEN_CONDITIONS)
        assert all(v >= 0 and math.isfinite(v) for v in bench["wer"][mode].values())
    assert set(bench["mouth_opening_pearson"]) == {"s1_test", "unseen"}
    assert all(-1 <= r <= 1 for r in bench["mouth_opening_pearson"].values())
    assert 0 <= bench["lip2speech"]["stoi"] <= 1

    report = (results / "report.md").read_text()
    assert all(f"| {c} |" in report for c in demo.WER_KEYS)
    assert "QUICK" in report and "(contact_sheet.png)" in report
    assert (results / "contact_sheet.png").stat().st_size > 0
    assert (results / "s1_test" / "wer_vs_snr.png").is_file()
    tested = json.loads((results / "s1_test" / "results.json").read_text())
    assert {len(tested["systems"][m]["conditions"]) for m in demo.MODES} == {len(tested["conditions"])}
    assert all(c["n_utterances"] == 7 for c in tested["systems"]["audio"]["conditions"].values())
    # The unseen-speaker set never includes s1's bbaf2n, and the quick run leaves the committed file alone.
    assert "bbaf2n" not in (work / "unseen" / "unseen.tsv").read_text()
    assert (work / "grid_s1_test.json").is_file()

    # A rerun finds every stage done: no model is trained again.
    ckpts = {m: Path(json.loads((work / "exp" / m / "DONE.json").read_text())["checkpoint"]) for m in demo.MODES}
    stamps = {m: p.stat().st_mtime_ns for m, p in ckpts.items()}
    assert demo.main(argv) == 0
    assert {m: p.stat().st_mtime_ns for m, p in ckpts.items()} == stamps


def test_training_rounds_follow_the_models_each_mode_starts_from():
    demo = _demo()
    assert demo._train_waves(list(demo.MODES)) == [["audio"], ["video"], ["audiovisual", "audiovisual_relscore"]]
    assert demo._train_waves(["video", "audiovisual"]) == [["video"], ["audiovisual"]]
    assert demo._train_waves(["audio", "audiovisual"]) == [["audio"], ["audiovisual"]]


def test_a_failed_side_by_side_training_names_the_mode_and_its_log(tmp_path):
    demo = _demo()
    logs = {m: tmp_path / f"{m}.log" for m in ("ok", "bad")}
    cmds = {"ok": ["-c", "print('fine')"], "bad": ["-c", "import sys; print('broken clip'); sys.exit(3)"]}
    with pytest.raises(RuntimeError, match=r"bad \(exit status 3, see .*bad\.log\)") as err:
        demo._train_together(cmds, logs, threads=1)
    assert "ok (" not in str(err.value)
    assert logs["bad"].read_text().strip() == "broken clip" and logs["ok"].read_text().strip() == "fine"


def test_parity_needs_the_demo_models_and_says_which_are_missing(tmp_path, caplog, monkeypatch):
    import avsr.utils

    monkeypatch.setattr(avsr.utils, "setup_logging", lambda *a, **k: None)  # keep pytest's log capture
    spec = importlib.util.spec_from_file_location("parity", REPO / "scripts" / "parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    (tmp_path / "exp" / "audio").mkdir(parents=True)
    (tmp_path / "exp" / "audio" / "DONE.json").write_text('{"checkpoint": "x.pt"}')
    with caplog.at_level("ERROR"):
        assert parity.main(["--work", str(tmp_path), "--bench", str(tmp_path / "p.json")]) == 2
    assert "run make demo first" in caplog.text and "exp/video/DONE.json" in caplog.text
    assert "exp/audio/" not in caplog.text
    assert not (tmp_path / "p.json").exists()
