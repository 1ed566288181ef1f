"""Generate phantom chest radiographs with exact masks, in CheXpert / CheXlocalize format.

Reads: nothing (an optional --config YAML). Writes under --out: train.csv, valid.csv, test.csv (the CheXpert
header; Path relative to --out, e.g. CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg), the
images under CheXpert-v1.0-small/, gt_segmentations_{valid,test}.json (COCO RLE, all 10 tasks per image),
gt_annotations_{valid,test}.json (polygons of the positive tasks), phantom_meta.json (seed, counts,
prevalences, generator version) and config.yaml (the resolved configuration).

The same seed and settings give byte-identical files. --seed/--n-train/--n-valid/--n-test/--size/--workers
override the matching synth.* fields of the preset, --config file and --set overrides.
"""

from __future__ import annotations

import argparse
import time

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config
from chexseg_dist.core.console import say

INPUTS = ("config",)
OUTPUTS = (
    Output(
        "out",
        "folder",
        writes=(
            "train.csv",
            "valid.csv",
            "test.csv",
            "phantom_meta.json",
            "config.yaml",
            "gt_segmentations_train.json",
            "gt_segmentations_valid.json",
            "gt_segmentations_test.json",
            "gt_annotations_valid.json",
            "gt_annotations_test.json",
        ),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (local path or URI)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: synth.seed)")
    parser.add_argument("--n-train", type=int, default=None, help="frontal train images (default: synth.n_train)")
    parser.add_argument("--n-valid", type=int, default=None, help="valid images (default: synth.n_valid)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default: synth.n_test)")
    parser.add_argument("--size", type=int, default=None, help="typical long side in pixels (default: synth.size)")
    parser.add_argument("--workers", type=int, default=None, help="generator processes (default: synth.workers)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.config import save_config
    from chexseg_dist.synth import generate

    cfg = load_command_config("synth", args)
    start = time.perf_counter()
    from chexseg_dist.core.console import Progress

    total = cfg.synth.n_train + cfg.synth.n_valid + cfg.synth.n_test
    meter = Progress("synth", total, unit="studies")
    meta = generate(args.out, cfg.synth, progress=lambda done, _: meter.update(done))
    seconds = time.perf_counter() - start
    n_images = sum(s["rows"] for s in meta["splits"].values())
    save_config(cfg, args.out, extra={"command": "synth", "images": n_images, "seconds": round(seconds, 2)})

    say(f"phantom radiographs ({meta['generator_version']}, seed {cfg.synth.seed}) written to {args.out}")
    for split, info in meta["splits"].items():
        modes = ", ".join(f"{k} {v}" for k, v in info["file_modes"].items() if v)
        say(
            f"  {split:5s}: {info['frontal_images']} frontal + {info['lateral_images']} lateral images, "
            f"{info['patients']} patients ({modes or 'none'})"
        )
    splits = list(meta["splits"])
    say("label prevalence (frontal rows; positive/uncertain):")
    say(f"  {'observation':28s}" + "".join(f"{s:>14s}" for s in splits))
    observations = list(meta["splits"][splits[0]]["label_prevalence"])
    for obs in observations:
        cells = []
        for s in splits:
            p = meta["splits"][s]["label_prevalence"][obs]
            cells.append(f"{p['positive']:6.1%}/{p['uncertain']:5.1%}")
        say(f"  {obs:28s}" + "".join(f"{c:>14s}" for c in cells))
    say(
        f"files: {args.out}/{{train,valid,test}}.csv, {args.out}/CheXpert-v1.0-small/, "
        f"{args.out}/gt_segmentations_{{valid,test}}.json, {args.out}/gt_annotations_{{valid,test}}.json, "
        f"{args.out}/phantom_meta.json, {args.out}/config.yaml"
    )
    say(f"{n_images} images in {seconds:.1f} s ({n_images / max(seconds, 1e-9):.1f} images/s)")
    return 0
