"""Per-image failure records: what could not be processed, where, and why. One format for every stage.

A long job never dies on one bad image: the image is left out and a record is kept (``image_id``, ``path``, manifest
``row``, ``stage`` = ``read`` | ``decode`` | ``model``, ``error``, UTC ``time``, and the ``run_id``). Records are
appended as small Parquet files, one per writer, to a *failures directory* (local or object storage), so parallel
tasks never write the same file; :func:`read_failure_tables` concatenates them. The map store keeps its table in
``<store>.sidecar/failures/`` (with each record's store ``slot``); classifier training keeps one under its Ray Train
run and copies the distinct failed images beside the exported checkpoint.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from chexseg_dist.core import fsio

#: Columns of a failure record, in order (stores add ``slot``).
FAILURE_COLUMNS: tuple[str, ...] = ("image_id", "path", "row", "stage", "error", "run_id", "time")


def failure_table(columns: Mapping[str, Any], run_id: str, extra: Mapping[str, pa.Array] | None = None) -> pa.Table:
    """Failure records as an Arrow table.

    Args:
        columns: ``image_id``, ``path``, ``stage``, ``error``, ``time`` (str sequences) and ``row`` (ints), one
            entry per failed image.
        run_id: the run that saw the failures.
        extra: further int64 columns (e.g. the store ``slot``), inserted after ``row``.
    """
    n = len(columns["row"])
    data: dict[str, pa.Array] = {
        "image_id": pa.array([str(v) for v in columns["image_id"]], pa.string()),
        "path": pa.array([str(v) for v in columns["path"]], pa.string()),
        "row": pa.array(np.asarray(columns["row"], dtype=np.int64)),
    }
    data.update(extra or {})
    data.update(
        {
            "stage": pa.array([str(v) for v in columns["stage"]], pa.string()),
            "error": pa.array([str(v) for v in columns["error"]], pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "time": pa.array([str(v) for v in columns["time"]], pa.string()),
        }
    )
    return pa.table(data)


def append_failure_table(directory: str, table: pa.Table) -> str:
    """Write one table of records as a new Parquet file in ``directory`` (created locally); returns its path."""
    fsio.makedirs(directory)
    run_id = str(table.column("run_id")[0]) if table.num_rows else "empty"
    target = fsio.join(directory, f"{run_id}-{uuid.uuid4().hex[:12]}.parquet")
    with fsio.open_file(target, "wb") as f:
        pq.write_table(table, f)
    return target


def read_failure_tables(directory: str) -> pa.Table | None:
    """Every record in ``directory`` (files in name order), or None when there is none."""
    fs, inner = fsio.filesystem(directory)
    try:
        listing = fs.ls(inner, detail=False, refresh=True) if fsio.is_uri(directory) else fs.ls(inner, detail=False)
    except FileNotFoundError:
        return None
    tables = []
    for path in sorted(str(p) for p in listing if str(p).endswith(".parquet")):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def latest_per_image(table: pa.Table, key: str = "row") -> pa.Table:
    """The newest record of each image (by ``key``), in ``key`` order: one line per failed image, not per attempt."""
    keys = np.asarray(table.column(key), dtype=np.int64)
    order = np.lexsort((np.asarray(table.column("time").to_pylist(), dtype=str), keys))
    last = np.r_[keys[order][1:] != keys[order][:-1], True]
    return table.take(pa.array(order[last]))
