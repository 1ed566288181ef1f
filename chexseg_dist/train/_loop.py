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
import math
import os
import signal
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from chexseg_dist.core import fsio
from chexseg_dist.core.console import Relay, format_seconds, relay_say, say
from chexseg_dist.core.ray_env import cluster_resources, ray_can_grow, ray_session, worker_gpus
from chexseg_dist.data.failures import latest_per_image, read_failure_tables
from chexseg_dist.errors import ChexsegError, TrainingError

STATE_FILE = "state.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
FAILURES_CSV = "failures.csv"
#: Driver-side environment hook for failure drills (e.g. with ``ray job submit``): a marker path, optionally
#: ``PATH:EPOCH``. The first attempt reaching that epoch creates the marker and kills rank 0's process.
FAIL_ONCE_ENV = "CHEXSEG_FAIL_ONCE_MARKER"


class LoopSettings(Protocol):
    """The fields a task's config section shares with the loop (:class:`~chexseg_dist.config.sections.TrainRunFields`
    of ``train_classifier``, ``train_segmentation`` and ``train_affinity``)."""

    SECTION: ClassVar[str]
    epochs: int
    num_workers: int
    use_gpu: bool | str
    cpus_per_worker: float
    torch_threads: int
    max_failures: int
    run_name: str
    storage_path: str
    num_to_keep: int
    log_every_steps: int
    seed: int


@dataclass
class StepResult:
    """What one training step computed.

    Attributes:
        loss: the scalar to minimise (still attached to the graph).
        images: images in the step (the epoch's mean loss is weighted by them).
        parts: further per-step sums to all-reduce and report (e.g. loss per data source), weighted by ``images``;
            every key must be one of the task's :meth:`Task.part_keys` (the workers all-reduce the same vector).
        ids: the batch's image ids, named if the loss is not finite.
    """

    loss: Tensor
    images: int
    parts: dict[str, float] = field(default_factory=dict)
    ids: Sequence[str] = ()


@dataclass
class WorkerContext:
    """What a task sees inside a worker."""

    rank: int
    world: int
    device: torch.device
    epoch: int
    generator: torch.Generator
    relay: Any = None

    def say(self, line: str) -> None:
        """A line on the driver's console (rank 0 only)."""
        if self.rank == 0:
            relay_say(self.relay, line)


class TrainTask(ABC):
    """A training task: what the loop needs to know about one kind of model.

    Attributes:
        name: the command's name, prefixed to console lines (e.g. ``train-classifier``).
        loop: the config section holding the :class:`LoopSettings` fields.
    """

    name: str
    loop: LoopSettings
    #: The datasets streamed in equal shares to the workers (``streaming_split``); the others reach every worker whole.
    split_datasets: tuple[str, ...] = ("train",)
    #: Deliver rows in the datasets' own order (Ray Data's ``preserve_order``): a reproducible run, some throughput.
    preserve_order: bool = False

    # ---------------------------------------------------------------- driver
    @abstractmethod
    def prepare(self) -> None:
        """Read and check the inputs before Ray starts (a refused run then leaves nothing behind)."""

    @abstractmethod
    def datasets(self) -> dict[str, Any]:
        """The Ray datasets by name; ``train`` is split across workers, the others are not."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a run must keep to be resumed (compared with the checkpoint's), e.g. architecture and size."""

    @abstractmethod
    def export(
        self, state: Mapping[str, Any], best: Mapping[str, Any], history: list[dict[str, Any]], out: str, extra: dict
    ) -> dict[str, str]:
        """Write the best epoch's model as the pipeline's output in ``out``; returns the written paths by name."""

    def describe(self) -> str:
        """One line for the console when the run starts."""
        return self.name

    # ---------------------------------------------------------------- worker
    @abstractmethod
    def build(self, steps_per_epoch: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Model (on CPU, not yet wrapped), optimizer and learning-rate scheduler (or None) for this run."""

    @abstractmethod
    def steps_per_epoch(self, world: int) -> int:
        """Optimizer steps per epoch on each worker (for schedules and ETAs)."""

    @abstractmethod
    def train_batches(self, shards: Mapping[str, Any], ctx: WorkerContext) -> Iterator[Any]:
        """This worker's training batches for one epoch, from its dataset shards (by name)."""

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Any, ctx: WorkerContext) -> StepResult:
        """Forward one batch and return the loss to minimise (the loop does backward and the optimizer step)."""

    @abstractmethod
    def validate(self, model: nn.Module, shards: Mapping[str, Any], ctx: WorkerContext) -> dict[str, Any]:
        """Score the epoch; rank 0's metrics must hold ``score`` (higher is better). Called on every rank."""

    def part_keys(self) -> Sequence[str]:
        """Every key a :attr:`StepResult.parts` may hold. Each worker's epoch sums start at 0 for all of them, so
        every worker all-reduces the same vector even when its steps produced different keys (default: none)."""
        return ()

    def part_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Metrics from summed :attr:`StepResult.parts` (``sums`` also holds ``loss`` and ``images``); by default
        each part per image, as ``train_<part>``."""
        images = sums.get("images", 0.0)
        if not images:
            return {}
        return {f"train_{k}": v / images for k, v in sums.items() if k not in ("loss", "images")}

    def progress(self, sums: Mapping[str, float]) -> str:
        """Extra words for the progress line, from this worker's sums so far in the epoch (default: none)."""
        return ""

    def epoch_line(self, epoch: int, metrics: Mapping[str, Any]) -> str:
        """The console line of one finished epoch."""
        return (
            f"epoch {epoch + 1}/{self.loop.epochs} train_loss {metrics['train_loss']:.4f} score {metrics['score']:.4f}"
        )


@dataclass
class FaultInjection:
    """Kill rank 0's worker process once, in the middle of epoch index ``epoch``, to exercise ``FailureConfig``.

    The rank 0 worker that reaches the epoch while ``marker`` does not exist creates it and dies after its first
    step (SIGKILL: no Python clean-up, as when a node is lost); the restarted attempt resumes from the latest
    checkpoint, finds the marker and trains on. ``marker`` must
    be visible to the workers (shared storage on a multi-node cluster).
    """

    marker: str
    epoch: int = 1

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        raw = os.environ.get(FAIL_ONCE_ENV, "")
        if not raw:
            return None
        path, sep, epoch = raw.rpartition(":")
        if sep and epoch.isdigit():
            return cls(marker=path, epoch=int(epoch))
        return cls(marker=raw)

    def maybe_fire(self, rank: int, epoch: int) -> None:
        """Called after the first step of every epoch; kills this process once, at ``epoch`` on rank 0."""
        if rank == 0 and epoch == self.epoch and not os.path.exists(self.marker):
            # Ray Train's controller collects reports by polling the workers (every 2 s by default): let it see the
            # previous epoch's checkpoint first, as it would before a real failure in the middle of an epoch.
            time.sleep(2.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
            with open(self.marker, "w") as f:
                f.write(f"fault drill: killed rank 0 at epoch index {epoch} (pid {os.getpid()})\n")
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainResult:
    """What :func:`fit` produced.

    Attributes:
        out: the exported output (e.g. a checkpoint directory).
        history: one metrics dict per epoch index 0..epochs-1 (over all attempts and resumptions).
        best_epoch: index of the epoch with the highest score (the weights in ``out``).
        best_metrics: that epoch's metrics.
        start_epoch: the epoch index this invocation started at (0 for a fresh run, > 0 when it resumed).
        starts: every epoch index a training attempt started at, over the run's whole life (a retried failure or
            a resumption adds one).
        wall_time_s: seconds this invocation spent in ``fit``.
        storage_path, run_name: where Ray Train keeps the run (re-run with the same two to resume).
        files: what the task's export wrote, by name.
    """

    out: str
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, Any]
    start_epoch: int
    starts: list[int]
    wall_time_s: float
    storage_path: str
    run_name: str
    files: dict[str, str] = field(default_factory=dict)


def resolve_run(loop: LoopSettings, out: str, default_name: str) -> tuple[str, str]:
    """``(storage_path, run_name)`` of a run: the config's, or ``<out>.ray`` and ``basename(out)``."""
    out = out.rstrip("/")
    storage = loop.storage_path or f"{out}.ray"
    if not fsio.is_uri(storage):
        storage = os.path.abspath(storage)
    return storage, loop.run_name or fsio.basename(out) or default_name


# ------------------------------------------------------------------------------------------------ the worker side


def _allreduce_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _load_state(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as directory, open(os.path.join(directory, STATE_FILE), "rb") as f:
        return dict(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))


def _worker_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (one process per worker): the loop described in the module docstring."""
    import ray.train
    import ray.train.torch

    task: TrainTask = config["task"]
    loop = task.loop
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(loop.torch_threads or max(1, int(loop.cpus_per_worker)))
    torch.manual_seed(loop.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    steps_per_epoch = task.steps_per_epoch(world)
    model, optimizer, scheduler = task.build(steps_per_epoch)
    start_epoch, history, starts = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _load_state(checkpoint)
        if state.get("identity") != task.identity():
            raise TrainingError(
                f"run {config['run']} holds {state.get('identity')}; this config asks for {task.identity()}: set "
                f"the run name (or another --out) to start a new run"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, starts = int(state["epoch"]) + 1, list(state["history"]), list(state["starts"])
    wctx = WorkerContext(rank, world, device, start_epoch, torch.Generator(), config.get("relay"))
    # Random draws (augmentation, mixing) are a function of (seed, rank, epoch the attempt started at).
    wctx.generator.manual_seed(loop.seed * 1000 + rank + 7919 * start_epoch)
    if checkpoint is not None:
        wctx.say(f"[{task.name}] resuming {config['run']} at epoch {start_epoch + 1}/{loop.epochs}")
    starts.append({"invocation": config["invocation"], "epoch": start_epoch})
    model = ray.train.torch.prepare_model(model)
    bare: nn.Module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    shards = {name: ray.train.get_dataset_shard(name) for name in config["datasets"]}
    fault = FaultInjection(**config["fault"]) if config.get("fault") else None

    for epoch in range(start_epoch, loop.epochs):
        wctx.epoch = epoch
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {"loss": 0.0, "images": 0.0, **dict.fromkeys(task.part_keys(), 0.0)}
        for step, batch in enumerate(task.train_batches(shards, wctx), start=1):
            result = task.train_step(model, batch, wctx)
            loss_value = float(result.loss.detach())
            if not math.isfinite(loss_value):
                ids = f" (images {list(result.ids)[:8]})" if result.ids else ""
                raise TrainingError(
                    f"[{task.name}] epoch {epoch + 1} step {step}: the loss is {loss_value}{ids}; lower the learning "
                    f"rate or check those images (the last good checkpoint is kept in {config['run']})"
                )
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if fault is not None and step == 1:
                fault.maybe_fire(rank, epoch)
            sums["loss"] += loss_value * result.images
            sums["images"] += result.images
            for key, value in result.parts.items():
                if key not in sums:
                    # A key one worker has and another lacks would all-reduce vectors of different lengths: a hang.
                    raise TrainingError(f"[{task.name}] step part {key!r} is not among the task's part_keys()")
                sums[key] += value
            if loop.log_every_steps and step % loop.log_every_steps == 0:
                elapsed = time.perf_counter() - t0
                rate = sums["images"] * world / max(elapsed, 1e-9)
                eta = format_seconds(elapsed / step * max(0, steps_per_epoch - step))
                lr = optimizer.param_groups[0]["lr"]
                extra = task.progress(sums) if rank == 0 else ""
                wctx.say(
                    f"[{task.name}] epoch {epoch + 1}/{loop.epochs} step {step}/~{steps_per_epoch} "
                    f"loss {loss_value:.4f}{' ' + extra if extra else ''} lr {lr:.2e} {rate:.1f} img/s, "
                    f"epoch ETA {eta}"
                )
        keys = sorted(sums)
        totals = dict(zip(keys, _allreduce_sum([sums[k] for k in keys], world, device)))
        if totals["images"] == 0:
            raise TrainingError(
                f"[{task.name}] epoch {epoch + 1}: no training image could be read or decoded (the failures table "
                "names them); check the manifest's paths and the storage credentials"
            )
        train_time = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": totals["loss"] / totals["images"],
            "train_images": int(totals["images"]),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_time_s": train_time,
            "train_images_per_s": totals["images"] / train_time if train_time > 0 else float("nan"),
        }
        metrics.update(task.part_metrics(totals))
        metrics.update(task.validate(bare, shards, wctx))
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        metrics["epoch_time_s"] = time.perf_counter() - t0
        history.append(metrics)
        left = loop.epochs - epoch - 1
        eta = f"; run ETA {format_seconds(left * metrics['epoch_time_s'])}" if left else ""
        wctx.say(f"[{task.name}] " + task.epoch_line(epoch, metrics) + eta)
        state = {
            "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch,
            "history": history,
            "starts": starts,
            "identity": task.identity(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch_{epoch:04d}"
            )


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
    except FileNotFoundError:
        return None
    except Exception:  # a truncated upload: Ray resumes from its own record instead
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
    # "auto" becomes what the cluster has, in the section itself: the run, its description and the exported config
    # all see the value the run used.
    loop.use_gpu = worker_gpus(loop.SECTION, loop.num_workers, loop.use_gpu, cluster_resources(), ray_can_grow())
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
    latest = _load_state(result.checkpoint)
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
        best_state = _load_state(candidates[0])
    starts = [dict(s) for s in latest["starts"]]
    mine = [int(s["epoch"]) for s in starts if s["invocation"] == invocation]
    # No attempt of this invocation reported anything: the run was already complete.
    start_epoch = min(mine) if mine else len(history)
    files = task.export(best_state, best, history, out, {"run": f"{storage}/{run_name}", "wall_time_s": wall})
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
    if loop.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "task": task,
            "datasets": list(datasets),
            "run": f"{storage}/{run_name}",
            "invocation": invocation,
            "fault": None if fault is None else {"marker": fault.marker, "epoch": fault.epoch},
            "relay": relay.handle,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=loop.num_workers, use_gpu=bool(loop.use_gpu), resources_per_worker=resources
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
