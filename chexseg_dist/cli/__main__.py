"""``python -m chexseg_dist.cli COMMAND ...``: the ``chexseg`` console script."""

import sys

from chexseg_dist.cli.main import main

sys.exit(main())
