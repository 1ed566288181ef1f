"""Ray job entry point: train the affinity network (same arguments as ``chexseg train-affinity``).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_affinity.py --store s3://bucket/maps/train.zarr --manifest T.parquet \
        --out s3://bucket/affinity [--preset paper] [--set ...]
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
    sys.exit(main(["train-affinity", *sys.argv[1:]]))
