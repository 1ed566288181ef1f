"""Run the whole pipeline end to end on generated phantom radiographs (the README's first command).

Stages, each the same `chexseg` subcommand a user would run (printed before it runs):
  1. synth            phantom CheXpert-format tree + CheXlocalize ground truth   -> OUT/data/
  2. manifest         one Parquet manifest per split                              -> OUT/manifests/
  3. train-classifier Ray Train, tiny classifier                                  -> OUT/classifier/
  4. pseudolabel      Ray Data all-class Grad-CAM into Zarr, per split            -> OUT/maps/{train,valid,test}.zarr
  5. tune-thresholds  per-pathology thresholds on the expert valid split          -> OUT/thresholds.json
  6. export-masks     Otsu and tuned masks for the test split                     -> OUT/predictions/
  7. evaluate         CheXlocalize mIoU + CIs + hit rate on test                  -> OUT/eval/{otsu,tuned}/report.md
  8. overlay          radiographs with maps and contours                          -> OUT/overlays/
  9. expert-split     the annotator's valid masks into expert-train / expert-select -> OUT/student/expert/
 10. train-segmentation  a semi-supervised student (expert + pseudo-labelled)     -> OUT/student/semi/
 11. segment          the student on test, CheXlocalize JSON at original size     -> OUT/predictions/test_semi.json
 12. evaluate         the student's report beside the saliency reports            -> OUT/eval/semi/report.md

The demo keeps small data of its own (600 train, 80 valid, 80 test radiographs: minutes on 2 cores) unless
--set synth.n_train=... (etc.) asks otherwise; chexseg experiment uses the synth defaults.

Reads: nothing (everything is generated). Writes: OUT (default outputs/demo). Re-running reuses finished stages:
the phantom data are deterministic, training resumes its Ray Train run, and pseudo-labelling skips finished images.
"""

from __future__ import annotations

import argparse
import os
import time

from chexseg_dist.cli._args import Output, add_config_arguments, log_beside
from chexseg_dist.cli._stages import Stages
from chexseg_dist.core.console import say

SPLITS = ("train", "valid", "test")
#: The demo's own data sizes (the synth defaults are the experiment's, minutes more to train on).
DEMO_SIZES = {"n_train": 600, "n_valid": 80, "n_test": 80}
INPUTS = ("config",)
OUTPUTS = (Output("out", "folder", writes=("demo.log", "thresholds.json"), marker="demo.log", fresh=True),)


def log_path(args: argparse.Namespace) -> str:
    return log_beside(args.out, "demo.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    parser.add_argument("--n-overlays", type=int, default=4, help="test images to draw overlays for")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds files an earlier demo did not write (they may be replaced)",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from chexseg_dist.cli._args import load_command_config
    from chexseg_dist.core.ray_env import ray_session

    cfg = load_command_config("demo", args)
    out = os.path.abspath(args.out)
    cfg_args = ["--preset", args.preset, *(["--config", args.config] if args.config else [])]
    for item in args.overrides:
        cfg_args += ["--set", item]
    data, manifests, maps = f"{out}/data", f"{out}/manifests", f"{out}/maps"
    ckpt, thresholds = f"{out}/classifier", f"{out}/thresholds.json"
    t0 = time.perf_counter()

    stage = Stages("demo", verbose=args.verbose).run

    sizes = []
    for name, value in DEMO_SIZES.items():
        if not any(item.startswith(f"synth.{name}=") for item in args.overrides):
            sizes += [f"--{name.replace('_', '-')}", str(value)]
    stage("phantom radiographs", ["synth", "--out", data, *sizes, *cfg_args])
    for split in SPLITS:
        stage(
            f"manifest ({split})", ["manifest", "--csv", f"{data}/{split}.csv", "--out", f"{manifests}/{split}.parquet"]
        )
    # One Ray for the stages that use it (each command alone would start and stop its own).
    with ray_session():
        stage(
            "train the classifier",
            [
                "train-classifier",
                "--train",
                f"{manifests}/train.parquet",
                "--valid",
                f"{manifests}/valid.parquet",
                "--out",
                ckpt,
                *cfg_args,
            ],
        )
        for split in SPLITS:
            stage(
                f"pseudo-label ({split})",
                [
                    "pseudolabel",
                    "--manifest",
                    f"{manifests}/{split}.parquet",
                    "--checkpoint",
                    ckpt,
                    "--store",
                    f"{maps}/{split}.zarr",
                    *cfg_args,
                ],
            )
    stage(
        "tune thresholds on valid",
        [
            "tune-thresholds",
            "--store",
            f"{maps}/valid.zarr",
            "--gt",
            f"{data}/gt_segmentations_valid.json",
            "--out",
            thresholds,
            *cfg_args,
        ],
    )
    for strategy in ("otsu", "tuned"):
        extra = ["--thresholds", thresholds] if strategy == "tuned" else []
        stage(
            f"export {strategy} masks (test)",
            [
                "export-masks",
                "--store",
                f"{maps}/test.zarr",
                "--strategy",
                strategy,
                *extra,
                "--out",
                f"{out}/predictions/test_{strategy}.json",
                *cfg_args,
            ],
        )
        stage(
            f"evaluate {strategy} (test)",
            [
                "evaluate",
                "--gt",
                f"{data}/gt_segmentations_test.json",
                "--pred",
                f"{out}/predictions/test_{strategy}.json",
                "--maps",
                f"{maps}/test.zarr",
                "--out",
                f"{out}/eval/{strategy}",
                *cfg_args,
            ],
        )
    ids = pq.read_table(f"{manifests}/test.parquet", columns=["image_id"]).column("image_id").to_pylist()
    stage(
        "overlays (test)",
        [
            "overlay",
            "--store",
            f"{maps}/test.zarr",
            "--manifest",
            f"{manifests}/test.parquet",
            "--ids",
            ",".join(ids[: args.n_overlays]),
            "--gt",
            f"{data}/gt_segmentations_test.json",
            "--thresholds",
            thresholds,
            "--out",
            f"{out}/overlays",
            *cfg_args,
        ],
    )
    student, expert = f"{out}/student/semi", f"{out}/student/expert"
    # Tune on the masks the student's label gating will make (the expert images' labels).
    gating = ["--manifest", f"{manifests}/valid.parquet"] if cfg.train_segmentation.label_gating else []
    # The pseudo-mask recipe is the config's: tuned thresholds only under masks.strategy=tuned.
    tuned = cfg.masks.strategy == "tuned"
    student_thresholds = ["--thresholds", f"{out}/student/thresholds.json"] if tuned else []
    annotations = f"{data}/expert_segmentations_valid.json"
    stage(
        "expert split (annotator's valid masks)",
        ["expert-split", "--manifest", f"{manifests}/valid.parquet", "--annotations", annotations, "--out", expert,
         *cfg_args],
    )  # fmt: skip
    if tuned:
        stage(
            "tune pseudo-mask thresholds on expert-train",
            ["tune-thresholds", "--store", f"{maps}/valid.zarr", "--gt", f"{expert}/expert_train.json", *gating,
             "--out", f"{out}/student/thresholds.json", *cfg_args],
        )  # fmt: skip
    with ray_session():  # one Ray for training and segmenting
        stage(
            "train a semi-supervised student",
            ["train-segmentation", "--mode", "semi", "--expert-manifest", f"{manifests}/valid.parquet",
             "--expert-annotations", annotations, "--pseudo-store", f"{maps}/train.zarr", "--pseudo-manifest",
             f"{manifests}/train.parquet", *student_thresholds, "--test",
             f"{manifests}/test.parquet", "--out", student, *cfg_args],
        )  # fmt: skip
        stage(
            "segment test with the student",
            ["segment", "--model", student, "--manifest", f"{manifests}/test.parquet", "--out",
             f"{out}/predictions/test_semi.json", *cfg_args],
        )  # fmt: skip
    stage(
        "evaluate the student (test)",
        ["evaluate", "--gt", f"{data}/gt_segmentations_test.json", "--pred", f"{out}/predictions/test_semi.json",
         "--out", f"{out}/eval/semi", *cfg_args],
    )  # fmt: skip
    say(
        f"\nDemo finished in {time.perf_counter() - t0:.0f} s. Outputs:\n"
        f"  phantom data        {data}\n"
        f"  classifier          {ckpt}\n"
        f"  saliency stores     {maps}/{{train,valid,test}}.zarr\n"
        f"  thresholds          {thresholds}\n"
        f"  student             {student}\n"
        f"  reports             {out}/eval/otsu/report.md, {out}/eval/tuned/report.md, {out}/eval/semi/report.md\n"
        f"  overlays            {out}/overlays/"
    )
    return 0
