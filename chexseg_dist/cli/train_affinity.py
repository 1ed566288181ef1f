"""Train the inter-pixel affinity network (IRNet's step) with Ray Train on the CRF seeds of a map store.

Reads: --store (a map store written by chexseg pseudolabel, normally the pseudo-labelled train split) and --manifest
(the manifest it was written for: image paths and labels; only pathologies with a positive label give seeds).
Frames are the student's (segmentation.image_size): the network refines masks in that frame only. Seeds use the
masks.crf_* parameters and masks.seed_fg_plane / seed_bg_plane; training uses train_affinity.*.
Writes: OUT, an affinity checkpoint directory (model.pt + affinity.json), metrics.json / metrics.csv (every epoch),
config.yaml and, when images could not be read, failures.csv; the Ray Train run under train_affinity.storage_path
(default OUT.ray). Re-running the same command resumes the run at its next epoch.
Then: --set masks.refiner=affinity --set masks.affinity_checkpoint=OUT for export-masks, refine, train-segmentation.

Connects to a running Ray cluster when there is one (RAY_ADDRESS, ray job submit), else starts a local one.
"""

from __future__ import annotations

import argparse

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config, log_beside

INPUTS = ("store", "manifest", "config")
OUTPUTS = (
    Output(
        "out",
        "folder",
        writes=("model.pt", "affinity.json", "metrics.json", "metrics.csv", "config.yaml", "failures.csv", "train.log"),
        marker="affinity.json",
    ),
)


def log_path(args: argparse.Namespace) -> str:
    return log_beside(args.out, "train.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="map store (chexseg pseudolabel) whose maps give the seeds")
    parser.add_argument("--manifest", required=True, help="the manifest the store was written for")
    parser.add_argument("--out", required=True, help="the affinity checkpoint directory to write (local or URI)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.train.affinity import train_affinity

    cfg = load_command_config("train-affinity", args)
    train_affinity(cfg, args.store, args.manifest, args.out)
    return 0
