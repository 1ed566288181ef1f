"""The store's failures table: one record per image whose latest attempt failed, in ``<store>.sidecar/failures/``.

Records use the one format of :mod:`chexseg_dist.data.failures`, plus the image's store ``slot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from chexseg_dist.data.failures import append_failure_table, failure_table, latest_per_image, read_failure_tables
from chexseg_dist.store.layout import failures_path
from chexseg_dist.store.mapstore import MapStore


@dataclass
class Failure:
    """Failure records of some rows: what could not be processed and why.

    Attributes:
        slots, rows: ``[m]`` int64 store slots and manifest rows.
        image_id, path, stage, error: ``[m]`` str; ``stage`` is ``read`` (fetching the bytes), ``decode``
            (decoding / letterboxing) or ``model`` (non-finite classifier output).
        time: ``[m]`` str, UTC ISO-8601 time of the failure.
    """

    slots: np.ndarray
    rows: np.ndarray
    image_id: np.ndarray
    path: np.ndarray
    stage: np.ndarray
    error: np.ndarray
    time: np.ndarray

    @staticmethod
    def empty() -> Failure:
        z = np.zeros(0, dtype=np.int64)
        s = np.zeros(0, dtype=str)
        return Failure(z, z.copy(), s, s.copy(), s.copy(), s.copy(), s.copy())

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    @staticmethod
    def concat(parts: Sequence[Failure]) -> Failure:
        if not parts:
            return Failure.empty()
        fields = Failure.__dataclass_fields__
        return Failure(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in fields})

    def to_table(self, run_id: str) -> pa.Table:
        columns = {"image_id": self.image_id, "path": self.path, "row": self.rows, "stage": self.stage}
        columns.update(error=self.error, time=self.time)
        return failure_table(columns, run_id, extra={"slot": pa.array(self.slots.astype(np.int64))})


def append_failures(store_uri: str, failures: Failure, run_id: str) -> str:
    """Write failure records as one new Parquet file in ``<store>.sidecar/failures/``; returns its path."""
    return append_failure_table(failures_path(store_uri), failures.to_table(run_id))


def read_failures(store_uri: str, current_only: bool = True) -> pa.Table:
    """The failures table (columns image_id, path, row, slot, stage, error, run_id, time).

    Args:
        store_uri: the map store.
        current_only: keep only the latest record per image, and only images still failed in the store (a retry
            that succeeded removes them); False returns every record ever written.
    """
    table = read_failure_tables(failures_path(store_uri))
    if table is None:
        return Failure.empty().to_table("")
    if not current_only:
        return table
    latest = latest_per_image(table, key="slot")
    still = MapStore.open(store_uri).failed()
    return latest.filter(pa.array(still[np.asarray(latest.column("slot"), dtype=np.int64)]))
