"""Values that leave the process: strict JSON and timestamps for records (failures, runs, locks)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np


def now_utc() -> str:
    """The current UTC time, ISO-8601 with milliseconds (failure records)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
