"""Tokenizers: SentencePiece unigram (LRS-scale corpora) and characters (tiny corpora such as GRID).

Both share one id layout, which the CTC head, the attention decoder and the decoders rely on:

=====================  =======================================================
id                     meaning
=====================  =======================================================
``0``                  CTC blank (never produced by :meth:`Tokenizer.encode`)
``1``                  unknown symbol (a character or piece not seen in training)
``2 .. V - 2``         word pieces / characters
``V - 1``              ``<sos/eos>``: start and end of sentence of the decoder
``-1`` (``IGNORE_ID``) padding of target sequences in a :class:`~avsr.data.batch.Batch`
=====================  =======================================================

Text is normalised before encoding: leading/trailing whitespace is stripped and runs of
whitespace collapse to one space, so ``decode(encode(s)) == " ".join(s.split())`` for every
string made of symbols seen in training. A tokenizer serialises to bytes (:meth:`to_bytes`)
so a checkpoint carries it; :func:`from_bytes` and :func:`load_tokenizer` read it back.
"""

from __future__ import annotations

import abc
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

from avsr.utils import atomic_write_bytes

log = logging.getLogger(__name__)

BLANK_ID = 0
UNK_ID = 1
KINDS = ("sentencepiece", "char")
_UNK_TEXT = "\u2047"  # "⁇", what SentencePiece prints for an unknown piece
_FORMAT = 1


class TokenizerError(ValueError):
    """A tokenizer cannot be trained (no text, vocabulary too small) or read (corrupt bytes)."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the model, training and decoding code need from a tokenizer (id layout above)."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def blank_id(self) -> int: ...

    @property
    def unk_id(self) -> int: ...

    @property
    def sos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_bytes(self) -> bytes: ...


def _normalise(text: str) -> str:
    return " ".join(text.split())


class _BaseTokenizer(abc.ABC):
    """The special ids, saving and the serialisation header shared by both tokenizers."""

    kind: str
    _size: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abc.abstractmethod
    def to_bytes(self) -> bytes: ...

    @property
    def vocab_size(self) -> int:
        """Number of output classes ``V`` (blank, unk, symbols and ``<sos/eos>``)."""
        return self._size

    @property
    def blank_id(self) -> int:
        return BLANK_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def sos_id(self) -> int:
        return self._size - 1

    @property
    def eos_id(self) -> int:
        return self._size - 1

    def _content_ids(self, ids: Iterable[int]) -> list[int]:
        """``ids`` without blank and ``<sos/eos>``; raises ValueError for an id outside ``[0, V)``."""
        out = []
        for i in map(int, ids):
            if not 0 <= i < self._size:
                raise ValueError(f"token id {i} out of range for vocabulary size {self._size}")
            if i not in (BLANK_ID, self.eos_id):
                out.append(i)
        return out

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically."""
        atomic_write_bytes(path, self.to_bytes())

    def _header(self, **extra: object) -> bytes:
        return (json.dumps({"kind": self.kind, "format": _FORMAT, **extra}) + "\n").encode("utf-8")


class CharTokenizer(_BaseTokenizer):
    """One id per character (space included), for corpora too small for word pieces.

    ``symbols`` are the characters in id order starting at id 2; unknown characters encode to
    ``unk_id`` and decode to ``"⁇"``. Blank and ``<sos/eos>`` ids are skipped by :meth:`decode`.
    """

    kind = "char"

    def __init__(self, symbols: Iterable[str]) -> None:
        self.symbols = list(symbols)
        if not self.symbols:
            raise TokenizerError("a character tokenizer needs at least one symbol")
        if any(len(s) != 1 for s in self.symbols) or len(set(self.symbols)) != len(self.symbols):
            raise TokenizerError("character tokenizer symbols must be distinct single characters")
        self._index = {c: i + 2 for i, c in enumerate(self.symbols)}
        self._size = len(self.symbols) + 3

    @classmethod
    def train(cls, transcripts: Iterable[str]) -> "CharTokenizer":
        """The sorted set of characters of ``transcripts`` (after whitespace normalisation)."""
        chars = sorted({c for t in transcripts for c in _normalise(t)})
        if not chars:
            raise TokenizerError("cannot build a character tokenizer from empty transcripts")
        return cls(chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (no ``<sos/eos>``)."""
        return [self._index.get(c, UNK_ID) for c in _normalise(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; blank and ``<sos/eos>`` are dropped, out-of-range ids raise ValueError."""
        return "".join(_UNK_TEXT if i == UNK_ID else self.symbols[i - 2] for i in self._content_ids(ids))

    def to_bytes(self) -> bytes:
        return self._header(symbols=self.symbols)


class SentencePieceTokenizer(_BaseTokenizer):
    """A SentencePiece unigram model (Kudo 2018) with the id layout above.

    SentencePiece owns ids ``0 .. V - 2`` (``0`` is its padding piece, used as the CTC blank;
    ``1`` its unknown piece); ``<sos/eos>`` is the extra id ``V - 1``.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"not a SentencePiece model: {exc}") from None
        if self._sp.pad_id() != BLANK_ID or self._sp.unk_id() != UNK_ID:
            raise TokenizerError(
                f"SentencePiece model must have pad (blank) id {BLANK_ID} and unk id {UNK_ID}, "
                f"got {self._sp.pad_id()} and {self._sp.unk_id()}"
            )
        self._proto = model_proto
        self._size = self._sp.get_piece_size() + 1

    @classmethod
    def train(cls, transcripts: Iterable[str], vocab_size: int) -> "SentencePieceTokenizer":
        """Train a unigram model on ``transcripts`` for ``vocab_size`` ids in all (specials included).

        Small corpora may support fewer pieces than asked for: the model then gets as many as
        the text allows (logged as a warning) rather than failing. Raises
        :class:`TokenizerError` for empty input or ``vocab_size`` < 4.
        """
        if vocab_size < 4:
            raise TokenizerError(f"vocab_size must be >= 4 (blank, unk, one piece, sos/eos), got {vocab_size}")
        lines = [t for t in (_normalise(x) for x in transcripts) if t]
        if not lines:
            raise TokenizerError("cannot train a SentencePiece model on empty transcripts")
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=buf, model_type="unigram",
                vocab_size=vocab_size - 1, hard_vocab_limit=False, character_coverage=1.0,
                normalization_rule_name="identity", pad_id=BLANK_ID, pad_piece="<blank>",
                unk_id=UNK_ID, bos_id=-1, eos_id=-1, num_threads=1, minloglevel=2,
            )
        except RuntimeError as exc:
            raise TokenizerError(f"SentencePiece training failed: {exc}") from None
        tok = cls(buf.getvalue())
        if tok.vocab_size != vocab_size:
            log.warning("asked for %d tokens, the transcripts support %d", vocab_size, tok.vocab_size)
        return tok

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text`` (no ``<sos/eos>``)."""
        return list(self._sp.encode(_normalise(text)))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; blank and ``<sos/eos>`` are dropped, out-of-range ids raise ValueError."""
        return _normalise(self._sp.decode(self._content_ids(ids)))

    def to_bytes(self) -> bytes:
        return self._header() + self._proto


def from_bytes(data: bytes) -> Tokenizer:
    """Inverse of ``Tokenizer.to_bytes``; raises :class:`TokenizerError` on malformed data."""
    head, sep, payload = bytes(data).partition(b"\n")
    try:
        meta = json.loads(head.decode("utf-8")) if sep else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("kind") not in KINDS:
        raise TokenizerError("not a serialised avsr tokenizer (bad header)")
    if meta["kind"] == "char":
        return CharTokenizer(meta.get("symbols", []))
    return SentencePieceTokenizer(payload)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer file written by ``Tokenizer.save``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        return from_bytes(path.read_bytes())
    except TokenizerError as exc:
        raise TokenizerError(f"{path}: {exc}") from None


def build_tokenizer(cfg, transcripts: Iterable[str] = ()) -> Tokenizer:
    """The tokenizer of ``cfg`` (an :class:`avsr.config.TextConfig`).

    Loads ``cfg.model_path`` when set, else trains a ``cfg.kind`` tokenizer on ``transcripts``
    (``cfg.vocab_size`` ids for SentencePiece). Raises :class:`TokenizerError` for an unknown
    kind or when there is nothing to train on.
    """
    if cfg.model_path:
        tok = load_tokenizer(cfg.model_path)
        if tok.kind != cfg.kind:
            log.warning("text.kind is %s but %s holds a %s tokenizer; using the file", cfg.kind, cfg.model_path, tok.kind)
        return tok
    if cfg.kind == "char":
        return CharTokenizer.train(transcripts)
    if cfg.kind == "sentencepiece":
        return SentencePieceTokenizer.train(transcripts, cfg.vocab_size)
    raise TokenizerError(f"text.kind must be one of {', '.join(KINDS)}, got '{cfg.kind}'")
