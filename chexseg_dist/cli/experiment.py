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
from chexseg_dist.evaluation.layout import SETTINGS, SPLITS, ExperimentLayout

INPUTS = ("data", "config")
OUTPUTS = (Output("out", "folder", writes=("results.json", "results.md", "experiment.log")),)


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
    from chexseg_dist.errors import ConfigError, InputNotFoundError

    cfg = load_command_config("experiment", args)
    if not cfg.train_segmentation.steps_per_epoch:
        raise ConfigError(
            "chexseg experiment compares the modes at equal optimizer steps: set train_segmentation.steps_per_epoch "
            "(0, one pass over each mode's own rows, gives every mode a different number of steps)"
        )
    data, out = (p.rstrip("/") if fsio.is_uri(p) else os.path.abspath(p) for p in (args.data, args.out))
    layout = ExperimentLayout(data, out)
    sizes = _sizes(args.expert_sizes)
    refiners = _refiners(args.refiners)
    needed = [layout.csv(split) for split in SPLITS] + [layout.gt_test, *(layout.expert_masks(s) for s in SETTINGS)]
    for path in needed:
        if not fsio.exists(path):
            raise InputNotFoundError(
                f"--data {data}: no {fsio.basename(path)}; pass a directory written by chexseg synth (with "
                "synth.annotator=true)"
            )
    return _Experiment(args, cfg, layout).run(sizes, refiners)


class _Experiment:
    """One run of the comparison: each phase runs its stages as the commands a user would type (reused when
    finished), into the paths of one :class:`~chexseg_dist.evaluation.layout.ExperimentLayout`."""

    def __init__(self, args: argparse.Namespace, cfg: Any, layout: ExperimentLayout) -> None:
        from chexseg_dist.cli._stages import Stages
        from chexseg_dist.evaluation.experiment import scored_pathologies

        self.args, self.cfg, self.at = args, cfg, layout
        self.cfg_args = ["--preset", args.preset, *(["--config", args.config] if args.config else [])]
        for item in args.overrides:
            self.cfg_args += ["--set", item]
        self.stages = Stages("experiment", verbose=args.verbose)
        self.stage = self.stages.run
        self.scored: list[str] = []
        self.scored_from = scored_pathologies
        self.results: dict[str, Any] = {}

    def run(self, sizes: list[int | None], refiners: list[str]) -> int:
        from chexseg_dist.core.ray_env import ray_session

        t0 = time.perf_counter()
        self.manifests()
        self.scored = self.scored_from(self.at.gt_test)
        settings = [k for k in SETTINGS if not (self.args.no_sensitivity and k == "exact")]
        with ray_session():
            self.classifier_and_maps()
            for setting in settings:
                self.tune(setting)
                self.modes(setting)
            curve = self.expert_curve(sizes) if sizes else {}
        self.references()
        if len(refiners) > 1:
            self.results["refiners"] = self.refiner_rows(refiners)
        if curve:
            from chexseg_dist.evaluation.experiment import plot_expert_curve

            self.results["expert_curve"] = curve
            plot_expert_curve(self.at.expert_curve_png, curve)
        self.finish(t0)
        return 0

    # ---------------------------------------------------------------- phases
    def manifests(self) -> None:
        for split in SPLITS:
            self.stage(
                f"manifest ({split})",
                ["manifest", "--csv", self.at.csv(split), "--out", self.at.manifest(split)],
                reuse=self.at.manifest(split),
            )

    def classifier_and_maps(self) -> None:
        at = self.at
        self.stage(
            "train the classifier",
            ["train-classifier", "--train", at.manifest("train"), "--valid", at.manifest("valid"),
             "--out", at.classifier, *self.cfg_args],
            reuse=f"{at.classifier}/checkpoint.json",
        )  # fmt: skip
        for split in SPLITS:
            self.stage(
                f"pseudo-label ({split})",
                ["pseudolabel", "--manifest", at.manifest(split), "--checkpoint", at.classifier,
                 "--store", at.store(split), *self.cfg_args],
            )  # fmt: skip

    def tune(self, setting: str, limit: int | None = None) -> None:
        """The expert split of a setting (and curve size) and the pseudo-mask thresholds tuned on its expert-train."""
        at, split = self.at, self.at.expert_split(setting, limit)
        self.stage(
            f"{setting}: expert split{'' if limit is None else f' ({limit} expert-train images)'}",
            ["expert-split", "--manifest", at.manifest("valid"), "--annotations", at.expert_masks(setting),
             *(["--limit", str(limit)] if limit is not None else []), "--out", split, *self.cfg_args],
            reuse=f"{split}/split.csv",
        )  # fmt: skip
        # The labels: tune on the masks the student's label gating will make.
        gating = ["--manifest", at.manifest("valid")] if self.cfg.train_segmentation.label_gating else []
        thresholds = at.thresholds(setting, limit)
        self.stage(
            f"{setting}: tune pseudo-mask thresholds on expert-train",
            ["tune-thresholds", "--store", at.store("valid"), "--gt", f"{split}/expert_train.json", *gating,
             "--out", thresholds, *self.cfg_args],
            reuse=thresholds,
        )  # fmt: skip

    def modes(self, setting: str) -> None:
        from chexseg_dist.evaluation.experiment import MODES, gains, paired_difference

        rows = {mode: self.student(setting, mode, mode) for mode in MODES}
        ev = self.cfg.evaluate
        full = self.at.evaluation(setting, "full")
        paired = {
            mode: paired_difference(self.at.evaluation(setting, mode), full, self.scored, ev.n_bootstrap, ev.seed)
            for mode in MODES
            if mode != "full"
        }
        entry = {"modes": rows, "gains": gains(rows), "paired_vs_full": paired}
        if setting == "annotated":
            self.results.update(entry)
        else:
            self.results["sensitivity_exact_experts"] = entry

    def student(
        self,
        setting: str,
        mode: str,
        name: str,
        limit: int | None = None,
        refiner: str = "none",
        extra: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Train one student, segment test with it and evaluate; returns its comparison row."""
        from chexseg_dist.core import fsio
        from chexseg_dist.evaluation.experiment import comparison, read_summary

        at = self.at
        refine = ["--set", f"masks.refiner={refiner}", *extra] if refiner != "none" else []
        size = ["--expert-limit", str(limit)] if limit is not None else []
        teacher = ["--set", f"train_segmentation.teacher={at.student(setting, 'full')}"] if mode == "distill" else []
        pseudo = [] if mode == "full" else ["--pseudo-store", at.store("train"), "--pseudo-manifest",
                                            at.manifest("train")]  # fmt: skip
        # The pseudo-mask recipe is the config's: tuned thresholds only under masks.strategy=tuned.
        tuned = mode in ("weak", "semi") and self.cfg.masks.strategy == "tuned"
        thresholds = ["--thresholds", at.thresholds(setting, limit)] if tuned else []
        model = at.student(setting, name)
        self.stage(
            f"{setting}: train {mode}{'' if limit is None else f' ({limit} expert images)'}"
            + ("" if refiner == "none" else f" on {refiner}-refined pseudo-masks"),
            ["train-segmentation", "--mode", mode, "--expert-manifest", at.manifest("valid"),
             "--expert-annotations", at.expert_masks(setting), *pseudo, *thresholds, "--test", at.manifest("test"),
             *size, "--out", model, *self.cfg_args, *teacher, *refine],
            reuse=f"{model}/segmentation.json",
        )  # fmt: skip
        pred, ev = at.prediction(setting, name), at.evaluation(setting, name)
        self.stage(
            f"{setting}: segment test with {name}",
            ["segment", "--model", model, "--manifest", at.manifest("test"), "--out", pred, *self.cfg_args],
            reuse=pred,
        )
        self.stage(
            f"{setting}: evaluate {name}",
            ["evaluate", "--gt", at.gt_test, "--pred", pred, "--out", ev, *self.cfg_args],
            reuse=f"{ev}/summary.json",
        )
        row = comparison(read_summary(ev), self.scored)
        best = json.loads(fsio.read_bytes(f"{model}/metrics.json"))["best"]
        # Development choices are made on these (expert-select, a part of valid), never on test.
        row["select"] = {k: best[k] for k in ("select_miou_full", "select_miou_tp", "select_images", "epoch")}
        return row

    def expert_curve(self, sizes: list[int | None]) -> dict[str, Any]:
        """Full and semi at each expert-train size (``all``: the headline's students)."""
        modes = self.results["modes"]
        curve: dict[str, Any] = {"sizes": [], "full": [], "semi": [], "weak": modes["weak"]["mean_miou"]}
        n_train = _expert_train_count(f"{self.at.expert_split('annotated')}/split.csv")
        for limit in sizes:
            n = n_train if limit is None else min(limit, n_train)
            if limit is None or limit >= n_train:
                full, semi = modes["full"], modes["semi"]
            else:
                self.tune("annotated", limit)
                full = self.student("annotated", "full", f"full_{limit}", limit)
                semi = self.student("annotated", "semi", f"semi_{limit}", limit)
            curve["sizes"].append(n)
            curve["full"].append(full["mean_miou"])
            curve["semi"].append(semi["mean_miou"])
        return curve

    def references(self) -> None:
        """The classifier's Grad-CAM masks (tuned thresholds from expert-train) and the annotator on test."""
        from chexseg_dist.core import fsio
        from chexseg_dist.evaluation.experiment import comparison, read_summary

        at = self.at
        self.stage(
            "reference: Grad-CAM tuned masks on test",
            ["export-masks", "--store", at.store("test"), "--strategy", "tuned", "--thresholds",
             at.thresholds("annotated"), "--out", at.gradcam_tuned, *self.cfg_args],
            reuse=at.gradcam_tuned,
        )  # fmt: skip
        references = {"Grad-CAM tuned (classifier saliency)": at.gradcam_tuned}
        if fsio.exists(at.annotator_test):
            references["annotator on test (human-like agreement)"] = at.annotator_test
        self.results["reference"] = {}
        for k, (name, pred) in enumerate(references.items()):
            ev = at.reference_evaluation(k)
            self.stage(
                f"reference: evaluate {name}",
                ["evaluate", "--gt", at.gt_test, "--pred", pred, "--out", ev, *self.cfg_args],
                reuse=f"{ev}/summary.json",
            )
            self.results["reference"][name] = comparison(read_summary(ev), self.scored)

    def refiner_rows(self, refiners: list[str]) -> dict[str, dict[str, float]]:
        """``{refiner: {"pseudo_miou", "weak", "semi"}}``: each refiner's pseudo-masks on test (tuned thresholds from
        expert-train, as the Grad-CAM reference row; ``none`` is that row) and the students trained on its masks. The
        affinity refiner's network is trained first, on the train store's CRF seeds."""
        from chexseg_dist.core.ray_env import ray_session
        from chexseg_dist.evaluation.experiment import comparison, read_summary

        at, results = self.at, self.results
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
            with ray_session():
                self.stage(
                    "refiners: train the affinity network on the train store's CRF seeds",
                    ["train-affinity", "--store", at.store("train"), "--manifest", at.manifest("train"),
                     "--out", at.affinity, *self.cfg_args],
                    reuse=f"{at.affinity}/affinity.json",
                )  # fmt: skip
            extra["affinity"] = ["--set", f"masks.affinity_checkpoint={at.affinity}"]
        for name in refiners[1:]:
            pred, ev = at.refined_pseudo(name), at.refined_pseudo_evaluation(name)
            self.stage(
                f"refiners: {name}-refined pseudo-masks on test",
                ["export-masks", "--store", at.store("test"), "--images", at.manifest("test"), "--strategy",
                 "tuned", "--thresholds", at.thresholds("annotated"), "--out", pred, *self.cfg_args,
                 "--set", f"masks.refiner={name}", *extra[name]],
                reuse=pred,
            )  # fmt: skip
            self.stage(
                f"refiners: evaluate {name}-refined pseudo-masks",
                ["evaluate", "--gt", at.gt_test, "--pred", pred, "--out", ev, *self.cfg_args],
                reuse=f"{ev}/summary.json",
            )
            pseudo = comparison(read_summary(ev), self.scored)
            with ray_session():
                weak = self.student("annotated", "weak", f"weak_{name}", refiner=name, extra=extra[name])
                semi = self.student("annotated", "semi", f"semi_{name}", refiner=name, extra=extra[name])
            rows[name] = {"pseudo_miou": pseudo["mean_miou"], "weak": weak["mean_miou"], "semi": semi["mean_miou"]}
            details[name] = {"pseudo": pseudo, "weak": weak, "semi": semi}
        results["refiner_details"] = details
        return rows

    def finish(self, t0: float) -> None:
        """``results.json`` and ``results.md``, and the closing lines."""
        from chexseg_dist.core.console import say
        from chexseg_dist.evaluation.experiment import MODES, write_results

        cfg, results, ts = self.cfg, self.results, self.cfg.train_segmentation
        results.update(
            data=self.at.data,
            preset=self.args.preset,
            overrides=list(self.args.overrides),
            student=f"{cfg.segmentation.arch}/{cfg.segmentation.encoder} at {cfg.segmentation.image_size} px",
            steps=ts.steps_per_epoch * ts.epochs if ts.steps_per_epoch else None,
            pathologies_scored=self.scored,
            test_images=results["modes"]["weak"].get("n_images"),
            stage_seconds=self.stages.seconds,
            total_seconds=time.perf_counter() - t0,
        )
        json_path, md_path = write_results(self.at.out, results)
        g = results["gains"]

        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:+.1%}"

        say(
            f"\nExperiment finished in {time.perf_counter() - t0:.0f} s. Comparison mean mIoU (annotated experts): "
            + ", ".join(f"{m} {results['modes'][m]['mean_miou']:.4f}" for m in MODES)
            + f"; semi vs full {pct(g['semi_vs_full'])}, semi vs weak {pct(g['semi_vs_weak'])}.\n"
            f"  results  {json_path}\n  table    {md_path}"
        )


def _expert_train_count(split_csv: str) -> int:
    import csv
    import io

    from chexseg_dist.core import fsio

    text = fsio.read_bytes(split_csv).decode("utf-8")
    return sum(1 for row in csv.DictReader(io.StringIO(text, newline="")) if row["part"] == "expert_train")
