"""The student on a real local Ray cluster: the exact expert count in every batch on each of 2 workers across epochs
and the expert pool's restarts, a run of another mode refused, the Bernoulli share within binomial bounds, and a
checkpoint chexseg segment turns into a file chexseg evaluate scores. The loop's own properties (resume, the fault
drill and its retry, a non-finite loss) are proved once with the debug task in tests/train/test_loop_cluster.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from student_helpers import SMALL_STUDENT

from chexseg_dist.config import load_config
from chexseg_dist.data.expert import load_expert_set
from chexseg_dist.errors import TrainingError

TWO_WORKERS = [*SMALL_STUDENT, "train_segmentation.num_workers=2", "train_segmentation.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def world(student_world: dict[str, str]) -> dict[str, str]:
    return student_world


def _inputs(world: dict[str, str]):  # type: ignore[no-untyped-def]
    from chexseg_dist.train.segmentation import StudentInputs

    return StudentInputs(
        expert_manifest=world["valid"],
        expert_annotations=world["expert"],
        pseudo_store=world["store"],
        pseudo_manifest=world["train"],
        holdout_manifest=world["test"],
    )


def _histogram(metrics: dict) -> dict[int, float]:  # type: ignore[type-arg]
    return {int(k.rsplit("/", 1)[1]): v for k, v in metrics.items() if k.startswith("experts_per_batch/")}


@pytest.mark.cluster
@pytest.mark.slow
def test_two_workers_hold_the_exact_ratio_in_every_batch_and_the_pool_restarts(
    ray_cluster: None, world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from chexseg_dist.cli import main
    from chexseg_dist.train.segmentation import train_segmentation

    out = str(tmp_path / "semi")
    steps, batch = 5, 4
    common = [*TWO_WORKERS, f"train_segmentation.steps_per_epoch={steps}", f"train_segmentation.batch_size={batch}"]
    result = train_segmentation(
        load_config("tiny", overrides=[*common, "train_segmentation.epochs=3"]), _inputs(world), out, verbose=False
    )
    assert result.start_epoch == 0 and [m["epoch"] for m in result.history] == [0, 1, 2]
    expert_train = result.history[0]["train_expert_rows"]
    for metrics in result.history:
        # Every batch of every worker held exactly round(0.5 x 4) = 2 expert rows: one bar, steps x 2 workers tall.
        assert _histogram(metrics) == {2: steps * 2}
        assert metrics["expert_share"] == 0.5
    # Three epochs drew 2 x 5 x 3 = 30 expert rows per worker from a smaller expert-train set: the pool restarted.
    ts = load_config("tiny").train_segmentation
    n_expert_train = load_expert_set(world["valid"], world["expert"], ts.select_fraction, ts.seed).train.num_rows
    assert 2 * steps * 3 > n_expert_train and expert_train == steps * 2 * 2
    meta = json.loads((tmp_path / "semi" / "segmentation.json").read_text())
    assert meta["metrics"]["expert_ratio_effective"] == 0.5 and meta["metrics"]["mode"] == "semi"
    assert set(meta["thresholds"]) == set(meta["tasks"])
    # A run of another mode under the same name is refused before any worker starts.
    with pytest.raises(TrainingError, match=r"'mode': 'semi'.*'mode': 'full'"):
        train_segmentation(
            load_config("tiny", overrides=[*common, "train_segmentation.epochs=3", "train_segmentation.mode=full"]),
            _inputs(world),
            out,
            verbose=False,
        )
    # The checkpoint goes through chexseg segment into a file chexseg evaluate accepts.
    pred = tmp_path / "pred.json"
    assert main(["segment", "--model", out, "--manifest", world["test"], "--out", str(pred), "--set",
                 "segment.batch_size=8"]) == 0  # fmt: skip
    assert main(["evaluate", "--gt", world["gt_test"], "--pred", str(pred), "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == 8 and summary["mode"] == "tp_only"
    capsys.readouterr()


@pytest.mark.cluster
def test_bernoulli_mixing_draws_each_row_with_probability_w(
    ray_cluster: None, world: dict[str, str], tmp_path: Path
) -> None:
    from chexseg_dist.train.segmentation import train_segmentation

    steps, batch, w = 12, 4, 0.3
    cfg = load_config(
        "tiny",
        overrides=[*TWO_WORKERS, "train_segmentation.mixing=bernoulli", f"train_segmentation.expert_ratio={w}",
                   f"train_segmentation.steps_per_epoch={steps}", f"train_segmentation.batch_size={batch}"],
    )  # fmt: skip
    res = train_segmentation(cfg, _inputs(world), str(tmp_path / "b"), verbose=False)
    metrics = res.history[0]
    rows = 2 * steps * batch
    experts = metrics["train_expert_rows"]
    sd = (rows * w * (1 - w)) ** 0.5
    assert abs(experts - w * rows) < 4 * sd, (experts, w * rows)
    hist = _histogram(metrics)
    assert sum(hist.values()) == 2 * steps and len(hist) > 1  # a per-sample draw: batches differ
    assert sum(k * v for k, v in hist.items()) == experts
