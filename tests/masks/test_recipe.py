"""The student's pseudo-mask recipe: every masks setting is either in the refined-mask key or declared irrelevant, a
setting in the key changes it, an irrelevant one does not, and the key of an existing store's recipe is unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from chexseg_dist.config import MasksConfig, load_config
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_OBSERVATIONS, N_TASKS
from chexseg_dist.masks.recipe import (
    BY_CONTENT,
    IRRELEVANT,
    REFINER_PARAMS,
    SPEC_FIELDS,
    refine_spec,
    spec_key,
    student_recipe,
)
from chexseg_dist.masks.thresholds import TunedThresholds
from chexseg_dist.store.layout import REFINED_VERSION
from chexseg_dist.store.mapstore import MapStore


def test_every_masks_field_is_in_the_key_or_declared_irrelevant() -> None:
    groups = [set(SPEC_FIELDS), set(REFINER_PARAMS), set(BY_CONTENT), set(IRRELEVANT)]
    listed = set().union(*groups)
    fields = {f.name for f in dataclasses.fields(MasksConfig)}
    assert fields - listed == set(), f"masks fields in neither the recipe key nor IRRELEVANT: {fields - listed}"
    assert listed - fields == set(), f"recipe names that are no masks field: {listed - fields}"
    assert sum(len(g) for g in groups) == len(listed), "a field is listed twice"


def _a_changed_value(name: str, value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if 0 < value < 1 else value + 1.0
    return {"strategy": "tuned", "refiner": "crf", "tune_mode": "full"}[name]


@pytest.mark.parametrize("name", [*SPEC_FIELDS, *REFINER_PARAMS])
def test_each_setting_in_the_key_changes_it(name: str) -> None:
    base = MasksConfig()
    changed = dataclasses.replace(base, **{name: _a_changed_value(name, getattr(base, name))})
    assert spec_key(refine_spec(changed, None, True, 64, "m")) != spec_key(refine_spec(base, None, True, 64, "m"))


@pytest.mark.parametrize("name", sorted(IRRELEVANT))
def test_an_irrelevant_setting_leaves_the_key_alone(name: str) -> None:
    base = MasksConfig()
    changed = dataclasses.replace(base, **{name: _a_changed_value(name, getattr(base, name))})
    assert spec_key(refine_spec(changed, None, True, 64, "m")) == spec_key(refine_spec(base, None, True, 64, "m"))


def test_the_key_of_an_existing_recipe_is_unchanged() -> None:
    # Refined subgroups written before the recipe module keep their keys: the spec is the one chexseg refine wrote
    # (the refiner parameters picked by name prefix), field for field.
    masks = MasksConfig(refiner="crf", crf_iterations=5)
    old = {
        "version": REFINED_VERSION,
        "refiner": "crf",
        "params": {
            k: v for k, v in sorted(dataclasses.asdict(masks).items()) if k.startswith(("crf_", "rw_", "fg_fraction"))
        },
        "strategy": "otsu",
        "label_gating": True,
        "prob_cutoff": False,
        "frame": 64,
        "model_fingerprint": "m",
    }
    assert refine_spec(masks, None, True, 64, "m") == old
    assert (
        spec_key(refine_spec(masks, None, True, 64, "m"))
        == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    )


def test_the_recipe_reads_thresholds_from_the_config_as_the_maker_does(tmp_path: Path) -> None:
    # masks.thresholds in the config and --thresholds on the command line are one file to the maker: to the key too
    # (a key without the thresholds would reuse masks made with other ones).
    path = tmp_path / "t.json"
    TunedThresholds(thresholds=np.full(N_TASKS, 0.3), cutoffs=np.zeros(N_TASKS), meta={}).save(str(path))
    store = MapStore.create(str(tmp_path / "s.zarr"), ["a"], np.array([0]), (4, 4), images_per_chunk=1)
    store.write_rows(
        np.array([0]),
        np.zeros((1, N_OBSERVATIONS), np.float32),
        np.zeros((1, N_TASKS, 4, 4), np.float32),
        np.array([(32, 32)]),
        np.array([Letterbox(32, 32, 32).params()]),
    )
    by_flag = student_recipe(load_config("tiny", overrides=["masks.strategy=tuned"]), str(path), store)
    by_config = student_recipe(
        load_config("tiny", overrides=["masks.strategy=tuned", f"masks.thresholds={path}"]), None, store
    )
    assert by_flag.key == by_config.key and by_flag.spec["thresholds"] == [0.3] * N_TASKS
    assert by_config.maker.label_gating is True  # the student's own gate (train_segmentation.label_gating)


def test_thresholds_of_another_classifiers_maps_are_refused_for_a_store(tmp_path: Path) -> None:
    from chexseg_dist.errors import InputError
    from chexseg_dist.masks.recipe import check_store

    def store(name: str, model: str) -> MapStore:
        ms = MapStore.create(str(tmp_path / name), ["a"], np.array([0]), (4, 4), {"model_fingerprint": model}, 1)
        return MapStore.open(ms.uri)

    tuned_on = {"store": {"uri": str(tmp_path / "valid.zarr"), "model_fingerprint": "sha256:aaaa1111"}}
    path = tmp_path / "t.json"
    TunedThresholds(thresholds=np.full(N_TASKS, 0.3), cutoffs=np.zeros(N_TASKS), meta=tuned_on).save(str(path))
    cfg = load_config("tiny", overrides=["masks.strategy=tuned"])
    check_store(cfg, str(path), store("same.zarr", "sha256:aaaa1111"))  # the same classifier: fine
    other = store("other.zarr", "sha256:bbbb2222")
    with pytest.raises(
        InputError, match=r"t\.json were tuned on the maps of classifier sha256:aaaa.*other\.zarr holds"
    ):
        check_store(cfg, str(path), other)
    with pytest.raises(InputError, match="tune thresholds on a store of this classifier"):
        student_recipe(cfg, str(path), other)
    check_store(load_config("tiny"), str(path), other)  # Otsu masks do not use the thresholds
    # A file written before thresholds recorded their classifier cannot be checked, and passes.
    TunedThresholds(thresholds=np.full(N_TASKS, 0.3), cutoffs=np.zeros(N_TASKS), meta={}).save(str(path))
    check_store(cfg, str(path), other)
