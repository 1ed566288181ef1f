"""Train the saliency classifier with Ray Train (data-parallel over CPU or GPU workers).

Reads: the train and valid Parquet manifests (``chexseg manifest``) and the images they name (local or s3://).
Writes: OUT, a classifier checkpoint directory (``model.pt`` + ``checkpoint.json``: the best epoch by mean AUROC over
the 10 localisation tasks on valid, with its metrics and the resolved config), plus ``metrics.json`` /
``metrics.csv`` (every epoch) and ``config.yaml`` in OUT; the Ray Train run (per-epoch checkpoints) under
``train_classifier.storage_path`` (default OUT.ray). Re-running the same command resumes the run at its next epoch.

Connects to a running Ray cluster when there is one (RAY_ADDRESS, ``ray job submit``), else starts a local one.
"""

from __future__ import annotations

import argparse

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config, log_beside

INPUTS = ("train", "valid", "config")
OUTPUTS = (
    Output(
        "out",
        "folder",
        writes=(
            "model.pt",
            "checkpoint.json",
            "metrics.json",
            "metrics.csv",
            "config.yaml",
            "failures.csv",
            "train.log",
        ),
        marker="checkpoint.json",
    ),
)


def log_path(args: argparse.Namespace) -> str:
    return log_beside(args.out, "train.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="train manifest (Parquet, local or URI)")
    parser.add_argument("--valid", required=True, help="valid manifest (Parquet): per-epoch AUROC, model selection")
    parser.add_argument("--out", required=True, help="output checkpoint directory (local or URI)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.train import train_classifier

    cfg = load_command_config("train-classifier", args)
    train_classifier(cfg, args.train, args.valid, args.out)
    return 0
