"""The student's pseudo-mask recipe: one place that builds, from the config, the mask maker the student trains on and
the key of its refined masks in the store (``chexseg refine`` writes them, ``chexseg train-segmentation`` reads them).

A refined subgroup is reused whenever its key matches, so the key must change with every setting that changes a
mask. Every field of the ``masks`` section is therefore listed here exactly once: in the spec by value
(:data:`SPEC_FIELDS`, :data:`REFINER_PARAMS`), in the spec by what it points at (:data:`BY_CONTENT`: the tuned
thresholds' values, the affinity network's fingerprint), or as irrelevant to the student's masks with the reason
(:data:`IRRELEVANT`). A field added to the section and to none of them fails ``tests/masks/test_recipe.py``.
Besides the ``masks`` section, the student's ``train_segmentation.label_gating`` (its own gate),
``segmentation.image_size`` (the frame) and the store's model fingerprint (the maps) enter the spec.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from chexseg_dist.config import Config, MasksConfig
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.thresholds import TunedThresholds, check_thresholds_store
from chexseg_dist.store.layout import REFINED_VERSION
from chexseg_dist.store.mapstore import MapStore

#: ``masks`` fields recorded in the spec by value, under their own names.
SPEC_FIELDS = ("strategy", "prob_cutoff", "refiner")
#: The refiners' parameters, recorded in the spec's ``params`` (CRF, random walk).
REFINER_PARAMS = (
    "crf_iterations",
    "crf_gt_prob",
    "crf_gauss_sxy",
    "crf_gauss_compat",
    "crf_bilat_sxy",
    "crf_bilat_srgb",
    "crf_bilat_compat",
    "crf_stride",
    "crf_radius",
    "rw_radius",
    "rw_beta",
    "rw_exp",
    "fg_fraction",
)
#: ``masks`` fields naming a file whose content, not its path, enters the spec.
BY_CONTENT = {
    "thresholds": "the tuned thresholds and cutoffs it holds (and the walk's fg_fractions)",
    "affinity_checkpoint": "the affinity network's weights fingerprint",
}
#: ``masks`` fields that never change a student's pseudo-mask, and why.
IRRELEVANT = {
    "label_gating": "the student gates by train_segmentation.label_gating instead",
    "threshold_steps": "tuning only (chexseg tune-thresholds)",
    "cutoff_steps": "tuning only (chexseg tune-thresholds)",
    "tune_mode": "tuning only (chexseg tune-thresholds)",
    "fallback_threshold": "tuning only: it is written into the thresholds file",
    "workers": "processes of export-masks and tune-thresholds",
    "refine_cpus": "resources of chexseg refine",
    "seed_fg_plane": "affinity training seeds only (chexseg train-affinity)",
    "seed_bg_plane": "affinity training seeds only (chexseg train-affinity)",
}


@dataclass(frozen=True)
class PseudoMaskRecipe:
    """How a student makes its pseudo-masks from a store.

    Attributes:
        maker: the mask maker (the ``masks`` section, gated by ``train_segmentation.label_gating``).
        spec: everything that decides the masks of a store row (recorded with refined masks).
        key: the refined subgroup's key, 16 hex digits of the SHA-256 of the spec's canonical JSON.
    """

    maker: MaskMaker
    spec: dict[str, Any]
    key: str


def thresholds_path(cfg: Config, thresholds: str | None) -> str | None:
    """The tuned thresholds file a student uses: the command's ``--thresholds``, else ``masks.thresholds``."""
    return thresholds or cfg.masks.thresholds or None


def student_maker(cfg: Config, thresholds: str | None) -> MaskMaker:
    """The pseudo-mask maker of the student's config: the ``masks`` section, gated by the student's own
    ``train_segmentation.label_gating`` (as ``chexseg train-segmentation`` makes its masks).

    Raises:
        ConfigError: ``tuned`` or ``prob_cutoff`` without a thresholds file; a refiner that cannot be built.
    """
    maker = MaskMaker.from_config(cfg.masks, thresholds_path(cfg, thresholds))
    return replace(maker, label_gating=cfg.train_segmentation.label_gating)


def check_store(cfg: Config, thresholds: str | None, store: MapStore) -> None:
    """Refuse tuned thresholds (when the recipe uses them) tuned on the maps of another classifier than the store's.

    Raises:
        InputError: naming the thresholds file, the store and both classifiers' fingerprints.
    """
    path = thresholds_path(cfg, thresholds)
    if path and (cfg.masks.strategy == "tuned" or cfg.masks.prob_cutoff):
        check_thresholds_store(TunedThresholds.load(path), path, store.uri, store.attrs)


def refine_spec(
    masks: MasksConfig, thresholds: TunedThresholds | None, label_gating: bool, frame: int, model_fingerprint: str
) -> dict[str, Any]:
    """Everything that decides the refined masks of a store row: the recipe recorded with them, whose hash is the
    subgroup's key."""
    spec: dict[str, Any] = {
        "version": REFINED_VERSION,
        **{name: getattr(masks, name) for name in SPEC_FIELDS},
        "params": {name: getattr(masks, name) for name in sorted(REFINER_PARAMS)},
        "label_gating": bool(label_gating),
        "frame": int(frame),
        "model_fingerprint": model_fingerprint,
    }
    spec["prob_cutoff"] = bool(spec["prob_cutoff"])
    if masks.refiner == "affinity":  # the network's weights, not its path, decide the masks
        from chexseg_dist.models.affinity import AFFINITY_META
        from chexseg_dist.models.checkpoint import read_json_meta

        meta = read_json_meta(masks.affinity_checkpoint, AFFINITY_META, "an affinity checkpoint")
        spec["affinity_fingerprint"] = meta.get("fingerprint")
    if masks.refiner == "affinity" and thresholds is not None and thresholds.meta.get("fg_fractions"):
        spec["fg_fractions"] = thresholds.meta["fg_fractions"]
    if thresholds is not None and (masks.strategy == "tuned" or masks.prob_cutoff):
        spec["thresholds"] = [round(float(t), 6) for t in thresholds.thresholds]
        spec["cutoffs"] = [round(float(c), 6) for c in thresholds.cutoffs] if masks.prob_cutoff else None
    return spec


def spec_key(spec: Mapping[str, Any]) -> str:
    """The subgroup key of a recipe: 16 hex digits of the SHA-256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def student_recipe(cfg: Config, thresholds: str | None, store: MapStore) -> PseudoMaskRecipe:
    """The maker, spec and key of the pseudo-masks the student of ``cfg`` makes from ``store``."""
    path = thresholds_path(cfg, thresholds)
    tuned = TunedThresholds.load(path) if path else None
    check_store(cfg, thresholds, store)
    model = str(store.attrs.get("model_fingerprint", ""))
    spec = refine_spec(
        cfg.masks, tuned, cfg.train_segmentation.label_gating, cfg.segmentation.image_size, model_fingerprint=model
    )
    return PseudoMaskRecipe(maker=student_maker(cfg, thresholds), spec=spec, key=spec_key(spec))
