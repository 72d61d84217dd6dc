"""Export of the frontends and the encoder (TorchScript, ONNX via onnxruntime) against eager mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avsr.config import Config, ModelConfig, to_dict
from avsr.export import ExportablePart, ExportError, check_export, example_inputs, export_part
from avsr.models import build_model, load_encoder
from avsr.text import CharTokenizer
from avsr.training.checkpoint import tokenizer_to_tensor

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

TINY = dict(visual_width=4, frontend_dim=16, audio_width=4, d_model=16, num_heads=2, ffn_dim=32, num_layers=2,
            conv_kernel=7, decoder_layers=1, decoder_ffn_dim=32, dropout=0.0)


def _checkpoint(path, mode: str, audio_frontend: str = "resnet1d") -> str:
    torch.manual_seed(0)
    tok = CharTokenizer.train(["BIN BLUE AT F TWO NOW"])
    cfg = Config(model=ModelConfig(mode=mode, audio_frontend=audio_frontend, **TINY))
    model = build_model(cfg.model, tok.vocab_size)
    # non-trivial batch-norm statistics, so that eval-mode normalisation is exercised
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "tokenizer": tokenizer_to_tensor(tok)}, path)
    return str(path)


@pytest.fixture(scope="module")
def av_checkpoint(tmp_path_factory) -> str:
    """Every branch of the full model; the log-mel audio frontend (as the suite's tiny checkpoint)."""
    return _checkpoint(tmp_path_factory.mktemp("export") / "av.pt", "audiovisual_relscore", "logmel")


@pytest.mark.parametrize("part,fmt", [("encoder", "torchscript"), ("encoder", "onnx"), ("visual_frontend", "onnx"),
                                      ("audio_frontend", "torchscript"), ("audio_frontend", "onnx")])
def test_exported_part_matches_eager(av_checkpoint, tmp_path, part, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package (see requirements.txt)")
        pytest.importorskip("onnxruntime", reason="ONNX checks need 'onnxruntime' (see requirements.txt)")
    out = tmp_path / f"{part}.{'onnx' if fmt == 'onnx' else 'pt'}"
    report = export_part(av_checkpoint, part, fmt, out, atol=1e-4)
    assert out.is_file() and report.path == out
    assert report.max_abs_diff <= 1e-4
    expected_inputs = {"encoder": ("video", "video_lengths", "audio", "audio_lengths"),
                       "visual_frontend": ("video", "video_lengths"), "audio_frontend": ("audio", "audio_lengths")}
    assert report.inputs == expected_inputs[part]

    # independent check on a batch of another size and padding than the trace and the built-in check
    wrapper = ExportablePart(load_encoder(av_checkpoint, part), part)
    inputs = example_inputs(wrapper.input_names, [7, 16], seed=5)
    with torch.no_grad():
        ref, ref_len = wrapper(*inputs)
    if fmt == "torchscript":
        with torch.no_grad():
            got, got_len = torch.jit.load(str(out))(*inputs)
        got, got_len = got.numpy(), got_len.numpy()
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got, got_len = sess.run(None, {n: x.numpy() for n, x in zip(wrapper.input_names, inputs)})
    dim = 16  # frontend_dim and d_model of TINY
    assert got.shape == (2, 16, dim)
    np.testing.assert_array_equal(got_len, [7, 16])
    np.testing.assert_allclose(got[0, :7], ref[0, :7].numpy(), atol=1e-4)
    np.testing.assert_allclose(got[1], ref[1].numpy(), atol=1e-4)
    assert float(ref.abs().max()) > 1e-3  # the comparison is not between two zero tensors


@pytest.mark.parametrize("kwargs", [dict(n_fft=512, win_length=400, hop_length=160, n_mels=80, center=True,
                                         pad_mode="constant"),
                                    dict(n_fft=400, hop_length=100, n_mels=40, power=1.0)])
def test_dft_mel_spectrogram_equals_torchaudio(kwargs):
    from torchaudio.transforms import MelSpectrogram

    from avsr.export import DFTMelSpectrogram

    mel = MelSpectrogram(16000, **kwargs)
    wave = 0.3 * torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    ref = mel(wave)
    got = DFTMelSpectrogram(mel)(wave)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_encoder_inputs_follow_the_mode(tmp_path):
    """Audio mode with the raw-waveform ResNet frontend: the encoder takes audio only."""
    ckpt = _checkpoint(tmp_path / "audio.pt", "audio")
    report = export_part(ckpt, "encoder", "torchscript", tmp_path / "enc.pt")
    assert report.inputs == ("audio", "audio_lengths") and report.outputs == ("enc", "enc_lengths")
    with pytest.raises(ValueError, match="without a visual_frontend"):
        export_part(ckpt, "visual_frontend", "torchscript", tmp_path / "vf.pt")


def test_check_detects_a_different_model(av_checkpoint, tmp_path):
    """The eager check must fail when the exported file is not the module it is compared with."""
    out = tmp_path / "af.pt"
    export_part(av_checkpoint, "audio_frontend", "torchscript", out)
    other = load_encoder(av_checkpoint, "audio_frontend")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert check_export(ExportablePart(other, "audio_frontend"), "torchscript", out) > 1e-3


def test_unknown_part_or_format(av_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="part must be one of"):
        export_part(av_checkpoint, "decoder", "onnx", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="format must be one of"):
        export_part(av_checkpoint, "encoder", "tflite", tmp_path / "x.tflite")
    assert issubclass(ExportError, RuntimeError)
