"""A CPU-budget lip-to-speech recipe on a preprocessed corpus: eigenlip features → mel → Griffin-Lim.

:class:`avsr.models.heads.Lip2SpeechDecoder` (speaker reference = the first second of the real
mel, as Kim et al. 2023 do at test time) is trained with the mel L1 loss on fixed, cheap visual
features: a PCA ("eigenlips", Bregler & Konig 1994) of the 44x44-downsampled 88x88 centre crop,
fit on the training split — a stand-in for a trained visual frontend that keeps the recipe within
a few CPU minutes. Waveforms come from Griffin-Lim (:func:`avsr.audio_features.mel_to_wave`),
scored with STOI/ESTOI against the real audio, beside Griffin-Lim of the real mel (the ceiling of
the vocoder path).

Used by ``scripts/demo.py`` (GRID benchmark) and ``benchmarks/bench_aux.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from avsr.audio_features import log_mel, mel_to_wave
from avsr.data.manifest import read_manifest
from avsr.data.media import read_gray_video
from avsr.evaluation.aux_metrics import speech_intelligibility
from avsr.models.heads import Lip2SpeechDecoder, Lip2SpeechLoss, reference_mel
from avsr.utils import seed_everything

log = logging.getLogger(__name__)

EIGENLIPS = 64  # PCA components of the visual features
SAMPLES_PER_FRAME = 640  # 16 kHz audio samples per 25 fps video frame


def eigenlip_inputs(root: str | Path, split: str) -> tuple[list[np.ndarray], list[torch.Tensor], list[str]]:
    """Per clip of ``<root>/<split>.tsv``: the 2x-downsampled 88x88 centre crop ``(T, 1936)``
    float32 in [0, 1], the real 16 kHz wave ``(640 T,)`` float32 and the utterance id.

    Raises ``ValueError`` (from the manifest reader) when the manifest is missing or malformed.
    """
    frames_out, waves, ids = [], [], []
    root = Path(root)
    for row in read_manifest(root, split):
        frames = read_gray_video(row.file(root, ".mp4"))[:, 4:92, 4:92].astype(np.float32) / 255.0
        small = frames.reshape(len(frames), 44, 2, 44, 2).mean((2, 4)).reshape(len(frames), -1)
        wave, _ = sf.read(str(row.file(root, ".wav")), dtype="float32")
        frames_out.append(small)
        waves.append(torch.from_numpy(wave[: SAMPLES_PER_FRAME * len(frames)]))
        ids.append(row.utt_id)
    return frames_out, waves, ids


def train_eval_lip2speech(root: str | Path, steps: int, train_split: str = "train", test_split: str = "test",
                          batch_size: int = 16, seed: int = 0, griffin_lim_iters: int = 32) -> dict:
    """Train the mel decoder on ``train_split`` for ``steps`` steps; STOI/ESTOI on ``test_split``.

    Returns a JSON-ready dict: setup, train L1 (first step, mean of the last 20), and per test set
    ``stoi``/``estoi``/``mel_l1`` beside ``griffin_lim_of_real_mel``. Raises ``ValueError`` when
    ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    seed_everything(seed)
    t0 = time.perf_counter()
    tr_frames, tr_waves, _ = eigenlip_inputs(root, train_split)
    te_frames, te_waves, te_ids = eigenlip_inputs(root, test_split)
    stacked = np.concatenate(tr_frames)
    mean = stacked.mean(0)
    _, _, vt = np.linalg.svd(stacked[::4] - mean, full_matrices=False)  # PCA on every 4th frame
    basis = vt[:EIGENLIPS].T
    scale = ((stacked - mean) @ basis).std(0)

    def feats(clips: list[np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(((c - mean) @ basis / scale).astype(np.float32)) for c in clips]

    def batch(f: list[torch.Tensor], w: list[torch.Tensor], index: list[int]):
        x = torch.nn.utils.rnn.pad_sequence([f[i] for i in index], batch_first=True)
        lengths = torch.tensor([len(f[i]) for i in index])
        wave = torch.nn.utils.rnn.pad_sequence([w[i] for i in index], batch_first=True)
        mel, mel_lengths = log_mel(wave, torch.tensor([len(w[i]) for i in index]))
        return x, lengths, mel, mel_lengths

    tr_feats, te_feats = feats(tr_frames), feats(te_frames)
    features_seconds = time.perf_counter() - t0
    decoder = Lip2SpeechDecoder(EIGENLIPS, d_model=128, num_blocks=2, dropout=0.1)
    criterion = Lip2SpeechLoss(EIGENLIPS)
    opt = torch.optim.AdamW(decoder.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t1 = time.perf_counter()
    decoder.train()
    for _ in range(steps):
        index = torch.randint(len(tr_feats), (batch_size,), generator=gen).tolist()
        x, lengths, mel, mel_lengths = batch(tr_feats, tr_waves, index)
        pred, pred_lengths = decoder(x, lengths, *reference_mel(mel, mel_lengths))
        loss = criterion(pred, pred_lengths, mel, mel_lengths)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - t1
    decoder.eval()
    generated, rebuilt, test_l1 = [], [], []
    with torch.no_grad():
        for i in range(len(te_feats)):
            x, lengths, mel, mel_lengths = batch(te_feats, te_waves, [i])
            pred, pred_lengths = decoder(x, lengths, *reference_mel(mel, mel_lengths))
            test_l1.append(float(criterion(pred, pred_lengths, mel, mel_lengths)["l1"]))
            generated.append(mel_to_wave(pred[0], n_iter=griffin_lim_iters).numpy())
            rebuilt.append(mel_to_wave(mel[0], n_iter=griffin_lim_iters).numpy())
    refs = [w.numpy() for w in te_waves]
    synth = speech_intelligibility(refs, generated, utt_ids=te_ids)
    ceiling = speech_intelligibility(refs, rebuilt, utt_ids=te_ids)
    log.info("lip-to-speech %s: STOI %.3f, ESTOI %.3f (Griffin-Lim of the real mel: %.3f / %.3f)", test_split,
             synth["stoi"], synth["estoi"], ceiling["stoi"], ceiling["estoi"])
    return {
        "visual_features": f"{EIGENLIPS}-component PCA of the 44x44-downsampled 88x88 centre crop "
                           f"(fit on {train_split})",
        "decoder": {"d_model": 128, "num_blocks": 2, "parameters": sum(p.numel() for p in decoder.parameters())},
        "loss": "mel L1 (no content supervision: no ASR encoder is trained in this recipe)",
        "steps": steps, "batch_size": batch_size, "features_seconds": round(features_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "train_l1_first_last": [round(losses[0], 3), round(float(np.mean(losses[-20:])), 3)],
        test_split: {"stoi": round(synth["stoi"], 4), "estoi": round(synth["estoi"], 4),
                     "mel_l1": round(float(np.mean(test_l1)), 4), "n_utterances": synth["n_utterances"]},
        "griffin_lim_of_real_mel": {"stoi": round(ceiling["stoi"], 4), "estoi": round(ceiling["estoi"], 4)},
    }
