"""The one Ray Train scaffolding every training task plugs into (the classifier and the segmentation student).

A task is a small object (:class:`TrainTask`): it builds its datasets and model, says what one step computes, scores
an epoch and exports the best one. The loop owns everything else, the same for every task:

- **Data parallel**: ``TorchTrainer`` over ``num_workers`` CPU or GPU workers; the task's ``split_datasets``
  (``train`` by default) are streamed with ``streaming_split(equal=True)`` (every rank runs the same number of steps,
  so DDP never waits on a missing batch); other datasets reach every worker whole. Step sums (loss, images) are
  all-reduced at the end of an epoch.
- **Checkpoints and resume**: after every epoch rank 0 reports the metrics with a checkpoint holding the model,
  optimizer and scheduler state, the epoch, the metrics history and the task's identity (e.g. architecture and
  frame size). ``CheckpointConfig`` keeps the ``num_to_keep`` best by the task's ``score`` (Ray keeps the latest as
  well). Re-running with the same run name and storage path resumes at the next epoch; a run of another identity
  is refused (:class:`~chexseg_dist.errors.TrainingError`, naming both).
- **Failures**: ``FailureConfig(max_failures)`` restarts the worker group from the latest checkpoint. The fault
  drill (:class:`FaultInjection`) kills rank 0's process once at a chosen epoch, to prove it.
- **Best epoch**: after ``fit`` the driver loads the best epoch's state and the task exports it.
- **Console**: rank 0 sends a progress line every ``log_every_steps`` steps (loss, learning rate, images/s, ETA)
  and one line per epoch to the driver's console through a :class:`~chexseg_dist.core.console.Relay`.

Importing this module imports torch but not Ray.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from chexseg_dist.core import fsio
from chexseg_dist.core.console import Relay, say
from chexseg_dist.core.ray_env import cluster_resources, ray_can_grow, ray_session, worker_gpus
from chexseg_dist.data.failures import latest_per_image, read_failure_tables
from chexseg_dist.errors import ChexsegError, TrainingError
from chexseg_dist.train._task import (
    FAIL_ONCE_ENV,
    STATE_FILE,
    FaultInjection,
    LoopSettings,
    StepResult,
    TrainResult,
    TrainTask,
    WorkerContext,
    resolve_run,
)
from chexseg_dist.train._worker import load_state, worker_loop

__all__ = [
    "FAIL_ONCE_ENV",
    "STATE_FILE",
    "FaultInjection",
    "LoopSettings",
    "StepResult",
    "TrainResult",
    "TrainTask",
    "WorkerContext",
    "check_resumable",
    "fit",
    "read_run_failures",
    "resolve_run",
    "write_failures",
    "write_history",
]

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
FAILURES_CSV = "failures.csv"


# ------------------------------------------------------------------------------------------------ the driver side


def _user_error(err: BaseException) -> ChexsegError | None:
    """The first ChexsegError a worker raised, found inside Ray's wrappers.

    Ray Train V2 raises a ``WorkerGroupError`` holding each failed rank's exception in ``worker_failures`` (or a
    ``ControllerError`` with ``controller_failure``); Ray core wraps task errors in ``RayTaskError`` (``cause``).
    """
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ChexsegError):
            return current
        inner = [current.__cause__, current.__context__, getattr(current, "cause", None)]
        inner.append(getattr(current, "controller_failure", None))
        inner += list((getattr(current, "worker_failures", None) or {}).values())
        todo += [e for e in inner if isinstance(e, BaseException)]
    return None


def fit(task: TrainTask, out: str, *, fault: FaultInjection | None = None, default_name: str = "run") -> TrainResult:
    """Train ``task`` with Ray Train and export its best epoch into ``out``.

    Checks the task's inputs first (:meth:`TrainTask.prepare`) and the run it would resume (same identity), then
    starts Ray unless it runs. Re-running with the same ``out`` (or run name and storage path) resumes the run at its
    next epoch; a run that already finished every epoch only re-exports ``out``, from its stored checkpoints, without
    starting Ray or a trainer.

    Raises:
        ChexsegError: bad input or state raised inside a worker (unwrapped from Ray's error), or a resumed run of
            another identity.
        RuntimeError: training failed after ``max_failures`` retries (the Ray error is chained).
    """
    task.prepare()
    storage, run_name = resolve_run(task.loop, out, default_name)
    newest = check_resumable(task, storage, run_name)
    if newest is not None and int(newest["epoch"]) + 1 >= task.loop.epochs:
        return _reexport(task, out, storage, run_name, newest)
    with ray_session():
        return _fit(task, out, fault or FaultInjection.from_env(), storage, run_name)


def _stored_epochs(storage: str, run_name: str) -> tuple[Any, str, list[str]]:
    """``(filesystem, run path inside it, sorted epoch_* checkpoint names)`` of a run (none when it does not exist)."""
    run = fsio.join(storage, run_name)
    fs, inner = fsio.filesystem(run)
    try:
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False)]
    except FileNotFoundError:
        names = []
    return fs, inner.rstrip("/"), sorted(n for n in names if n.startswith("epoch_"))


def _read_stored_state(fs: Any, path: str) -> dict[str, Any] | None:
    """A checkpoint's state, or None when it is absent or unreadable (an epoch Ray has not finished writing)."""
    try:
        with fs.open(path, "rb") as f:
            return dict(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))
    except Exception:  # absent, or a truncated upload: Ray resumes from its own record instead
        return None


def check_resumable(task: TrainTask, storage: str, run_name: str) -> dict[str, Any] | None:
    """Refuse, on the driver and before any worker starts, to resume a run that trained another model.

    The run's newest ``epoch_*`` checkpoint holds the identity it was trained with (the workers check it again).

    Returns:
        that newest checkpoint's state when it could be read (its ``epoch``, ``history``, ...), else None.

    Raises:
        TrainingError: naming both identities and the fix.
    """
    fs, inner, epochs = _stored_epochs(storage, run_name)
    if not epochs:
        return None
    state = _read_stored_state(fs, f"{inner}/{epochs[-1]}/{STATE_FILE}")
    if state is None:
        return None  # the workers decide
    if state.get("identity") != task.identity():
        raise TrainingError(
            f"run {fsio.join(storage, run_name)} holds {state.get('identity')}; this config asks for "
            f"{task.identity()}: set the run name (or another --out) to start a new run"
        )
    return state


def _best_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the highest score (the earliest of equal scores)."""
    return max(history, key=lambda m: (m["score"], -m["epoch"]))


def _reexport(task: TrainTask, out: str, storage: str, run_name: str, latest: dict[str, Any]) -> TrainResult:
    """Export a run that has trained every epoch, from its stored checkpoints (no Ray, no trainer)."""
    history: list[dict[str, Any]] = list(latest["history"])
    best = _best_of(history)
    best_state = latest
    if best["epoch"] != latest["epoch"]:
        fs, inner, _ = _stored_epochs(storage, run_name)
        stored = _read_stored_state(fs, f"{inner}/epoch_{int(best['epoch']):04d}/{STATE_FILE}")
        if stored is None:
            raise RuntimeError(
                f"training run {storage}/{run_name}: the checkpoint of the best epoch {best['epoch']} is gone; "
                "raise num_to_keep"
            )
        best_state = stored
    say(
        f"[{task.name}] run {run_name!r} in {storage} has trained all {len(history)} epoch(s): exporting its best "
        f"epoch {int(best['epoch']) + 1} (nothing to train)"
    )
    files = task.export(best_state, best, history, out, {"run": f"{storage}/{run_name}", "wall_time_s": 0.0})
    return TrainResult(
        out=out,
        history=history,
        best_epoch=int(best["epoch"]),
        best_metrics=best,
        start_epoch=len(history),
        starts=[int(s["epoch"]) for s in latest["starts"]],
        wall_time_s=0.0,
        storage_path=storage,
        run_name=run_name,
        files=files,
    )


def _fit(task: TrainTask, out: str, fault: FaultInjection | None, storage: str, run_name: str) -> TrainResult:
    loop = task.loop
    # "auto" becomes what the cluster has, for this run: the task (its description, the workers) uses the resolved
    # value and the export records it under the config's run facts; the config keeps what the user asked for.
    task.use_gpu = worker_gpus(loop.SECTION, loop.num_workers, loop.use_gpu, cluster_resources(), ray_can_grow())
    invocation = uuid.uuid4().hex
    datasets = task.datasets()
    say(f"[{task.name}] {task.describe()}; run {run_name!r} in {storage}")
    relay = Relay()
    t0 = time.perf_counter()
    try:
        result = _train(task, datasets, storage, run_name, invocation, fault, relay)
    except Exception as err:
        user = _user_error(err)
        if user is not None:
            raise user from None
        raise RuntimeError(f"training run {storage}/{run_name} failed: {err}") from err
    finally:
        relay.close()
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {storage}/{run_name} finished without a checkpoint")
    latest = load_state(result.checkpoint)
    history: list[dict[str, Any]] = list(latest["history"])
    best = _best_of(history)
    best_state = latest
    if best["epoch"] != latest["epoch"]:
        candidates = [c for c, m in (result.best_checkpoints or []) if m.get("epoch") == best["epoch"]]
        if not candidates:
            raise RuntimeError(
                f"training run {storage}/{run_name}: the checkpoint of the best epoch {best['epoch']} is gone; "
                "raise num_to_keep"
            )
        best_state = load_state(candidates[0])
    starts = [dict(s) for s in latest["starts"]]
    mine = [int(s["epoch"]) for s in starts if s["invocation"] == invocation]
    # No attempt of this invocation reported anything: the run was already complete.
    start_epoch = min(mine) if mine else len(history)
    extra = {"run": f"{storage}/{run_name}", "wall_time_s": wall, "use_gpu": task.use_gpu}
    files = task.export(best_state, best, history, out, extra)
    return TrainResult(
        out=out,
        history=history,
        best_epoch=int(best["epoch"]),
        best_metrics=best,
        start_epoch=start_epoch,
        starts=[int(s["epoch"]) for s in starts],
        wall_time_s=wall,
        storage_path=storage,
        run_name=run_name,
        files=files,
    )


def _train(
    task: TrainTask,
    datasets: dict[str, Any],
    storage: str,
    run_name: str,
    invocation: str,
    fault: FaultInjection | None,
    relay: Relay,
) -> Any:
    """Build the TorchTrainer and run it; returns Ray Train's ``Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    loop = task.loop
    resources = {"CPU": loop.cpus_per_worker}
    if task.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "task": task,
            "datasets": list(datasets),
            "run": f"{storage}/{run_name}",
            "invocation": invocation,
            "fault": None if fault is None else {"marker": fault.marker, "epoch": fault.epoch},
            "relay": relay.handle,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=loop.num_workers, use_gpu=task.use_gpu, resources_per_worker=resources
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=list(task.split_datasets), execution_options=_execution_options(task.preserve_order)
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=loop.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=loop.num_to_keep, checkpoint_score_attribute="score", checkpoint_score_order="max"
            ),
        ),
    )
    return trainer.fit()


def _execution_options(preserve_order: bool) -> Any:
    """Ray Data's execution options for the run's datasets: the defaults, with ``preserve_order`` when the task asks
    for it (``train_classifier.preserve_order``: rows in the seeded shuffle's order, a reproducible run)."""
    from ray.train import DataConfig

    if not preserve_order:
        return None
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


# ------------------------------------------------------------------------------------------------ export helpers


def write_history(out: str, best: Mapping[str, Any], history: list[dict[str, Any]]) -> dict[str, str]:
    """``metrics.json`` (best epoch, its metrics, every epoch) and ``metrics.csv`` (one row per epoch) in ``out``."""
    files = {"metrics_json": fsio.join(out, METRICS_JSON), "metrics_csv": fsio.join(out, METRICS_CSV)}
    with fsio.open_file(files["metrics_json"], "w") as f:
        json.dump({"best_epoch": best["epoch"], "best": dict(best), "epochs": history}, f, indent=2)
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with fsio.open_file(files["metrics_csv"], "w") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    return files


def read_run_failures(failures_dir: str, splits: Sequence[str]) -> list[dict[str, Any]]:
    """The images a run left out, one record per image (its latest): ``split, row, image_id, path, stage, error``."""
    records: list[dict[str, Any]] = []
    for split in splits:  # rows are per manifest: one table per split, never mixed
        table = read_failure_tables(fsio.join(failures_dir, split))
        if table is not None:
            records += [{"split": split, **r} for r in latest_per_image(table).to_pylist()]
    return records


def write_failures(out: str, failures_dir: str, splits: Sequence[str]) -> str | None:
    """``failures.csv`` in ``out`` (split, row, image id, path, stage, reason) when the run left images out."""
    failures = read_run_failures(failures_dir, splits)
    if not failures:
        return None
    path = fsio.join(out, FAILURES_CSV)
    with fsio.open_file(path, "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["split", "row", "image_id", "path", "stage", "error"], extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(failures)
    return path
