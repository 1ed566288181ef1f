"""Where ``chexseg experiment`` puts everything: one dataclass names every input and output path of a run, so the
command, its tests and docs/formats.md agree on the tree (local paths or ``s3://`` URIs alike)."""

from __future__ import annotations

from dataclasses import dataclass

#: Expert-mask settings: name -> the synth file of the valid split's expert masks. The headline comes first.
SETTINGS = {"annotated": "expert_segmentations_valid.json", "exact": "gt_segmentations_valid.json"}
SPLITS = ("train", "valid", "test")


def _size(limit: int | None) -> str:
    return "" if limit is None else f"_{limit}"


@dataclass(frozen=True)
class ExperimentLayout:
    """The paths of one experiment (``data``: a ``chexseg synth`` directory; ``out``: the experiment's folder).

    ``limit`` is an expert-train size of the curve (``--expert-sizes``; None: all of expert-train).
    """

    data: str
    out: str

    # ------------------------------------------------------------------ inputs (the synth directory)
    def csv(self, split: str) -> str:
        return f"{self.data}/{split}.csv"

    @property
    def gt_test(self) -> str:
        """The exact masks of the test split: the ground truth every row is scored against."""
        return f"{self.data}/gt_segmentations_test.json"

    @property
    def annotator_test(self) -> str:
        """The annotator's masks of the test split (a reference row, when synth wrote them)."""
        return f"{self.data}/expert_segmentations_test.json"

    def expert_masks(self, setting: str) -> str:
        """The valid split's expert masks of a setting (``annotated``: the annotator's; ``exact``)."""
        return f"{self.data}/{SETTINGS[setting]}"

    # ------------------------------------------------------------------ shared stages
    def manifest(self, split: str) -> str:
        return f"{self.out}/manifests/{split}.parquet"

    def store(self, split: str) -> str:
        """The classifier's map store of a split (``maps/<split>.zarr``)."""
        return f"{self.out}/maps/{split}.zarr"

    @property
    def classifier(self) -> str:
        return f"{self.out}/classifier"

    @property
    def affinity(self) -> str:
        """The affinity network of ``--refiners ...,affinity``."""
        return f"{self.out}/affinity"

    # ------------------------------------------------------------------ per expert-mask setting
    def setting(self, setting: str) -> str:
        return f"{self.out}/{setting}"

    def expert_split(self, setting: str, limit: int | None = None) -> str:
        """``expert[_N]/``: ``expert_train.json``, ``expert_select.json``, ``split.csv``."""
        return f"{self.setting(setting)}/expert{_size(limit)}"

    def thresholds(self, setting: str, limit: int | None = None) -> str:
        """The pseudo-mask thresholds tuned on that expert-train."""
        return f"{self.setting(setting)}/thresholds{_size(limit)}.json"

    def student(self, setting: str, name: str) -> str:
        """A student's checkpoint, ``students/<name>`` (``semi``, ``full_20``, ``weak_crf``, ...)."""
        return f"{self.setting(setting)}/students/{name}"

    def prediction(self, setting: str, name: str) -> str:
        """The student's CheXlocalize segmentation of test (``chexseg segment``)."""
        return f"{self.setting(setting)}/predictions/{name}.json"

    def evaluation(self, setting: str, name: str) -> str:
        """The student's ``chexseg evaluate`` folder (``summary.json``, ``per_image.csv``, ``report.md``)."""
        return f"{self.setting(setting)}/eval/{name}"

    # ------------------------------------------------------------------ reference rows and results
    @property
    def reference(self) -> str:
        return f"{self.out}/reference"

    @property
    def gradcam_tuned(self) -> str:
        """The classifier's Grad-CAM masks of test, at the thresholds tuned on expert-train."""
        return f"{self.reference}/gradcam_tuned.json"

    def reference_evaluation(self, k: int) -> str:
        return f"{self.reference}/eval_{k}"

    def refined_pseudo(self, refiner: str) -> str:
        """A refiner's pseudo-masks of test."""
        return f"{self.reference}/pseudo_{refiner}.json"

    def refined_pseudo_evaluation(self, refiner: str) -> str:
        return f"{self.reference}/eval_pseudo_{refiner}"

    @property
    def results_json(self) -> str:
        return f"{self.out}/results.json"

    @property
    def results_md(self) -> str:
        return f"{self.out}/results.md"

    @property
    def expert_curve_png(self) -> str:
        return f"{self.out}/expert_curve.png"
