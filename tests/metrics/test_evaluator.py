"""The segmentation evaluator under training loops gives exactly ``chexseg evaluate``'s numbers, whether it is fed
dense masks or RLEs, in one piece or merged from several workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chexseg_dist.cli import main
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.data import decode_mask, encode_mask, read_segmentations, write_segmentations
from chexseg_dist.evaluation import evaluate_files
from chexseg_dist.metrics import SegmentationEvaluator, dense_pair_stats


def _random_masks(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    masks = {}
    for task in TASKS:
        m = np.zeros((h, w), dtype=bool)
        if rng.random() < 0.6:  # some pathologies empty, as in real data
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            m[y : y + rng.integers(2, h // 2), x : x + rng.integers(2, w // 2)] = True
        masks[task] = m
    return masks


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("ev")
    gt, pred = {}, {}
    for i in range(12):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        image_id = f"patient{i:05d}_study1_view1_frontal"
        gt[image_id] = {t: encode_mask(m) for t, m in _random_masks(rng, h, w).items()}
        pred[image_id] = {t: encode_mask(m) for t, m in _random_masks(rng, h, w).items()}
    write_segmentations(str(root / "gt.json"), gt)
    write_segmentations(str(root / "pred.json"), pred)
    return {"gt": str(root / "gt.json"), "pred": str(root / "pred.json"), "root": str(root)}


def _dense(entry: dict, image_id: str) -> np.ndarray:
    return np.stack([decode_mask(entry[t], image_id=image_id, pathology=t) for t in TASKS])[None]


@pytest.mark.parametrize("mode", ["tp_only", "full"])
def test_evaluator_equals_chexseg_evaluate(files: dict[str, str], mode: str) -> None:
    reference = evaluate_files(files["gt"], files["pred"], mode, n_bootstrap=200, seed=3)
    gt, pred = read_segmentations(files["gt"]), read_segmentations(files["pred"])
    ids = list(reversed(sorted(gt)))  # any processing order

    dense = SegmentationEvaluator(mode, n_bootstrap=200, seed=3)
    for image_id in ids:
        as_torch = image_id.endswith(("1_study1_view1_frontal", "3_study1_view1_frontal"))
        g, p = _dense(gt[image_id], image_id), _dense(pred[image_id], image_id)
        if as_torch:  # what a training loop hands over: tensors, possibly float probabilities thresholded
            dense.process([image_id], torch.from_numpy(g), torch.from_numpy(p).float())
        else:
            dense.process([image_id], g, p)
    rles = SegmentationEvaluator(mode, n_bootstrap=200, seed=3)
    rles.process(ids, [gt[i] for i in ids], [pred[i] for i in ids])
    # Two workers each see half the images; rank 0 merges their states.
    halves = [SegmentationEvaluator(mode, n_bootstrap=200, seed=3) for _ in range(2)]
    for k, image_id in enumerate(ids):
        halves[k % 2].process([image_id], _dense(gt[image_id], image_id), _dense(pred[image_id], image_id))
    merged = SegmentationEvaluator(mode, n_bootstrap=200, seed=3)
    merged.merge([h.state() for h in halves])

    for evaluator in (dense, rles, merged):
        result = evaluator.evaluate()
        assert result.stats.image_ids == reference.stats.image_ids
        np.testing.assert_array_equal(result.stats.inter, reference.stats.inter)
        np.testing.assert_array_equal(result.miou.value, reference.miou.value)
        np.testing.assert_array_equal(result.miou.ci, reference.miou.ci)
        assert result.miou.mean == reference.miou.mean
        np.testing.assert_array_equal(result.dataset_iou.value, reference.dataset_iou.value)


def test_evaluator_matches_the_command_summary(files: dict[str, str], tmp_path: Path) -> None:
    import json

    out = tmp_path / "report"
    assert (
        main(["evaluate", "--gt", files["gt"], "--pred", files["pred"], "--out", str(out), "--n-bootstrap", "50"]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    gt, pred = read_segmentations(files["gt"]), read_segmentations(files["pred"])
    ev = SegmentationEvaluator("tp_only", n_bootstrap=50, seed=0)
    ev.process(sorted(gt), [gt[i] for i in sorted(gt)], [pred[i] for i in sorted(gt)])
    assert ev.evaluate().summary()["pathologies"] == summary["pathologies"]


def test_dense_statistics_and_refusals() -> None:
    g = np.zeros((2, len(TASKS), 4, 4), dtype=bool)
    p = np.zeros_like(g)
    g[0, 1, :2, :2] = True
    p[0, 1, 1:3, 1:3] = True
    gt_area, pred_area, inter = dense_pair_stats(g, p)
    assert gt_area[0, 1] == 4 and pred_area[0, 1] == 4 and inter[0, 1] == 1 and gt_area.sum() == 4
    ev = SegmentationEvaluator("full", n_bootstrap=0)
    ev.process(["a", "b"], g, p)
    assert ev.evaluate().miou.value[1] == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="processed more than once"):
        ev.process(["a"], g[:1], p[:1])
        ev.stats()
    with pytest.raises(ValueError, match=r"\[B, 10, H, W\]"):
        dense_pair_stats(g[:, :3], p[:, :3])
    ev.reset()
    assert ev.stats().image_ids == []
