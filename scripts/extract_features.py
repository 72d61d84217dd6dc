#!/usr/bin/env python
"""Features of a pretrained frontend or encoder for every clip of a manifest (same as ``avsr extract-features``).

    python scripts/extract_features.py --checkpoint ckpt.pt --root <corpus> --split test \
        --part visual_frontend --out feats/

Writes ``feats/<utt_id>.npy``: float32 ``(T, D)`` at 25 fps, ``D = model.frontend_dim`` for the
frontends and ``model.d_model`` for ``encoder`` (see :mod:`avsr.inference.features`).
"""

import sys

from avsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract-features", *sys.argv[1:]]))
