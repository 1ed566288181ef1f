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
import json
import shlex
import time
import warnings

from chexseg_dist.cli import add_config_arguments


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
    from chexseg_dist.config import load_config, save_config
    from chexseg_dist.evaluation import evaluate_files, write_per_image_csv
    from chexseg_dist.fsio import join, makedirs, open_file
    from chexseg_dist.masks import json_safe
    from chexseg_dist.report import read_reference, write_report

    overrides = list(args.overrides)
    if args.full:
        overrides.append("evaluate.full=true")
    if args.allow_missing:
        overrides.append("evaluate.allow_missing=true")
    if args.n_bootstrap is not None:
        overrides.append(f"evaluate.n_bootstrap={args.n_bootstrap}")
    if args.seed is not None:
        overrides.append(f"evaluate.seed={args.seed}")
    cfg = load_config(args.preset, args.config, overrides)
    ev = cfg.evaluate
    mode = "full" if ev.full else "tp_only"
    reference = read_reference(args.reference) if args.reference else None

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = evaluate_files(args.gt, args.pred, mode, ev.n_bootstrap, ev.seed, args.maps, ev.allow_missing)
        radiologist = (
            evaluate_files(args.gt, args.radiologist, mode, ev.n_bootstrap, ev.seed, None, ev.allow_missing)
            if args.radiologist
            else None
        )
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"WARNING: {note}")
    elapsed = time.perf_counter() - t0

    makedirs(args.out)
    summary = result.summary()
    if radiologist is not None:
        summary["radiologist"] = {
            "source": args.radiologist,
            "pathologies": radiologist.summary()["pathologies"],
            "mean_miou": radiologist.summary()["mean_miou"],
        }
    if reference is not None:
        summary["reference"] = {"source": args.reference, "pathologies": reference}
    with open_file(join(args.out, "summary.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=2)
    write_per_image_csv(join(args.out, "per_image.csv"), result)
    command = _command(args)
    inputs = {
        "ground truth": args.gt,
        "predictions": args.pred,
        "map store (hit rate)": args.maps,
        "radiologist segmentations": args.radiologist,
        "reference values": args.reference,
    }
    report = write_report(args.out, result, command, inputs, radiologist, reference, notes)
    save_config(cfg, args.out, extra={"command": command, "inputs": inputs, "seconds": round(elapsed, 2)})

    print(
        f"evaluated {len(result.stats.image_ids)} images ({mode}) in {elapsed:.1f} s; mean mIoU {result.miou.mean:.3f}"
    )
    if result.excluded:
        print(f"  no kept pairs (excluded from the mean): {', '.join(result.excluded)}")
    print(f"  report: {report}")
    return 0
