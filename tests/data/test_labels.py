"""Label policies (U-Ones / U-Zeros / U-Ignore, blanks) and the rank-based AUROC."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from chexseg_dist.core.pathologies import OBSERVATIONS, TASK_OBSERVATION_INDEX, TASKS
from chexseg_dist.data.labels import labels_and_mask
from chexseg_dist.errors import ConfigError, ManifestError
from chexseg_dist.metrics.auroc import auroc, mean_task_auroc, per_class_auroc, task_aurocs

NAN = float("nan")


def _rows(values: list[float | None], column: str = "Cardiomegaly") -> dict[str, list[float | None]]:
    """Manifest-like columns: ``column`` takes ``values``; every other observation is a definite 0."""
    rows: dict[str, list[float | None]] = {name: [0.0] * len(values) for name in OBSERVATIONS}
    rows[column] = list(values)
    rows["row"] = list(range(len(values)))
    return rows


CARDIO = OBSERVATIONS.index("Cardiomegaly")
CELLS = [1.0, 0.0, -1.0, None]  # positive, negative, uncertain, blank


def test_u_ones_marks_uncertain_positive() -> None:
    targets, mask = labels_and_mask(_rows(CELLS), uncertain_policy="ones")
    assert targets[:, CARDIO].tolist() == [1, 0, 1, 0]
    assert mask[:, CARDIO].tolist() == [1, 1, 1, 1]


def test_u_zeros_never_treats_uncertain_as_positive() -> None:
    targets, mask = labels_and_mask(_rows(CELLS), uncertain_policy="zeros")
    assert targets[2, CARDIO] == 0.0
    assert mask[2, CARDIO] == 1.0  # counted in the loss, as a negative
    assert targets[:, CARDIO].tolist() == [1, 0, 0, 0]


def test_u_ignore_keeps_uncertain_out_of_the_loss() -> None:
    targets, mask = labels_and_mask(_rows(CELLS), uncertain_policy="ignore")
    assert mask[:, CARDIO].tolist() == [1, 1, 0, 1]
    assert targets[2, CARDIO] == 0.0  # a valid BCE target, but masked


@pytest.mark.parametrize(("policy", "expected_mask"), [("negative", 1.0), ("ignore", 0.0)])
def test_blank_policy(policy: str, expected_mask: float) -> None:
    targets, mask = labels_and_mask(_rows(CELLS), blank_policy=policy)
    assert targets[3, CARDIO] == 0.0
    assert mask[3, CARDIO] == expected_mask
    # Definite labels are unaffected by the blank policy.
    assert mask[:2, CARDIO].tolist() == [1, 1]


def test_accepts_arrow_pandas_and_numpy_batches_with_nulls_as_blank() -> None:
    rows = _rows(CELLS)
    expected = labels_and_mask(rows, "ignore", "ignore")
    table = pa.table(rows)
    assert table.column("Cardiomegaly").null_count == 1
    numpy_batch = {k: np.array([NAN if v is None else v for v in col], dtype=np.float64) for k, col in rows.items()}
    for source in (table, table.to_pandas(), numpy_batch):
        targets, mask = labels_and_mask(source, "ignore", "ignore")
        assert targets.dtype == np.float32 and mask.dtype == np.float32
        assert targets.shape == (4, len(OBSERVATIONS))
        np.testing.assert_array_equal(targets, expected[0])
        np.testing.assert_array_equal(mask, expected[1])


def test_bad_label_value_names_column_and_row() -> None:
    rows = _rows([1.0, 2.0])
    rows["row"] = [10, 11]
    with pytest.raises(ValueError, match=r"'Cardiomegaly' at row 11 is 2\.0"):
        labels_and_mask(rows)


def test_missing_column_and_unknown_policy() -> None:
    rows = _rows([1.0])
    del rows["Edema"]
    with pytest.raises(ManifestError, match="no label column 'Edema'"):
        labels_and_mask(rows)
    with pytest.raises(ConfigError, match="uncertain_policy='maybe': unknown uncertain-label policy"):
        labels_and_mask(_rows([1.0]), uncertain_policy="maybe")


def _pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The definition: P(score of a random positive > score of a random negative) + 1/2 P(tie)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    # Coarse scores force many ties, which the rank formula must count as one half.
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), 1)
    assert auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_extremes_and_undefined() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    with pytest.raises(ValueError, match="0/1"):
        auroc(np.array([0.1, 0.2]), np.array([0, 2]))


def test_per_class_auroc_respects_mask_and_task_mean() -> None:
    scores = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3], [0.2, 0.4]])
    targets = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    # Masking out row 2 of class 0 leaves one positive; class 1 all counted.
    mask = np.array([[1, 1], [1, 1], [0, 1], [1, 1]])
    result = per_class_auroc(scores, targets, mask)
    assert result[0] == 1.0 and result[1] == 1.0
    only_negatives = per_class_auroc(scores, targets, np.array([[0, 1], [1, 1], [0, 1], [1, 1]]))
    assert np.isnan(only_negatives[0])

    per_obs = np.full(len(OBSERVATIONS), NAN)
    per_obs[OBSERVATIONS.index("No Finding")] = 0.0  # not a localisation task: must not enter the mean
    per_obs[TASK_OBSERVATION_INDEX[0]] = 0.6
    per_obs[OBSERVATIONS.index("Lung Opacity")] = 1.0
    assert mean_task_auroc(per_obs) == pytest.approx(0.8)
    assert task_aurocs(per_obs)["Airspace Opacity"] == 1.0
    assert list(task_aurocs(per_obs)) == list(TASKS)
    assert np.isnan(mean_task_auroc(np.full(len(OBSERVATIONS), NAN)))
