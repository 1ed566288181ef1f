"""The thresholds file written by ``chexseg tune-thresholds``: per-pathology map thresholds and probability cutoffs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.core.serialize import json_safe
from chexseg_dist.errors import InputError

# ---------------------------------------------------------------------------------------------------- tuned file
THRESHOLDS_FORMAT = "chexseg-thresholds"


@dataclass
class TunedThresholds:
    """The content of a thresholds file written by ``chexseg tune-thresholds``.

    Attributes:
        thresholds: ``[10]`` map thresholds in ``[0, 1]`` (TASKS order).
        cutoffs: ``[10]`` probability cutoffs in ``[0, 1]`` (TASKS order).
        meta: everything else recorded in the file (objective, grid, mIoU, store fingerprint...).
    """

    thresholds: np.ndarray
    cutoffs: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": THRESHOLDS_FORMAT, "version": 1}
        out["thresholds"] = {t: float(v) for t, v in zip(TASKS, self.thresholds)}
        out["cutoffs"] = {t: float(v) for t, v in zip(TASKS, self.cutoffs)}
        out.update(self.meta)
        return out

    def save(self, path: str) -> None:
        with fsio.open_file(path, "w") as f:
            json.dump(json_safe(self.to_json()), f, indent=2)

    @classmethod
    def load(cls, path: str) -> TunedThresholds:
        """Read a thresholds file.

        Raises:
            InputNotFoundError: no such file; InputError: naming the file and the missing or malformed field.
        """
        try:
            data = json.loads(fsio.read_input(path, "thresholds file (write it with chexseg tune-thresholds)"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
            raise InputError(f'{path}: not a thresholds file (expected "format": "{THRESHOLDS_FORMAT}")')
        values = []
        for key in ("thresholds", "cutoffs"):
            section = data.get(key)
            if not isinstance(section, dict):
                raise InputError(f"{path}: missing the {key!r} object {{pathology: value}}")
            missing = [t for t in TASKS if t not in section]
            if missing:
                raise InputError(f"{path}: {key!r} lacks pathologies {missing}")
            try:
                arr = np.asarray([section[t] for t in TASKS], dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"{path}: {key!r} values must be numbers in [0, 1], got {section!r:.200}") from None
            if not np.all(np.isfinite(arr) & (arr >= 0) & (arr <= 1)):
                raise InputError(f"{path}: {key!r} values must be numbers in [0, 1], got {arr.tolist()}")
            values.append(arr)
        meta = {k: v for k, v in data.items() if k not in ("thresholds", "cutoffs", "format", "version")}
        return cls(thresholds=values[0], cutoffs=values[1], meta=meta)


def check_thresholds_store(tuned: TunedThresholds, path: str, store_uri: str, store_attrs: dict[str, Any]) -> None:
    """Refuse thresholds tuned on the maps of another classifier than the store's they are applied to.

    A thresholds file records the model fingerprint of the store it was tuned on (``store.model_fingerprint``,
    written since 0.1.0's successor); a file without one (older) cannot be checked and passes.

    Raises:
        InputError: naming both fingerprints, the file and the store, and the fix.
    """
    tuned_on = (tuned.meta.get("store") or {}).get("model_fingerprint")
    applied_to = store_attrs.get("model_fingerprint")
    if tuned_on and applied_to and tuned_on != applied_to:
        raise InputError(
            f"thresholds {path} were tuned on the maps of classifier {str(tuned_on)[:12]}... "
            f"({(tuned.meta.get('store') or {}).get('uri')}) but {store_uri} holds the maps of classifier "
            f"{str(applied_to)[:12]}...: tune thresholds on a store of this classifier (chexseg tune-thresholds)"
        )
