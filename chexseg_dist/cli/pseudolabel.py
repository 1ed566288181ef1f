"""Pseudo-label every frontal radiograph of a manifest: classifier probabilities and all-task Grad-CAM maps.

Reads: --manifest (Parquet, from 'chexseg manifest'), --checkpoint (a classifier checkpoint directory, or several
comma-separated for an ensemble), the images the manifest points to (local paths or s3:// URIs).
Writes: the Zarr map store --store (local directory or s3://; layout in docs/store-format.md) and, next to it in
<store>.sidecar/: config.yaml (resolved config), failures/*.parquet (images that could not be read or decoded),
staging/ (fragments between commits) and lock.json (while a job runs).

Resumable: run the same command again after an interruption and only the remaining images are processed; a
finished store is not recomputed. Runs on a local Ray (started here) or, under 'ray job submit', on the cluster.
Exit status: 0 on success (also when some images failed; see the summary), 1 if there was work and none of it
succeeded, 2 for unusable input (manifest, checkpoint, or a store written for another manifest or model).
"""

from __future__ import annotations

import argparse
import time

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config, log_beside

INPUTS = ("manifest", "checkpoint", "config")
OUTPUTS = (Output("store", "folder", writes=("zarr.json",), marker="zarr.json"),)


def log_path(args: argparse.Namespace) -> str:
    return log_beside(args.store.rstrip("/") + ".sidecar", f"logs/pseudolabel-{time.strftime('%Y%m%dT%H%M%S')}.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="Parquet manifest (local path or URI)")
    parser.add_argument(
        "--checkpoint", required=True, help="classifier checkpoint directory; comma-separated for an ensemble"
    )
    parser.add_argument("--store", required=True, help="output Zarr map store (local directory or s3://...)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store (its maps, staged fragments and failures) instead of resuming it",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.pseudolabel import main_summary, run_pseudolabel

    cfg = load_command_config("pseudolabel", args)
    summary = run_pseudolabel(cfg, args.manifest, args.checkpoint, args.store, overwrite=args.overwrite)
    return main_summary(summary)
