import json

import numpy as np
import pytest
from maps_helpers import blob_mask, image_ids, make_manifest, make_store, stored_cams

from chexseg_dist.cli.main import main
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import encode_mask, write_segmentations
from chexseg_dist.masks.binarize import ThresholdBinarizer
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.maps import normalise_maps, upsample_maps
from chexseg_dist.masks.thresholds import TunedThresholds
from chexseg_dist.masks.tuning import TuningTable, choose, threshold_counts, threshold_grid
from chexseg_dist.metrics.segmentation import evaluate_stats, pair_stats


def test_threshold_grid_is_what_a_json_round_trip_keeps() -> None:
    grid = threshold_grid(100)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 101
    assert json.loads(json.dumps(grid.tolist())) == grid.tolist()
    assert grid[7] == 0.07


@pytest.mark.parametrize("steps", [100, 7])
def test_one_pass_counts_equal_thresholding_each_value(steps: int) -> None:
    rng = np.random.default_rng(0)
    box = Letterbox(53, 41, 16)
    cams = rng.random((5, 4, 4)).astype(np.float32)
    cams[1] = 2.5  # constant
    cams[2, :2] = 0.0  # flat regions put many pixels exactly at 0
    gts = [blob_mask(rng, 53, 41), blob_mask(rng, 53, 41), rng.random((53, 41)) < 0.5, None, np.ones((53, 41), bool)]
    gts[2] = np.asfortranarray(gts[2])  # pycocotools decodes Fortran-ordered masks
    inter, pred = threshold_counts(cams, box, gts, steps)
    norm = normalise_maps(upsample_maps(cams, box))
    for j, t in enumerate(threshold_grid(steps)):
        masks = ThresholdBinarizer(np.full(10, t)).binarise(norm, np.zeros(5, dtype=int))
        for k in range(5):
            if gts[k] is None:
                assert (pred[k, j] > 0) == masks[k].any()
            else:
                assert inter[k, j] == (masks[k] & gts[k]).sum()
                assert pred[k, j] == masks[k].sum()
    assert (pred[1] == 0).all()


def test_cutoff_objective_hand_case() -> None:
    # One pathology (index 0) on two images, thresholds grid {0, 0.5, 1}:
    #   image 0: gt positive (area 4), pred at t=0: 8 px covering the gt (IoU 0.5); t=0.5: 4 px, 3 inside (IoU 0.6)
    #   image 1: gt empty, its map is non-constant (non-empty prediction below t=1), prob 0.3
    gt_area = np.zeros((2, 10), dtype=np.int64)
    gt_area[0, 0] = 4
    inter = np.zeros((2, 10, 3), dtype=np.int64)
    pred = np.zeros((2, 10, 3), dtype=np.int64)
    inter[0, 0] = [4, 3, 0]
    pred[0, 0] = [8, 4, 0]
    pred[1, 0] = [1, 1, 0]
    probs = np.zeros((2, 10))
    probs[:, 0] = [0.9, 0.3]
    table = TuningTable(["a", "b"], gt_area, inter, pred, probs, threshold_grid(2))
    thresholds, cutoffs, details = choose(table, "tp_only", cutoff_steps=100, fallback=0.5)
    # tp_only: only image 0 counts: IoU 0.5 at t=0, 0.6 at t=0.5, nothing kept at t=1 -> t = 0.5.
    assert thresholds[0] == 0.5 and details[TASKS[0]]["miou"] == pytest.approx(0.6)
    # full mode at t=0.5: cutoff <= 0.3 keeps image 1's false positive: (0.6 + 0) / 2 = 0.3; cutoffs 0.31..0.90
    # empty it: 0.6 / 1; above 0.9 image 0 is emptied too: 0 / 1. Smallest best cutoff: 0.31.
    assert cutoffs[0] == pytest.approx(0.31)
    assert details[TASKS[0]]["miou_full_no_cutoff"] == pytest.approx(0.3)
    assert details[TASKS[0]]["miou_full"] == pytest.approx(0.6)
    # Pathologies without a positive expert mask keep the fallback and are marked untuned.
    assert thresholds[1] == 0.5 and cutoffs[1] == 0.0 and details[TASKS[1]]["tuned"] is False


def _tuning_case(tmp_path, n: int = 7):
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(30, 60)), int(rng.integers(30, 60))) for _ in range(n)]
    cams = rng.random((n, 10, 5, 5)).astype(np.float32) ** 2
    probs = rng.random((n, len(OBSERVATIONS))).astype(np.float32)
    uri = str(tmp_path / "valid.zarr")
    make_store(uri, cams, sizes, 24, probs=probs)
    gt = {}
    for i, image_id in enumerate(image_ids(n)):
        h, w = sizes[i]
        gt[image_id] = {
            t: encode_mask(blob_mask(rng, h, w) if (rng.random() < 0.6 and t != "Pneumothorax") else np.zeros((h, w)))
            for t in TASKS
        }
    write_segmentations(str(tmp_path / "gt.json"), gt)
    return uri, gt, sizes, probs


def _brute_force_miou(uri, gt, sizes, probs, thresholds, cutoffs, mode):
    cams = stored_cams(uri)
    maker = MaskMaker(ThresholdBinarizer(thresholds), cutoffs=cutoffs)
    pred = {}
    for i, image_id in enumerate(image_ids(len(sizes))):
        masks = maker.masks(cams[i], Letterbox(*sizes[i], 24), probs[i])
        pred[image_id] = {t: encode_mask(masks[k]) for k, t in enumerate(TASKS)}
    return evaluate_stats(pair_stats(gt, pred), mode, n_bootstrap=0).miou.value


def test_tuned_thresholds_and_cutoffs_equal_a_brute_force_search(tmp_path) -> None:
    uri, gt, sizes, probs = _tuning_case(tmp_path)
    steps, cut_steps = 25, 20
    out = str(tmp_path / "t.json")
    argv = ["tune-thresholds", "--store", uri, "--gt", str(tmp_path / "gt.json"), "--out", out, "--workers", "1"]
    argv += ["--set", f"masks.threshold_steps={steps}", "--set", f"masks.cutoff_steps={cut_steps}"]
    assert main(argv) == 0
    tuned = TunedThresholds.load(out)

    # Brute force through the real mask and evaluation code: one full evaluation per threshold.
    grid = threshold_grid(steps)
    curves = np.stack([_brute_force_miou(uri, gt, sizes, probs, np.full(10, t), None, "tp_only") for t in grid], 1)
    tunable = np.isfinite(curves).any(axis=1)
    assert not tunable[TASKS.index("Pneumothorax")]
    best = np.where(tunable, grid[np.argmax(np.nan_to_num(curves, nan=-1), axis=1)], 0.5)
    np.testing.assert_array_equal(tuned.thresholds, best)
    for k, task in enumerate(TASKS):
        if tunable[k]:
            assert tuned.meta["pathologies"][task]["miou"] == pytest.approx(np.nanmax(curves[k]), abs=1e-12)
            curve = np.array(tuned.meta["curves"]["miou"][task], dtype=float)  # JSON null -> NaN
            np.testing.assert_allclose(curve, curves[k], atol=1e-12)

    cut_grid = threshold_grid(cut_steps)
    full = np.stack([_brute_force_miou(uri, gt, sizes, probs, best, np.full(10, c), "full") for c in cut_grid], axis=1)
    best_cut = np.where(tunable, cut_grid[np.argmax(np.nan_to_num(full, nan=-1), axis=1)], 0.0)
    np.testing.assert_array_equal(tuned.cutoffs, best_cut)
    assert tuned.meta["grid"]["thresholds"]["steps"] == steps
    assert tuned.meta["store"]["fingerprint"].startswith("sha256:")
    assert (tmp_path / "t.json.config.yaml").exists()


def test_label_gating_in_tuning_and_fingerprint(tmp_path) -> None:
    uri, _gt, _sizes, _probs = _tuning_case(tmp_path, n=5)
    labels = np.zeros((5, len(OBSERVATIONS)))  # every label negative: gating empties every prediction
    manifest = str(tmp_path / "m.parquet")
    make_manifest(manifest, image_ids(5), labels)
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    base = ["tune-thresholds", "--store", uri, "--gt", str(tmp_path / "gt.json"), "--workers", "1"]
    assert main([*base, "--out", a]) == 0
    assert main([*base, "--out", b, "--manifest", manifest]) == 0
    ta, tb = TunedThresholds.load(a), TunedThresholds.load(b)
    assert ta.meta["store"] == tb.meta["store"]  # same store, same fingerprint
    assert any(v["tuned"] for v in ta.meta["pathologies"].values())
    assert not any(v["tuned"] for v in tb.meta["pathologies"].values())  # no kept pair anywhere
    assert tb.meta["objective"]["label_gating"] is True


def test_tuning_needs_matching_sizes_and_all_images(tmp_path, capsys) -> None:
    uri, gt, _sizes, _ = _tuning_case(tmp_path, n=4)
    gt["patient99999_study1_view1_frontal"] = gt[image_ids(4)[0]]
    write_segmentations(str(tmp_path / "gt2.json"), gt)
    argv = ["tune-thresholds", "--store", uri, "--gt", str(tmp_path / "gt2.json"), "--out", str(tmp_path / "t.json")]
    assert main([*argv, "--workers", "1"]) == 2
    assert "patient99999_study1_view1_frontal" in capsys.readouterr().err


def test_process_pool_gives_the_same_result(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("chexseg_dist.masks.tuning.IN_PROCESS_PIXELS", 0)  # use the pool even for tiny images
    uri, _gt, _sizes, _ = _tuning_case(tmp_path, n=8)
    base = ["tune-thresholds", "--store", uri, "--gt", str(tmp_path / "gt.json")]
    assert main([*base, "--out", str(tmp_path / "a.json"), "--workers", "1"]) == 0
    assert main([*base, "--out", str(tmp_path / "b.json"), "--workers", "2"]) == 0
    a, b = TunedThresholds.load(str(tmp_path / "a.json")), TunedThresholds.load(str(tmp_path / "b.json"))
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    np.testing.assert_array_equal(a.cutoffs, b.cutoffs)
    assert a.meta["curves"] == b.meta["curves"]
