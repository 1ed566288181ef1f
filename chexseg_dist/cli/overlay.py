"""PNG overlays of saliency maps, predicted and expert mask contours: one PNG per radiograph, 10 panels.

Reads: --store (map store), --manifest (image paths; the radiographs are read from there), optionally --gt
(expert segmentation JSON: dashed green contours) and --thresholds (tuned strategy; without it the masks are
Otsu's). Writes: --out/<image_id>.png for each id of --ids, and --out/config.yaml.
"""

from __future__ import annotations

import argparse

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config
from chexseg_dist.core.console import say

INPUTS = ("store", "manifest", "gt", "thresholds", "config")
OUTPUTS = (Output("out", "folder", writes=("config.yaml",)),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="map store (chexseg pseudolabel)")
    parser.add_argument("--manifest", required=True, help="manifest of the images (paths and labels)")
    parser.add_argument("--ids", required=True, help="comma-separated image ids")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--gt", default=None, help="expert segmentation JSON to outline")
    parser.add_argument("--thresholds", default=None, help="thresholds JSON: draw tuned masks instead of Otsu's")
    parser.add_argument(
        "--label-gating", action="store_true", help="empty masks where the manifest label is not positive"
    )
    parser.add_argument("--panel-px", type=int, default=320, help="width of one panel in pixels")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.config import save_config
    from chexseg_dist.errors import InputError
    from chexseg_dist.evaluation import write_overlays
    from chexseg_dist.masks import MaskMaker

    ids = [i.strip() for i in args.ids.split(",") if i.strip()]
    if not ids:
        raise InputError("--ids: give at least one image id")
    if args.panel_px < 64:
        raise InputError(f"--panel-px={args.panel_px} must be >= 64")
    cfg = load_command_config("overlay", args)
    maker = MaskMaker.from_config(cfg.masks)
    written = write_overlays(
        args.store, args.manifest, ids, args.out, maker, args.gt, cfg.masks.label_gating, args.panel_px
    )
    save_config(cfg, args.out, extra={"ids": ids, "store": args.store, "gt": args.gt})
    for path in written:
        say(path)
    return 0
