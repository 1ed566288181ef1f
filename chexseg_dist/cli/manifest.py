"""Build the Parquet manifest (one row per radiograph) that every distributed stage reads.

Reads one of:
  --csv CSV       a CheXpert-format CSV (train.csv, valid.csv, a test-set CSV); labels 1.0 / 0.0 / -1.0 / blank
                  are kept distinct. Image paths: the dataset-folder prefix of each CSV path (the part before
                  train/, valid/ or test/, e.g. 'CheXpert-v1.0-small/') is replaced by --root, default the CSV's
                  own directory (where the releases keep their CSVs), so a moved or renamed dataset resolves too.
  --dir DIR       every .jpg/.jpeg/.png under a local directory tree (labels null)
  --prefix URI    the same under an object-store prefix (s3://bucket/chexpert/; one listing, now, and never again)
Writes: --out M.parquet (local path or URI); provenance (source, root, version, time) in its schema metadata.
The file is written only when every row passed the checks. With --csv, a few evenly spaced image paths are probed
for existence (a wrong --root fails here, naming an example path; --no-check skips it, e.g. before an upload);
images are never opened unless --check-files.
--root may be the dataset folder itself or the folder that holds it (DIR with DIR/CheXpert-v1.0-small/...), local
or s3://; without it, the CSV's directory, under the same rule.

Examples:
  chexseg manifest --csv /data/CheXpert-v1.0-small/train.csv --out outputs/train.parquet
  chexseg manifest --csv s3://bucket/chexpert/train.csv --root s3://bucket/chexpert --out s3://bucket/m/train.parquet
  chexseg manifest --prefix s3://bucket/chexpert/train --split train --out outputs/train.parquet
"""

from __future__ import annotations

import argparse
import time

from chexseg_dist.cli._args import Output
from chexseg_dist.core.console import say

INPUTS = ("csv", "dir", "prefix")
OUTPUTS = (Output("out", "file", (".parquet",)),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CheXpert-format CSV (local path or URI)")
    source.add_argument(
        "--dir", metavar="DIR", help="local directory tree of CheXpert-layout images (.../patient*/study*/view*)"
    )
    source.add_argument("--prefix", metavar="URI", help="object-store prefix (s3://...) of CheXpert-layout images")
    parser.add_argument(
        "--out", required=True, metavar="M.parquet", help="the manifest to write (.parquet; local path or URI)"
    )
    parser.add_argument(
        "--root",
        default=None,
        metavar="DIR_OR_URI",
        help="with --csv: the dataset folder (holding train/, valid/), or the folder holding it, that replaces each "
        "path's dataset prefix (default: the CSV's directory)",
    )
    parser.add_argument(
        "--split", default=None, metavar="NAME", help="set the split column to NAME (default: from each path)"
    )
    parser.add_argument(
        "--check-files",
        action="store_true",
        help="open every image's header (existence and format; pixels not decoded) and fail listing the bad ones",
    )
    parser.add_argument("--workers", type=int, default=16, help="threads for --check-files (default: 16)")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="with --csv: do not probe that a few evenly spaced images exist (to build a manifest before the images "
        "are uploaded)",
    )


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import pyarrow.compute as pc

    from chexseg_dist.core import fsio
    from chexseg_dist.data import check_files, manifest_from_csv, manifest_from_listing, write_manifest
    from chexseg_dist.data.manifest import METADATA_KEY
    from chexseg_dist.errors import InputError

    if args.root is not None and args.csv is None:
        raise InputError("--root applies to --csv only (with --dir/--prefix the paths are the listed ones)")
    if args.split is not None and not args.split.strip():
        raise InputError("--split must be a non-empty name such as train, valid or test")
    start = time.perf_counter()
    source = args.csv or args.dir or args.prefix
    if not fsio.is_uri(source):
        source = os.path.abspath(source)
    if args.csv is not None:
        kind = "csv"
        table = manifest_from_csv(source, root=args.root, split=args.split)
    else:
        kind = "listing"
        table = manifest_from_listing(source, split=args.split)
    if args.check_files:
        check_files(table, source, workers=args.workers, lines=kind == "csv")
    elif kind == "csv" and not args.no_check:
        from chexseg_dist.data.manifest import check_paths_exist

        root = json.loads(table.schema.metadata[METADATA_KEY])["root"]
        check_paths_exist(
            table.column("path").to_pylist(),
            source,
            fix=f"they were resolved against {root}: pass --root with the dataset folder (holding train/, valid/) or "
            "the folder that holds it, or --no-check to build the manifest before the images are uploaded",
        )
    # manifest_from_csv records the root it resolved in the table's metadata; root=None keeps it.
    write_manifest(table, args.out, {"source": source, "kind": kind, "root": None, "split": args.split})
    frontal = pc.sum(pc.fill_null(table.column("frontal"), False)).as_py() or 0
    splits = table.column("split").value_counts().to_pylist()
    split_text = ", ".join(f"{s['values']}: {s['counts']}" for s in splits)
    say(
        f"wrote {args.out}: {table.num_rows} radiographs ({frontal} frontal; {split_text}) "
        f"in {time.perf_counter() - start:.2f} s"
    )
    return 0
