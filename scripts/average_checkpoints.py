#!/usr/bin/env python
"""Average the weights of several checkpoints (icefall/ESPnet-style model averaging).

    python scripts/average_checkpoints.py --exp-dir checkpoints/grid_audio --last 5
    python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --out avg.pt

``--last K`` takes the K newest ``step-<N>.pt`` files of ``--exp-dir`` (default output
``<exp-dir>/avg-last<K>.pt``). The result holds the mean model, and the config and tokenizer
of the newest input; it loads with ``avsr.training.load_model`` (not for ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from avsr.training.averaging import average_checkpoints
from avsr.training.checkpoint import save_checkpoint, step_checkpoints
from avsr.utils import setup_logging

log = logging.getLogger("average_checkpoints")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inputs", nargs="+", type=Path, help="checkpoint files to average")
    src.add_argument("--exp-dir", type=Path, help="experiment folder holding step-<N>.pt files")
    p.add_argument("--last", type=int, default=5, help="with --exp-dir: how many of the newest to average")
    p.add_argument("--out", type=Path, help="output checkpoint (default <exp-dir>/avg-last<K>.pt)")
    args = p.parse_args(argv)
    setup_logging()
    if args.inputs:
        paths = args.inputs
        if args.out is None:
            p.error("--out is required with --inputs")
        out = args.out
    else:
        if args.last < 1:
            p.error("--last must be >= 1")
        found = [path for _, path in step_checkpoints(args.exp_dir)]
        if len(found) < args.last:
            log.error("%s has %d step checkpoint(s), fewer than --last %d", args.exp_dir, len(found), args.last)
            return 1
        paths = found[-args.last:]
        out = args.out or args.exp_dir / f"avg-last{args.last}.pt"
    try:
        state = average_checkpoints(paths)
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    save_checkpoint(state, out)
    log.info("wrote %s (mean of %d checkpoints)", out, len(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
