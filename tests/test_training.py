"""Training: schedules, checkpoints (safe load, averaging), the loop (over-fitting real GRID clips,
non-finite guard), exact resumption after SIGKILL, and two-process DDP with torchrun."""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import one_thread

from avsr.config import load_config, to_dict
from avsr.training.averaging import average_checkpoints, average_state_dicts
from avsr.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from avsr.training.schedules import Noam, WarmupCosine

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
GRID_AUDIO = REPO / "configs" / "grid" / "audio.yaml"

# Smaller than configs/model/tiny.yaml, so that learning tests fit a few CPU seconds per step.
MICRO = [
    "model.mode=audio", "model.audio_frontend=logmel", "model.audio_width=16", "model.frontend_dim=64",
    "model.d_model=64", "model.num_heads=2", "model.ffn_dim=128", "model.num_layers=2", "model.conv_kernel=15",
    "model.decoder_layers=1", "model.decoder_ffn_dim=128", "model.mouth_opening_weight=0.0",
    "model.lip2speech_weight=0.0", "text.kind=char", "train.log_step=1",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", AVSR_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "68719476736")
    return env


# ----------------------------------------------------------------------------- schedules

def test_warmup_cosine_rises_linearly_then_decays_to_the_floor():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(9, 120))


def test_noam_peaks_at_warmup_and_decays_as_inverse_sqrt():
    f = Noam(warmup=25)
    assert f(24) == pytest.approx(1.0) and f(11) == pytest.approx(12 / 25)
    assert f(99) == pytest.approx(math.sqrt(25 / 100))
    with pytest.raises(ValueError):
        Noam(0)


# ----------------------------------------------------------------------------- checkpoints

def _toy_state(scale: float) -> dict:
    return {"w": torch.full((3, 2), scale), "b": torch.arange(3, dtype=torch.float32) * scale,
            "bn.num_batches_tracked": torch.tensor(int(10 * scale))}


def _toy_checkpoint(scale: float, step: int) -> dict:
    return {"model": _toy_state(scale), "config": to_dict(load_config()), "tokenizer": torch.zeros(4, dtype=torch.uint8),
            "step": step, "epoch": 0}


def test_checkpoint_round_trip_and_manager_keeps_last_k(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        path = m.save(_toy_checkpoint(step, step), step)
    m.mark_best(tmp_path / "step-4.pt")
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-4.pt", "step-6.pt"]
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 6
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 4
    (tmp_path / ".step-8.abc.part.pt").write_bytes(b"partial")  # what a SIGKILL mid-save leaves
    m.remove_partial()
    assert not list(tmp_path.glob(".*.part.pt"))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    save_checkpoint({**_toy_checkpoint(1, 1), "rng": [state]}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _NotData:
    """A pickled object: code, not data."""


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "pickle_object", "not_a_checkpoint", "missing"])
def test_corrupt_checkpoint_gives_a_clear_one_line_error(tmp_path, kind):
    good = tmp_path / "good.pt"
    save_checkpoint(_toy_checkpoint(1, 1), good)
    bad = tmp_path / "bad.pt"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "garbage":
        bad.write_bytes(os.urandom(5000))
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "pickle_object":
        torch.save({"model": _NotData(), "config": {}, "tokenizer": None}, bad)
    elif kind == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    msg = str(info.value)
    assert str(bad) in msg and "\n" not in msg
    exc = info.value  # no pickle/zip traceback chained onto the message
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    assert not isinstance(info.value, pickle.UnpicklingError)


def test_average_checkpoints_equals_the_hand_computed_mean(tmp_path):
    paths = []
    for i, scale in enumerate((1.0, 2.0, 4.5)):
        paths.append(save_checkpoint(_toy_checkpoint(scale, 10 * (i + 1)), tmp_path / f"step-{10 * (i + 1)}.pt"))
    avg = average_state_dicts([_toy_state(s) for s in (1.0, 2.0, 4.5)])
    assert torch.equal(avg["w"], torch.full((3, 2), 7.5 / 3))
    assert torch.allclose(avg["b"], torch.tensor([0.0, 1.0, 2.0]) * 7.5 / 3)
    assert avg["bn.num_batches_tracked"].item() == (10 + 20 + 45) // 3

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import average_checkpoints as script
    finally:
        sys.path.pop(0)
    assert script.main(["--exp-dir", str(tmp_path), "--last", "2"]) == 0
    out = load_checkpoint(tmp_path / "avg-last2.pt")
    assert torch.allclose(out["model"]["w"], torch.full((3, 2), (2.0 + 4.5) / 2))
    assert out["step"] == 30 and "optimizer" not in out
    from avsr.training.loop import Trainer

    with pytest.raises(CheckpointError, match="cannot be resumed"):
        Trainer(load_config(None, [f"train.exp_dir={tmp_path}"]), resume=str(tmp_path / "avg-last2.pt"))
    assert torch.equal(average_checkpoints(paths)["model"]["w"], avg["w"])
    with pytest.raises(ValueError, match="different parameters"):
        average_state_dicts([_toy_state(1.0), {"w": torch.zeros(3, 2)}])


# ----------------------------------------------------------------------------- CLI

def test_cli_seed_aliases_map_onto_config_keys(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.pop(0)
    args = train.parse_args(["--config", str(GRID_AUDIO), "--data", "/d", "--data_name", "LRS3", "--checkpoint_dir",
                             str(tmp_path), "--batch_size", "6", "--epochs", "3", "--eval_step", "7", "--lr", "0.01",
                             "--gpu", "-1", "--seed", "5", "train.log_step=9", "--resume", "train.lr=0.02"])
    cfg = load_config(args.config, train._overrides(args))
    assert (cfg.data.root, cfg.data.name, cfg.train.exp_dir) == ("/d", "LRS3", str(tmp_path))
    assert (cfg.data.max_clips, cfg.train.epochs, cfg.train.eval_step) == (6, 3, 7)
    assert (cfg.train.device, cfg.seed, cfg.train.log_step) == ("cpu", 5, 9)
    assert cfg.train.lr == pytest.approx(0.02)  # an explicit override wins over the alias
    assert args.resume == "auto"


# ----------------------------------------------------------------------------- the loop

def _cfg(root, exp_dir, *extra):
    return load_config(GRID_AUDIO, [f"data.root={root}", f"train.exp_dir={exp_dir}", "data.val_holdout=0", *MICRO, *extra])


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_real_grid_clips(grid_prepared, tmp_path):
    """Greedy-CTC WER on the training clips themselves falls to ~0 within a step budget."""
    from avsr.data.dataset import AVDataset, collate
    from avsr.data.manifest import read_manifest
    from avsr.data.transforms import build_transform
    from avsr.decoding.ctc import ctc_greedy_search
    from avsr.training.loop import Trainer
    from avsr.training.validate import word_errors

    cfg = _cfg(grid_prepared, tmp_path / "exp", "data.val_split=train", "data.max_frames=100000", "data.num_workers=0",
               "data.hflip_prob=0", "data.time_mask_max_frames=0", "model.dropout=0.0", "model.ctc_weight=1.0",
               "train.lr=3e-3", "train.schedule=noam", "train.warmup_steps=10", "train.max_steps=150",
               "train.epochs=1000", "train.eval_step=50", "train.save_step=1000", "train.save_epoch_end=false",
               "train.log_step=25")
    with one_thread():
        trainer = Trainer(cfg)
        last = trainer.fit()
    assert trainer.best_wer <= 0.05

    model, tokenizer, _ = load_model(last)  # an independent check of the saved model
    rows = read_manifest(grid_prepared, "train")
    ds = AVDataset(grid_prepared, rows, tokenizer.encode, build_transform(cfg.data, train=False))
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        out = model(batch)
    hyps = [tokenizer.decode(p) for p in ctc_greedy_search(out.ctc_log_probs, out.enc_lengths)]
    errors, words = word_errors(batch.transcripts, hyps)
    assert words == sum(len(r.transcript.split()) for r in rows)
    assert errors / words <= 0.05, list(zip(batch.transcripts, hyps))


def test_nonfinite_losses_skip_steps_then_stop_with_a_clear_message(grid_prepared, tmp_path):
    from avsr.training.loop import NonFiniteLossError, Trainer

    cfg = _cfg(grid_prepared, tmp_path / "exp", "data.num_workers=0", "data.max_clips=1", "train.max_nonfinite=3",
               "train.save_step=1000", "train.eval_step=1000")
    trainer = Trainer(cfg)
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    forward = trainer.model.forward

    def nan_forward(batch):
        out = forward(batch)
        out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = nan_forward
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row"):
        trainer.fit()
    assert trainer.step == 0
    assert all(torch.equal(before[k], p) for k, p in trainer.model.named_parameters())  # no update applied


def _train_cmd(root, exp_dir, *extra):
    return [PY, str(REPO / "train.py"), "--config", str(GRID_AUDIO), f"data.root={root}", f"train.exp_dir={exp_dir}",
            *MICRO, "data.max_clips=1", "data.num_workers=2", "data.val_split=none", "data.val_holdout=0", "train.epochs=2",
            "train.save_step=2", "train.eval_step=1000", "train.warmup_steps=3", *extra]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_weights_of_an_uninterrupted_run(grid_prepared, tmp_path):
    """Dropout, flips, time masks and DataLoader workers are all on: the resumed run must replay them."""
    ref = subprocess.run(_train_cmd(grid_prepared, tmp_path / "ref"), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    victim = subprocess.Popen(_train_cmd(grid_prepared, tmp_path / "run"), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "run" / "step-2.pt").exists():
        assert victim.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    resume_from = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert 0 < resume_from["sampler"]["batches_done"]  # killed mid-epoch
    ref_ckpt = load_checkpoint(tmp_path / "ref" / "last.pt")
    assert resume_from["step"] < ref_ckpt["step"]

    resumed = subprocess.run(_train_cmd(grid_prepared, tmp_path / "run") + ["--resume"], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    final = load_checkpoint(tmp_path / "run" / "last.pt")
    assert final["step"] == ref_ckpt["step"]
    for k, v in ref_ckpt["model"].items():
        assert torch.allclose(final["model"][k].float(), v.float(), rtol=1e-5, atol=1e-6), k
    assert (tmp_path / "run" / "train.log").read_text().count("resuming from") == 1


@pytest.mark.slow
def test_torchrun_two_processes_train_and_agree_on_the_weights(grid_prepared, tmp_path):
    from avsr.data.manifest import read_manifest
    from avsr.training.loop import param_digest

    torchrun = Path(PY).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2",
           *_train_cmd(grid_prepared, tmp_path / "ddp", "train.epochs=1", "data.num_workers=0")[1:]]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    digests = ckpt["trainer"]["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    model, _, _ = load_model(tmp_path / "ddp" / "last.pt")
    assert param_digest(model) == digests[0]  # the digests describe the saved weights
    # one clip per batch and each rank took half of them: one optimiser step per pair of clips
    assert ckpt["step"] == len(read_manifest(grid_prepared, "train")) // 2 > 0


def test_a_run_leaves_tensorboard_scalars_images_config_and_a_loadable_model(tiny_checkpoint):
    """The session ``tiny_checkpoint`` run (audiovisual_relscore, visual corruption, 3 steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tiny_checkpoint.parent
    events = EventAccumulator(str(exp / "tb"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/ctc", "train/att", "train/acc", "train/lr", "train/grad_norm", "train/frames_per_s",
            "val/loss", "val/wer"} <= set(tags["scalars"])
    assert {"train/mouth_crops", "train/reliability"} <= set(tags["images"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))
    saved = load_config(exp / "config.yaml")
    model, tokenizer, cfg = load_model(tiny_checkpoint)
    assert to_dict(saved) == to_dict(cfg) and cfg.model.mode == "audiovisual_relscore"
    assert not model.training and tokenizer.vocab_size == model.vocab_size
    assert set(model.aux_heads) == {"mouth", "l2s"}
    assert {"train/mouth", "train/l2s"} <= set(tags["scalars"])
    assert (exp / "best.pt").is_file() and load_checkpoint(exp / "best.pt")["step"] == 3


def test_init_from_copies_the_weights_that_fit_from_another_mode(tiny_checkpoint, grid_prepared, tmp_path):
    """``--checkpoint`` / ``train.init_from``: an audio model starts from an audio-visual one."""
    from avsr.training.loop import Trainer

    trainer = Trainer(_cfg(grid_prepared, tmp_path / "exp", f"train.init_from={tiny_checkpoint}", "data.num_workers=0"))
    source = load_checkpoint(tiny_checkpoint)["model"]
    own = trainer.model.state_dict()
    shared = [k for k in own if k in source and own[k].shape == source[k].shape]
    assert any(k.startswith("encoder.audio_frontend.") for k in shared) and any(k.startswith("decoder.") for k in shared)
    assert all(torch.equal(own[k], source[k]) for k in shared)
    assert own["encoder.fusion.0.weight"].shape != source["encoder.fusion.0.weight"].shape  # 1 stream vs 2: not copied
    assert trainer.step == 0 and not (tmp_path / "exp" / "last.pt").exists()


def test_init_visual_from_copies_only_the_visual_frontend(tiny_checkpoint, grid_prepared, tmp_path):
    """``train.init_visual_from``: an audio-visual model takes its visual frontend from a lip-reading
    (here: audio-visual) checkpoint and nothing else; a source without one is a clear error."""
    from avsr.training.loop import Trainer

    from conftest import MICRO_AVSR

    av = ("data.num_workers=0", *MICRO_AVSR, "model.mode=audiovisual", "model.mouth_opening_weight=0",
          "model.lip2speech_weight=0")
    fresh = Trainer(_cfg(grid_prepared, tmp_path / "exp", *av)).model.state_dict()
    trainer = Trainer(_cfg(grid_prepared, tmp_path / "exp2", f"train.init_visual_from={tiny_checkpoint}", *av))
    source = load_checkpoint(tiny_checkpoint)["model"]
    own = trainer.model.state_dict()
    visual = [k for k in own if k.startswith("encoder.visual_frontend.")]
    assert visual and all(torch.equal(own[k], source[k]) for k in visual)
    assert all(torch.equal(own[k], fresh[k]) for k in own if k.startswith("decoder."))  # same seed, not copied
    audio_ckpt = tmp_path / "audio"
    audio = Trainer(_cfg(grid_prepared, audio_ckpt, "data.num_workers=0", "train.max_steps=1",
                         "train.save_step=1", "train.eval_step=100")).fit()
    with pytest.raises(ValueError, match="tensors under 'encoder.visual_frontend.'"):
        Trainer(_cfg(grid_prepared, tmp_path / "exp3", f"train.init_visual_from={audio}", *av))


def test_gradient_accumulation_steps_once_per_group_and_bf16_trains_on_cpu(grid_prepared, tmp_path):
    """accum_grad=2 over 6 one-clip batches: 3 optimiser steps per epoch (the scheduler follows);
    bf16 autocast trains on the CPU with finite losses; fp16 on the CPU is a clear error."""
    from avsr.training.loop import Trainer, param_digest

    common = ("data.num_workers=0", "data.max_clips=1", "train.epochs=1", "train.eval_step=100",
              "train.save_step=100", "train.warmup_steps=1")
    trainer = Trainer(_cfg(grid_prepared, tmp_path / "accum", *common, "train.accum_grad=2"))
    assert trainer.sampler.batches_per_epoch(0) == 6 and trainer.total_steps == 3
    before = param_digest(trainer.model)
    trainer.fit()
    assert trainer.step == 3 and trainer.scheduler.last_epoch == 3 and param_digest(trainer.model) != before

    bf16 = Trainer(_cfg(grid_prepared, tmp_path / "bf16", *common, "train.precision=bf16", "train.max_steps=2"))
    assert bf16.amp_dtype == torch.bfloat16
    bf16.fit()
    assert bf16.step == 2 and bf16.nonfinite == 0
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Trainer(_cfg(grid_prepared, tmp_path / "fp16", *common, "train.precision=fp16"))


def test_average_last_writes_the_mean_of_the_newest_step_checkpoints_and_checks_its_bound(grid_prepared, tmp_path):
    """train.average_last=2 over 3 one-step epochs: average.pt holds the mean of step-2 and step-3
    (not step-1), and the training model ends with those weights; more than keep_last is an error."""
    from avsr.training.loop import Trainer

    common = ("data.num_workers=0", "data.max_clips=1", "data.max_frames=75", "train.epochs=1000", "train.max_steps=3",
              "train.eval_step=100", "train.save_step=1", "train.warmup_steps=1", "data.val_split=train")
    with one_thread():
        trainer = Trainer(_cfg(grid_prepared, tmp_path / "exp", *common, "train.keep_last=3", "train.average_last=2"))
        trainer.fit()
    exp = tmp_path / "exp"
    steps = {n: load_checkpoint(exp / f"step-{n}.pt")["model"] for n in (1, 2, 3)}
    avg = load_checkpoint(exp / "average.pt")["model"]
    name = next(k for k, v in avg.items() if v.is_floating_point() and not torch.equal(steps[2][k], steps[3][k]))
    assert torch.allclose(avg[name], (steps[2][name] + steps[3][name]) / 2, atol=1e-6)
    assert not torch.allclose(avg[name], (steps[1][name] + steps[2][name] + steps[3][name]) / 3, atol=1e-6)
    assert torch.equal(trainer.model.state_dict()[name], avg[name])
    with pytest.raises(ValueError, match="average_last .* between 0 and train.keep_last"):
        Trainer(_cfg(grid_prepared, tmp_path / "bad", *common, "train.keep_last=2", "train.average_last=3"))


def test_final_model_prefers_the_average_then_the_best_then_the_last(tmp_path):
    from avsr.training.checkpoint import final_model

    with pytest.raises(FileNotFoundError, match="no trained model"):
        final_model(tmp_path)
    for name, want in (("last.pt", "last.pt"), ("best.pt", "best.pt"), ("average.pt", "average.pt")):
        (tmp_path / name).write_bytes(b"")
        assert final_model(tmp_path) == tmp_path / want
