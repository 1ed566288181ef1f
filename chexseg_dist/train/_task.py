"""The contract between a training task and the shared loop (:mod:`chexseg_dist.train._loop`): what a task provides
(:class:`TrainTask`), what one step returns, what a worker sees, the fault drill and what a run produced.

Importing this module imports torch but not Ray.
"""

from __future__ import annotations

import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from chexseg_dist.core import fsio
from chexseg_dist.core.console import relay_say

#: A checkpoint's state file: model, optimizer and scheduler state, epoch, history, starts and the task's identity.
STATE_FILE = "state.pt"
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
    #: Whether the workers run on GPUs: the section's ``use_gpu`` with ``auto`` resolved by the loop when the run
    #: starts (the config itself keeps what the user asked for; the export records this under its run facts).
    use_gpu: bool = False

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

    def footer(self) -> list[str]:
        """The closing lines every task's summary ends with: wall time, where the output and the run are, and the
        images left out (when any were)."""
        lines = [
            f"Wall time {self.wall_time_s:.1f} s (this invocation; started at epoch {self.start_epoch + 1}).",
            f"Checkpoint {self.out}; metrics {self.files.get('metrics_json', '')}; Ray run "
            f"{self.storage_path}/{self.run_name}",
        ]
        if "failures" in self.files:
            lines.append(
                f"Images left out (unreadable): {self.best_metrics.get('failed_images', '?')}, listed in "
                f"{self.files['failures']}"
            )
        return lines


def resolve_run(loop: LoopSettings, out: str, default_name: str) -> tuple[str, str]:
    """``(storage_path, run_name)`` of a run: the config's, or ``<out>.ray`` and ``basename(out)``."""
    out = out.rstrip("/")
    storage = loop.storage_path or f"{out}.ray"
    if not fsio.is_uri(storage):
        storage = os.path.abspath(storage)
    return storage, loop.run_name or fsio.basename(out) or default_name
