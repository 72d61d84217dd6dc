"""The ``avsr`` command line: use a trained checkpoint.

Subcommands::

    avsr transcribe --checkpoint ckpt.pt video.mp4 [more ...] [--json out.json|-] [--mouth-csv m.csv]
                    [--speech out.wav] [--visualize out.mp4] [--lipsync track.json --lipsync-model lipsync.pt
                    [--aligner aligner.pt]]
    avsr extract-features --checkpoint ckpt.pt --root <corpus> --split test --part visual_frontend --out feats/
    avsr export --checkpoint ckpt.pt --part encoder --format onnx --out encoder.onnx
    avsr export --checkpoint lipsync.pt --part lipsync --format onnx --out lipsync.onnx
    avsr lipsync --model lipsync.pt speech.wav [more ...] --out track.tsv [--format rhubarb-tsv|rhubarb-json|csv|json]
                 [--fps 24|30|60] [--dialog "text" --aligner aligner.pt] [--streaming] [--preview out.mp4]

With several inputs, the ``--mouth-csv``, ``--speech``, ``--visualize``, ``--lipsync`` and ``lipsync --out``
paths must contain ``{name}`` (the input's file name without extension). Inputs that fail (unreadable file, no face,
several faces, a stream the checkpoint's mode needs is missing) are reported on stderr with one
line naming the file and skipped; the exit status is then 1. A bad checkpoint, bad arguments or
an export that fails its check exit with 2 (one line; ``-v`` adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("avsr")

EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2


def _per_input(template: Optional[str], input_path: str, several: bool) -> Optional[Path]:
    if template is None:
        return None
    return Path(template.replace("{name}", Path(input_path).stem) if several else template)


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (default: the checkpoint's decode config)")
    g.add_argument("--beam-size", type=int, help="beam width; 1 = greedy CTC")
    g.add_argument("--ctc-weight", type=float, help="CTC weight of joint CTC/attention beam search")
    g.add_argument("--lm", dest="lm_path", help="language model checkpoint for shallow fusion")
    g.add_argument("--lm-weight", type=float)


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(prog="avsr", description="Use a trained avsr checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", parents=[common], help="transcribe audio/video files",
                       description="Transcribe media files with a checkpoint, in the checkpoint's mode "
                                   "(audio, video or audio-visual).")
    t.add_argument("--checkpoint", required=True, help="checkpoint .pt written by train.py")
    t.add_argument("inputs", nargs="+", help="video (or, for audio checkpoints, audio) files")
    t.add_argument("--json", dest="json_out", help="write results as JSON (docs/transcribe_schema.json); '-' = stdout")
    t.add_argument("--mouth-csv", help="write the mouth-opening curve (the model's prediction if it has that "
                   "head, else the landmark measurement) as CSV (time_s,mouth_opening), or JSON for a .json path")
    t.add_argument("--mouth-fps", type=float, help="resample the mouth curve to this rate (default 25)")
    t.add_argument("--speech", help="write lip-to-speech audio (16 kHz WAV; checkpoints with that head)")
    t.add_argument("--visualize", help="write the mouth crop with mouth opening and reliability drawn over time (mp4)")
    t.add_argument("--lipsync", help="write a lip-sync track (JSON: the transcript, visemes and ARKit blendshape "
                   "curves, as `avsr lipsync --format json` plus \"text\"); needs --lipsync-model")
    t.add_argument("--lipsync-model", help="lip-sync checkpoint (scripts/train_lipsync.py) for --lipsync")
    t.add_argument("--aligner", help="phone aligner: time the --lipsync visemes by forced alignment of the "
                   "transcript (default: the recogniser's own word timings, each word's phones spread over it)")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    t.add_argument("--window", type=float, default=10.0, help="seconds per model window (long inputs)")
    t.add_argument("--overlap", type=float, default=1.0, help="seconds of overlap between windows")
    _add_decode_args(t)

    f = sub.add_parser("extract-features", parents=[common], help="frontend/encoder features of a manifest, one .npy per clip",
                       description="Write <out>/<utt_id>.npy: float32 (T, D) features at 25 fps of every clip "
                                   "of <root>/<split>.tsv (D = model.frontend_dim for the frontends, "
                                   "model.d_model for the encoder).")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--root", required=True, help="preprocessed corpus root")
    f.add_argument("--split", default="test")
    f.add_argument("--part", default="encoder", choices=("visual_frontend", "audio_frontend", "encoder"))
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--device", default="cpu")

    e = sub.add_parser("export", parents=[common], help="export a frontend, the encoder or the streaming lip-sync "
                       "model to TorchScript or ONNX",
                       description="Export a part of a checkpoint's model and check it against eager mode.")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--part", default="encoder", choices=("visual_frontend", "audio_frontend", "encoder", "lipsync"),
                   help="lipsync: one streaming hop of a causal lip-sync checkpoint (scripts/train_lipsync.py)")
    e.add_argument("--format", default="onnx", choices=("torchscript", "onnx"))
    e.add_argument("--out", required=True, help="output file (.pt for TorchScript, .onnx for ONNX)")
    e.add_argument("--atol", type=float, default=1e-4, help="largest allowed |exported - eager| in the check")

    from avsr.lipsync.export import FORMATS

    s = sub.add_parser("lipsync", parents=[common], help="mouth shapes and blendshape curves from speech",
                       description="Lip-sync tracks from speech (audio files, or the audio of videos) with a "
                                   "model trained by scripts/train_lipsync.py: Rhubarb Lip Sync's TSV or JSON "
                                   "mouth cues, a CSV of ARKit blendshape curves, or JSON with both.")
    s.add_argument("--model", required=True, help="lip-sync checkpoint (lipsync.pt)")
    s.add_argument("inputs", nargs="+", help="speech or video files")
    s.add_argument("--out", required=True, help="output file; with several inputs it holds {name}")
    s.add_argument("--format", choices=FORMATS, help="default: from the suffix of --out (.tsv, .csv, .json)")
    s.add_argument("--fps", type=float, default=25.0, help="frames per second of the output (e.g. 24, 30, 60)")
    s.add_argument("--dialog", help="the transcript: visemes from its forced alignment instead of the model's head")
    s.add_argument("--aligner", help="phone-aligner checkpoint (scripts/train_aligner.py), needed by --dialog")
    s.add_argument("--streaming", action="store_true",
                   help="run the causal model in 10 ms hops, as a live stream would (same output)")
    s.add_argument("--preview", help="also write an mp4: the mouth crop (video inputs) beside a mouth drawn "
                   "from the predicted blendshapes, with the audio; with several inputs it holds {name}")
    s.add_argument("--use-video", action="store_true",
                   help="video inputs: feed the face too (a model trained with scripts/train_lipsync.py "
                        "--video-frontend; such a model needs it)")
    return parser


def _transcribe(args: argparse.Namespace) -> int:
    from avsr.inference import InputError, Recognizer
    from avsr.inference.result import results_document, write_json

    several = len(args.inputs) > 1
    if args.lipsync and not args.lipsync_model:
        log.error("--lipsync needs --lipsync-model (a checkpoint of scripts/train_lipsync.py)")
        return EXIT_USAGE
    for name in ("mouth_csv", "speech", "visualize", "lipsync"):
        value = getattr(args, name)
        if several and value is not None and "{name}" not in value:
            log.error("with several inputs, --%s needs a '{name}' placeholder, e.g. out/{name}%s",
                      name.replace("_", "-"), Path(value).suffix)
            return EXIT_USAGE
    overrides = {k: getattr(args, k) for k in ("beam_size", "ctc_weight", "lm_path", "lm_weight")
                 if getattr(args, k) is not None}
    recognizer = Recognizer.from_checkpoint(args.checkpoint, device=args.device, window_s=args.window,
                                            overlap_s=args.overlap, **overrides)
    if args.speech and not recognizer.has_speech_head:
        log.error("%s: the checkpoint has no lip-to-speech head; --speech is not available", args.checkpoint)
        return EXIT_USAGE
    lipsync = _load_lipsync(args) if args.lipsync else None
    results, errors = [], []
    for path in args.inputs:
        try:
            result = recognizer.transcribe(path, speech=args.speech is not None)
            _write_outputs(result, args, several, lipsync)
        except InputError as exc:
            log.error("%s", exc)
            errors.append((path, str(exc)))
            continue
        results.append(result)
        if args.json_out != "-":
            print(f"{path}\t{result.text}", flush=True)
    if args.json_out:
        write_json(results_document(results, errors, args.checkpoint, recognizer.mode), args.json_out)
    return EXIT_INPUT_FAILED if errors else 0


def _load_lipsync(args: argparse.Namespace) -> tuple:
    """``(lip-sync model, phone aligner or None, mouth features or None)`` of ``--lipsync-model`` /
    ``--aligner`` (the mouth features of a model with video input)."""
    from avsr.lipsync.model import load_lipsync_model
    from avsr.lipsync.video import load_mouth_features

    aligner = None
    if args.aligner:
        from avsr.lipsync.aligner import load_aligner

        aligner = load_aligner(args.aligner)
    model, ckpt = load_lipsync_model(args.lipsync_model)
    return model, aligner, load_mouth_features(ckpt)


def _write_lipsync(result, path: Path, model, aligner, mouth=None) -> None:
    """Transcript, visemes and curves of one transcription as JSON: the visemes by forced alignment
    of the transcript when there is an aligner, else timed by the recogniser's own word alignment;
    a model with video input also gets the transcription's mouth crops through ``mouth``."""
    import json

    from avsr.inference import InputError
    from avsr.lipsync.infer import predict_track, render
    from avsr.utils import atomic_write_text

    if result.audio is None:
        raise InputError(f"{result.path}: --lipsync needs the audio track, and this input has none")
    if mouth is not None and result.crops is None:
        raise InputError(f"{result.path}: the lip-sync model takes video, and this input has no mouth crops")
    dialog = result.text if aligner is not None and result.text.strip() else None
    words = None if dialog is not None else [(w.word, w.start, w.end) for w in result.words]
    try:
        track = predict_track(model, result.audio, dialog=dialog, aligner=aligner, words=words,
                              video=None if mouth is None else mouth(result.crops))
    except ValueError as exc:
        raise InputError(f"{result.path}: lip sync failed ({exc})") from None
    doc = {"text": result.text, **json.loads(render(track, "json", result.fps, sound_file=result.path))}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def _write_outputs(result, args: argparse.Namespace, several: bool, lipsync: Optional[tuple] = None) -> None:
    from avsr.data.media import write_wav
    from avsr.evaluation.curves import write_curve
    from avsr.inference import InputError, mouth_curve
    from avsr.inference.visualize import write_overlay
    from avsr.utils import atomic_path

    if (p := _per_input(args.mouth_csv, result.path, several)) is not None:
        curve, source = mouth_curve(result)
        if curve is None:
            raise InputError(f"{result.path}: no mouth-opening curve (no usable face, and the checkpoint "
                             "has no mouth-opening head)")
        write_curve(p, curve, result.fps, args.mouth_fps)
        log.debug("%s: mouth opening (%s) written to %s", result.path, source, p)
    if (p := _per_input(args.speech, result.path, several)) is not None:
        with atomic_path(p, suffix=".wav") as tmp:
            write_wav(tmp, result.speech, 16000)
    if (p := _per_input(args.lipsync, result.path, several)) is not None:
        _write_lipsync(result, p, *lipsync)
    if (p := _per_input(args.visualize, result.path, several)) is not None:
        if result.crops is None:
            raise InputError(f"{result.path}: --visualize needs a video with a face; this input has no mouth crop")
        write_overlay(result, p)


def _extract_features(args: argparse.Namespace) -> int:
    from avsr.inference.features import extract_features

    written, failed = extract_features(args.checkpoint, args.root, args.split, args.part, args.out, args.device)
    log.info("wrote %d feature files to %s (%d clips failed)", written, args.out, failed)
    return EXIT_INPUT_FAILED if failed else 0


def _export(args: argparse.Namespace) -> int:
    from avsr.export import export_part

    report = export_part(args.checkpoint, args.part, args.format, args.out, atol=args.atol)
    log.info("exported %s to %s (%s); max |exported - eager| = %.2e", args.part, report.path, args.format,
             report.max_abs_diff)
    return 0


def _lipsync(args: argparse.Namespace) -> int:
    from avsr.lipsync.infer import lipsync_files
    from avsr.lipsync.model import load_lipsync_model
    from avsr.lipsync.video import load_mouth_features

    model, ckpt = load_lipsync_model(args.model)
    mouth = load_mouth_features(ckpt)
    if args.use_video != (mouth is not None):
        log.error("%s: %s", args.model, "this model takes video: run it with --use-video on video inputs" if mouth
                  else "this model was trained without video (scripts/train_lipsync.py --video-frontend); "
                       "drop --use-video")
        return EXIT_USAGE
    aligner = None
    if args.aligner:
        from avsr.lipsync.aligner import load_aligner

        aligner = load_aligner(args.aligner)
    failed = lipsync_files(model, args.inputs, args.out, args.format, args.fps, args.streaming, args.dialog, aligner,
                           args.preview, mouth)
    for _, why in failed:
        log.error("%s", why)
    log.info("wrote %d track(s) (%d failed)", len(args.inputs) - len(failed), len(failed))
    return EXIT_INPUT_FAILED if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``avsr`` console script; returns the exit status."""
    from avsr.export import ExportError
    from avsr.utils import set_num_threads, setup_logging

    args = _build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    set_num_threads()
    commands = {"transcribe": _transcribe, "extract-features": _extract_features, "export": _export,
                "lipsync": _lipsync}
    try:
        return commands[args.command](args)
    except (ValueError, ExportError, OSError) as exc:  # bad checkpoint, option, manifest or output path
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
