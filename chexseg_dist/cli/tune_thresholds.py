"""Tune per-pathology map thresholds and probability cutoffs on expert masks (the CheXlocalize validation set).

Reads: --store (map store of the expert-annotated images, from chexseg pseudolabel), --gt (their expert
segmentation JSON) and optionally --manifest (image-level labels; turns label gating on, so thresholds are tuned
on the masks label gating will produce). Writes: --out (thresholds JSON: thresholds, cutoffs, the mIoU at the
chosen values, the curves, the grid, the store fingerprint) and <out>.config.yaml next to it.

Objective: thresholds t = k/100 maximise mIoU in masks.tune_mode (default true positives only, as the benchmark);
cutoffs then maximise full-mode mIoU at those thresholds (in tp-only mode a cutoff only drops pairs). Every
threshold is evaluated in one pass over the images (per-pixel histograms of the normalised maps).
With masks.refiner=affinity (and --images or --manifest for the image paths), the refiner's foreground fraction is
tuned per pathology as well, the same way (fg_fractions in the file; chexseg_dist.masks.refine_tuning).
"""

from __future__ import annotations

import argparse
import time

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config
from chexseg_dist.core.console import say

INPUTS = ("store", "gt", "manifest", "images", "config")
OUTPUTS = (Output("out", "file", (".json",), writes=(".config.yaml",)),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="map store of the expert-annotated images")
    parser.add_argument("--gt", required=True, help="expert segmentation JSON of the same images")
    parser.add_argument("--out", required=True, help="thresholds JSON to write")
    parser.add_argument("--manifest", default=None, help="manifest with the images' labels: tune with label gating")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: masks.workers)")
    parser.add_argument(
        "--images",
        default=None,
        help="with masks.refiner=affinity: manifest of the images (paths), to tune the refiner's fg fraction per "
        "pathology too (default: --manifest)",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.config import save_config
    from chexseg_dist.core.fsio import basename, parent
    from chexseg_dist.core.pathologies import TASKS
    from chexseg_dist.errors import InputError
    from chexseg_dist.masks import describe, tune

    cfg = load_command_config("tune-thresholds", args)
    m = cfg.masks
    t0 = time.perf_counter()
    tuned = tune(
        args.store,
        args.gt,
        manifest=args.manifest,
        steps=m.threshold_steps,
        cutoff_steps=m.cutoff_steps,
        mode=m.tune_mode,
        fallback=m.fallback_threshold,
        label_gating=m.label_gating,
        workers=m.workers,
    )
    if m.refiner == "affinity":
        from chexseg_dist.masks.refine_tuning import tune_fg_fractions

        images = args.images or args.manifest
        if not images:
            raise InputError("masks.refiner=affinity: pass --images M (the images' manifest) to tune its fg fractions")
        fractions, details = tune_fg_fractions(
            args.store, args.gt, images, m, manifest=args.manifest, label_gating=m.label_gating
        )
        tuned.meta["fg_fractions"] = {t: float(f) for t, f in zip(TASKS, fractions)}
        tuned.meta["fg_fraction_tuning"] = {
            "objective": f"max mIoU ({m.tune_mode}) of walked map > f x its max, f = k/20, 0 < f < 1; ties -> smallest",
            "affinity_checkpoint": m.affinity_checkpoint,
            "pathologies": details,
        }
        say("fg fractions (affinity): " + ", ".join(f"{t} {f:.2f}" for t, f in zip(TASKS, fractions)))
    tuned.save(args.out)
    save_config(cfg, parent(args.out), filename=f"{basename(args.out)}.config.yaml", extra={"out": args.out})
    say(describe(tuned))
    say(f"tuned on {tuned.meta['n_images']} images in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0
