"""The shared training loop's own properties, proved once with the debug task (one linear layer, in-memory data) on
real Ray Train workers: resume by re-running, the fault drill and the retry from the latest checkpoint, best-epoch
export, re-export of a finished run without Ray, the identity refusal, a killed worker without retries and a
non-finite loss. The classifier, the student and the affinity network test what is theirs on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chexseg_dist.errors import TrainingError
from chexseg_dist.train import _loop
from chexseg_dist.train._loop import FAIL_ONCE_ENV, STATE_FILE, FaultInjection
from chexseg_dist.train.debug import DEBUG_WEIGHTS, DebugLoopConfig, train_debug


def _stored(run: Path, epoch: int) -> dict:  # type: ignore[type-arg]
    return torch.load(run / f"epoch_{epoch:04d}" / STATE_FILE, weights_only=True)


@pytest.mark.cluster
def test_a_run_resumes_by_rerunning_survives_a_killed_worker_exports_its_best_epoch_and_refuses_another_model(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "debug"
    run = tmp_path / "debug.ray" / "debug"
    # Epoch 1 scores best: the export must hold epoch 1's weights, not the last epoch's.
    scores = [0.1, 0.9, 0.5]
    first = train_debug(DebugLoopConfig(epochs=1, scores=scores), out)
    assert first.start_epoch == 0 and [m["epoch"] for m in first.history] == [0] and first.starts == [0]

    # Re-run with more epochs: resumes at epoch 2 (index 1); rank 0 is SIGKILLed after the first step of epoch
    # index 2 (the drill armed through the environment, as with ray job submit), and FailureConfig restarts the
    # worker group from the latest checkpoint (epoch index 1).
    marker = tmp_path / "killed"
    cfg = DebugLoopConfig(epochs=3, scores=scores, max_failures=1)
    monkeypatch.setenv(FAIL_ONCE_ENV, f"{marker}:2")
    second = train_debug(cfg, out)
    monkeypatch.delenv(FAIL_ONCE_ENV)
    assert "killed rank 0 at epoch index 2" in marker.read_text()
    assert second.start_epoch == 1
    assert second.starts == [0, 1, 2]  # the fresh run, the resumption, the retry after the kill
    assert [m["epoch"] for m in second.history] == [0, 1, 2]
    assert second.history[0]["train_loss"] == first.history[0]["train_loss"]  # epoch 0 survived unchanged
    assert second.history[1]["train_loss"] < second.history[0]["train_loss"]  # and training went on from it
    assert "resuming" in capsys.readouterr().out

    assert second.best_epoch == 1 and second.best_metrics["score"] == 0.9
    exported = torch.load(out / DEBUG_WEIGHTS, weights_only=True)
    best_state, last_state = _stored(run, 1)["model"], _stored(run, 2)["model"]
    for key, value in exported.items():
        assert torch.equal(value, best_state[key])
    assert not torch.equal(exported["weight"], last_state["weight"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_epoch"] == 1 and [m["epoch"] for m in saved["epochs"]] == [0, 1, 2]

    # A finished run only re-exports, from its stored checkpoints: neither Ray nor a trainer starts.
    (out / DEBUG_WEIGHTS).unlink()

    def no_ray() -> None:
        raise AssertionError("a finished run started Ray")

    monkeypatch.setattr(_loop, "ray_session", no_ray)
    third = train_debug(cfg, out)
    assert "has trained all 3 epoch(s): exporting its best epoch 2 (nothing to train)" in capsys.readouterr().out
    assert third.start_epoch == 3 and third.best_epoch == 1 and third.history == second.history
    for key, value in torch.load(out / DEBUG_WEIGHTS, weights_only=True).items():
        assert torch.equal(value, best_state[key])

    # A run of another model under the same name is refused on the driver, naming both identities.
    with pytest.raises(TrainingError, match=r"holds \{'task': 'debug', 'features': 4\}.*asks for .*'features': 3"):
        train_debug(DebugLoopConfig(epochs=4, features=3), out)


@pytest.mark.cluster
def test_a_killed_worker_without_retries_ends_the_run_with_an_error_naming_it(
    ray_cluster: None, tmp_path: Path
) -> None:
    marker = tmp_path / "killed"
    with pytest.raises(RuntimeError, match=r"training run .*debug\.ray/debug failed"):
        train_debug(DebugLoopConfig(epochs=1, max_failures=0), tmp_path / "debug", fault=FaultInjection(str(marker), 0))
    assert "killed rank 0 at epoch index 0" in marker.read_text()
    assert not (tmp_path / "debug" / DEBUG_WEIGHTS).exists()


@pytest.mark.cluster
def test_a_non_finite_loss_stops_naming_the_step_and_the_images_and_exports_nothing(
    ray_cluster: None, tmp_path: Path
) -> None:
    # An absurd learning rate: the first update makes the next step's loss overflow. Two workers: the error of the
    # rank that saw it reaches the user, not Ray's wrapper.
    cfg = DebugLoopConfig(epochs=1, lr=1e30, num_workers=2)
    with pytest.raises(TrainingError, match=r"epoch 1 step \d+: the loss is (nan|inf) \(images \['row") as err:
        train_debug(cfg, tmp_path / "debug")
    assert "last good checkpoint" in str(err.value)
    assert not (tmp_path / "debug" / DEBUG_WEIGHTS).exists()
