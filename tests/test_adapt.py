"""Fine-tuning a trained model (``train.init_from`` + ``train.freeze``) and the speaker-adaptation
study (``make adapt``) on real GRID s4 clips. Plumbing and invariants, never accuracy."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import MICRO_AVSR, one_thread

REPO = Path(__file__).resolve().parents[1]
FRONTENDS = ("encoder.visual_frontend.", "encoder.audio_frontend.")


def _fine_tune(root: Path, init: Path, exp: Path, *overrides: str) -> dict:
    from avsr.config import load_config
    from avsr.training.checkpoint import load_checkpoint
    from avsr.training.loop import Trainer

    cfg = load_config(None, [f"data.root={root}", f"train.exp_dir={exp}", *MICRO_AVSR, "data.num_workers=0",
                             "data.max_frames=150", "data.num_buckets=1", "train.max_steps=2", "train.epochs=10",
                             "train.warmup_steps=1", "train.lr=1e-3", "train.save_step=2", "train.eval_step=100",
                             f"train.init_from={init}", *overrides])
    with one_thread():
        return load_checkpoint(Trainer(cfg).fit())


def test_frozen_frontends_stay_as_they_were_while_the_rest_trains(grid_prepared, tiny_checkpoint, tmp_path):
    from avsr.training.checkpoint import load_checkpoint

    before = load_checkpoint(tiny_checkpoint)["model"]
    after = _fine_tune(grid_prepared, tiny_checkpoint, tmp_path / "exp", "train.freeze=[frontends]")["model"]
    frozen = [k for k in before if k.startswith(FRONTENDS)]
    assert len(frozen) > 20 and any("running_mean" in k for k in frozen)  # parameters and BatchNorm statistics
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    rest = [k for k, v in before.items() if not k.startswith(FRONTENDS) and v.is_floating_point()
            and "running" not in k and k.startswith(("encoder.conformer", "decoder", "ctc"))]
    changed = [k for k in rest if not torch.equal(before[k], after[k])]
    assert len(rest) > 20 and len(changed) == len(rest), sorted(set(rest) - set(changed))[:5]


def test_freeze_names_what_it_freezes_and_refuses_a_part_the_model_lacks():
    from avsr.config import load_config
    from avsr.models import build_model
    from avsr.training.loop import freeze_parts

    video = build_model(load_config(None, [*MICRO_AVSR, "model.mode=video"]).model, 30)
    assert freeze_parts(video, ["frontends"]) == ["encoder.visual_frontend"]
    assert not any(p.requires_grad for p in video.encoder.visual_frontend.parameters())
    assert all(p.requires_grad for p in video.decoder.parameters())
    video.train()
    video.encoder.visual_frontend.train()  # a parent's .train() ...
    with torch.no_grad():
        video.encoder.visual_frontend(torch.zeros(1, 4, 1, 88, 88), torch.tensor([4]))
    assert not video.encoder.visual_frontend.training  # ... is undone on its next forward: BatchNorm stays fixed
    with pytest.raises(ValueError, match="no part 'encoder.audio_frontend'.*frontends"):
        freeze_parts(video, ["encoder.audio_frontend"])


@pytest.fixture(scope="module")
def s4_three(s4_dir, tmp_path_factory) -> Path:
    """Three s4 adaptation clips, preprocessed."""
    from avsr.config import PreprocessConfig
    from avsr.data.corpora import discover
    from avsr.data.preprocess import preprocess

    utts = [u for u in discover("grid", s4_dir) if u.split == "adapt"][:3]
    root = tmp_path_factory.mktemp("s4_three")
    assert preprocess(utts, root, PreprocessConfig(), workers=1, progress=False).kept == 3
    return root


def test_fine_tuning_on_another_speaker_keeps_the_tokenizer_it_starts_from(s4_three, tiny_checkpoint, tmp_path):
    from avsr.data.manifest import read_manifest
    from avsr.text import build_tokenizer
    from avsr.config import TextConfig
    from avsr.training.checkpoint import load_checkpoint, tokenizer_from_state

    s1_tok = tokenizer_from_state(load_checkpoint(tiny_checkpoint))
    own = build_tokenizer(TextConfig(kind="char"), [r.transcript for r in read_manifest(s4_three, "adapt")])
    assert own.vocab_size != s1_tok.vocab_size  # three clips lack some of s1's characters: ids would shift
    state = _fine_tune(s4_three, tiny_checkpoint, tmp_path / "exp", "data.train_split=adapt")
    assert tokenizer_from_state(state).to_bytes() == s1_tok.to_bytes()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_adaptation_study_writes_every_variant_and_the_results_file(grid_dir, s4_dir, tmp_path):
    adapt = _script("adapt")
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--quick", "--grid-dir", str(grid_dir), "--s4-dir", str(s4_dir), "--work", str(work),
            "--results", str(results), "--adapt-clips", "3", "--test-clips", "7", "--steps", "2", "--modes", "audio", "video"]
    assert adapt.main(argv) == 0  # trains the missing s1 models first, as make demo does

    bench = json.loads((results / "grid_s4_adapt.json").read_text())
    assert set(bench) == {"commit", "wer", "mouth_opening_r", "steps", "minutes"}
    assert set(bench["wer"]) == {"audio", "video"}
    for rows in bench["wer"].values():
        assert set(rows) == {"zero_shot", "adapt_frozen_frontends", "adapt_all", "scratch"}
        assert all(set(r) == {"clean", "babble_snr0"} and all(math.isfinite(v) for v in r.values())
                   for r in rows.values())
    assert set(bench["mouth_opening_r"]) == {"zero_shot", "adapted", "scratch"}
    assert all(-1 <= r <= 1 for r in bench["mouth_opening_r"].values())
    assert "| video | babble_snr0 |" in (results / "report.md").read_text()
    # the frozen-frontend variant starts from the s1 model and leaves its frontend as it was
    from avsr.training.checkpoint import load_checkpoint

    s1 = load_checkpoint(json.loads((work / "exp" / "video" / "DONE.json").read_text())["checkpoint"])["model"]
    tuned = load_checkpoint(work / "adapt" / "adapt_frozen_frontends" / "video" / "last.pt")["model"]
    front = [k for k in s1 if k.startswith(FRONTENDS)]
    assert front and all(torch.equal(s1[k], tuned[k]) for k in front)
    assert not torch.equal(s1["decoder.embed.weight"], tuned["decoder.embed.weight"])
