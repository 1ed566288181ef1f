"""Refine the pseudo-masks of a map store into the store itself (``refined/<key>``), for the student to read.

Reads: --store (map store, from chexseg pseudolabel), --manifest (the manifest it was written for: image paths and
labels), --thresholds (for masks.strategy=tuned or prob_cutoff). The recipe is the student's: masks.* (refiner,
binariser, crf_* parameters), train_segmentation.label_gating and the student's frame segmentation.image_size.
Writes: the store's subgroup refined/<key> (bit-packed masks in the student's frame; key = hash of the recipe, so
another recipe makes another subgroup) and <store>.sidecar/refined-<key>/failures/*.parquet.

Resumable: run the same command again after an interruption and only the remaining images are refined; each store
chunk is written by one task, done flags last. Runs on a local Ray (started here) or, under 'ray job submit', on the
cluster. Exit status: 0 on success (also when some images failed), 1 if there was work and none of it succeeded,
2 for unusable input.
"""

from __future__ import annotations

import argparse
import time

from chexseg_dist.cli._args import add_config_arguments, load_command_config, log_beside

INPUTS = ("manifest", "thresholds", "config")
OUTPUTS = ()


def log_path(args: argparse.Namespace) -> str:
    return log_beside(args.store.rstrip("/") + ".sidecar", f"logs/refine-{time.strftime('%Y%m%dT%H%M%S')}.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="the map store to refine (local directory or s3://...)")
    parser.add_argument("--manifest", required=True, help="the manifest the store was written for")
    parser.add_argument("--thresholds", default=None, help="thresholds JSON (masks.strategy=tuned or prob_cutoff)")
    parser.add_argument("--retry-failed", action="store_true", help="refine again the images that failed before")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.core.console import say
    from chexseg_dist.masks.refine_job import run_refine

    cfg = load_command_config("refine", args)
    summary = run_refine(cfg, args.store, args.manifest, args.thresholds, retry_failed=args.retry_failed)
    say(summary.line())
    todo = summary.refined + summary.failed
    return 1 if todo and not summary.refined else 0
