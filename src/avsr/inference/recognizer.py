"""One media file in, transcript and per-frame outputs out: :class:`Recognizer`.

::

    rec = Recognizer.from_checkpoint("checkpoints/grid_av/best.pt", beam_size=10)
    result = rec.transcribe("clip.mp4")   # -> TranscriptionResult
    print(result.text, result.words)

The input is prepared as preprocessing prepares a corpus clip (:mod:`avsr.inference.inputs`:
PyAV decoding at 25 fps, mediapipe lip landmarks, mean-face alignment, 96x96 mouth crop,
16 kHz mono audio of ``640 * T`` samples), transformed with the test transform (centre crop,
normalisation), and run through the model in its checkpoint's mode, in windows of ``window_s``
seconds overlapping by ``overlap_s`` (:mod:`avsr.inference.windows`). Each window is decoded on
its own (joint CTC/attention beam search, or greedy CTC with ``beam_size=1``), its tokens are
timed by forced alignment to its CTC posteriors, and a window contributes the tokens and
per-frame values in the part of the clip it owns.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from avsr.config import Config, DecodeConfig
from avsr.data.transforms import Clip, build_transform
from avsr.decoding.beam_search import BeamSearch
from avsr.decoding.ctc import ctc_greedy_search
from avsr.inference.alignment import AlignmentError, TimedToken, align_tokens, group_words, token_texts
from avsr.inference.inputs import PreparedInput, prepare_input
from avsr.inference.result import TranscriptionResult
from avsr.inference.windows import Window, plan_windows, stitch
from avsr.models.heads import MOUTH_HEAD, SPEECH_HEAD, aux_predictions

log = logging.getLogger(__name__)

FPS = 25
SAMPLES_PER_FRAME = 640
DECODE_OVERRIDES = tuple(f.name for f in fields(DecodeConfig))


class Recognizer:
    """A loaded model that transcribes media files.

    Args:
        model: trained :class:`avsr.models.AVSRModel` (put in eval mode here).
        tokenizer: its tokenizer.
        cfg: its config (``model.mode`` picks the inputs; ``data`` gives the test transform,
            ``preprocess`` the crop, ``decode`` the search).
        device: torch device to run on.
        window_s: seconds per model window (inputs up to this long are one window).
        overlap_s: least overlap of neighbouring windows, seconds (``0 <= overlap_s < window_s``).
        batch_size: windows encoded at once.

    Raises:
        ValueError: on a non-positive window or batch size, an overlap outside ``[0, window_s)``, or
            an LM whose tokenizer is not the model's.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: Config, device: str | torch.device = "cpu",
                 window_s: float = 10.0, overlap_s: float = 1.0, batch_size: int = 4) -> None:
        self.window = int(round(window_s * FPS))
        self.overlap = int(round(overlap_s * FPS))
        if self.window <= 0 or not 0 <= self.overlap < self.window or batch_size <= 0:
            raise ValueError(f"need window_s > 0, 0 <= overlap_s < window_s and batch_size > 0; got "
                             f"{window_s}, {overlap_s}, {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.mode = cfg.model.mode
        self.uses_video = self.mode != "audio"
        self.uses_audio = self.mode != "video"
        self.batch_size = batch_size
        self.transform = build_transform(cfg.data, train=False)
        self.search = self._build_search(cfg.decode)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", window_s: float = 10.0,
                        overlap_s: float = 1.0, batch_size: int = 4, **decode: Any) -> "Recognizer":
        """Load ``path`` (:func:`avsr.training.checkpoint.load_model`); ``decode`` overrides fields of
        its ``decode`` config (``beam_size``, ``ctc_weight``, ``lm_path``, ``lm_weight``, ...).

        Raises:
            avsr.training.checkpoint.CheckpointError: for an unreadable or mismatched checkpoint.
            ValueError: for an unknown decode field or an invalid value.
        """
        from avsr.training.checkpoint import load_model

        unknown = sorted(set(decode) - set(DECODE_OVERRIDES))
        if unknown:
            raise ValueError(f"unknown decode option(s) {', '.join(unknown)}; valid: {', '.join(DECODE_OVERRIDES)}")
        model, tokenizer, cfg = load_model(path, device)
        cfg = replace(cfg, decode=replace(cfg.decode, **decode))
        log.info("loaded %s (%s mode, beam %d)", path, cfg.model.mode, cfg.decode.beam_size)
        return cls(model, tokenizer, cfg, device, window_s, overlap_s, batch_size)

    def _build_search(self, dc: DecodeConfig) -> Optional[BeamSearch]:
        """Joint CTC/attention beam search of ``dc``; None for greedy CTC (``beam_size == 1``)."""
        if dc.beam_size == 1:
            return None
        lm = None
        if dc.lm_path and dc.lm_weight > 0:
            from avsr.decoding.lm import load_lm

            lm, lm_tokenizer = load_lm(dc.lm_path, map_location=self.device)
            if bytes(lm_tokenizer) != self.tokenizer.to_bytes():
                raise ValueError(f"LM {dc.lm_path} was trained with another tokenizer than the model's")
            lm = lm.to(self.device).eval()
        tok = self.tokenizer
        return BeamSearch(self.model.decoder, tok.vocab_size, tok.sos_id, tok.eos_id, tok.blank_id,
                          beam_size=dc.beam_size, ctc_weight=dc.ctc_weight, lm=lm,
                          lm_weight=dc.lm_weight if lm is not None else 0.0, length_penalty=dc.length_penalty,
                          max_len_ratio=dc.max_len_ratio)

    # -- auxiliary heads ---------------------------------------------------------------------
    @property
    def has_mouth_head(self) -> bool:
        """Whether the model predicts the mouth opening (:class:`avsr.models.heads.MouthOpeningAux`)."""
        return MOUTH_HEAD in self.model.aux_heads

    @property
    def has_speech_head(self) -> bool:
        """Whether the model synthesises speech from the video (:class:`avsr.models.heads.Lip2SpeechAux`)."""
        return SPEECH_HEAD in self.model.aux_heads

    # -- transcription -----------------------------------------------------------------------
    def transcribe(self, path: str | Path, speech: bool = True) -> TranscriptionResult:
        """Transcribe one media file in the checkpoint's mode.

        ``speech``: synthesise lip-to-speech audio (``result.speech``) when the checkpoint has that
        head; the voice follows the first second of the input's audio track (silence when it has none).

        Raises:
            avsr.inference.InputError: (one line naming the file) when it is missing or unreadable, lacks a stream
                the mode needs, shows no face or several faces, or is too short.
        """
        inp = prepare_input(path, self.cfg.preprocess, need_video=self.uses_video, need_audio=self.uses_audio)
        windows = plan_windows(inp.n_frames, self.window, self.overlap)
        reference = self._speaker_reference(inp) if speech and self.has_speech_head else None
        parts: list[dict[str, Any]] = []
        for i in range(0, len(windows), self.batch_size):
            parts += self._run_windows(inp, windows[i: i + self.batch_size], reference)
        tokens = [t for p in parts for t in p["tokens"]]
        ids = [t[0] for t in tokens]
        texts = token_texts(self.tokenizer, ids)
        timed = [TimedToken(i, txt, s / FPS, e / FPS, score) for (i, s, e, score), txt in zip(tokens, texts)]
        curves = {k: stitch([p[k] for p in parts], windows) for k in parts[0] if k not in ("tokens", "mel")}
        synthesized = None
        if "mel" in parts[0]:
            synthesized = self._speech(stitch([p["mel"] for p in parts], windows, rate=4))
        return TranscriptionResult(
            path=str(path), mode=self.mode, text=self.tokenizer.decode(ids), tokens=timed,
            words=group_words(timed), n_frames=inp.n_frames, fps=float(FPS),
            windows=[(w.start / FPS, w.end / FPS) for w in windows],
            face_detected=inp.face_detected, mouth_opening=inp.mouth_opening,
            mouth_opening_pred=curves.get("mouth_opening_pred"),
            reliability={k[len("reliability_"):]: v for k, v in curves.items() if k.startswith("reliability_")},
            speech=synthesized, crops=inp.crops, landmarks=inp.landmarks, audio=inp.wave)

    def _inputs(self, inp: PreparedInput, windows: list[Window]) -> tuple[Optional[torch.Tensor], ...]:
        """Model inputs of equal-length ``windows``: video ``(N, Tw, 1, 88, 88)``, lengths, audio ``(N, 640 Tw)``, lengths."""
        n, tw = len(windows), windows[0].length
        frames = torch.full((n,), tw, dtype=torch.int64, device=self.device)
        video = audio = None
        if self.uses_video:
            rng = np.random.default_rng(0)  # the test transform is deterministic
            clips = [self.transform(Clip(inp.crops[w.start: w.end]), rng).video for w in windows]
            video = torch.from_numpy(np.stack(clips)).unsqueeze(2).to(self.device)
        if self.uses_audio:
            waves = [inp.wave[SAMPLES_PER_FRAME * w.start: SAMPLES_PER_FRAME * w.end] for w in windows]
            audio = torch.from_numpy(np.stack(waves)).to(self.device)
        return video, frames if video is not None else None, audio, frames * SAMPLES_PER_FRAME if audio is not None else None

    @torch.no_grad()
    def _run_windows(self, inp: PreparedInput, windows: list[Window],
                     reference: Optional[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
        """Encode and decode windows of one length; per window: owned ``tokens`` as
        ``(id, start_frame, end_frame, score)`` in clip frames and per-frame arrays of the window."""
        video, video_lengths, audio, audio_lengths = self._inputs(inp, windows)
        encoded = self.model.encode(video, video_lengths, audio, audio_lengths)
        ctc = self.model.ctc_head(encoded.enc)
        lengths = encoded.enc_lengths
        if self.search is None:
            hyps = ctc_greedy_search(ctc, lengths, self.tokenizer.blank_id)
        else:
            hyps = [list(h[0].tokens) if h else [] for h in self.search(encoded.enc, lengths, ctc)]
        aux = self._aux_outputs(encoded, reference)
        out = []
        for b, w in enumerate(windows):
            n = int(lengths[b])
            log_probs = ctc[b, :n].float().cpu()
            try:
                spans = align_tokens(log_probs, hyps[b], self.tokenizer.blank_id)
            except AlignmentError as exc:  # only without CTC in the search (ctc_weight == 0)
                log.warning("%s: window %.1f-%.1f s: %s; using the greedy CTC tokens there", inp.path,
                            w.start / FPS, w.end / FPS, exc)
                greedy = ctc_greedy_search(log_probs[None], torch.tensor([n]), self.tokenizer.blank_id)[0]
                spans = align_tokens(log_probs, greedy, self.tokenizer.blank_id)
            part: dict[str, Any] = {"tokens": [(s.token, w.start + s.start, w.start + s.end, s.score) for s in spans
                                               if w.keep_start <= w.start + s.start < w.keep_end]}
            for name, scores in encoded.reliability.items():
                part[f"reliability_{name}"] = _pad(scores[b, :n].mean(-1).float().cpu().numpy(), w.length)
            for name, value in aux.items():
                part[name] = value[b].float().cpu().numpy()
            out.append(part)
        return out

    def _speaker_reference(self, inp: PreparedInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-mel ``(1, F, 80)`` and ``(1,)`` length for the lip-to-speech voice."""
        from avsr.audio_features import log_mel
        from avsr.models.heads import reference_mel

        if inp.wave is None:
            log.warning("%s: no audio track to take the voice from; lip-to-speech uses a silent reference", inp.path)
        wave = torch.zeros(SAMPLES_PER_FRAME * inp.n_frames) if inp.wave is None else torch.from_numpy(inp.wave)
        mel, lengths = log_mel(wave.to(self.device))
        return reference_mel(mel, lengths)

    def _aux_outputs(self, encoded, reference: Optional[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Predictions of the auxiliary heads: ``mouth_opening_pred`` ``(N, Tw)``, ``mel`` ``(N, 4 Tw, 80)``
        (:func:`avsr.models.heads.aux_predictions`)."""
        return aux_predictions(self.model, encoded, reference if self.has_speech_head else None)

    def _speech(self, mel: np.ndarray) -> np.ndarray:
        """16 kHz waveform of a stitched ``(4 T, 80)`` log-mel (Griffin-Lim)."""
        from avsr.audio_features import mel_to_wave

        return mel_to_wave(torch.from_numpy(mel)).numpy()


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` padded with NaN (no value) to ``n`` frames."""
    return x if len(x) >= n else np.concatenate([x, np.full(n - len(x), np.nan, x.dtype)])
