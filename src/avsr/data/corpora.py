"""Corpus layouts -> a list of :class:`Utterance` (media file, transcript, split, landmark file).

Layouts (``discover(layout, root)``):

``grid``
    ``video/<id>.mpg`` with ``align/<id>.align`` (``start end word`` in 1/25000 s; ``sil``/``sp``
    dropped) or, for clips without one, ``transcripts.tsv`` (``<id>.mpg<TAB>TRANSCRIPT``).
    ``split_<name>.txt`` files (one ``<id>.mpg`` per line) assign splits; without them every
    clip goes to ``split``.
``lrs2``
    ``main/<spk>/<clip>.mp4`` and ``pretrain/<spk>/<clip>.mp4`` with ``.txt`` beside them
    (``Text:  WORDS`` header, then, in ``pretrain/``, word timings). ``train.txt``/``val.txt``/``test.txt`` (and
    ``pretrain.txt``) at the root assign splits (``<spk>/<clip>`` per line, extra columns
    ignored); without them the split is the top folder.
``lrs3``
    ``trainval/``, ``pretrain/``, ``test/`` folders (``<spk>/<clip>.mp4`` + ``.txt``); the split
    is the folder name.
``videos``
    Any tree of videos (:data:`avsr.data.media.VIDEO_EXTENSIONS`), each with a ``.txt`` beside it
    (plain text or the LRS ``Text:`` format) or a line in ``<root>/transcripts.tsv``
    (``<relative path or stem><TAB>TRANSCRIPT``). Everything goes to ``split``.

Precomputed landmarks (any layout) are looked up as ``<landmarks_dir>/<stem>.npz`` then
``.pkl``, where ``<stem>`` is the clip's path below the media folder without extension
(``<id>`` for GRID, ``<subset>/<spk>/<clip>`` for LRS); ``landmarks_dir`` defaults to the media
folder itself (files beside the videos). Clips without one get mediapipe detection.

Word timings (:attr:`Utterance.word_times`) come from GRID ``.align`` files and from the
``WORD START END ASDSCORE`` table of LRS-format ``.txt`` files (:func:`read_lrs_words`; any layout
that reads ``.txt`` files); a malformed table is logged and ignored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from avsr.data.media import VIDEO_EXTENSIONS
from avsr.text.normalize import VOCAB_CHARS, normalise

log = logging.getLogger(__name__)

LAYOUTS = ("grid", "lrs2", "lrs3", "videos")
VOCAB = VOCAB_CHARS
_OUT_OF_VOCAB = re.compile(r"[^A-Z' ]")
_GRID_SILENCE = {"sil", "sp"}
_LRS_SUBSETS = {"lrs2": ("main", "pretrain"), "lrs3": ("trainval", "pretrain", "test")}


class TranscriptError(ValueError):
    """A transcript is missing, empty, or has characters outside :data:`VOCAB`."""


class CorpusError(ValueError):
    """A corpus folder does not have the layout asked for."""


@dataclass(frozen=True)
class Utterance:
    """One clip to preprocess; outputs go to ``<out>/<split>/<utt_id>.*``.

    ``transcript`` is the raw text (``None`` when none was found); ``landmarks`` a precomputed
    68-point file (``.npz`` or ``.pkl``) or ``None`` for mediapipe detection; ``word_times`` the
    words with their ``(word, start_s, end_s)`` times in seconds from the clip's first video frame,
    as the corpus gives them (raw words: LRS ``.txt`` timings, GRID ``.align`` without ``sil``/``sp``),
    or ``None`` when it gives none.
    """

    utt_id: str
    split: str
    media: Path
    transcript: str | None
    landmarks: Path | None = None
    word_times: tuple[tuple[str, float, float], ...] | None = None

    @property
    def rel_path(self) -> str:
        return f"{self.split}/{self.utt_id}"


def normalise_transcript(text: str | None) -> str:
    """The training transcript of ``text``: :func:`avsr.text.normalize.normalise` (the rule the
    evaluation scores with too), which spells out digits and removes punctuation
    (``"Bin blue, at L 9 again!"`` -> ``"BIN BLUE AT L NINE AGAIN"``) and keeps apostrophes inside
    words (``"IT'S"``).

    Raises :class:`TranscriptError` when ``text`` is None, has no words once normalised, or keeps
    characters outside :data:`VOCAB` (letters of another script, symbols such as ``$``); the
    message names them and says how to fix the transcript.
    """
    if text is None:
        raise TranscriptError("no transcript")
    norm = normalise(text)
    if not norm:
        what = "empty transcript" if not text.strip() else f"transcript has no words once normalised: {text.strip()!r}"
        raise TranscriptError(what)
    bad = sorted(set(_OUT_OF_VOCAB.findall(norm)))
    if bad:
        letters = "".join(c for c in bad if c.isalpha())
        symbols = "".join(c for c in bad if not c.isalpha())
        fixes = []
        if letters:
            fixes.append(f"letters {letters!r} have no A-Z spelling (another script?): transliterate the "
                         "transcript into English letters")
        if symbols:
            fixes.append(f"spell out the symbols {symbols!r} in words")
        raise TranscriptError(f"transcript has characters outside [A-Z' ] after normalisation: "
                              f"{'; '.join(fixes)} (or leave the clip out)")
    return norm


def read_align(path: str | Path) -> list[tuple[float, float, str]]:
    """GRID ``.align`` words as ``(start_frame, end_frame, word)`` at 25 fps (times / 1000)."""
    words = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise CorpusError(f"{path}:{lineno}: expected 'start end word', got {line!r}")
        words.append((int(parts[0]) / 1000.0, int(parts[1]) / 1000.0, parts[2]))
    return words


def align_transcript(path: str | Path) -> str:
    """Words of a GRID ``.align`` file without ``sil``/``sp``, space-separated."""
    return " ".join(w for _, _, w in read_align(path) if w not in _GRID_SILENCE)


def align_words(path: str | Path) -> tuple[tuple[str, float, float], ...]:
    """Words of a GRID ``.align`` file without ``sil``/``sp`` as ``(word, start_s, end_s)``, in
    seconds (the file's 1/25000 s units)."""
    return tuple((w, s / 25.0, e / 25.0) for s, e, w in read_align(path) if w not in _GRID_SILENCE)


def read_lrs_words(path: str | Path) -> tuple[tuple[str, float, float], ...] | None:
    """Word timings of an LRS2 ``pretrain/`` or LRS3 ``.txt``: ``(word, start_s, end_s)`` per row of
    the table under its ``WORD START END ...`` header, times in seconds from the clip's start.

    Returns ``None`` when the file has no such table or an empty one (LRS2 ``main/`` files have only
    the ``Text:`` and ``Conf:`` lines). Raises :class:`CorpusError` naming the line for a row
    without a word and two numbers, or one that ends before it starts.
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    header = next((i for i, line in enumerate(lines) if line.split()[:3] == ["WORD", "START", "END"]), None)
    if header is None:
        return None
    words = []
    for lineno, line in enumerate(lines[header + 1:], start=header + 2):
        parts = line.split()
        if not parts:
            continue
        try:
            word, start, end = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise CorpusError(f"{path}:{lineno}: expected 'WORD START END ...', got {line!r}") from None
        if end < start:
            raise CorpusError(f"{path}:{lineno}: word ends ({end}) before it starts ({start})")
        words.append((word, start, end))
    return tuple(words) or None


def _lrs_words_or_none(path: Path) -> tuple[tuple[str, float, float], ...] | None:
    """:func:`read_lrs_words`, ``None`` without the file, a malformed table logged and ignored (the
    clip keeps its text)."""
    if not path.is_file():
        return None
    try:
        return read_lrs_words(path)
    except CorpusError as exc:
        log.warning("word timings ignored: %s", exc)
        return None


def read_lrs_text(path: str | Path) -> str:
    """Transcript of an LRS ``.txt`` (the ``Text:`` line), or the whole file if it has no header."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("Text:"):
            return line[len("Text:"):].strip()
    return text.strip()


def _safe_id(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", rel)


def _find_landmarks(landmarks_dir: Path, stem: str) -> Path | None:
    for ext in (".npz", ".pkl"):
        p = landmarks_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _read_tsv(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                key, text = line.split("\t", 1)
                out[key.strip()] = text.strip()
    return out


def _warn_orphans(root: Path, orphans: dict[str, str], shown: int = 10) -> None:
    """One warning naming the transcripts (``id -> where``) that have no clip; they are ignored."""
    if not orphans:
        return
    items = [f"{k} ({v})" for k, v in sorted(orphans.items())]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    log.warning("%s: %d transcript(s) without a clip, ignored: %s%s", root, len(items), ", ".join(items[:shown]), more)


def _tsv_stem(key: str) -> str:
    return key[: -len(Path(key).suffix)] if Path(key).suffix.lower() in VIDEO_EXTENSIONS else key


def grid_corpus(root: str | Path, split: str = "train", landmarks_dir: str | Path | None = None) -> list[Utterance]:
    root = Path(root)
    video_dir = root / "video"
    if not video_dir.is_dir():
        raise CorpusError(f"{root}: not a GRID layout (no video/ folder)")
    lm_dir = Path(landmarks_dir) if landmarks_dir else video_dir
    tsv = _read_tsv(root / "transcripts.tsv")
    split_of: dict[str, str] = {}
    for f in sorted(root.glob("split_*.txt")):
        name = f.stem[len("split_"):]
        for line in f.read_text(encoding="utf-8").split():
            split_of[Path(line).stem] = name
    utts = []
    for media in sorted(p for p in video_dir.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
        stem = media.stem
        align = root / "align" / f"{stem}.align"
        text = align_transcript(align) if align.is_file() else tsv.get(media.name, tsv.get(stem))
        times = align_words(align) if align.is_file() else None
        utts.append(Utterance(stem, split_of.get(stem, split), media, text, _find_landmarks(lm_dir, stem), times))
    have = {u.utt_id for u in utts}
    orphans = {_tsv_stem(k): f"transcripts.tsv: {k}" for k in tsv if _tsv_stem(k) not in have}
    if (root / "align").is_dir():
        orphans.update({p.stem: f"align/{p.name}" for p in (root / "align").glob("*.align") if p.stem not in have})
    _warn_orphans(root, orphans)
    return utts


def _read_list(path: Path) -> set[str]:
    return {line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def lrs_corpus(root: str | Path, kind: str, landmarks_dir: str | Path | None = None) -> list[Utterance]:
    root = Path(root)
    if kind not in _LRS_SUBSETS:
        raise ValueError(f"kind must be 'lrs2' or 'lrs3', got {kind!r}")
    subsets = [s for s in _LRS_SUBSETS[kind] if (root / s).is_dir()]
    if not subsets:
        raise CorpusError(f"{root}: not an {kind.upper()} layout (none of {', '.join(_LRS_SUBSETS[kind])}/)")
    lm_dir = Path(landmarks_dir) if landmarks_dir else root
    lists = {}
    if kind == "lrs2":
        lists = {name: _read_list(root / f"{name}.txt") for name in ("train", "val", "test", "pretrain")
                 if (root / f"{name}.txt").is_file()}
    utts = []
    for subset in subsets:
        for media in sorted((root / subset).rglob("*.mp4")):
            rel = media.relative_to(root / subset).with_suffix("").as_posix()  # <spk>/<clip>
            split = next((name for name, ids in lists.items() if rel in ids), subset)
            txt = media.with_suffix(".txt")
            text = read_lrs_text(txt) if txt.is_file() else None
            utts.append(Utterance(_safe_id(rel), split, media, text, _find_landmarks(lm_dir, f"{subset}/{rel}"),
                                  _lrs_words_or_none(txt)))
        _warn_orphans(root, {txt.relative_to(root).with_suffix("").as_posix(): txt.relative_to(root).as_posix()
                             for txt in sorted((root / subset).rglob("*.txt")) if not txt.with_suffix(".mp4").is_file()})
    return utts


def video_corpus(root: str | Path, split: str = "train", landmarks_dir: str | Path | None = None) -> list[Utterance]:
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: not a folder")
    lm_dir = Path(landmarks_dir) if landmarks_dir else root
    tsv = _read_tsv(root / "transcripts.tsv")
    utts = []
    known: set[str] = set()
    for media in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
        rel = media.relative_to(root).as_posix()
        stem = rel[: -len(media.suffix)]
        txt = media.with_suffix(".txt")
        text = read_lrs_text(txt) if txt.is_file() else tsv.get(rel, tsv.get(stem, tsv.get(media.stem)))
        utts.append(Utterance(_safe_id(stem), split, media, text, _find_landmarks(lm_dir, stem),
                              _lrs_words_or_none(txt)))
        known.update({rel, stem, media.stem})
    orphans = {_tsv_stem(k): f"transcripts.tsv: {k}" for k in tsv if k not in known}
    for txt in root.rglob("*.txt"):
        stem = txt.relative_to(root).with_suffix("").as_posix()
        if stem not in known:
            orphans[stem] = txt.relative_to(root).as_posix()
    _warn_orphans(root, orphans)
    return utts


def discover(layout: str, root: str | Path, split: str = "train",
             landmarks_dir: str | Path | None = None) -> list[Utterance]:
    """All utterances of the corpus at ``root`` in ``layout`` (one of :data:`LAYOUTS`), sorted.

    ``split`` names the split of clips the layout does not assign (GRID without split files,
    ``videos``). Raises :class:`CorpusError` when ``root`` lacks the layout or an utterance id
    repeats within a split.
    """
    if layout == "grid":
        utts = grid_corpus(root, split, landmarks_dir)
    elif layout in ("lrs2", "lrs3"):
        utts = lrs_corpus(root, layout, landmarks_dir)
    elif layout == "videos":
        utts = video_corpus(root, split, landmarks_dir)
    else:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    seen: dict[str, Path] = {}
    for u in utts:
        if u.rel_path in seen:
            raise CorpusError(f"utterance id {u.rel_path} is used by both {seen[u.rel_path]} and {u.media}")
        seen[u.rel_path] = u.media
    return sorted(utts, key=lambda u: u.rel_path)
