"""The Ray Train worker function of the shared loop (one process per worker): restore, then per epoch train, score
and report with a checkpoint (rank 0). See :mod:`chexseg_dist.train._loop` for the whole loop.

Importing this module imports torch; Ray is imported inside the worker function.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chexseg_dist.core.console import format_seconds
from chexseg_dist.errors import TrainingError
from chexseg_dist.train._task import STATE_FILE, FaultInjection, TrainTask, WorkerContext


def _allreduce_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def load_state(checkpoint: Any) -> dict[str, Any]:
    """The state a Ray Train checkpoint holds (:data:`STATE_FILE`), on the CPU."""
    with checkpoint.as_directory() as directory, open(os.path.join(directory, STATE_FILE), "rb") as f:
        return dict(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))


@dataclass
class _Run:
    """One worker's training state: what :func:`_restore` built and every epoch updates."""

    task: TrainTask
    ctx: WorkerContext
    model: nn.Module  # wrapped for DDP when there are several workers
    bare: nn.Module  # the model itself (what is scored and saved)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    start_epoch: int
    history: list[dict[str, Any]]
    starts: list[dict[str, Any]]
    run: str


def worker_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (one process per worker): restore, then every epoch left train, score, report."""
    import ray.train

    run = _restore(config)
    shards = {name: ray.train.get_dataset_shard(name) for name in config["datasets"]}
    fault = FaultInjection(**config["fault"]) if config.get("fault") else None
    for epoch in range(run.start_epoch, run.task.loop.epochs):
        run.ctx.epoch = epoch
        t0 = time.perf_counter()
        metrics = _train_epoch(run, shards, fault, t0)
        metrics.update(run.task.validate(run.bare, shards, run.ctx))
        _report(run, epoch, metrics, t0)


def _restore(config: dict[str, Any]) -> _Run:
    """Build the model, optimizer and schedule, and restore them from the run's latest checkpoint (same identity)."""
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
        state = load_state(checkpoint)
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
    wrapped = ray.train.torch.prepare_model(model)
    bare: nn.Module = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    return _Run(task, wctx, wrapped, bare, optimizer, scheduler, steps_per_epoch, start_epoch, history, starts,
                config["run"])  # fmt: skip


def _train_epoch(run: _Run, shards: dict[str, Any], fault: FaultInjection | None, t0: float) -> dict[str, Any]:
    """One epoch's steps on this worker; returns the epoch's metrics, summed over all workers."""
    task, ctx, loop = run.task, run.ctx, run.task.loop
    epoch = ctx.epoch
    run.model.train()
    sums: dict[str, float] = {"loss": 0.0, "images": 0.0, **dict.fromkeys(task.part_keys(), 0.0)}
    for step, batch in enumerate(task.train_batches(shards, ctx), start=1):
        result = task.train_step(run.model, batch, ctx)
        loss_value = float(result.loss.detach())
        if not math.isfinite(loss_value):
            ids = f" (images {list(result.ids)[:8]})" if result.ids else ""
            raise TrainingError(
                f"[{task.name}] epoch {epoch + 1} step {step}: the loss is {loss_value}{ids}; lower the learning "
                f"rate or check those images (the last good checkpoint is kept in {run.run})"
            )
        run.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        run.optimizer.step()
        if run.scheduler is not None:
            run.scheduler.step()
        if fault is not None and step == 1:
            fault.maybe_fire(ctx.rank, epoch)
        sums["loss"] += loss_value * result.images
        sums["images"] += result.images
        for key, value in result.parts.items():
            if key not in sums:
                # A key one worker has and another lacks would all-reduce vectors of different lengths: a hang.
                raise TrainingError(f"[{task.name}] step part {key!r} is not among the task's part_keys()")
            sums[key] += value
        if loop.log_every_steps and step % loop.log_every_steps == 0:
            _progress(run, step, loss_value, sums, t0)
    keys = sorted(sums)
    totals = dict(zip(keys, _allreduce_sum([sums[k] for k in keys], ctx.world, ctx.device)))
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
        "lr": float(run.optimizer.param_groups[0]["lr"]),
        "train_time_s": train_time,
        "train_images_per_s": totals["images"] / train_time if train_time > 0 else float("nan"),
    }
    metrics.update(task.part_metrics(totals))
    return metrics


def _progress(run: _Run, step: int, loss_value: float, sums: dict[str, float], t0: float) -> None:
    """Rank 0's progress line: loss, learning rate, images/s over all workers, the epoch's ETA."""
    task, ctx = run.task, run.ctx
    elapsed = time.perf_counter() - t0
    rate = sums["images"] * ctx.world / max(elapsed, 1e-9)
    eta = format_seconds(elapsed / step * max(0, run.steps_per_epoch - step))
    lr = run.optimizer.param_groups[0]["lr"]
    extra = task.progress(sums) if ctx.rank == 0 else ""
    ctx.say(
        f"[{task.name}] epoch {ctx.epoch + 1}/{task.loop.epochs} step {step}/~{run.steps_per_epoch} "
        f"loss {loss_value:.4f}{' ' + extra if extra else ''} lr {lr:.2e} {rate:.1f} img/s, epoch ETA {eta}"
    )


def _report(run: _Run, epoch: int, metrics: dict[str, Any], t0: float) -> None:
    """Report the epoch to Ray Train: rank 0 with a checkpoint of everything a resumption needs, the others without."""
    import ray.train

    task = run.task
    if run.ctx.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    metrics["epoch_time_s"] = time.perf_counter() - t0
    run.history.append(metrics)
    left = task.loop.epochs - epoch - 1
    eta = f"; run ETA {format_seconds(left * metrics['epoch_time_s'])}" if left else ""
    run.ctx.say(f"[{task.name}] " + task.epoch_line(epoch, metrics) + eta)
    state = {
        "model": {k: v.detach().cpu() for k, v in run.bare.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "epoch": epoch,
        "history": run.history,
        "starts": run.starts,
        "identity": task.identity(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch_{epoch:04d}"
        )
