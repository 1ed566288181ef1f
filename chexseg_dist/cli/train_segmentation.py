"""Train the segmentation student with Ray Train on expert and pseudo-labelled radiographs (CheXseg).

Modes (--mode, or train_segmentation.mode): weak (pseudo-labelled images only), full (expert-train only), semi
(both, round(w x B) expert rows in every batch with mixing=exact, or each row expert with probability w with
mixing=bernoulli), distill (the pseudo set's images with a trained full-mode teacher's soft outputs as targets;
--set train_segmentation.teacher=CKPT).

Reads: the expert set (--expert-manifest and --expert-annotations: CheXlocalize segmentation or polygon JSON of
every image, all 10 pathologies), split by patient into expert-train and expert-select; for weak, semi and distill
the pseudo-labelled set (--pseudo-store, a map store written by chexseg pseudolabel, and --pseudo-manifest, the
manifest it was written for; its pseudo-masks are gated by its images' labels unless
train_segmentation.label_gating=false); --thresholds (chexseg tune-thresholds on expert-train, with --manifest when
gating) to make the pseudo-masks with tuned thresholds instead of masks.strategy's; --test (a manifest whose
patients must not appear in training).
Writes: OUT, a segmentation checkpoint directory (model.pt + segmentation.json with the per-pathology output
thresholds chosen on expert-select), metrics.json / metrics.csv (every epoch), config.yaml and, when images could not
be read, failures.csv; the Ray Train run under train_segmentation.storage_path (default OUT.ray). Re-running the same
command resumes the run at its next epoch.

Connects to a running Ray cluster when there is one (RAY_ADDRESS, ray job submit), else starts a local one.
"""

from __future__ import annotations

import argparse

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config, log_beside

INPUTS = ("expert_manifest", "expert_annotations", "pseudo_store", "pseudo_manifest", "thresholds", "test", "config")
OUTPUTS = (
    Output(
        "out",
        "folder",
        writes=(
            "model.pt",
            "segmentation.json",
            "metrics.json",
            "metrics.csv",
            "config.yaml",
            "failures.csv",
            "train.log",
        ),
        marker="segmentation.json",
    ),
)


def log_path(args: argparse.Namespace) -> str:
    return log_beside(args.out, "train.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from chexseg_dist.core.registry import TRAINING_MODES

    parser.add_argument("--expert-manifest", required=True, help="the expert images' manifest (Parquet)")
    parser.add_argument(
        "--expert-annotations", required=True, help="their expert masks: CheXlocalize segmentation or polygon JSON"
    )
    parser.add_argument(
        "--pseudo-store", default=None, help="map store of the pseudo-labelled images (weak/semi/distill)"
    )
    parser.add_argument("--pseudo-manifest", default=None, help="the manifest the map store was written for")
    parser.add_argument(
        "--thresholds",
        default=None,
        help="tuned thresholds: the pseudo-masks are made with them (sets masks.strategy=tuned)",
    )
    parser.add_argument("--test", default=None, help="held-out manifest: refuse training on any of its patients")
    parser.add_argument(
        "--expert-limit", type=int, default=None, help="use only the first N expert-train images (expert-size curve)"
    )
    parser.add_argument(
        "--mode", choices=TRAINING_MODES.names(), default=None, help="supervision (train_segmentation.mode)"
    )
    parser.add_argument("--out", required=True, help="output checkpoint directory (local or URI)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.errors import InputError
    from chexseg_dist.train.segmentation import StudentInputs, train_segmentation

    if args.expert_limit is not None and args.expert_limit < 1:
        raise InputError(f"--expert-limit {args.expert_limit}: give a positive number of expert-train images")
    cfg = load_command_config("train-segmentation", args)
    inputs = StudentInputs(
        expert_manifest=args.expert_manifest,
        expert_annotations=args.expert_annotations,
        pseudo_store=args.pseudo_store or "",
        pseudo_manifest=args.pseudo_manifest or "",
        thresholds=args.thresholds or "",
        holdout_manifest=args.test or "",
        expert_limit=args.expert_limit,
    )
    train_segmentation(cfg, inputs, args.out)
    return 0
