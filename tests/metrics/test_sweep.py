"""The one threshold sweep: every threshold's areas in one pass equal thresholding densely at each, inside the
letterbox content only; workers' sweeps merge into the whole; an image is counted once."""

from __future__ import annotations

import numpy as np
import pytest

from chexseg_dist.core.pathologies import N_TASKS
from chexseg_dist.metrics.segmentation import dense_pair_stats
from chexseg_dist.metrics.sweep import ThresholdSweep


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.uniform(size=(3, N_TASKS, 16, 16)).astype(np.float32)
    probs[0, 0, 0, :4] = [0.25, 0.5, 0.75, 1.0]  # values on the grid: p > t is strict
    gt = rng.uniform(size=(3, N_TASKS, 16, 16)) > 0.6
    content = np.ones((3, 16, 16), dtype=bool)
    content[1, :4] = False  # letterbox padding is never predicted
    gt[1, :, :4] = False
    return probs, gt, content


def test_output_threshold_counts_equal_dense_masks_at_every_threshold() -> None:
    probs, gt, content = _batch(0)
    steps = 4
    sweep = ThresholdSweep(steps)
    sweep.process(["c", "a", "b"], probs, gt, content)
    counts = sweep.evaluate()
    assert counts.image_ids == ["a", "b", "c"]  # rows sorted by id
    order = [1, 2, 0]
    for k in range(steps + 1):
        dense = (probs > k / steps) & content[:, None]
        g, p, i = dense_pair_stats(gt, dense)
        assert np.array_equal(g[order], counts.gt_area)
        assert np.array_equal(p[order], counts.pred[:, :, k]) and np.array_equal(i[order], counts.inter[:, :, k])
    np.testing.assert_array_equal(counts.grid, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_sweeps_of_two_workers_merge_into_the_sweep_of_all_and_an_image_counts_once() -> None:
    (pa, ga, ca), (pb, gb, cb) = _batch(1), _batch(2)
    whole = ThresholdSweep(5)
    whole.process(["a0", "a1", "a2"], pa, ga, ca)
    whole.process(["b0", "b1", "b2"], pb, gb, cb)
    one, two = ThresholdSweep(5), ThresholdSweep(5)
    one.process(["a0", "a1", "a2"], pa, ga, ca)
    two.process(["b0", "b1", "b2"], pb, gb, cb)
    one.merge(two.state())
    merged, expected = one.evaluate(), whole.evaluate()
    assert merged.image_ids == expected.image_ids
    for name in ("gt_area", "inter", "pred"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(expected, name))
    with pytest.raises(ValueError, match="'a1' was processed twice"):
        one.merge(two.state() | {"image_ids": np.array(["a1", "x", "y"])})
    one.reset()
    assert one.evaluate().image_ids == []
