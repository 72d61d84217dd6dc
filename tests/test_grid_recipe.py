"""The GRID recipe's fixes: an audio-visual model initialised from an audio model starts as that
audio model (and, blended with the lip reader, as the lip reader when the audio is silent), the lip-reading model starts from the audio model's encoder and decoder, and a
corruption failure in a DataLoader worker skips the clip with one reason."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avsr.config import load_config

REPO = Path(__file__).resolve().parents[1]
GRID_AUDIO = REPO / "configs" / "grid" / "audio.yaml"
SMALL = [
    "model.audio_frontend=logmel", "model.audio_width=16", "model.frontend_dim=64", "model.d_model=64",
    "model.num_heads=2", "model.ffn_dim=128", "model.num_layers=2", "model.conv_kernel=15", "model.decoder_layers=1",
    "model.decoder_ffn_dim=128", "model.visual_width=8", "model.visual_stem_kernel_t=3", "model.relscore_layers=2",
    "text.kind=char", "data.num_workers=0", "data.val_holdout=0", "train.log_step=1",
]


def _cfg(root, exp_dir, *extra):
    return load_config(GRID_AUDIO, [f"data.root={root}", f"train.exp_dir={exp_dir}", *SMALL, *extra])


@pytest.mark.parametrize("mode", ["audiovisual", "audiovisual_relscore"])
def test_av_model_from_an_audio_model_gives_its_encoder_output_when_video_is_silent(grid_prepared, tmp_path, mode):
    """The fusion projection takes the audio model's weights for the audio columns and zeros for
    the video ones (a Linear(2C -> d) that started random in front of a pretrained Conformer was
    the bug); reliability scorers start neutral, so the encoder is the audio model's exactly."""
    from avsr.data.dataset import AVDataset, collate
    from avsr.data.manifest import read_manifest
    from avsr.data.transforms import build_transform
    from avsr.training.loop import Trainer

    audio = Trainer(_cfg(grid_prepared, tmp_path / "audio", "model.mode=audio", "train.max_steps=2",
                         "train.save_step=2", "train.eval_step=100"))
    audio_ckpt = audio.fit()
    av = Trainer(_cfg(grid_prepared, tmp_path / "av", f"model.mode={mode}", f"train.init_from={audio_ckpt}"))
    a_model, av_model = audio.model.eval(), av.model.eval()
    fusion = av_model.state_dict()["encoder.fusion.0.weight"]
    c = fusion.shape[1] // 2
    assert torch.count_nonzero(fusion[:, :c]) == 0
    scale = 1.5 if mode == "audiovisual_relscore" else 1.0  # neutral scorers give 1.5 f
    assert torch.allclose(fusion[:, c:] * scale, a_model.state_dict()["encoder.fusion.0.weight"])

    rows = read_manifest(grid_prepared, "test")
    ds = AVDataset(grid_prepared, rows, av.tokenizer.encode, build_transform(av.cfg.data, train=False))
    batch = collate([ds[i] for i in range(len(ds))])
    frontend = av_model.encoder.visual_frontend
    frontend.forward = lambda video, lengths: (torch.zeros(*video.shape[:2], c), lengths)  # a silent video stream
    with torch.no_grad():
        want, want_len = a_model.encoder(None, None, batch.audio, batch.audio_lengths)
        got, got_len = av_model.encoder(batch.video, batch.video_lengths, batch.audio, batch.audio_lengths)
    assert torch.equal(got_len, want_len)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # and the video stream is live: real video features change the output
    del frontend.forward
    with torch.no_grad():
        live, _ = av_model.encoder(batch.video, batch.video_lengths, batch.audio, batch.audio_lengths)
    assert torch.allclose(live, want, atol=1e-5)  # zero video columns: still the audio model at the start ...
    loss = av_model.train()(batch).loss
    loss.backward()
    assert float(av_model.encoder.fusion[0].weight.grad[:, :c].abs().sum()) > 0  # ... and it learns to use video


@pytest.mark.parametrize("mode", ["audiovisual", "audiovisual_relscore"])
def test_blending_in_the_lip_reader_averages_shared_parts_and_reads_video_alone_at_share_one(
        grid_prepared, tmp_path, mode):
    """``train.init_visual_share``: 0.5 averages the audio and lip-reading models' Conformer and
    decoder and puts half of each projection in its fusion columns; 1 gives the lip reader's
    encoder output when the audio stream is silent; a share without a lip reader is an error."""
    from avsr.data.dataset import AVDataset, collate
    from avsr.data.manifest import read_manifest
    from avsr.data.transforms import build_transform
    from avsr.training.loop import Trainer

    steps = ("train.max_steps=2", "train.save_step=2", "train.eval_step=100")
    audio = Trainer(_cfg(grid_prepared, tmp_path / "audio", "model.mode=audio", *steps))
    audio_ckpt = audio.fit()
    video = Trainer(_cfg(grid_prepared, tmp_path / "video", "model.mode=video", f"train.init_from={audio_ckpt}",
                         "train.lr=1e-2", *steps))
    video_ckpt = video.fit()
    a, v = audio.model.state_dict(), video.model.state_dict()
    blended = ("encoder.conformer.layers.0.ffn1.net.1.weight", "decoder.embed.weight", "ctc_head.linear.weight",
               "encoder.fusion.0.bias")
    assert not any(torch.equal(a[k], v[k]) for k in blended)  # the two models differ where they are blended

    def av(share, name):
        return Trainer(_cfg(grid_prepared, tmp_path / name, f"model.mode={mode}", f"train.init_from={audio_ckpt}",
                            f"train.init_visual_from={video_ckpt}", f"train.init_visual_share={share}")).model.eval()

    half = av(0.5, "half").state_dict()
    for name in blended:
        assert torch.allclose(half[name], (a[name] + v[name]) / 2), name
    scale = 1.5 if mode == "audiovisual_relscore" else 1.0
    fusion, c = half["encoder.fusion.0.weight"], v["encoder.fusion.0.weight"].shape[1]
    assert torch.allclose(fusion[:, :c] * scale, v["encoder.fusion.0.weight"] / 2)
    assert torch.allclose(fusion[:, c:] * scale, a["encoder.fusion.0.weight"] / 2)

    lip_reader = av(1.0, "one")
    rows = read_manifest(grid_prepared, "test")
    ds = AVDataset(grid_prepared, rows, audio.tokenizer.encode, build_transform(audio.cfg.data, train=False))
    batch = collate([ds[i] for i in range(len(ds))])
    frontend = lip_reader.encoder.audio_frontend
    frontend.forward = lambda audio, lengths: (torch.zeros(audio.shape[0], batch.video.shape[1], c),
                                               batch.video_lengths)  # a silent audio stream
    with torch.no_grad():
        want, _ = video.model.eval().encoder(batch.video, batch.video_lengths, None, None)
        got, _ = lip_reader.encoder(batch.video, batch.video_lengths, batch.audio, batch.audio_lengths)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    with pytest.raises(ValueError, match="init_visual_share needs the lip-reading model"):
        Trainer(_cfg(grid_prepared, tmp_path / "bad", f"model.mode={mode}", f"train.init_from={audio_ckpt}",
                     "train.init_visual_share=0.5"))
    with pytest.raises(ValueError, match="a lip-reading \\(video\\) init_visual_from model"):
        Trainer(_cfg(grid_prepared, tmp_path / "bad2", f"model.mode={mode}", f"train.init_from={audio_ckpt}",
                     f"train.init_visual_from={audio_ckpt}", "train.init_visual_share=0.5"))


def test_lip_reading_model_from_an_audio_model_takes_all_but_the_frontend(grid_prepared, tmp_path):
    """configs/grid/video.yaml starts from the audio model: Conformer, CTC head and decoder are
    copied, the visual frontend (which the audio model has not got) starts from scratch."""
    from avsr.training.loop import Trainer

    audio = Trainer(_cfg(grid_prepared, tmp_path / "audio", "model.mode=audio", "train.max_steps=1",
                         "train.save_step=1", "train.eval_step=100"))
    audio_ckpt = audio.fit()
    video_cfg = load_config(REPO / "configs" / "grid" / "video.yaml")
    assert video_cfg.train.init_from.endswith("grid_audio/best.pt")  # what make demo maps to its audio model
    video = Trainer(_cfg(grid_prepared, tmp_path / "video", "model.mode=video", f"train.init_from={audio_ckpt}"))
    a, v = audio.model.state_dict(), video.model.state_dict()
    for name, value in v.items():
        if name.startswith(("encoder.conformer.", "ctc_head.", "decoder.")):
            assert torch.equal(value, a[name]), name
    assert not any(k.startswith("encoder.visual_frontend.") for k in a)
    fresh = Trainer(_cfg(grid_prepared, tmp_path / "fresh", "model.mode=video")).model.state_dict()
    assert not torch.equal(fresh["ctc_head.linear.weight"], a["ctc_head.linear.weight"])  # the copy did it


def test_a_corruption_failure_in_a_worker_skips_that_clip_with_one_logged_reason(grid_prepared, capfd):
    from avsr.config import DataConfig
    from avsr.data.dataset import AVDataset
    from avsr.data.manifest import read_manifest
    from avsr.data.sampler import FrameBudgetSampler
    from avsr.data.transforms import build_transform
    from avsr.training.loop import make_loader

    rows = sorted(read_manifest(grid_prepared, "train"), key=lambda r: r.utt_id)
    bad = rows[1].utt_id

    def corrupt(frames, landmarks, rng):
        if np.array_equal(frames, bad_frames):
            raise ValueError("non-finite landmark in frame 3")
        return frames

    from avsr.data.media import load_clip

    bad_frames = load_clip(grid_prepared, rows[1])[0]
    ds = AVDataset(grid_prepared, rows, lambda t: [1 + (ord(ch) % 26) for ch in t if ch != " "],
                   build_transform(DataConfig(), train=True), visual_corrupt=corrupt)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("avsr.data.dataset").addHandler(handler)
    try:
        sampler = FrameBudgetSampler(ds.lengths, max_frames=150, num_buckets=1, shuffle=False)
        loader = make_loader(ds, sampler, num_workers=1, seed=0)
        seen = []
        for epoch in range(2):  # two epochs through the same persistent worker: still one report
            sampler.set_epoch(epoch)
            for batch in loader:
                seen += batch.utt_ids if batch is not None else []
    finally:
        logging.getLogger("avsr.data.dataset").removeHandler(handler)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "skipping bad clip" in ln]
    assert sorted(set(seen)) == sorted(r.utt_id for r in rows if r.utt_id != bad)
    assert len(lines) == 1, lines
    assert bad in lines[0] and "corrupting" in lines[0] and "non-finite landmark" in lines[0]
