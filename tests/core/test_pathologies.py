import pytest

from chexseg_dist.core.pathologies import (
    CSV_HEADER,
    OBSERVATIONS,
    TASK_OBSERVATION_INDEX,
    TASKS,
    canonical_task,
    observation_for_task,
)


def test_counts_and_header_match_chexpert() -> None:
    assert len(OBSERVATIONS) == 14 and len(TASKS) == 10
    assert CSV_HEADER[:5] == ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
    assert CSV_HEADER[5:] == OBSERVATIONS
    assert "Airspace Opacity" not in OBSERVATIONS and "Lung Opacity" in OBSERVATIONS


def test_lung_opacity_alias_maps_both_ways() -> None:
    assert canonical_task("Lung Opacity") == "Airspace Opacity"
    assert observation_for_task("Airspace Opacity") == "Lung Opacity"
    assert observation_for_task("Cardiomegaly") == "Cardiomegaly"


def test_task_index_points_at_the_same_observation() -> None:
    for task, idx in zip(TASKS, TASK_OBSERVATION_INDEX):
        assert OBSERVATIONS[idx] == observation_for_task(task)


def test_unknown_pathology_is_named() -> None:
    with pytest.raises(KeyError, match="Pneumonia"):
        canonical_task("Pneumonia")
