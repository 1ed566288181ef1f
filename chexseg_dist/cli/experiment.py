"""CheXseg's comparison on a phantom dataset: weak, full, semi and distill students, scored on test.

Reads: --data, a chexseg synth directory (train/valid/test CSVs and images, exact ground truth gt_segmentations_*.json
and the annotator's expert_segmentations_valid.json). Writes into --out: manifests/, classifier/, maps/ (pseudo-labels
of every split), and per expert-mask setting (annotated/: the annotator's masks, the headline; exact/: the exact
masks, the sensitivity row) expert/ (the expert-train / expert-select split), thresholds.json (tuned on expert-train
only), students/<mode>/, predictions/<mode>.json and eval/<mode>/; reference/ (Grad-CAM tuned masks and the annotator
on test); results.json, results.md and, with --expert-sizes, expert_curve.png.

Like chexseg demo it prints each stage as the command it runs and reuses finished stages on a re-run. Every student
has the same architecture, initialisation, seed, batch and optimizer steps (train_segmentation.steps_per_epoch x
epochs). The comparison metric is fixed in chexseg_dist.evaluation.experiment (tp-only per-image IoU at original
resolution, averaged over the pathologies with a positive in test, a pathology with no kept pair counting 0).

--expert-sizes 20,60,all repeats full and semi with the first N expert-train images (same selection split) and plots
the comparison mIoU against expert-set size.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from chexseg_dist.cli._args import Output, add_config_arguments, log_beside
from chexseg_dist.cli._stages import Stages

SPLITS = ("train", "valid", "test")
INPUTS = ("data", "config")
OUTPUTS = (Output("out", "folder", writes=("results.json", "results.md", "experiment.log")),)
#: Expert-mask settings: name -> the synth file of the valid split's expert masks. The headline comes first.
SETTINGS = {"annotated": "expert_segmentations_valid.json", "exact": "gt_segmentations_valid.json"}


def log_path(args: argparse.Namespace) -> str:
    return log_beside(args.out, "experiment.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a chexseg synth directory (local or s3://)")
    parser.add_argument("--out", required=True, help="output directory (local or s3://)")
    parser.add_argument(
        "--expert-sizes",
        default=None,
        help="comma-separated expert-train sizes for the full/semi curve, e.g. 20,60,all (annotated masks)",
    )
    parser.add_argument(
        "--no-sensitivity", action="store_true", help="skip the exact-expert-mask sensitivity comparison"
    )
    parser.add_argument(
        "--refiners",
        default="none",
        help="comma-separated pseudo-mask refiners to compare (masks.refiner), e.g. none,crf: for each, the "
        "pseudo-label mIoU on test and the weak and semi students trained on its masks",
    )
    add_config_arguments(parser)


def _sizes(raw: str | None) -> list[int | None]:
    from chexseg_dist.errors import InputError

    if not raw:
        return []
    out: list[int | None] = []
    for item in raw.split(","):
        item = item.strip()
        if item == "all":
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise InputError(f"--expert-sizes: {item!r} is not a positive number of images or 'all'")
    return out


def _refiners(raw: str) -> list[str]:
    from chexseg_dist.core.registry import REFINERS

    names = [r.strip() for r in raw.split(",") if r.strip()]
    for name in names:
        REFINERS.check(name, "--refiners")
    return ["none", *[n for n in dict.fromkeys(names) if n != "none"]]


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.cli._args import load_command_config
    from chexseg_dist.core import fsio
    from chexseg_dist.core.console import say
    from chexseg_dist.core.ray_env import ray_session
    from chexseg_dist.errors import InputNotFoundError
    from chexseg_dist.evaluation.experiment import (
        MODES,
        comparison,
        gains,
        plot_expert_curve,
        read_summary,
        scored_pathologies,
        write_results,
    )

    cfg = load_command_config("experiment", args)
    if not cfg.train_segmentation.steps_per_epoch:
        from chexseg_dist.errors import ConfigError

        raise ConfigError(
            "chexseg experiment compares the modes at equal optimizer steps: set train_segmentation.steps_per_epoch "
            "(0, one pass over each mode's own rows, gives every mode a different number of steps)"
        )
    data, out = (p.rstrip("/") if fsio.is_uri(p) else os.path.abspath(p) for p in (args.data, args.out))
    sizes = _sizes(args.expert_sizes)
    refiners = _refiners(args.refiners)
    for name in ("train.csv", "valid.csv", "test.csv", "gt_segmentations_test.json", *SETTINGS.values()):
        if not fsio.exists(fsio.join(data, name)):
            raise InputNotFoundError(
                f"--data {data}: no {name}; pass a directory written by chexseg synth (with synth.annotator=true)"
            )
    cfg_args = ["--preset", args.preset, *(["--config", args.config] if args.config else [])]
    for item in args.overrides:
        cfg_args += ["--set", item]
    man, maps, ckpt = f"{out}/manifests", f"{out}/maps", f"{out}/classifier"
    gt_test = f"{data}/gt_segmentations_test.json"
    stages = Stages("experiment", verbose=args.verbose)
    stage = stages.run
    t0 = time.perf_counter()
    settings = {k: v for k, v in SETTINGS.items() if not (args.no_sensitivity and k == "exact")}
    results: dict[str, Any] = {}

    tuned_masks = cfg.masks.strategy == "tuned"

    def student(
        setting: str,
        mode: str,
        folder: str,
        limit: int | None = None,
        refiner: str = "none",
        extra: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Train one student, segment test with it and evaluate; returns its comparison row."""
        refine = ["--set", f"masks.refiner={refiner}", *extra] if refiner != "none" else []
        base = f"{out}/{setting}"
        extra = ["--expert-limit", str(limit)] if limit is not None else []
        teacher = ["--set", f"train_segmentation.teacher={base}/students/full"] if mode == "distill" else []
        pseudo = (
            []
            if mode == "full"
            else ["--pseudo-store", f"{maps}/train.zarr", "--pseudo-manifest", f"{man}/train.parquet"]
        )
        thresholds = f"{base}/thresholds{'' if limit is None else f'_{limit}'}.json"
        model = f"{base}/{folder}"
        stage(
            f"{setting}: train {mode}{'' if limit is None else f' ({limit} expert images)'}"
            + ("" if refiner == "none" else f" on {refiner}-refined pseudo-masks"),
            [
                "train-segmentation",
                "--mode",
                mode,
                "--expert-manifest",
                f"{man}/valid.parquet",
                "--expert-annotations",
                f"{data}/{SETTINGS[setting]}",
                *pseudo,
                # The pseudo-mask recipe is the config's: tuned thresholds only under masks.strategy=tuned.
                *(["--thresholds", thresholds] if mode in ("weak", "semi") and tuned_masks else []),
                "--test",
                f"{man}/test.parquet",
                *extra,
                "--out",
                model,
                *cfg_args,
                *teacher,
                *refine,
            ],
            reuse=f"{model}/segmentation.json",
        )
        name = folder.replace("students/", "")
        pred = f"{base}/predictions/{name}.json"
        stage(
            f"{setting}: segment test with {name}",
            ["segment", "--model", model, "--manifest", f"{man}/test.parquet", "--out", pred, *cfg_args],
            reuse=pred,
        )
        ev = f"{base}/eval/{name}"
        stage(
            f"{setting}: evaluate {name}",
            ["evaluate", "--gt", gt_test, "--pred", pred, "--out", ev, *cfg_args],
            reuse=f"{ev}/summary.json",
        )
        row = comparison(read_summary(ev), scored)
        best = json.loads(fsio.read_bytes(f"{model}/metrics.json"))["best"]
        # Development choices are made on these (expert-select, a part of valid), never on test.
        row["select"] = {k: best[k] for k in ("select_miou_full", "select_miou_tp", "select_images", "epoch")}
        return row

    def tune(setting: str, limit: int | None = None) -> None:
        base = f"{out}/{setting}"
        suffix = "" if limit is None else f"_{limit}"
        split = f"{base}/expert{suffix}"
        stage(
            f"{setting}: expert split{'' if limit is None else f' ({limit} expert-train images)'}",
            [
                "expert-split",
                "--manifest",
                f"{man}/valid.parquet",
                "--annotations",
                f"{data}/{SETTINGS[setting]}",
                *(["--limit", str(limit)] if limit is not None else []),
                "--out",
                split,
                *cfg_args,
            ],
            reuse=f"{split}/split.csv",
        )
        stage(
            f"{setting}: tune pseudo-mask thresholds on expert-train",
            [
                "tune-thresholds",
                "--store",
                f"{maps}/valid.zarr",
                "--gt",
                f"{split}/expert_train.json",
                # The labels: tune on the masks the student's label gating will make.
                *(["--manifest", f"{man}/valid.parquet"] if cfg.train_segmentation.label_gating else []),
                "--out",
                f"{base}/thresholds{suffix}.json",
                *cfg_args,
            ],
            reuse=f"{base}/thresholds{suffix}.json",
        )

    for split in SPLITS:
        stage(
            f"manifest ({split})",
            ["manifest", "--csv", f"{data}/{split}.csv", "--out", f"{man}/{split}.parquet"],
            reuse=f"{man}/{split}.parquet",
        )
    scored = scored_pathologies(gt_test)
    with ray_session():
        stage(
            "train the classifier",
            [
                "train-classifier",
                "--train",
                f"{man}/train.parquet",
                "--valid",
                f"{man}/valid.parquet",
                "--out",
                ckpt,
                *cfg_args,
            ],
            reuse=f"{ckpt}/checkpoint.json",
        )
        for split in SPLITS:
            stage(
                f"pseudo-label ({split})",
                [
                    "pseudolabel",
                    "--manifest",
                    f"{man}/{split}.parquet",
                    "--checkpoint",
                    ckpt,
                    "--store",
                    f"{maps}/{split}.zarr",
                    *cfg_args,
                ],
            )
        for setting in settings:
            tune(setting)
            rows = {mode: student(setting, mode, f"students/{mode}") for mode in MODES}
            entry = {"modes": rows, "gains": gains(rows)}
            if setting == "annotated":
                results.update(entry)
            else:
                results["sensitivity_exact_experts"] = entry
        curve: dict[str, Any] = {}
        if sizes:
            curve = {"sizes": [], "full": [], "semi": [], "weak": results["modes"]["weak"]["mean_miou"]}
            n_train = _expert_train_count(f"{out}/annotated/expert/split.csv")
            for limit in sizes:
                n = n_train if limit is None else min(limit, n_train)
                if limit is None or limit >= n_train:
                    full, semi = results["modes"]["full"], results["modes"]["semi"]
                else:
                    tune("annotated", limit)
                    full = student("annotated", "full", f"students/full_{limit}", limit)
                    semi = student("annotated", "semi", f"students/semi_{limit}", limit)
                curve["sizes"].append(n)
                curve["full"].append(full["mean_miou"])
                curve["semi"].append(semi["mean_miou"])
    # Reference rows: the classifier's Grad-CAM masks (tuned thresholds from expert-train) and the annotator on test.
    ref = f"{out}/reference"
    stage(
        "reference: Grad-CAM tuned masks on test",
        [
            "export-masks",
            "--store",
            f"{maps}/test.zarr",
            "--strategy",
            "tuned",
            "--thresholds",
            f"{out}/annotated/thresholds.json",
            "--out",
            f"{ref}/gradcam_tuned.json",
            *cfg_args,
        ],
        reuse=f"{ref}/gradcam_tuned.json",
    )
    references = {"Grad-CAM tuned (classifier saliency)": f"{ref}/gradcam_tuned.json"}
    if fsio.exists(f"{data}/expert_segmentations_test.json"):
        references["annotator on test (human-like agreement)"] = f"{data}/expert_segmentations_test.json"
    results["reference"] = {}
    for k, (name, pred) in enumerate(references.items()):
        ev = f"{ref}/eval_{k}"
        stage(
            f"reference: evaluate {name}",
            ["evaluate", "--gt", gt_test, "--pred", pred, "--out", ev, *cfg_args],
            reuse=f"{ev}/summary.json",
        )
        results["reference"][name] = comparison(read_summary(ev), scored)
    if len(refiners) > 1:
        results["refiners"] = refiner_rows(
            refiners, results, ref, stage, student, gt_test, scored, maps, man, out, cfg_args
        )
    if curve:
        results["expert_curve"] = curve
        plot_expert_curve(fsio.join(out, "expert_curve.png"), curve)
    ts = cfg.train_segmentation
    results.update(
        data=data,
        preset=args.preset,
        overrides=list(args.overrides),
        student=f"{cfg.segmentation.arch}/{cfg.segmentation.encoder} at {cfg.segmentation.image_size} px",
        steps=ts.steps_per_epoch * ts.epochs if ts.steps_per_epoch else None,
        pathologies_scored=scored,
        test_images=results["modes"]["weak"].get("n_images"),
        stage_seconds=stages.seconds,
        total_seconds=time.perf_counter() - t0,
    )
    json_path, md_path = write_results(out, results)
    g = results["gains"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.1%}"

    say(
        f"\nExperiment finished in {time.perf_counter() - t0:.0f} s. Comparison mean mIoU (annotated experts): "
        + ", ".join(f"{m} {results['modes'][m]['mean_miou']:.4f}" for m in MODES)
        + f"; semi vs full {pct(g['semi_vs_full'])}, semi vs weak {pct(g['semi_vs_weak'])}.\n"
        f"  results  {json_path}\n  table    {md_path}"
    )
    return 0


def refiner_rows(
    refiners: list[str],
    results: dict[str, Any],
    ref: str,
    stage: Any,
    student: Any,
    gt_test: str,
    scored: list[str],
    maps: str,
    man: str,
    out: str,
    cfg_args: list[str],
) -> dict[str, dict[str, float]]:
    """``{refiner: {"pseudo_miou", "weak", "semi"}}``: each refiner's pseudo-masks on test (tuned thresholds from
    expert-train, as the Grad-CAM reference row; ``none`` is that row) and the students trained on its masks. The
    affinity refiner's network is trained first, on the train store's CRF seeds (``<out>/affinity``)."""
    from chexseg_dist.core.ray_env import ray_session
    from chexseg_dist.evaluation.experiment import comparison, read_summary

    rows: dict[str, dict[str, float]] = {
        "none": {
            "pseudo_miou": results["reference"]["Grad-CAM tuned (classifier saliency)"]["mean_miou"],
            "weak": results["modes"]["weak"]["mean_miou"],
            "semi": results["modes"]["semi"]["mean_miou"],
        }
    }
    details: dict[str, Any] = {}
    extra: dict[str, list[str]] = {name: [] for name in refiners}
    if "affinity" in refiners:
        ckpt = f"{out}/affinity"
        with ray_session():
            stage(
                "refiners: train the affinity network on the train store's CRF seeds",
                [
                    "train-affinity",
                    "--store",
                    f"{maps}/train.zarr",
                    "--manifest",
                    f"{man}/train.parquet",
                    "--out",
                    ckpt,
                    *cfg_args,
                ],
                reuse=f"{ckpt}/affinity.json",
            )
        extra["affinity"] = ["--set", f"masks.affinity_checkpoint={ckpt}"]
    for name in refiners[1:]:
        pred = f"{ref}/pseudo_{name}.json"
        stage(
            f"refiners: {name}-refined pseudo-masks on test",
            [
                "export-masks",
                "--store",
                f"{maps}/test.zarr",
                "--images",
                f"{man}/test.parquet",
                "--strategy",
                "tuned",
                "--thresholds",
                f"{out}/annotated/thresholds.json",
                "--out",
                pred,
                *cfg_args,
                "--set",
                f"masks.refiner={name}",
                *extra[name],
            ],
            reuse=pred,
        )
        ev = f"{ref}/eval_pseudo_{name}"
        stage(
            f"refiners: evaluate {name}-refined pseudo-masks",
            ["evaluate", "--gt", gt_test, "--pred", pred, "--out", ev, *cfg_args],
            reuse=f"{ev}/summary.json",
        )
        pseudo = comparison(read_summary(ev), scored)
        with ray_session():
            weak = student("annotated", "weak", f"students/weak_{name}", refiner=name, extra=extra[name])
            semi = student("annotated", "semi", f"students/semi_{name}", refiner=name, extra=extra[name])
        rows[name] = {"pseudo_miou": pseudo["mean_miou"], "weak": weak["mean_miou"], "semi": semi["mean_miou"]}
        details[name] = {"pseudo": pseudo, "weak": weak, "semi": semi}
    results["refiner_details"] = details
    return rows


def _expert_train_count(split_csv: str) -> int:
    import csv
    import io

    from chexseg_dist.core import fsio

    text = fsio.read_bytes(split_csv).decode("utf-8")
    return sum(1 for row in csv.DictReader(io.StringIO(text, newline="")) if row["part"] == "expert_train")
