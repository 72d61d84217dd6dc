"""Phone timings from CTC forced alignment, and the viseme track of each video frame.

A small phone recogniser (:class:`PhoneCTC`: log-mel at 100 fps -> convolutions, one with stride
2 -> 39 ARPAbet phones + blank at 50 fps) is trained with CTC on a
corpus's own audio and transcripts (:func:`train_phone_ctc`; phones from
:func:`avsr.lipsync.visemes.transcript_phones`). Its log-probabilities and a transcript's phones
go to ``torchaudio.functional.forced_align`` (Viterbi over the CTC graph), and the token spans to
video frames (:func:`phone_frames`). CTC emits a phone as a spike somewhere inside it, usually
after its onset, so phone k is taken to start halfway between the spikes of phones k - 1 and k
(on GRID s1 test against the corpus's own word alignments this moves word onsets from 54 ms late
on average to 13 ms, 91% within 80 ms); the first phone starts :data:`HOLD_FRAMES` before its
spike, the last holds as long after its own; the frames outside are silence, as are those of a
gap of more than :data:`PAUSE_FRAMES` between two spikes (a pause; shorter gaps are CTC blanks
inside speech). Without an aligner, words timed elsewhere (the recogniser's own alignment) give
phone spans by :func:`word_phone_spans`. :func:`frame_visemes` maps the phones through
:data:`avsr.lipsync.visemes.RHUBARB` or ``VISEME15``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from avsr.audio_features import MEL_PER_VIDEO_FRAME, log_mel
from avsr.lipsync.visemes import PHONES, SILENCE, transcript_phones
from avsr.safe_load import safe_torch_load

log = logging.getLogger(__name__)

STRIDE = 2  #: mel frames (100 fps) per output frame: 50 fps, 2 per 25 fps video frame
HOLD_FRAMES = 2  #: output frames (40 ms) a phone reaches beyond its spike next to silence
PAUSE_FRAMES = 25  #: a gap of more than this many output frames (500 ms) between two spikes is a pause
_INDEX = {p: i + 1 for i, p in enumerate(PHONES)}  # 0 = CTC blank


class PhoneCTC(nn.Module):
    """Log-mel ``(B, F, 80)`` at 100 fps -> phone log-probabilities ``(B, ceil(F / 2), 40)`` at
    50 fps (class 0 = blank, class k = ``PHONES[k - 1]``). Each utterance's mel is normalised to
    zero mean and unit variance per bin over its valid frames; then a convolution, a strided one and
    residual convolutions (a receptive field of about 0.4 s, non-causal: the aligner runs offline).
    Convolutions, not a recurrent layer, for speed on a CPU; a short receptive field keeps each
    phone's spike near its sound (dilations up to 8, a 1.4 s field, let the spikes drift: word
    onsets 127 ms early on average against 54 ms late)."""

    def __init__(self, n_mels: int = 80, channels: int = 128, dilations: Sequence[int] = (1, 1, 1, 1),
                 dropout: float = 0.1) -> None:
        super().__init__()

        def block(c_in: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(c_in, channels, 5, stride=stride, padding=2 * dilation, dilation=dilation),
                                 nn.BatchNorm1d(channels), nn.ReLU(), nn.Dropout(dropout))

        self.stem = nn.Sequential(block(n_mels), block(channels, stride=STRIDE))
        self.blocks = nn.ModuleList(block(channels, dilation=d) for d in dilations)
        self.out = nn.Conv1d(channels, len(PHONES) + 1, 1)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs (B, F', 40), out_lengths (B,))`` with ``F' = ceil(F / 2)``."""
        valid = (torch.arange(mel.shape[1], device=mel.device)[None, :] < lengths[:, None])[..., None]
        n = valid.sum(1, keepdim=True).clamp_min(1)
        mean = (mel * valid).sum(1, keepdim=True) / n
        std = (((mel - mean) ** 2 * valid).sum(1, keepdim=True) / n).sqrt().clamp_min(1e-3)
        x = self.stem(((mel - mean) / std * valid).transpose(1, 2))
        out_lengths = torch.div(lengths + STRIDE - 1, STRIDE, rounding_mode="floor")
        keep = (torch.arange(x.shape[2], device=x.device)[None, :] < out_lengths[:, None])[:, None]
        for blk in self.blocks:
            x = (x + blk(x)) * keep  # padding stays zero, so a clip's output does not depend on its batch
        return self.out(x).transpose(1, 2).log_softmax(-1), out_lengths


def phone_ids(text: str) -> list[int]:
    """CTC class ids of a transcript's phones. Raises ``ValueError`` as ``transcript_phones``."""
    return [_INDEX[p] for p in transcript_phones(text)]


@dataclass
class AlignerData:
    """Utterances for the aligner: per utterance its log-mel ``(F, 80)`` and transcript."""

    utt_ids: list[str]
    mels: list[torch.Tensor]
    texts: list[str]


def load_aligner_data(root: str | Path, split: str) -> AlignerData:
    """The ``.wav`` and transcript of every clip of a preprocessed split. Raises ``ValueError``
    naming a clip whose transcript has a word the pronouncing dictionary lacks."""
    import soundfile as sf

    from avsr.data.manifest import read_manifest

    data = AlignerData([], [], [])
    for row in read_manifest(root, split):
        try:
            phone_ids(row.transcript)
        except ValueError as exc:
            raise ValueError(f"{row.utt_id}: {exc}") from None
        wave, _ = sf.read(row.file(root, ".wav"), dtype="float32")
        mel, _ = log_mel(torch.from_numpy(wave))
        data.utt_ids.append(row.utt_id)
        data.mels.append(mel[0])
        data.texts.append(row.transcript)
    return data


def train_phone_ctc(data: AlignerData, steps: int = 3000, batch_size: int = 8, lr: float = 2e-3,
                    seed: int = 0) -> PhoneCTC:
    """Train a :class:`PhoneCTC` on ``data`` (Adam, one-cycle learning rate). Raises ``ValueError``
    with fewer than 2 utterances."""
    if len(data.utt_ids) < 2:
        raise ValueError(f"need at least 2 utterances to train the phone aligner, got {len(data.utt_ids)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PhoneCTC()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    targets = [torch.tensor(phone_ids(t)) for t in data.texts]
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        pick = torch.randint(len(data.utt_ids), (min(batch_size, len(data.utt_ids)),), generator=gen).tolist()
        mel = nn.utils.rnn.pad_sequence([data.mels[i] for i in pick], batch_first=True)
        lengths = torch.tensor([len(data.mels[i]) for i in pick])
        lp, out_lengths = model(mel, lengths)
        tgt = [targets[i] for i in pick]
        loss = ctc(lp.transpose(0, 1), torch.cat(tgt), out_lengths, torch.tensor([len(t) for t in tgt]))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log.info("phone aligner step %d: CTC loss %.3f (%.0f s)", step + 1, loss.item(), time.perf_counter() - t0)
    return model.eval()


def align(model: PhoneCTC, mel: torch.Tensor, text: str) -> list[tuple[str, int, int]]:
    """Forced alignment of one utterance: ``[(phone, start, end)]`` in 50 fps output frames (end
    exclusive), one entry per phone of ``text`` in order. Raises ``ValueError`` when the audio is
    too short for the phones (CTC needs a frame per phone, and one more between repeats)."""
    import torchaudio.functional as AF

    ids = phone_ids(text)
    with torch.no_grad():
        lp, n = model(mel[None], torch.tensor([len(mel)]))
    need = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))
    if int(n[0]) < need:
        raise ValueError(f"{int(n[0])} aligner frames cannot hold the {len(ids)} phones of '{text}'")
    labels, _ = AF.forced_align(lp[:, : int(n[0])], torch.tensor([ids], dtype=torch.int32), blank=0)
    spans = AF.merge_tokens(labels[0], torch.zeros(labels.shape[1]))
    return [(PHONES[s.token - 1], int(s.start), int(s.end)) for s in spans]


def word_phone_spans(words: Sequence[tuple[str, float, float]]) -> list[tuple[str, int, int]]:
    """Phone spans in :func:`align`'s form (50 fps, one spike frame per phone) from word times
    alone, for when the words are timed elsewhere and no phone aligner is at hand (the recogniser's
    own CTC alignment, :mod:`avsr.inference.alignment`): each word's phones
    (:func:`avsr.lipsync.visemes.pronounce_or_spell`: a non-word is spelled) spread evenly over
    its ``[start, end)`` seconds, phone ``j`` of ``n`` spiking at the centre of its share. Feed
    them to :func:`phone_frames`.

    Args:
        words: ``(word, start s, end s)`` in time order.

    Raises:
        ValueError: for a word with no letter, or words out of time order.
    """
    from avsr.lipsync.visemes import pronounce_or_spell

    rate = 100 / STRIDE
    spans: list[tuple[str, int, int]] = []
    for word, start, end in words:
        phones = pronounce_or_spell(word)
        share = max(end - start, 0.0) * rate / len(phones)
        for j, phone in enumerate(phones):
            spike = int(start * rate + (j + 0.5) * share)
            if spans and spike < spans[-1][1]:
                raise ValueError(f"word '{word}' at {start:.3f} s starts before the word before it")
            spans.append((phone, spike, spike + 1))
    return spans


def phone_starts(spans: list[tuple[str, int, int]]) -> list[int]:
    """The 50 fps frame where each phone of :func:`align`'s spans starts (before any pause rule):
    :data:`HOLD_FRAMES` before the first spike, then halfway between consecutive spikes."""
    return [spans[0][1] - HOLD_FRAMES] + [(spans[k - 1][2] + spans[k][1]) // 2 for k in range(1, len(spans))]


def phone_frames(spans: list[tuple[str, int, int]], n_frames: int) -> list[str]:
    """The phone (or ``"sil"``) of each of ``n_frames`` 25 fps video frames from :func:`align`'s
    50 fps spans, by the rule of the module docstring; a video frame takes the label of its first
    50 fps half; no spans: all silence."""
    per = MEL_PER_VIDEO_FRAME // STRIDE
    labels = [SILENCE] * (n_frames * per)
    if not spans:
        return labels[::per]
    bounds = phone_starts(spans)
    for k, (phone, start, end) in enumerate(spans):
        begin, stop = bounds[k], bounds[k + 1] if k + 1 < len(spans) else end + HOLD_FRAMES
        if k + 1 < len(spans) and spans[k + 1][1] - end > PAUSE_FRAMES:  # a pause: hold, then silence
            stop = end + HOLD_FRAMES
        if k > 0 and start - spans[k - 1][2] > PAUSE_FRAMES:
            begin = start - HOLD_FRAMES
        for t in range(max(begin, 0), min(stop, len(labels))):
            labels[t] = phone
    return labels[::per]


def frame_visemes(phones: list[str], table: dict[str, str]) -> list[str]:
    """Per-frame phones (or ``"sil"``) through a viseme table (``RHUBARB`` or ``VISEME15``)."""
    return [table[p] for p in phones]


def save_aligner(model: PhoneCTC, path: str | Path) -> None:
    from avsr.utils import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"kind": "phone_ctc", "phones": list(PHONES), "state_dict": model.state_dict()}, tmp)


def load_aligner(path: str | Path) -> PhoneCTC:
    """A :class:`PhoneCTC` saved by :func:`save_aligner`. Raises ``ValueError`` for another file."""
    ckpt = safe_torch_load(path, "a phone-aligner checkpoint", ValueError)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "phone_ctc" or ckpt.get("phones") != list(PHONES):
        raise ValueError(f"{path}: not a phone-aligner checkpoint of this version")
    model = PhoneCTC()
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def clip_visemes(model: PhoneCTC, data: AlignerData, n_frames: Optional[dict[str, int]] = None,
                 table: Optional[dict[str, str]] = None) -> dict[str, list[str]]:
    """Per-utterance frame labels (phones, or visemes through ``table``); a clip that cannot be
    aligned is logged and left out."""
    out = {}
    for utt, mel, text in zip(data.utt_ids, data.mels, data.texts):
        frames = (n_frames or {}).get(utt, len(mel) // MEL_PER_VIDEO_FRAME)
        try:
            phones = phone_frames(align(model, mel, text), frames)
        except ValueError as exc:
            log.warning("%s: %s (left out)", utt, exc)
            continue
        out[utt] = frame_visemes(phones, table) if table else phones
    return out


def opening_check(visemes: dict[str, list[str]], opening: dict[str, np.ndarray], closed: Sequence[str],
                  open_: Sequence[str]) -> tuple[float, int]:
    """The video check: the fraction of clips (with both kinds of frame) whose mean landmark mouth
    opening over frames labelled ``closed`` is below its mean over frames labelled ``open_``, and
    the number of such clips."""
    wins = []
    for utt, labels in visemes.items():
        o = opening[utt][: len(labels)]
        lab = np.array(labels[: len(o)])
        c, p = np.isin(lab, closed), np.isin(lab, open_)
        if c.any() and p.any():
            wins.append(o[c].mean() < o[p].mean())
    return (float(np.mean(wins)) if wins else 0.0), len(wins)
