"""Ray job entry point: train the saliency classifier (same arguments as ``chexseg train-classifier``).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_classifier.py --train M.parquet --valid V.parquet --out CKPT [--preset paper] [--set ...]
"""

from __future__ import annotations

import os
import sys

try:
    import chexseg_dist  # noqa: F401
except ImportError:  # Run from a Ray job working dir without the package installed: use the repo copy.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chexseg_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-classifier", *sys.argv[1:]]))
