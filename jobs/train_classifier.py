"""Ray job entry point: train the saliency classifier (same arguments as ``chexseg train-classifier``).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_classifier.py --train M.parquet --valid V.parquet --out CKPT [--preset paper] [--set ...]
"""

from __future__ import annotations

import argparse
import os
import sys

# The working directory of `ray job submit --working-dir .` is the repo root, but the script's own directory
# (jobs/) is what Python puts on sys.path: add the root so chexseg_dist imports without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chexseg_dist.commands import train_classifier


def main() -> int:
    parser = argparse.ArgumentParser(prog="jobs/train_classifier.py", description=train_classifier.__doc__)
    train_classifier.add_arguments(parser)
    return train_classifier.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
