#!/usr/bin/env python
"""Train the Transformer LM used for shallow fusion (``decode.lm_path``, ``decode.lm_weight``).

The LM reads the ASR model's own token ids, so take the tokenizer from the ASR checkpoint (or a
tokenizer file), and train on the transcripts of the training split only::

    .venv/bin/python scripts/train_lm.py --data data/grid --checkpoint checkpoints/grid_av/best.pt \\
        --out checkpoints/grid_lm/lm.pt --steps 2000
    .venv/bin/python test.py ... --decode.lm_path=checkpoints/grid_lm/lm.pt --decode.lm_weight=0.3

The validation split (default ``val``, else 5% of the training transcripts held out) gives the
reported cross-entropy and perplexity; test transcripts are never read.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys

from avsr.data.manifest import ManifestError, read_manifest
from avsr.decoding.lm import LMConfig, TransformerLM, save_lm, train_lm
from avsr.utils import seed_everything, set_num_threads, setup_logging

log = logging.getLogger("train_lm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessed corpus root (holds <split>.tsv)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="ASR checkpoint whose tokenizer the LM uses")
    src.add_argument("--tokenizer", help="tokenizer file (Tokenizer.save) instead of a checkpoint")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="held-out split (if missing, 5%% of train is held out)")
    p.add_argument("--out", required=True, help="LM checkpoint to write")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _tokenizer(args: argparse.Namespace):
    if args.tokenizer:
        from avsr.text import load_tokenizer

        return load_tokenizer(args.tokenizer)
    from avsr.training.checkpoint import load_checkpoint, tokenizer_from_state

    return tokenizer_from_state(load_checkpoint(args.checkpoint))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    set_num_threads()
    seed_everything(args.seed)
    try:
        tokenizer = _tokenizer(args)
        train_text = [r.transcript for r in read_manifest(args.data, args.train_split)]
        try:
            val_text = [r.transcript for r in read_manifest(args.data, args.val_split)]
        except ManifestError:
            shuffled = random.Random(args.seed).sample(train_text, len(train_text))
            n_val = max(1, len(shuffled) // 20)
            val_text, train_text = shuffled[:n_val], shuffled[n_val:]
            log.info("no '%s' split: holding out %d training transcripts for validation", args.val_split, n_val)
        train = [ids for ids in map(tokenizer.encode, train_text) if ids]
        valid = [ids for ids in map(tokenizer.encode, val_text) if ids]
        cfg = LMConfig(tokenizer.vocab_size, args.d_model, args.num_heads, args.num_layers, args.ffn_dim, args.dropout)
        lm = TransformerLM(cfg)
        val_loss = train_lm(lm, train, valid, sos_id=tokenizer.sos_id, eos_id=tokenizer.eos_id, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    save_lm(args.out, lm, tokenizer.to_bytes(), args.steps, val_loss)
    log.info("wrote %s: %d sentences, validation cross-entropy %.3f nats/token (perplexity %.2f; uniform %.1f)",
             args.out, len(train), val_loss, math.exp(val_loss), float(tokenizer.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
