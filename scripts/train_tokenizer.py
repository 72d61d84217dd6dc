#!/usr/bin/env python
"""Train the tokenizer of a config on the transcripts of a preprocessed split and save it.

Example::

    python scripts/train_tokenizer.py --config configs/grid/audio.yaml --out data/grid/tokenizer.bin \\
        text.kind=sentencepiece text.vocab_size=64

The corpus root and split default to ``data.root`` and ``data.train_split`` of the config.
Point ``text.model_path`` at the written file to use it for training and decoding.
"""

from __future__ import annotations

import argparse
import logging
import sys

from avsr.config import ConfigError, load_config
from avsr.data.manifest import ManifestError, read_manifest
from avsr.text import TokenizerError, build_tokenizer
from avsr.utils import setup_logging

log = logging.getLogger("train_tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--root", help="preprocessed corpus root (default: data.root)")
    parser.add_argument("--split", help="split whose transcripts to train on (default: data.train_split)")
    parser.add_argument("--out", required=True, help="output tokenizer file")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.text.model_path = ""  # always train here
        root = args.root or cfg.data.root
        if not root:
            raise ConfigError("no corpus root: pass --root or set data.root")
        split = args.split or cfg.data.train_split
        rows = read_manifest(root, split)
        tok = build_tokenizer(cfg.text, [r.transcript for r in rows])
    except (ConfigError, ManifestError, TokenizerError) as exc:
        log.error("%s", exc)
        return 1
    tok.save(args.out)
    log.info("wrote a %s tokenizer with %d ids, trained on %d transcripts of %s/%s, to %s",
             tok.kind, tok.vocab_size, len(rows), root, split, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
