"""Building a manifest: from a CheXpert-format CSV, or from one listing of a directory tree or object-store prefix.

The path rule, the columns and the checks are described in :mod:`chexseg_dist.data.manifest`; every error names the
file and the 1-based line (header = line 1) or the path.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import CSV_HEADER, OBSERVATIONS
from chexseg_dist.data.chexlocalize import CHEXPERT_PATH_PATTERN
from chexseg_dist.data.manifest import (
    _SHOW,
    IMAGE_EXTENSIONS,
    LABEL_SPELLINGS,
    METADATA_KEY,
    manifest_schema,
)
from chexseg_dist.errors import InputNotFoundError, ManifestError


# ---------------------------------------------------------------------------------------------------- helpers
def _lines(rows: np.ndarray) -> str:
    """'line 5' / 'lines 5, 9, 12 and 40 more' for 0-based data rows (header is line 1)."""
    shown = ", ".join(str(int(r) + 2) for r in rows[:_SHOW])
    more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
    return f"line{'s' if len(rows) > 1 else ''} {shown}{more}"


def _bad_rows(ok: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """0-based indices where ``ok`` is false or null."""
    arr = pc.fill_null(ok, False)
    return np.flatnonzero(~np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool))


def _null_if_empty(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)


def _split_paths(paths: pa.ChunkedArray) -> pa.ChunkedArray:
    """Regex-split paths into prefix, rel, split, patient, study, file, view (a struct; null where no match)."""
    return pc.extract_regex(paths, pattern=CHEXPERT_PATH_PATTERN)


def resolve_root(csv_path: str, root: str | None, prefix: str = "") -> str:
    """The dataset folder a CSV's paths resolve against.

    ``root`` (made absolute if local) when given, otherwise the CSV's directory, which is the dataset folder in every
    CheXpert release, however it was renamed. Either may instead be the folder that HOLDS the dataset folder: when
    the folder named by the paths' ``prefix`` exists inside it (``DIR/CheXpert-v1.0-small/train/...``, as Kaggle
    copies, ``chexseg synth`` and an upload to ``s3://bucket/DIR`` lay it out), that folder is the root. The same
    rule for local folders and object-store prefixes; one directory check, no image is opened.
    """
    if root is None:
        base = fsio.parent(csv_path)
    elif fsio.is_uri(root):
        base = root.rstrip("/")
    else:
        # Ray workers resolve relative paths against their own working directory: store absolute ones.
        base = os.path.abspath(root)
    if prefix and _is_dir(fsio.join(base, prefix)):
        return fsio.join(base, prefix)
    return base


def _is_dir(path: str) -> bool:
    """Whether ``path`` is a folder (or a non-empty prefix); False when it cannot be checked (no such bucket, no
    access): the root is then taken as given, and ``chexseg manifest``'s probe of a few paths names the problem."""
    try:
        fs, inner = fsio.filesystem(path)
        return bool(fs.isdir(inner))
    except Exception:
        return False


def _read_header(data: bytes) -> list[str]:
    first = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
    return next(csv.reader([first]), [])


def _finish(
    parts: pa.StructArray | pa.ChunkedArray,
    paths: pa.ChunkedArray,
    *,
    frontal: pa.ChunkedArray,
    ap_pa: pa.ChunkedArray,
    sex: pa.ChunkedArray,
    age: pa.ChunkedArray,
    split: str | None,
    labels: dict[str, pa.ChunkedArray],
) -> pa.Table:
    n = len(paths)
    patient = pc.struct_field(parts, "patient")
    study = pc.struct_field(parts, "study")
    view = pc.struct_field(parts, "view")
    image_id = pc.binary_join_element_wise(patient, study, view, "_")
    if split is not None:
        split_col = pa.repeat(pa.scalar(split, pa.string()), n)
    else:
        split_col = _null_if_empty(pc.struct_field(parts, "split"))
    columns: dict[str, Any] = {
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "image_id": image_id,
        "path": paths,
        "patient_id": patient,
        "study": study,
        "view": view,
        "frontal": frontal,
        "ap_pa": ap_pa,
        "sex": sex,
        "age": age,
        "split": split_col,
    }
    columns.update(labels)
    schema = manifest_schema()
    arrays = [_chunked(columns[f.name]).cast(f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _chunked(col: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])


def _check_unique_ids(table: pa.Table, describe: Callable[[str, int, int], str]) -> None:
    """Raise ``ManifestError(describe(id, first_row, second_row))`` for the first repeated image id."""
    ids = table.column("image_id")
    if len(pc.unique(ids)) == len(ids):
        return
    # Error path only: find the first repeated id and where it occurs.
    seen: dict[str, int] = {}
    for i, v in enumerate(ids.to_pylist()):
        if v in seen:
            raise ManifestError(describe(v, seen[v], i))
        seen[v] = i


# ---------------------------------------------------------------------------------------------------- CSV
def _parse_csv(data: bytes, source: str, header: list[str]) -> pa.Table:
    bad: list[Any] = []

    def on_invalid(row: Any) -> str:
        bad.append(row)
        return "error"

    def read(threads: bool) -> pa.Table:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(use_threads=threads, block_size=1 << 22),
            # Empty lines are kept as rows so that row i is always physical line i + 2 of the file.
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                include_columns=list(CSV_HEADER),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )

    try:
        return read(True)
    except pa.ArrowInvalid as exc:
        if not bad:
            raise ManifestError(f"{source}: not a readable CSV file ({exc})") from None
    # The threaded reader does not know line numbers: read again single-threaded to name the line.
    bad.clear()
    with contextlib.suppress(pa.ArrowInvalid):
        read(False)
    row = bad[0] if bad else None
    where = f"line {row.number}" if row is not None and row.number is not None else "a line"
    text = f": {row.text[:120]!r}" if row is not None else ""
    cols = f" (has {row.actual_columns} columns, the header has {row.expected_columns})" if row is not None else ""
    raise ManifestError(f"{source}, {where}: malformed CSV row{cols}{text}")


def manifest_from_csv(csv_path: str, root: str | None = None, split: str | None = None) -> pa.Table:
    """Build a manifest from a CheXpert-format CSV (local path or URI).

    Args:
        csv_path: the CSV; its header must contain every column of ``CSV_HEADER`` (any order; extra columns, such
            as those of CheXpert Plus or user annotations, are ignored).
        root: the dataset folder that replaces each path's prefix (see the module docstring); local or URI.
            Default: the CSV's directory.
        split: value of the ``split`` column for every row (default: the split directory of each path).

    Returns:
        The manifest table (schema :func:`manifest_schema`), rows in CSV order. No image is opened.

    Raises:
        ManifestError: naming the file and the 1-based line (header = line 1) of the first problem: missing columns,
            a malformed row, an empty or non-CheXpert Path, a label other than 1.0/1/0.0/0/-1.0/-1/blank, an age
            that is not a whole number, a Frontal/Lateral other than Frontal/Lateral, a duplicate image id (both
            lines named).
    """
    try:
        data = fsio.read_bytes(csv_path)
    except FileNotFoundError:
        raise InputNotFoundError(f"CSV file not found: {csv_path}") from None
    except IsADirectoryError:
        raise ManifestError(f"{csv_path}: is a directory, not a CSV file") from None
    except PermissionError:
        if fsio.is_uri(csv_path):
            raise  # the CLI names the object and the credentials to check (core.storage_errors)
        raise ManifestError(f"{csv_path}: permission denied") from None
    header = _read_header(data)
    missing = [c for c in CSV_HEADER if c not in header]
    if missing:
        raise ManifestError(
            f"{csv_path}, line 1: missing column(s) {missing} in the header; a CheXpert CSV has the columns "
            f"{list(CSV_HEADER)}"
        )
    table = _parse_csv(data, csv_path, header)

    # Trailing blank lines (an editor's extra newline) are harmless; blank lines inside the file are not.
    end = table.num_rows
    while end > 0 and not any(table.slice(end - 1, 1).to_pylist()[0].values()):
        end -= 1
    table = table.slice(0, end)
    if table.num_rows == 0:
        raise ManifestError(f"{csv_path}: no data rows after the header")

    raw_paths = table.column("Path")
    rows = _bad_rows(pc.greater(pc.utf8_length(raw_paths), 0))
    if rows.size:
        raise ManifestError(f"{csv_path}, {_lines(rows)}: empty Path (blank line or missing image path)")
    parts = _split_paths(raw_paths)
    rows = _bad_rows(pc.is_valid(parts))
    if rows.size:
        example = raw_paths[int(rows[0])].as_py()
        raise ManifestError(
            f"{csv_path}, {_lines(rows)}: Path {example!r} is not a CheXpert image path "
            "([dataset folder/][train|valid|test/]patient*/study*/<view file>)"
        )

    # Path remap, vectorised: root + "/" + the path from the split (or patient) directory on.
    rel = pc.struct_field(parts, "rel")
    first_path, first_rel = str(raw_paths[0].as_py()), str(rel[0].as_py())
    base = resolve_root(csv_path, root, prefix=first_path[: len(first_path) - len(first_rel)].strip("/"))
    paths = pc.binary_join_element_wise(pa.scalar(base.rstrip("/")), rel, "/")
    if root is None:
        keep = pc.or_(pc.starts_with(raw_paths, "/"), pc.match_substring(raw_paths, "://"))
        paths = pc.if_else(keep, raw_paths, paths)

    fl = pc.utf8_lower(pc.utf8_trim_whitespace(table.column("Frontal/Lateral")))
    rows = _bad_rows(pc.is_in(fl, value_set=pa.array(["frontal", "lateral"])))
    if rows.size:
        value = table.column("Frontal/Lateral")[int(rows[0])].as_py()
        raise ManifestError(
            f"{csv_path}, {_lines(rows)}: Frontal/Lateral is {value!r}; expected 'Frontal' or 'Lateral'"
        )
    frontal = pc.equal(fl, "frontal")

    age_raw = pc.utf8_trim_whitespace(table.column("Age"))
    age_ok = pc.or_(pc.equal(age_raw, ""), pc.match_substring_regex(age_raw, r"^[0-9]{1,3}(\.0*)?$"))
    rows = _bad_rows(age_ok)
    if rows.size:
        value = table.column("Age")[int(rows[0])].as_py()
        raise ManifestError(f"{csv_path}, {_lines(rows)}: Age {value!r} is not a whole number of years (or blank)")
    age = pc.cast(_null_if_empty(pc.replace_substring_regex(age_raw, r"\.0*$", "")), pa.int32())

    labels: dict[str, pa.ChunkedArray] = {}
    spellings = pa.array(list(LABEL_SPELLINGS))
    for name in OBSERVATIONS:
        cell = pc.utf8_trim_whitespace(table.column(name))
        rows = _bad_rows(pc.is_in(cell, value_set=spellings))
        if rows.size:
            value = table.column(name)[int(rows[0])].as_py()
            raise ManifestError(
                f"{csv_path}, {_lines(rows)}: column {name!r} has {value!r}, not a CheXpert label; expected 1.0 "
                "(positive), 0.0 (negative), -1.0 (uncertain) or blank (not mentioned)"
            )
        labels[name] = pc.cast(_null_if_empty(cell), pa.float32())

    out = _finish(
        parts,
        paths,
        frontal=frontal,
        ap_pa=_null_if_empty(pc.utf8_trim_whitespace(table.column("AP/PA"))),
        sex=_null_if_empty(pc.utf8_trim_whitespace(table.column("Sex"))),
        age=age,
        split=split,
        labels=labels,
    )
    _check_unique_ids(
        out,
        lambda v, a, b: f"{csv_path}, lines {a + 2} and {b + 2}: duplicate image id {v!r} (each radiograph once)",
    )
    # The root the paths were resolved against travels with the table, so write_manifest records the real one.
    return out.replace_schema_metadata({METADATA_KEY: json.dumps({"root": base}).encode()})


# ---------------------------------------------------------------------------------------------------- listing
def list_images(location: str) -> list[str]:
    """Every ``.jpg``/``.jpeg``/``.png`` under a local directory or object-store prefix, sorted (one listing)."""
    fs, inner = fsio.filesystem(location)
    if not fs.exists(inner):
        raise InputNotFoundError(f"directory or prefix not found: {location}")
    found = fs.find(inner)
    if fsio.is_uri(location):
        protocol = location.split("://", 1)[0]
        found = [f"{protocol}://{p}" for p in found]
    return sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS))


def manifest_from_listing(location: str, split: str | None = None) -> pa.Table:
    """Build a manifest from the images under a directory tree or an object-store prefix.

    Image ids and ``patient_id``/``study``/``view``/``split`` come from the paths (which must follow the CheXpert
    layout ``.../[split/]patient*/study*/<view file>``); ``frontal`` is true/false when the view name says
    ``frontal``/``lateral``, null otherwise; labels, sex, age and AP/PA are null.

    Raises:
        InputNotFoundError: the location does not exist.
        ManifestError: no images found, paths outside the CheXpert layout (the first few named), duplicate ids.
    """
    found = list_images(location)
    if not found:
        raise ManifestError(f"{location}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under it")
    paths = pa.chunked_array([pa.array(found, pa.string())])
    parts = _split_paths(paths)
    rows = _bad_rows(pc.is_valid(parts))
    if rows.size:
        examples = ", ".join(repr(found[int(i)]) for i in rows[:_SHOW])
        raise ManifestError(
            f"{location}: {rows.size} image(s) outside the CheXpert layout .../patient*/study*/<view file>, e.g. "
            f"{examples}; move them away or point at a folder that holds only CheXpert-style images"
        )
    n = len(found)
    view = pc.utf8_lower(pc.struct_field(parts, "view"))
    is_frontal = pc.match_substring(view, "frontal")
    is_lateral = pc.match_substring(view, "lateral")
    frontal = pc.if_else(
        pc.or_(is_frontal, is_lateral), pc.and_(is_frontal, pc.invert(is_lateral)), pa.scalar(None, pa.bool_())
    )
    nulls = pa.chunked_array([pa.nulls(n, pa.string())])
    out = _finish(
        parts,
        paths,
        frontal=frontal,
        ap_pa=nulls,
        sex=nulls,
        age=pa.chunked_array([pa.nulls(n, pa.int32())]),
        split=split,
        labels={name: pa.chunked_array([pa.nulls(n, pa.float32())]) for name in OBSERVATIONS},
    )
    _check_unique_ids(out, lambda v, a, b: f"{location}: duplicate image id {v!r} from {found[a]} and {found[b]}")
    return out


# ---------------------------------------------------------------------------------------------------- checks
def _check_one(path: str) -> str | None:
    from PIL import Image

    try:
        with fsio.open_file(path, "rb") as f, Image.open(f) as img:
            w, h = img.size
        if w < 1 or h < 1:
            return "image has no pixels"
        return None
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for non-images
        return f"unreadable ({type(exc).__name__}: {exc})"


def check_files(table: pa.Table, source: str, *, workers: int = 16, lines: bool = True) -> None:
    """Check that every image of a manifest exists and has a readable header (Pillow; pixels are not decoded).

    Args:
        table: a manifest.
        source: the CSV or location the manifest came from (named in the error).
        workers: threads (the check is I/O bound: many in flight hide object-store latency).
        lines: name CSV lines (``row + 2``) in the error, else paths.

    Raises:
        ManifestError: listing the first missing or unreadable images and how many there are.
    """
    paths = table.column("path").to_pylist()
    rows = table.column("row").to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(_check_one, paths))
    bad = [(r, p, why) for r, p, why in zip(rows, paths, results, strict=True) if why is not None]
    if bad:
        shown = "; ".join(f"{f'line {r + 2}: ' if lines else ''}{p} {why}" for r, p, why in bad[:_SHOW])
        more = f" (and {len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        raise ManifestError(f"{source}: {len(bad)} of {len(paths)} image(s) missing or unreadable: {shown}{more}")
