"""Ray job entry point: ``python jobs/refine.py --store S --manifest M --set masks.refiner=crf [--preset P] ...``.

The same arguments as ``chexseg refine``. Alone it starts a local Ray; under
``ray job submit --working-dir <repo> -- python jobs/refine.py ...`` it attaches to the cluster (RAY_ADDRESS).
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
    sys.exit(main(["refine", *sys.argv[1:]]))
