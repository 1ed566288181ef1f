"""Ray job entry point: train the segmentation student (same arguments as ``chexseg train-segmentation``).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_segmentation.py --mode semi --expert-manifest V.parquet --expert-annotations V.json \
        --pseudo-store s3://bucket/maps/train.zarr --pseudo-manifest T.parquet --out s3://bucket/student \
        [--preset paper] [--set ...]
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
    sys.exit(main(["train-segmentation", *sys.argv[1:]]))
