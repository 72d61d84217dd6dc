"""Text tokenizers (SentencePiece unigram and characters) with a fixed id layout; see :mod:`.tokenizer`."""

from avsr.text.tokenizer import (
    BLANK_ID,
    UNK_ID,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    from_bytes,
    load_tokenizer,
)

__all__ = [
    "BLANK_ID",
    "UNK_ID",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "from_bytes",
    "load_tokenizer",
]
