"""The Parquet manifest: one row per radiograph, the single input every distributed stage reads.

A manifest is built once, from a CheXpert-format CSV (:func:`manifest_from_csv`) or from one listing of a
directory tree or object-store prefix (:func:`manifest_from_listing`), and written with :func:`write_manifest`.
Every later stage loads it with :func:`read_manifest` instead of listing the store again (listing millions of
objects under an S3 prefix takes hours; reading a Parquet file of URIs takes seconds).

Columns (:data:`MANIFEST_COLUMNS`, types in :func:`manifest_schema`):

- ``row`` (int64): stable index; for a CSV the 0-based order of its data lines, for a listing the sorted path order.
- ``image_id``: CheXlocalize id (``patient00001_study1_view1_frontal``, see
  :func:`chexseg_dist.data.chexlocalize.image_id_from_path`), unique within a manifest.
- ``path``: where the image is, a local absolute path or a URI (``s3://...``).
- ``patient_id``, ``study``, ``view``: the three components the id is made of (``view`` without extension).
- ``frontal`` (bool, null if unknown), ``ap_pa``, ``sex`` (strings, null if blank), ``age`` (int32, null if blank).
- ``split``: ``train``/``valid``/``test`` from the path, or the ``split`` argument; null if neither.
- The 14 CheXpert observations under their CSV names (float32): 1.0 positive, 0.0 negative, -1.0 uncertain, null
  blank (not mentioned). The four are kept distinct; the uncertainty policy belongs to the classifier.

Path rule (CSV): a CheXpert path is ``[prefix/][split/]patient*/study*/<view file>``. The prefix, i.e. everything
before the split directory (or before the patient directory when there is none), is the dataset folder as named
when the CSV was written (``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/`` in the releases; absent in the test-set
CSVs). It is replaced by ``root``, the folder that holds ``train/`` and ``valid/``. Without ``root`` it is the CSV's
own directory: in every release the CSVs sit in the dataset folder, so this resolves the original release and a
renamed or moved copy alike (``/data/cxp/train.csv`` with ``CheXpert-v1.0-small/train/...`` paths resolves to
``/data/cxp/train/...``). When the CSV sits beside the dataset folder instead (``DIR/train.csv`` next to
``DIR/CheXpert-v1.0-small/``, as Kaggle copies and ``chexseg synth`` lay it out), that folder is the root.
Absolute paths and URIs in the CSV are kept as they are unless ``root`` is given.
"""

from __future__ import annotations

import datetime
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from chexseg_dist.core import __version__, fsio
from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.errors import InputNotFoundError, ManifestError

#: Split directory names recognised in CheXpert paths.
SPLITS: tuple[str, ...] = ("train", "valid", "test")


#: Metadata columns of a manifest, in order; the 14 observations (OBSERVATIONS) follow them.
META_COLUMNS: tuple[str, ...] = (
    "row",
    "image_id",
    "path",
    "patient_id",
    "study",
    "view",
    "frontal",
    "ap_pa",
    "sex",
    "age",
    "split",
)


#: All manifest columns, in order.
MANIFEST_COLUMNS: tuple[str, ...] = META_COLUMNS + OBSERVATIONS


#: Parquet schema-metadata key holding the manifest's provenance (JSON).
METADATA_KEY = b"chexseg.manifest"


#: Accepted spellings of a CheXpert label cell (after trimming whitespace) and their values; blank is null.
LABEL_SPELLINGS: dict[str, float | None] = {
    "1.0": 1.0,
    "1": 1.0,
    "0.0": 0.0,
    "0": 0.0,
    "-1.0": -1.0,
    "-1": -1.0,
    "": None,
}


#: File extensions taken when listing a directory or prefix (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


# How many offending lines an error message lists.
_SHOW = 5


def manifest_schema() -> pa.Schema:
    """The Arrow schema of a manifest (without provenance metadata)."""
    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("study", pa.string(), nullable=False),
        pa.field("view", pa.string(), nullable=False),
        pa.field("frontal", pa.bool_()),
        pa.field("ap_pa", pa.string()),
        pa.field("sex", pa.string()),
        pa.field("age", pa.int32()),
        pa.field("split", pa.string()),
    ]
    fields += [pa.field(name, pa.float32()) for name in OBSERVATIONS]
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------------- I/O
def write_manifest(table: pa.Table, out: str, provenance: dict[str, Any] | None = None) -> None:
    """Write a manifest as Parquet (local path or URI) with its provenance in the schema metadata.

    The file appears only once complete (temporary name + rename locally; a single PUT on object stores).

    Args:
        table: a manifest (schema :func:`manifest_schema`).
        out: destination ``.parquet`` path or URI.
        provenance: JSON-serialisable facts (source, root, ...); ``created_by``, ``created_at`` and ``rows`` are
            added.
    """
    if table.schema.remove_metadata() != manifest_schema():
        raise ManifestError(f"{out}: refusing to write a table whose schema is not the manifest schema")
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    meta.update({k: v for k, v in (provenance or {}).items() if v is not None or k not in meta})
    meta.setdefault("created_by", f"chexseg_dist {__version__}")
    meta.setdefault("created_at", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    meta["rows"] = table.num_rows
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fsio.write_bytes_atomic(out, buf.getvalue())


def read_manifest(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a manifest (local path or URI).

    Args:
        path: the Parquet file.
        columns: subset of :data:`MANIFEST_COLUMNS` to load (default: all).

    Returns:
        A ``pyarrow.Table`` with the manifest's columns (``.to_pandas()`` for pandas).

    Raises:
        InputNotFoundError: no such file.
        ManifestError: not a Parquet file, or one that lacks manifest columns (not a manifest, or written by an
            older version).
    """
    pf = _parquet(path)
    have = set(pf.schema_arrow.names)
    wanted = list(columns) if columns is not None else list(MANIFEST_COLUMNS)
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ManifestError(
            f"{path}: not a chexseg manifest, missing column(s) {missing}; build it with 'chexseg manifest'"
        )
    return pf.read(columns=wanted)


def _parquet(path: str) -> pq.ParquetFile:
    data = fsio.read_input(path, "manifest")
    try:
        return pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{path}: not a Parquet manifest ({exc}); build one with 'chexseg manifest'") from None


def manifest_metadata(path: str) -> dict[str, Any]:
    """The provenance stored in a manifest (source, root, created_by, created_at, rows, ...)."""
    meta = _parquet(path).schema_arrow.metadata or {}
    raw = meta.get(METADATA_KEY)
    return dict(json.loads(raw)) if raw else {}


def check_paths_exist(
    paths: Sequence[str],
    source: str,
    n: int = 8,
    fix: str = "the manifest's paths do not point at the images: rebuild it with `chexseg manifest --root <dataset "
    "folder>`",
) -> None:
    """Fail before any work starts when none of a few evenly spaced images exists (a wrong root, not bad files).

    Raises:
        InputNotFoundError: naming ``source``, an example path and ``fix``.
    """
    step = max(1, len(paths) // n)
    sample = list(paths[::step][:n])
    if sample and not any(fsio.exists(p) for p in sample):
        raise InputNotFoundError(f"{source}: none of {len(sample)} sampled images exists (e.g. {sample[0]}); {fix}")


# ---------------------------------------------------------------------------------------------------- views
#: The one view rule. A row whose view is unknown (``frontal`` null: a listed file whose name says neither
#: "frontal" nor "lateral") is taken for a frontal view by every stage: a CheXpert CSV always states the view, so
#: unknown views only come from archives named otherwise, where dropping them would silently leave nothing to do.
#: Stages that keep frontal views only say how many unknown-view rows they kept.
UNKNOWN_VIEW_IS_FRONTAL = True


@dataclass(frozen=True)
class ViewSelection:
    """What :func:`select_views` kept: ``table`` and the counts behind it."""

    table: pa.Table
    frontal: int
    unknown: int
    lateral_dropped: int

    def note(self, what: str) -> str | None:
        """A line for the user when the rule mattered (lateral rows dropped, unknown views kept), else None."""
        parts = []
        if self.lateral_dropped:
            parts.append(f"{self.lateral_dropped} lateral view(s) left out")
        if self.unknown:
            parts.append(f"{self.unknown} image(s) of unknown view kept as frontal")
        return f"{what}: {'; '.join(parts)}" if parts else None


def select_views(table: pa.Table, frontal_only: bool) -> ViewSelection:
    """Keep the rows a stage works on under the one view rule (:data:`UNKNOWN_VIEW_IS_FRONTAL`).

    Args:
        table: manifest rows with a ``frontal`` column (bool, null = unknown).
        frontal_only: drop lateral views (keep frontal and unknown ones); False keeps every row.
    """
    if "frontal" not in table.column_names:
        raise ManifestError(f"manifest has no 'frontal' column (columns {table.column_names}); rebuild it")
    frontal = table.column("frontal")
    unknown = int(frontal.null_count)
    n_frontal = int(pc.sum(pc.fill_null(frontal, False)).as_py() or 0)
    lateral = table.num_rows - n_frontal - unknown
    if frontal_only:
        table = table.filter(pc.fill_null(frontal, UNKNOWN_VIEW_IS_FRONTAL))
    return ViewSelection(
        table=table, frontal=n_frontal, unknown=unknown, lateral_dropped=lateral if frontal_only else 0
    )
