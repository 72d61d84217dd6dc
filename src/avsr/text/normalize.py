"""The one text normalisation of the project: training transcripts and evaluation both use it.

:func:`normalise` turns ordinary writing into upper-case words over ``[A-Z' ]`` wherever it can:

1. Unicode NFKC (full-width and compatibility forms become plain ones: ``１`` -> ``1``, ``…`` ->
   ``...``); invisible format characters (category ``Cf``: byte-order mark, zero-width space) are
   deleted;
2. annotation tags in braces (LRS3's ``{LG}`` laughter and ``{NS}`` noise) are deleted: they are
   not words anyone said;
3. numbers written with the digits 0-9 are spelled out in English words with ``num2words``:
   cardinals (``9`` -> ``NINE``, ``1,000`` -> ``ONE THOUSAND``, ``21`` -> ``TWENTY ONE``), the
   digits after a decimal point one by one (``3.05`` -> ``THREE POINT ZERO FIVE``), ordinals with
   ``st``/``nd``/``rd``/``th`` (``2nd`` -> ``SECOND``). Years and phone numbers are read as
   cardinals too (``1999`` -> ``ONE THOUSAND NINE HUNDRED AND NINETY NINE``): how a number was
   spoken is a guess, so transcripts meant to be exact should spell numbers out;
4. ``&`` -> ``AND``, ``%`` -> ``PERCENT``;
5. upper case, then accents are removed from Latin letters (``Café`` -> ``CAFE``: NFD, combining
   marks deleted);
6. dashes (category ``Pd``), ``/`` and ``_`` become spaces (``WELL-KNOWN`` -> two words); the
   typographic apostrophes ``’`` and ``ʼ`` become ``'``; an apostrophe between two letters is kept
   (``DON'T``, ``WE'RE``: the training vocabulary ``[A-Z' ]`` has it and it tells ``WE'RE`` from
   ``WERE``) unless ``apostrophes=False``; one at a word's edge cannot be told from a quotation
   mark and is deleted (``'bin blue'`` -> ``BIN BLUE``, ``GOIN'`` -> ``GOIN``); every other
   punctuation character (categories ``P*``) is deleted;
7. runs of whitespace collapse to one space; leading and trailing whitespace is removed.

What is left outside ``[A-Z' ]`` (letters of other scripts, symbols such as ``$`` or ``€``) stays
as it is: :func:`avsr.data.corpora.normalise_transcript` rejects such a transcript, and the
evaluation scores it as it stands.

Apostrophes, decided: training transcripts keep them (``apostrophes=True``, the default) because
the character vocabulary can spell them and they carry meaning; evaluation
(:func:`avsr.evaluation.wer.normalize_text`) runs this same function with ``apostrophes=False`` on
references and hypotheses alike, so ``DON'T`` and ``DONT`` score as a match (as before). The two
results differ by apostrophes alone, and every evaluation result is also expressible in the
training vocabulary.
"""

from __future__ import annotations

import re
import unicodedata

from num2words import num2words

#: The characters a normalised training transcript may contain.
VOCAB_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ' "

_TAG = re.compile(r"\{[^{}]*\}")
# 1,234,567.89 / 2nd / 9: digits with optional thousands groups, decimals and an ordinal suffix
_NUMBER = re.compile(r"(?<![0-9])([0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.([0-9]+))?"
                     r"(?:(st|nd|rd|th)(?![A-Za-z]))?", re.IGNORECASE)
_SYMBOLS = {"&": " and ", "%": " percent "}
_APOSTROPHES = {"\u2019": "'", "\u02bc": "'"}
_SPACE_PUNCT = {"/", "_"}
_EDGE_APOSTROPHE = re.compile(r"(?<![A-Z])'|'(?![A-Z])")  # not between two letters


def _spell_number(match: re.Match) -> str:
    whole, frac, suffix = match.group(1), match.group(2), match.group(3)
    value = int(whole.replace(",", ""))
    if suffix and frac is None:
        words = num2words(value, lang="en", to="ordinal")
    else:
        words = num2words(value, lang="en")
        if frac is not None:
            words += " point " + " ".join(num2words(int(d), lang="en") for d in frac)
        if suffix:  # "3.5th": not an ordinal; keep the letters as a word
            words += " " + suffix
    return f" {words} "


def normalise(text: str, apostrophes: bool = True) -> str:
    """``text`` normalised by the rules of the module docstring; never raises.

    ``"Bin blue, at L 9 again!"`` -> ``"BIN BLUE AT L NINE AGAIN"``; ``"Don't"`` -> ``"DON'T"``
    (``"DONT"`` with ``apostrophes=False``). The result may still hold characters outside
    :data:`VOCAB_CHARS` (non-Latin letters, symbols); callers decide what to do with them.
    """
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = _TAG.sub(" ", text)
    text = _NUMBER.sub(_spell_number, text)
    text = "".join(_SYMBOLS.get(ch, ch) for ch in text)
    text = unicodedata.normalize("NFD", text.upper())
    out = []
    for ch in text:
        ch = _APOSTROPHES.get(ch, ch)
        cat = unicodedata.category(ch)
        if cat == "Mn":  # combining accent of a decomposed letter
            continue
        if cat == "Pd" or ch in _SPACE_PUNCT:
            out.append(" ")
        elif ch == "'" or not cat.startswith("P"):
            out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    # keep those between two letters (after the other rules, so "ROCK'N'ROLL" keeps both), or none
    text = _EDGE_APOSTROPHE.sub("", text) if apostrophes else text.replace("'", "")
    return " ".join(text.split())
