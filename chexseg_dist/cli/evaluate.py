"""CheXlocalize evaluation of predicted segmentations: mIoU, dataset-level IoU, hit rate, 95% bootstrap CIs.

Reads: --gt (ground-truth segmentation JSON), --pred (prediction JSON covering every gt image and pathology at
original resolution), optionally --maps (map store, for the hit rate), --radiologist (radiologist segmentation JSON,
evaluated the same way and drawn beside the model) and --reference ({pathology: miou} JSON of fixed values).
Writes into --out: summary.json, per_image.csv, report.md, miou.png and config.yaml.

Modes: true positives only (default: pairs where both gt and prediction are non-empty) or --full (also pairs where
exactly one is empty, IoU 0). Both-empty pairs never count.
"""

from __future__ import annotations

import argparse
import shlex

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config
from chexseg_dist.core.console import say

INPUTS = ("gt", "pred", "maps", "radiologist", "reference", "config")
OUTPUTS = (Output("out", "folder", writes=("summary.json", "per_image.csv", "report.md", "miou.png", "config.yaml")),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="ground-truth segmentation JSON (CheXlocalize format)")
    parser.add_argument("--pred", required=True, help="predicted segmentation JSON (chexseg export-masks)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--full", action="store_true", help="full mode: also score pairs where exactly one mask is empty (IoU 0)"
    )
    parser.add_argument("--maps", default=None, help="map store (chexseg pseudolabel) for the hit rate")
    parser.add_argument("--radiologist", default=None, help="radiologist segmentation JSON, evaluated the same way")
    parser.add_argument("--reference", default=None, help="JSON {pathology: miou} of fixed reference values to draw")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score images/pathologies missing from --pred as empty masks (with a warning) instead of failing",
    )
    parser.add_argument("--n-bootstrap", type=int, default=None, help="bootstrap resamples (default: config, 1000)")
    parser.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: config, 0)")
    add_config_arguments(parser)


def _command(args: argparse.Namespace) -> str:
    argv = ["chexseg", "evaluate", "--gt", args.gt, "--pred", args.pred, "--out", args.out]
    for flag, value in (("--maps", args.maps), ("--radiologist", args.radiologist), ("--reference", args.reference)):
        if value:
            argv += [flag, value]
    argv += ["--full"] if args.full else []
    argv += ["--allow-missing"] if args.allow_missing else []
    for flag, value in (("--n-bootstrap", args.n_bootstrap), ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--preset", args.preset] + (["--config", args.config] if args.config else [])
    for item in args.overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.evaluation import run_evaluation

    cfg = load_command_config("evaluate", args)
    done = run_evaluation(
        cfg,
        args.gt,
        args.pred,
        args.out,
        maps=args.maps,
        radiologist=args.radiologist,
        reference=args.reference,
        command=_command(args),
    )
    for note in done.notes:
        say(f"WARNING: {note}")
    result = done.result
    say(
        f"evaluated {len(result.stats.image_ids)} images ({result.mode}) in {done.seconds:.1f} s; "
        f"mean mIoU {result.miou.mean:.3f}"
    )
    if result.excluded:
        say(f"  no kept pairs (excluded from the mean): {', '.join(result.excluded)}")
    say(f"  report: {done.report}")
    return 0
