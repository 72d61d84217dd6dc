#!/usr/bin/env python
"""Transcribe media files with a trained checkpoint (same as ``avsr transcribe``).

    python scripts/transcribe.py --checkpoint ckpt.pt video.mp4 [more.mp4 ...] [--json out.json|-]
        [--mouth-csv mouth.csv] [--speech speech.wav] [--visualize overlay.mp4]

See ``python scripts/transcribe.py --help`` and ``docs/transcribe_schema.json``.
"""

import sys

from avsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["transcribe", *sys.argv[1:]]))
