"""Tokenizers: id layout, round trips on every GRID s1 training transcript, serialisation, CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from avsr.config import TextConfig
from avsr.data.manifest import ManifestRow, write_manifest
from avsr.text import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    from_bytes,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


def _grid_train_transcripts(grid_dir: Path) -> list[str]:
    text = dict(line.rstrip("\n").split("\t", 1) for line in (grid_dir / "transcripts.tsv").open(encoding="utf-8"))
    train = [line.strip() for line in (grid_dir / "split_train.txt").open(encoding="utf-8") if line.strip()]
    return [text[clip] for clip in train]


@pytest.fixture(scope="module")
def transcripts(grid_dir: Path) -> list[str]:
    out = _grid_train_transcripts(grid_dir)
    assert len(out) == 450
    return out


@pytest.fixture(scope="module", params=["char", "sentencepiece"])
def tokenizer(request, transcripts) -> Tokenizer:
    return build_tokenizer(TextConfig(kind=request.param, vocab_size=40), transcripts)


def test_round_trips_every_training_transcript(tokenizer, transcripts):
    for text in transcripts:
        ids = tokenizer.encode(text)
        assert ids, text
        assert tokenizer.decode(ids) == text


def test_id_layout(tokenizer, transcripts):
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.blank_id == 0 and tokenizer.unk_id == 1
    assert tokenizer.sos_id == tokenizer.eos_id == tokenizer.vocab_size - 1
    used = {i for t in transcripts for i in tokenizer.encode(t)}
    # seen text never maps to blank, unk or sos/eos
    assert min(used) >= 2 and max(used) <= tokenizer.vocab_size - 2


def test_sentencepiece_has_the_asked_vocabulary_size_and_uses_pieces(transcripts):
    tok = SentencePieceTokenizer.train(transcripts, vocab_size=40)
    assert tok.vocab_size == 40
    char = CharTokenizer.train(transcripts)
    # word pieces make sequences shorter than characters
    n_sp = sum(len(tok.encode(t)) for t in transcripts)
    n_char = sum(len(char.encode(t)) for t in transcripts)
    assert n_sp < 0.85 * n_char


def test_char_vocabulary_is_the_grid_alphabet(transcripts):
    tok = CharTokenizer.train(transcripts)
    assert "".join(tok.symbols) == " ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert tok.vocab_size == 27 + 3
    assert tok.encode("AB") == [3, 4]


def test_whitespace_is_normalised_and_specials_are_dropped(tokenizer):
    ids = tokenizer.encode("  BIN   BLUE ")
    assert tokenizer.decode(ids) == "BIN BLUE"
    assert tokenizer.decode([tokenizer.blank_id, *ids, tokenizer.eos_id]) == "BIN BLUE"
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([-1])


def test_unknown_symbols_map_to_unk(tokenizer):
    ids = tokenizer.encode("BIN 9")
    assert tokenizer.unk_id in ids
    assert "\u2047" in tokenizer.decode(ids)


def test_bytes_and_file_round_trip(tokenizer, transcripts, tmp_path):
    again = from_bytes(tokenizer.to_bytes())
    assert type(again) is type(tokenizer) and again.vocab_size == tokenizer.vocab_size
    for text in transcripts[:50]:
        assert again.encode(text) == tokenizer.encode(text)
    path = tmp_path / "tok.bin"
    tokenizer.save(path)
    loaded = build_tokenizer(TextConfig(kind=tokenizer.kind, model_path=str(path)))
    assert loaded.to_bytes() == tokenizer.to_bytes()


def test_bad_input_raises_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="bad header"):
        from_bytes(b"not a tokenizer")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b'{"kind": "sentencepiece", "format": 1}\nxx')
    with pytest.raises(TokenizerError, match="bad.bin"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.bin")
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.train(["", "  "])
    with pytest.raises(TokenizerError, match="vocab_size"):
        SentencePieceTokenizer.train(["A B"], vocab_size=3)
    with pytest.raises(TokenizerError, match="kind"):
        build_tokenizer(TextConfig(kind="bpe"), ["A B"])


def test_train_tokenizer_script(transcripts, tmp_path):
    rows = [ManifestRow(f"u{i}", f"train/u{i}", 75, 48000, t) for i, t in enumerate(transcripts[:100])]
    write_manifest(tmp_path, "train", rows)
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "scripts" / "train_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "tok.bin"
    assert script.main(["--root", str(tmp_path), "--out", str(out), "text.kind=sentencepiece", "text.vocab_size=30"]) == 0
    tok = load_tokenizer(out)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 30
    assert all(tok.decode(tok.encode(t)) == t for t in transcripts[:100])
    assert script.main(["--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
