"""Segment radiographs with a trained student into CheXlocalize segmentation JSON at original size (Ray Data job).

Reads: --model (a segmentation checkpoint from chexseg train-segmentation: weights, frame size and per-pathology
output thresholds), --manifest (Parquet; frontal views under segment.frontal_only) and the images it names.
Writes: --out (segmentation JSON: every readable image, all 10 pathologies, COCO RLE at the image's original size;
chexseg evaluate scores it unchanged), <out>.config.yaml and, when images could not be read, <out>.failures.csv.

Connects to a running Ray cluster when there is one (RAY_ADDRESS, ray job submit), else starts a local one. GPU
actors: --set segment.gpus_per_actor=1 --set segment.num_actors=N.
"""

from __future__ import annotations

import argparse

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config, log_beside

INPUTS = ("model", "manifest", "config")
OUTPUTS = (Output("out", "file", (".json",), writes=(".config.yaml", ".failures.csv", ".log")),)


def log_path(args: argparse.Namespace) -> str:
    from chexseg_dist.core import fsio

    return log_beside(fsio.parent(args.out) or ".", f"{fsio.basename(args.out)}.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="segmentation checkpoint directory (chexseg train-segmentation)")
    parser.add_argument("--manifest", required=True, help="manifest of the radiographs to segment (Parquet)")
    parser.add_argument("--out", required=True, help="segmentation JSON to write")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.core.console import say
    from chexseg_dist.predict import run_segment

    cfg = load_command_config("segment", args)
    summary = run_segment(cfg, args.model, args.manifest, args.out)
    say(summary.line())
    return 0
