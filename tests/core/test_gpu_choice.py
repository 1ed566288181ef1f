"""GPUs by default where there are GPUs: ``auto`` in the paper preset resolves against the cluster's resources, says
so, and explicit values are kept; asking for GPUs a cluster cannot have is refused by name."""

from __future__ import annotations

import pytest

from chexseg_dist.config import load_config
from chexseg_dist.core.ray_env import actor_gpus, worker_gpus
from chexseg_dist.errors import ConfigError, InputError


def test_the_paper_preset_asks_for_gpus_where_the_cluster_has_them_and_tiny_for_none() -> None:
    paper = load_config("paper")
    assert paper.train_classifier.use_gpu == "auto" and paper.train_segmentation.use_gpu == "auto"
    assert paper.pseudolabel.gpus_per_actor == "auto" and paper.segment.gpus_per_actor == "auto"
    tiny = load_config("tiny")
    assert tiny.train_classifier.use_gpu is False and tiny.pseudolabel.gpus_per_actor == 0.0
    explicit = load_config("paper", overrides=["train_classifier.use_gpu=false", "pseudolabel.gpus_per_actor=0.5"])
    assert explicit.train_classifier.use_gpu is False and explicit.pseudolabel.gpus_per_actor == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train_classifier.use_gpu=maybe", "train_classifier.use_gpu='maybe': expected bool or auto"),
        ("pseudolabel.gpus_per_actor=some", "pseudolabel.gpus_per_actor='some': expected float or auto"),
        ("pseudolabel.gpus_per_actor=-1", "pseudolabel.gpus_per_actor=-1.0: expected a number >= 0 or auto"),
    ],
)
def test_a_gpu_setting_that_is_neither_a_value_nor_auto_is_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("paper", overrides=[override])


def test_auto_actors_take_a_gpu_each_or_share_or_run_on_cpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert actor_gpus("pseudolabel", 4, "auto", {"CPU": 64.0, "GPU": 8.0}) == 1.0
    assert actor_gpus("pseudolabel", 4, "auto", {"CPU": 64.0, "GPU": 2.0}) == 0.5
    assert actor_gpus("pseudolabel", 2, "auto", {"CPU": 2.0}) == 0.0
    assert actor_gpus("pseudolabel", 2, 1.0, {"CPU": 2.0}) == 1.0  # explicit: kept (pool_problem judges it)
    said = capsys.readouterr().out
    assert "gpus_per_actor=auto: the Ray cluster has 8 GPU(s); 4 actor(s), 1 each" in said
    assert "gpus_per_actor=auto: the Ray cluster has no GPU; 2 model actor(s) on CPUs" in said


def test_auto_workers_train_on_gpus_only_when_there_is_one_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_gpus("train_classifier", 2, "auto", {"GPU": 2.0}, can_grow=False) is True
    assert worker_gpus("train_classifier", 4, "auto", {"GPU": 2.0}, can_grow=False) is False
    assert worker_gpus("train_classifier", 1, "auto", {"CPU": 2.0}, can_grow=False) is False
    assert "set train_classifier.num_workers=2 to use the GPUs" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"train_segmentation.use_gpu=true with num_workers=2 needs 2 GPU\(s\)"):
        worker_gpus("train_segmentation", 2, True, {"CPU": 8.0}, can_grow=False)
    assert worker_gpus("train_segmentation", 2, True, {"CPU": 8.0}, can_grow=True) is True  # it may still grow
