"""Frontends from the LRW models of Ma et al. (``avsr.models.lrw``): files shaped like the published
``lrw_resnet18_dctcn_{video,audio}.pth.tar`` (random values) fill every stem and trunk tensor, compute
what a functional re-statement of the published network computes, and misfit files are refused;
``model.frontend_activation`` and the ``train.init_*_frontend`` / train.py plumbing. (Padding
invariance with swish: ``tests/test_models.py``'s frontend tests, parametrised by activation.)"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avsr.config import ModelConfig, load_config
from avsr.models import AudioResNetFrontend, VisualFrontend, build_model
from avsr.models.lrw import init_lrw_frontends, load_lrw_frontend, read_lrw_state_dict

REPO = Path(__file__).resolve().parents[1]
W = 64  # the published ResNet-18 width
STAGES = [(1, 64, 1), (2, 128, 2), (3, 256, 2), (4, 512, 2)]  # (layer, planes, stride)


# ----------------------------------------------------------------------------- published-shaped files

def _bn(sd: dict, name: str, n: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = torch.rand(n, generator=g) + 0.5
    sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.running_mean"] = 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.running_var"] = torch.rand(n, generator=g) + 0.5
    sd[f"{name}.num_batches_tracked"] = torch.randint(1, 10**6, (), generator=g)


def _conv(shape: tuple, g: torch.Generator) -> torch.Tensor:
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5


def _published(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``model_state_dict`` with the names and shapes of the published LRW ResNet-18 dctcn model."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    k = (3, 3) if kind == "video" else (3,)
    one = (1, 1) if kind == "video" else (1,)
    if kind == "video":
        sd["frontend3D.0.weight"] = _conv((W, 1, 5, 7, 7), g)
        _bn(sd, "frontend3D.1", W, g)  # frontend3D.2 is swish: no tensors; .3 the max-pool
    else:
        sd["trunk.conv1.weight"] = _conv((W, 1, 80), g)
        _bn(sd, "trunk.bn1", W, g)
    inplanes = W
    for layer, planes, stride in STAGES:
        for b in (0, 1):
            p = f"trunk.layer{layer}.{b}"
            cin = inplanes if b == 0 else planes
            sd[f"{p}.conv1.weight"] = _conv((planes, cin) + k, g)
            _bn(sd, f"{p}.bn1", planes, g)
            sd[f"{p}.conv2.weight"] = _conv((planes, planes) + k, g)
            _bn(sd, f"{p}.bn2", planes, g)
            if b == 0 and (stride != 1 or cin != planes):
                sd[f"{p}.downsample.0.weight"] = _conv((planes, cin) + one, g)
                _bn(sd, f"{p}.downsample.1", planes, g)
        inplanes = planes
    # a few tensors of the DC-TCN back-end and the classifier: not frontend, to be ignored
    sd["tcn.tcn_trunk.features.transition0.conv.weight"] = torch.randn(512, 512, 1, generator=g)
    _bn(sd, "tcn.tcn_trunk.features.transition0.norm", 512, g)
    sd["tcn.tcn_trunk.features.transition0.prelu.weight"] = torch.rand(512, generator=g)
    sd["tcn.tcn_output.weight"] = torch.randn(500, 512 + 3 * 384, generator=g)
    sd["tcn.tcn_output.bias"] = torch.randn(500, generator=g)
    return sd


def _save(tmp_path: Path, sd: dict, name: str = "lrw.pth.tar", wrap: bool = True) -> Path:
    path = tmp_path / name
    obj = {"epoch_idx": 80, "model_state_dict": sd, "best_prec": 0.896,
           "optimizer_state_dict": {"state": {0: {"step": torch.tensor(5.0)}},
                                    "param_groups": [{"lr": 3e-4, "params": [0]}]}} if wrap else sd
    torch.save(obj, path)
    return path


def _ours(name: str, kind: str) -> str:
    """Our name of the published tensor ``name`` (stated from their side of the mapping)."""
    stem = {"frontend3D.0.": "stem_conv.", "frontend3D.1.": "stem_bn.", "trunk.conv1.": "stem.0.",
            "trunk.bn1.": "stem.1."}
    for theirs, ours in stem.items():
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    _, layer, block, rest = name.split(".", 3)
    index = 2 * (int(layer[len("layer"):]) - 1) + int(block)
    return f"{'trunk' if kind == 'video' else 'blocks'}.{index}.{rest.replace('downsample.', 'shortcut.')}"


# ----------------------------------------------------------------------------- functional references

def _ref_bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def _ref_trunk(x, sd, conv):
    for layer, _, stride in STAGES:
        for b in (0, 1):
            p = f"trunk.layer{layer}.{b}"
            s = stride if b == 0 else 1
            out = F.silu(_ref_bn(conv(x, sd[f"{p}.conv1.weight"], stride=s, padding=1), sd, f"{p}.bn1"))
            out = _ref_bn(conv(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            res = x
            if f"{p}.downsample.0.weight" in sd:
                res = _ref_bn(conv(x, sd[f"{p}.downsample.0.weight"], stride=s), sd, f"{p}.downsample.1")
            x = F.silu(out + res)
    return x


def _ref_video(video: torch.Tensor, sd: dict) -> torch.Tensor:
    """The published video frontend in eval mode: (B, T, 1, H, W) -> (B, T, 512)."""
    b, t = video.shape[:2]
    x = F.conv3d(video.transpose(1, 2), sd["frontend3D.0.weight"], stride=(1, 2, 2), padding=(2, 3, 3))
    x = F.silu(_ref_bn(x, sd, "frontend3D.1"))
    x = F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    x = x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:])
    return _ref_trunk(x, sd, F.conv2d).mean(dim=(2, 3)).view(b, t, -1)


def _ref_audio(audio: torch.Tensor, sd: dict) -> torch.Tensor:
    """The published audio frontend in eval mode: (B, S) -> (B, S // 640, 512)."""
    x = F.conv1d(audio[:, None], sd["trunk.conv1.weight"], stride=4, padding=38)
    x = F.silu(_ref_bn(x, sd, "trunk.bn1"))
    return F.avg_pool1d(_ref_trunk(x, sd, F.conv1d), 20, 20).transpose(1, 2)


# ----------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("kind", ["video", "audio"])
def test_lrw_file_fills_every_stem_and_trunk_tensor_and_computes_the_published_function(tmp_path, kind):
    sd = _published(kind)
    path = _save(tmp_path, sd)
    fe = (VisualFrontend(W, 512, activation="swish") if kind == "video"
          else AudioResNetFrontend(W, 512, activation="swish"))
    report = load_lrw_frontend(fe, path)
    own = fe.state_dict()
    frontend = {k: v for k, v in sd.items() if not k.startswith("tcn.")}
    mapped = {_ours(k, kind): k for k in frontend}
    assert set(mapped) == set(own)  # every one of our tensors has its source, and no two share one
    for ours, theirs in mapped.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    assert report.kind == kind and report.loaded == len(own) == 120
    assert report.unused == {"tcn.tcn_output": 2, "tcn.tcn_trunk": 7} and report.uncovered == []
    assert "tcn.tcn_trunk.* (7)" in str(report)
    fe.eval()
    with torch.no_grad():
        if kind == "video":
            video = torch.randn(2, 4, 1, 88, 88, generator=torch.Generator().manual_seed(1))
            got, ref = fe(video, torch.tensor([4, 4]))[0], _ref_video(video, sd)
        else:
            audio = torch.randn(2, 640 * 10, generator=torch.Generator().manual_seed(1))
            got, ref = fe(audio, torch.tensor([6400, 6400]))[0], _ref_audio(audio, sd)
    assert got.shape == ref.shape == (2, 4 if kind == "video" else 10, 512)
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


def test_raw_and_dataparallel_state_dicts_are_accepted_and_proj_is_reported(tmp_path, caplog):
    sd = _published("video")
    raw = _save(tmp_path, {f"module.{k}": v for k, v in sd.items()}, "raw.pth", wrap=False)
    assert read_lrw_state_dict(raw).keys() == sd.keys()
    fe = VisualFrontend(W, 256)  # ReLU, and a projection 512 -> 256 the file has nothing for
    before = {k: v.clone() for k, v in fe.state_dict().items() if k.startswith("proj.")}
    with caplog.at_level(logging.WARNING, logger="avsr.models.lrw"):
        report = load_lrw_frontend(fe, raw)
    assert report.loaded == 120 and report.uncovered == ["proj.weight", "proj.bias"]
    assert all(torch.equal(fe.state_dict()[k], v) for k, v in before.items())
    assert "trained with swish" in caplog.text and "model.frontend_activation=swish" in caplog.text


def test_a_file_whose_shapes_do_not_fit_is_refused_naming_the_tensor(tmp_path):
    sd = _published("video")
    sd["trunk.layer2.0.conv1.weight"] = torch.randn(32, 64, 3, 3)
    fe = VisualFrontend(W, 512, activation="swish")
    before = {k: v.clone() for k, v in fe.state_dict().items()}
    with pytest.raises(ValueError, match=r"trunk\.layer2\.0\.conv1\.weight has shape \(32, 64, 3, 3\), but our "
                                         r"trunk\.2\.conv1\.weight .* has \(128, 64, 3, 3\)"):
        load_lrw_frontend(fe, _save(tmp_path, sd))
    assert all(torch.equal(fe.state_dict()[k], v) for k, v in before.items())  # nothing copied
    with pytest.raises(ValueError, match=r"frontend3D\.0\.weight has shape \(64, 1, 5, 7, 7\).*stem_kernel_t 5"):
        load_lrw_frontend(VisualFrontend(W, 512, stem_kernel_t=3), _save(tmp_path, _published("video"), "v.pth"))
    with pytest.raises(ValueError, match=r"trunk\.conv1\.weight has shape \(64, 1, 80\).*\(16, 1, 80\)"):
        load_lrw_frontend(AudioResNetFrontend(16, 512), _save(tmp_path, _published("audio"), "a.pth"))


def test_files_of_another_kind_or_layout_are_refused(tmp_path):
    video = _save(tmp_path, _published("video"), "video.pth")
    with pytest.raises(ValueError, match=r"an LRW video model \(it has frontend3D\.0\.weight, not trunk\.conv1\.weight\)"):
        load_lrw_frontend(AudioResNetFrontend(W, 512), video)
    with pytest.raises(ValueError, match="none of its 2 tensors"):
        load_lrw_frontend(VisualFrontend(W, 512), _save(tmp_path, {"a": torch.zeros(1), "b": torch.zeros(1)}, "x.pth"))
    prelu = {**_published("video"), "frontend3D.2.weight": torch.rand(64), "trunk.layer1.0.relu1.weight": torch.rand(64)}
    with pytest.raises(ValueError, match=r"PReLU activations \(frontend3D\.2\.weight and 1 more\)"):
        load_lrw_frontend(VisualFrontend(W, 512), _save(tmp_path, prelu, "prelu.pth"))
    partial = _published("audio")
    del partial["trunk.layer4.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"1 tensor\(s\) .* missing, first trunk\.layer4\.1\.bn2\.running_var "
                                         r"\(for our blocks\.7\.bn2\.running_var\)"):
        load_lrw_frontend(AudioResNetFrontend(W, 512), _save(tmp_path, partial, "partial.pth"))
    legacy = {k: v for k, v in _published("audio").items() if not k.endswith("num_batches_tracked")}
    report = load_lrw_frontend(AudioResNetFrontend(W, 512), _save(tmp_path, legacy, "legacy.pth"))
    assert report.loaded == 100 and len(report.uncovered) == 20  # num_batches_tracked: older torch files lack it
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "note": "text"}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors"):
        load_lrw_frontend(VisualFrontend(W, 512), tmp_path / "odd.pth")
    torch.save({"epoch_idx": 3}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="not an LRW model file"):
        read_lrw_state_dict(tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="cannot be read as an LRW model file"):
        read_lrw_state_dict(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="VisualFrontend or an AudioResNetFrontend"):
        load_lrw_frontend(torch.nn.Linear(2, 2), video)


class _Payload:
    """A pickled object: code, not data."""


def test_a_file_with_pickled_objects_is_refused_unrun(tmp_path):
    torch.save({"model_state_dict": _published("video"), "extra": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused as an LRW model file: it holds pickled code or objects"):
        read_lrw_state_dict(tmp_path / "evil.pth")


# ----------------------------------------------------------------------------- activation option

def test_frontend_activation_reaches_both_resnet_frontends_and_rejects_other_values():
    cfg = load_config(None, ["model.mode=audiovisual", "model.frontend_activation=swish", "model.visual_width=8",
                             "model.audio_width=8", "model.frontend_dim=32", "model.d_model=32", "model.ffn_dim=64",
                             "model.num_layers=1", "model.decoder_layers=1", "model.decoder_ffn_dim=64"])
    enc = build_model(cfg.model, 12).encoder
    for fe in (enc.visual_frontend, enc.audio_frontend):
        acts = [m for m in fe.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.SiLU))]
        assert fe.activation == "swish" and len(acts) == 9 and all(isinstance(m, torch.nn.SiLU) for m in acts)
    relu = build_model(ModelConfig(mode="video", visual_width=8, frontend_dim=32, d_model=32, ffn_dim=64,
                                   num_layers=1, decoder_layers=1, decoder_ffn_dim=64), 12).encoder.visual_frontend
    assert relu.activation == "relu" and all(m.inplace for m in relu.modules() if isinstance(m, torch.nn.ReLU))
    with pytest.raises(ValueError, match="model.frontend_activation must be one of relu, swish, got 'gelu'"):
        build_model(ModelConfig(frontend_activation="gelu"), 12)
    with pytest.raises(ValueError, match="activation must be one of relu, swish"):
        VisualFrontend(8, 32, activation="prelu")


# ----------------------------------------------------------------------------- training plumbing

LRW_AV = ["model.mode=audiovisual", "model.audio_frontend=resnet1d", "model.frontend_activation=swish",
          "model.visual_width=64", "model.audio_width=64", "model.frontend_dim=512", "model.d_model=32",
          "model.num_heads=2", "model.ffn_dim=64", "model.num_layers=1", "model.conv_kernel=7",
          "model.decoder_layers=1", "model.decoder_ffn_dim=64", "model.mouth_opening_weight=0",
          "model.lip2speech_weight=0", "text.kind=char"]


def _train_module():
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.pop(0)
    return train


def test_train_aliases_set_the_lrw_keys():
    train = _train_module()
    args = train.parse_args(["--visual_front_checkpoint", "v.pth.tar", "--audio_front_checkpoint", "a.pth.tar"])
    cfg = load_config(None, train._overrides(args))
    assert (cfg.train.init_visual_frontend, cfg.train.init_audio_frontend) == ("v.pth.tar", "a.pth.tar")
    assert "--visual_front_checkpoint" in train.__doc__ and "--audio_front_checkpoint" in train.__doc__


def test_init_lrw_frontends_checks_the_mode_and_audio_frontend(tmp_path):
    video, audio = _save(tmp_path, _published("video"), "v.pth"), _save(tmp_path, _published("audio"), "a.pth")
    small = dict(d_model=32, num_heads=2, ffn_dim=64, num_layers=1, decoder_layers=1, decoder_ffn_dim=64,
                 frontend_activation="swish")
    audio_only = build_model(ModelConfig(mode="audio", **small), 12)
    with pytest.raises(ValueError, match="mode 'audio' has no visual frontend"):
        init_lrw_frontends(audio_only, visual_path=str(video))
    with pytest.raises(ValueError, match="mode 'video' has no audio frontend"):
        init_lrw_frontends(build_model(ModelConfig(mode="video", **small), 12), audio_path=str(audio))
    logmel = build_model(ModelConfig(mode="audio", audio_frontend="logmel", **small), 12)
    with pytest.raises(ValueError, match="needs model.audio_frontend=resnet1d"):
        init_lrw_frontends(logmel, audio_path=str(audio))
    reports = init_lrw_frontends(audio_only, audio_path=str(audio))
    assert [r.kind for r in reports] == ["audio"] and reports[0].loaded == 120


def test_trainer_starts_from_lrw_frontends_given_by_the_train_py_flags(grid_prepared, tmp_path):
    """``--visual_front_checkpoint`` / ``--audio_front_checkpoint``: a fresh audio-visual Trainer
    holds the files' frontend tensors; a mode without the frontend is a clear error."""
    from avsr.training.loop import Trainer

    video, audio = _save(tmp_path, _published("video", 1), "v.pth"), _save(tmp_path, _published("audio", 2), "a.pth")
    train = _train_module()
    base = [f"data.root={grid_prepared}", "data.val_holdout=0", "data.num_workers=0", *LRW_AV]
    args = train.parse_args(["--visual_front_checkpoint", str(video), "--audio_front_checkpoint", str(audio),
                             "--checkpoint_dir", str(tmp_path / "exp"), *base])
    own = Trainer(load_config(None, train._overrides(args))).model.state_dict()
    for path, prefix, kind in ((video, "encoder.visual_frontend.", "video"), (audio, "encoder.audio_frontend.", "audio")):
        sd = _published(kind, 1 if kind == "video" else 2)
        for theirs, v in sd.items():
            if not theirs.startswith("tcn."):
                assert torch.equal(own[prefix + _ours(theirs, kind)], v), theirs
    with pytest.raises(ValueError, match="has no visual frontend"):
        Trainer(load_config(None, [*base, "model.mode=audio", f"train.exp_dir={tmp_path / 'exp2'}",
                                   f"train.init_visual_frontend={video}"]))
    with pytest.raises(ValueError, match="both set the visual frontend"):
        Trainer(load_config(None, [*base, f"train.exp_dir={tmp_path / 'exp3'}", f"train.init_visual_frontend={video}",
                                   f"train.init_visual_from={video}"]))


def test_resume_does_not_reapply_the_lrw_frontends(grid_prepared, tmp_path):
    """Only a fresh start loads the LRW files: resuming a run keeps its own (trained) weights, even
    when the file named then is gone."""
    from conftest import one_thread

    from avsr.training.loop import Trainer

    micro = ["model.mode=audio", "model.audio_frontend=logmel", "model.audio_width=16", "model.frontend_dim=64",
             "model.d_model=64", "model.num_heads=2", "model.ffn_dim=128", "model.num_layers=1",
             "model.conv_kernel=15", "model.decoder_layers=1", "model.decoder_ffn_dim=128",
             "model.mouth_opening_weight=0", "model.lip2speech_weight=0", "text.kind=char"]
    base = [f"data.root={grid_prepared}", f"train.exp_dir={tmp_path / 'exp'}", "data.val_holdout=0",
            "data.num_workers=0", "data.max_clips=1", "train.max_steps=1", "train.save_step=1", "train.eval_step=100",
            *micro]
    with one_thread():
        Trainer(load_config(None, base)).fit()
    gone = [f"train.init_audio_frontend={tmp_path / 'gone.pth'}"]
    with pytest.raises(ValueError, match="needs model.audio_frontend=resnet1d"):
        Trainer(load_config(None, [*base, *gone]))  # a fresh start applies it (and refuses: logmel)
    trainer = Trainer(load_config(None, [*base, *gone]), resume="auto")
    assert trainer.step == 1
