"""Split an expert set, patient-disjoint and seeded, into expert-train and expert-select (as the student does).

Reads: --manifest (the expert images' Parquet manifest; frontal views under the one view rule) and --annotations
(their expert masks: CheXlocalize segmentation or polygon JSON, all 10 pathologies of every image).
Writes into --out: expert_train.json and expert_select.json (segmentation JSON subsets: tune pseudo-mask thresholds
on expert-train only with chexseg tune-thresholds --gt OUT/expert_train.json), split.csv (image_id, patient_id,
part) and config.yaml. The split is train_segmentation.select_fraction of the patients to expert-select, drawn
with train_segmentation.seed: exactly the split chexseg train-segmentation makes with the same settings.
"""

from __future__ import annotations

import argparse

from chexseg_dist.cli._args import Output, add_config_arguments, load_command_config

INPUTS = ("manifest", "annotations", "config")
OUTPUTS = (Output("out", "folder", writes=("expert_train.json", "expert_select.json", "split.csv", "config.yaml")),)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="the expert images' manifest (Parquet)")
    parser.add_argument("--annotations", required=True, help="their expert masks (segmentation or polygon JSON)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N expert-train images")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import csv
    import json

    from chexseg_dist.config import save_config
    from chexseg_dist.core import fsio
    from chexseg_dist.core.console import say
    from chexseg_dist.data.chexlocalize import write_segmentations
    from chexseg_dist.data.expert import load_expert_set

    cfg = load_command_config("expert-split", args)
    ts = cfg.train_segmentation
    expert = load_expert_set(args.manifest, args.annotations, ts.select_fraction, ts.seed, limit_train=args.limit)
    fsio.makedirs(args.out)
    rows = []
    for part, table in (("expert_train", expert.train), ("expert_select", expert.select)):
        ids = table.column("image_id").to_pylist()
        masks = {i: json.loads(m) for i, m in zip(ids, table.column("masks_json").to_pylist())}
        write_segmentations(fsio.join(args.out, f"{part}.json"), masks)
        rows += [(i, p, part) for i, p in zip(ids, table.column("patient_id").to_pylist())]
    with fsio.open_file(fsio.join(args.out, "split.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "patient_id", "part"])
        writer.writerows(rows)
    save_config(cfg, args.out, extra={"manifest": args.manifest, "annotations": args.annotations, "limit": args.limit})
    say(
        f"expert set {args.manifest}: {expert.train.num_rows} expert-train / {expert.select.num_rows} expert-select "
        f"images ({len(expert.patients)} patients, select_fraction={ts.select_fraction}, seed {ts.seed}) -> {args.out}"
    )
    return 0
