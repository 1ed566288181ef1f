"""Binarise every map of a store into a CheXlocalize segmentation JSON at original resolution.

Reads: --store (map store), --thresholds (for --strategy tuned or --prob-cutoff), --manifest (image-level labels;
turns label gating on: masks of pathologies whose label is not positive are empty). Writes: --out (segmentation
JSON with all 10 pathologies of every image of the store) and <out>.config.yaml next to it.

Strategies: otsu (the benchmark's default: Otsu on the 0..255-quantised normalised map, holes filled) or tuned
(normalised map > the tuned threshold). See chexseg_dist.masks for the conventions.
"""

from __future__ import annotations

import argparse
import time

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config
from chexseg_dist.core.console import say
from chexseg_dist.core.registry import BINARIZERS

INPUTS = ("store", "thresholds", "manifest", "images", "config")
OUTPUTS = (Output("out", "file", (".json",), writes=(".config.yaml",)),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="map store (chexseg pseudolabel)")
    parser.add_argument("--out", required=True, help="segmentation JSON to write")
    parser.add_argument(
        "--strategy", choices=BINARIZERS.names(), default=None, help="binarisation (default: masks.strategy)"
    )
    parser.add_argument("--thresholds", default=None, help="thresholds JSON from chexseg tune-thresholds")
    parser.add_argument("--prob-cutoff", action="store_true", help="empty masks below the tuned probability cutoffs")
    parser.add_argument(
        "--manifest", default=None, help="manifest with labels: empty masks where the label is not positive"
    )
    parser.add_argument(
        "--images",
        default=None,
        help="manifest whose image paths a refiner (masks.refiner) reads, without label gating (default: --manifest)",
    )
    parser.add_argument(
        "--skip-missing", action="store_true", help="leave out images without maps (failed) instead of failing"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: masks.workers)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.config import save_config
    from chexseg_dist.core.fsio import basename, parent
    from chexseg_dist.masks import export_masks

    cfg = load_command_config("export-masks", args)
    t0 = time.perf_counter()
    n = export_masks(
        args.store, args.out, cfg.masks, manifest=args.manifest, skip_missing=args.skip_missing, images=args.images
    )
    elapsed = time.perf_counter() - t0
    save_config(
        cfg,
        parent(args.out),
        filename=f"{basename(args.out)}.config.yaml",
        extra={"out": args.out, "seconds": round(elapsed, 2)},
    )
    say(f"wrote {cfg.masks.strategy} masks of {n} images to {args.out} in {elapsed:.1f} s")
    return 0
