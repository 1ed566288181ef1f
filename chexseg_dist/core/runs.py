"""Run ids: one format for every job that records what it did (store lock owners, fragment names, failure records,
training runs' failure tables)."""

from __future__ import annotations

import time
import uuid


def new_run_id() -> str:
    """A run id: local time plus 6 random hex digits, e.g. ``20261208T041512-3fa9c1``."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
