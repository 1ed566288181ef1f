"""The pseudo-labelling job: every radiograph of a manifest -> probabilities and all-task Grad-CAM maps in a map store.

Pipeline (Ray Data, streaming)::

    manifest (Parquet) -> slots (sorted manifest row) -> skip done -> blocks of (slot, row, image_id, path)
      -> read + decode + letterbox      CPU tasks          (num_cpus=decode_cpus, memory=decode_memory_mb)
      -> classifier + all-class CAMs    fixed actor pool   (ActorPoolStrategy(size=num_actors), num_gpus, batch_size)
      -> FragmentSink                   write tasks stage immutable fragments; the driver commits them per chunk

Decoding never runs inside the model actors: Ray Data fuses a task stage into a following actor stage only when
their Ray remote arguments are identical, and the decode stage always reserves ``memory`` (a large radiograph's
decode peaks at a few hundred MB) while the actors do not. :func:`pipeline_operators` lists the executed operators
(from ``Dataset.stats()``) so tests and users can check that ``decode_frames`` and the classifier are separate.

Everything before Ray starts is :func:`plan_pseudolabel` (manifest, checkpoint, store creation or resume, the skip-done
scan, the table of rows to compute); it lists no object (the manifest names every image) and peaks under 1 KB per
image (docs/benchmarks.md, "Planning a million images"). ``pseudolabel.max_queued_frames`` bounds the
decoded frames waiting for the actors (:func:`cap_queued_frames`).

Per-image problems (missing object, empty, truncated or corrupt file, unsupported mode, non-finite model output)
never stop the job: the row is recorded as failed (``failed = 1`` in the store, a record in the failures table
next to it) and the rest completes. The job is resumable and idempotent (see docs/store-format.md): rows already
done are skipped, fragments left by an interrupted run are committed first, and a finished store is never
recomputed (Ray is not even started).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from chexseg_dist.config import Config, PseudolabelConfig
from chexseg_dist.core.console import say
from chexseg_dist.core.ray_env import actor_gpus, cluster_resources, pool_problem, ray_can_grow, ray_session
from chexseg_dist.core.runs import new_run_id
from chexseg_dist.data.frames import with_decode_stage
from chexseg_dist.data.manifest import read_manifest
from chexseg_dist.errors import InputError
from chexseg_dist.models.checkpoint import split_paths
from chexseg_dist.pseudolabel.inputs import checkpoint_identity, manifest_fingerprint, probe_grid_shape, select_images
from chexseg_dist.pseudolabel.predictor import ClassifierPredictor
from chexseg_dist.pseudolabel.summary import PseudolabelSummary, operator_busy_seconds, pipeline_operators
from chexseg_dist.store import MapStore, StoreSpec, StoreWriter, WriterSettings


def run_pseudolabel(
    cfg: Config, manifest: str, checkpoints: str | Sequence[str], store: str, overwrite: bool = False
) -> PseudolabelSummary:
    """Pseudo-label every (frontal) image of a manifest into a map store; resumable and idempotent.

    Starts a local Ray (``ray.init()``, which attaches to a cluster when ``RAY_ADDRESS`` is set, e.g. under
    ``ray job submit``) only if there is model work to do and Ray is not running yet.

    Args:
        cfg: resolved config (``pseudolabel`` section; classifier geometry comes from the checkpoint).
        manifest: the Parquet manifest (local or URI).
        checkpoints: a checkpoint directory, a comma-separated list, or a list (ensemble).
        store: the map store (local directory or ``s3://...``).
        overwrite: replace an existing store (and its staged fragments and failures) instead of resuming it.

    Returns:
        The :class:`PseudolabelSummary` (its ``line()`` is the job's last output line).

    Raises:
        ChexsegError: unusable manifest or checkpoint; a store of another manifest or model (suggesting a new
            store or --overwrite); a store another job is writing; a pool the local Ray can never schedule.
    """
    pl = cfg.pseudolabel
    with StoreWriter(store, new_run_id(), writer_settings(pl)) as writer:
        plan = plan_pseudolabel(cfg, manifest, checkpoints, writer, overwrite)
        summary, ms = plan.summary, plan.store
        if plan.todo.num_rows == 0:
            return summary
        say(
            f"pseudolabel: {plan.todo.num_rows} of {ms.n} images to process ({summary.skipped} already done); "
            f"{pl.num_actors} classifier actor(s), batch {pl.batch_size}"
        )
        cap = effective_frame_cap(pl)
        if cap != pl.max_queued_frames:
            say(
                f"pseudolabel: note: max_queued_frames={pl.max_queued_frames} raised to {cap} (batch_size + "
                "images_per_decode_task: fewer would leave the actors waiting for a batch that is never decoded)"
            )
        summary.model_started = True
        can_grow = ray_can_grow()
        with ray_session():
            start = time.time()  # images/s covers the pipeline (actor start-up included), not starting Ray itself
            resources = cluster_resources()
            # "auto" resolved for this run only: the config keeps what the user asked for, the summary what ran.
            gpus = actor_gpus("pseudolabel", pl.num_actors, pl.gpus_per_actor, resources)
            pl = replace(pl, gpus_per_actor=gpus)
            summary.gpus_per_actor = float(gpus)
            problem = resource_problem(pl, resources)
            if problem and not can_grow:
                raise InputError(problem)  # A Ray started here never grows: the job would wait forever.
            if problem:
                say(f"pseudolabel: warning: {problem} (it will wait for the cluster to grow)")
            ds = build_dataset(plan.todo, pl, plan.checkpoints, plan.image_size, ms.grid_shape)
            writer.write(ds, plan.todo.num_rows)
            summary.seconds = time.time() - start  # Stats and shutting Ray down are not pipeline time.
            _add_stats(summary, ds)
        done1, failed1 = ms.done(), ms.failed()
        summary.processed = int((done1 & ~plan.done0).sum())
        summary.failed = int((failed1 & plan.todo_mask).sum())
        summary.images_per_s = (summary.processed + summary.failed) / max(summary.seconds, 1e-9)
        if summary.busy_s:
            say(summary.stage_line())
        return summary


@dataclass
class PseudolabelPlan:
    """What one run will do, decided before Ray starts (:func:`plan_pseudolabel`).

    Attributes:
        store: the opened (created, or resumed) map store, locked by the writer.
        todo: ``(slot, row, image_id, path)`` of the images this run computes, in slot order (may be empty).
        todo_mask: ``[N]`` bool, True at the slots in ``todo``.
        done0: ``[N]`` bool, rows done when the run started (after recovering an interrupted run's fragments).
        summary: the run's summary before the model stage (totals, skipped, recovered, failed before).
        checkpoints: the checkpoint directories.
        image_size: the classifier's frame size ``S`` (from the checkpoint).
        seconds: wall seconds per planning step (``manifest``, ``checkpoint``, ``store``, ``scan``, ``todo``).
    """

    store: MapStore
    todo: pa.Table
    todo_mask: np.ndarray
    done0: np.ndarray
    summary: PseudolabelSummary
    checkpoints: list[str]
    image_size: int
    seconds: dict[str, float] = field(default_factory=dict)


def plan_pseudolabel(
    cfg: Config, manifest: str, checkpoints: str | Sequence[str], writer: StoreWriter, overwrite: bool = False
) -> PseudolabelPlan:
    """Everything a run does before Ray starts: read the inputs, open the store, find the rows left to compute.

    Steps (timed in :attr:`PseudolabelPlan.seconds`): ``manifest`` (read, select the images, fingerprint them),
    ``checkpoint`` (identity, and one forward pass for the map grid: a damaged checkpoint fails here, before the store
    is touched), ``store`` (lock, create or resume with the identity check, commit an interrupted run's fragments),
    ``scan`` (the done and failed flags: the skip-done step) and ``todo`` (the table the Ray dataset is built from).
    Nothing is listed: the images come from the manifest, the store's slots from its own arrays.

    Args:
        cfg: resolved config.
        manifest: the Parquet manifest (local or URI).
        checkpoints: a checkpoint directory, a comma-separated list, or a list (ensemble).
        writer: the run's :class:`StoreWriter` (not opened yet; it holds the lock until the caller closes it).
        overwrite: replace an existing store instead of resuming it.

    Raises:
        ChexsegError: as :func:`run_pseudolabel`.
    """
    pl = cfg.pseudolabel
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpts = split_paths(checkpoints)
    if not ckpts:
        raise InputError("no checkpoint given (--checkpoint DIR or DIR1,DIR2 for an ensemble)")
    images, views = select_images(
        read_manifest(manifest, ["row", "image_id", "path", "frontal"]), pl.frontal_only, manifest
    )
    if note := views.note("pseudolabel"):
        say(note)
    manifest_fp = manifest_fingerprint(images)
    t1 = time.perf_counter()
    seconds["manifest"] = t1 - t0
    model_fp, info = checkpoint_identity(ckpts)
    grid = probe_grid_shape(ckpts)  # loads every member: a damaged checkpoint fails here, before the store is touched
    image_size = int(info["image_size"])
    if image_size != cfg.classifier.image_size:
        say(f"pseudolabel: note: the checkpoint was trained at {image_size} px (classifier.image_size is ignored)")
    t2 = time.perf_counter()
    seconds["checkpoint"] = t2 - t1
    n_images = images.num_rows
    spec = StoreSpec(
        image_ids=images.column("image_id").to_pylist(),  # read only when the store is created; dropped after
        rows=np.asarray(images.column("row")),
        identity={"manifest_fingerprint": manifest_fp, "model_fingerprint": model_fp, "precision": pl.precision},
        identity_defaults={"precision": "fp32"},  # stores written before the setting existed
        attrs={
            "manifest": manifest,
            "frontal_only": pl.frontal_only,
            "checkpoints": ckpts,
            "config": cfg.to_dict(),
            **{k: info[k] for k in ("arch", "target_layer", "image_size")},
        },
        grid_shape=grid,
        images_per_chunk=pl.images_per_chunk,
        mismatch=lambda key, stored, wanted, attrs: _mismatch(key, stored, wanted, attrs, manifest, ckpts, n_images),
    )
    ms = writer.open(spec, overwrite, cfg, {"manifest": manifest, "checkpoints": ckpts})
    del spec
    t3 = time.perf_counter()
    seconds["store"] = t3 - t2
    done0, failed0 = ms.done(), ms.failed()
    todo_mask = ~done0 & (~failed0 | pl.retry_failed)  # what writer.pending() computes, without reading twice
    t4 = time.perf_counter()
    seconds["scan"] = t4 - t3
    todo = _todo_table(ms, images, np.flatnonzero(todo_mask))
    seconds["todo"] = time.perf_counter() - t4
    summary = PseudolabelSummary(
        store=ms.uri, total=ms.n, processed=0, skipped=int(done0.sum()),
        recovered=int(writer.recovered.rows - writer.recovered.failed), failed=0,
        failed_before=int((failed0 & ~done0 & ~todo_mask).sum()), seconds=0.0, images_per_s=0.0,
        model_started=False, operators=[], run_id=writer.run_id, num_actors=pl.num_actors,
    )  # fmt: skip
    return PseudolabelPlan(ms, todo, todo_mask, done0, summary, ckpts, image_size, seconds)


def writer_settings(pl: PseudolabelConfig) -> WriterSettings:
    """The store writer's pacing from the ``pseudolabel`` section."""
    return WriterSettings(pl.lock_stale_s, pl.commit_interval_s, pl.progress_interval_s, pl.write_concurrency)


def build_dataset(
    todo: pa.Table, pl: PseudolabelConfig, checkpoints: Sequence[str], image_size: int, grid_shape: tuple[int, int]
) -> Any:
    """The Ray Data pipeline up to (not including) the sink.

    Args:
        todo: ``(slot, row, image_id, path)`` of the images to process.
        pl: the ``pseudolabel`` config section.
        checkpoints: checkpoint directories.
        image_size: the classifier's frame size ``S``.
        grid_shape: the store's ``(gh, gw)``.

    Returns:
        A ``ray.data.Dataset`` of rows in the store sink's input contract (see :class:`ClassifierPredictor`), not
        executed; with ``pl.max_queued_frames`` its decoding is capped (:func:`cap_queued_frames`).
    """
    import ray.data

    per_block = pl.images_per_decode_task
    blocks = [
        pa.table({name: todo.column(name).slice(i, per_block).combine_chunks() for name in todo.column_names})
        for i in range(0, todo.num_rows, per_block)
    ]
    # The memory request (one the actors do not make) also keeps Ray Data from fusing decoding into the actors.
    ds = with_decode_stage(ray.data.from_arrow(blocks), image_size, pl.decode_cpus, memory_mb=pl.decode_memory_mb)
    ds = ds.map_batches(
        ClassifierPredictor,
        fn_constructor_kwargs={
            "checkpoints": list(checkpoints),
            "grid_shape": tuple(grid_shape),
            "use_gpu": float(pl.gpus_per_actor) > 0,
            "threads": pl.torch_threads or max(1, int(pl.cpus_per_actor)),
            "batch_size": pl.batch_size,  # fixed-shape model batches: maps independent of how rows were batched
            "precision": pl.precision,
        },
        compute=ray.data.ActorPoolStrategy(size=pl.num_actors),
        batch_size=pl.batch_size,
        batch_format="numpy",
        num_cpus=pl.cpus_per_actor,
        num_gpus=float(pl.gpus_per_actor),
    )
    cap_queued_frames(ds, effective_frame_cap(pl), per_block)
    return ds


#: Key of the frame cap's settings in a dataset's ``DataContext`` (read by :class:`QueuedFrameCap`).
FRAME_CAP_KEY = "chexseg.max_queued_frames"

#: How long a capped pipeline waits for its actors to start before failing (a cluster may have to grow first).
ACTOR_START_WAIT_S = 24 * 3600


def effective_frame_cap(pl: PseudolabelConfig) -> int:
    """``pseudolabel.max_queued_frames`` raised to the least that always progresses (0 stays 0: no cap).

    The actors take batches of ``batch_size`` frames, which arrive in decode tasks of ``images_per_decode_task``:
    with ``batch_size + images_per_decode_task`` allowed, another decode task may start whenever fewer than a batch
    are queued, so a batch always completes.
    """
    if pl.max_queued_frames <= 0:
        return 0
    return max(pl.max_queued_frames, pl.batch_size + pl.images_per_decode_task)


def cap_queued_frames(ds: Any, max_frames: int, frames_per_task: int) -> None:
    """Bound the frames between a dataset's task stage and the actor stage it feeds (no-op for ``max_frames`` 0).

    Counted from the decode tasks' submission to the actors' output: frames being decoded, queued in the object store,
    in flight to an actor or in its current batch. A decode task of up to ``frames_per_task`` frames starts only
    while the count stays within ``max_frames`` (:class:`QueuedFrameCap`, added to Ray Data's own backpressure
    policies); Ray Data's byte budgets still apply on top. The pipeline also waits for its actors before decoding
    (``DataContext.wait_for_min_actors_s``): while no operator has a task running, Ray Data's liveness rule starts a
    task even against backpressure, which during a model's start-up (seconds on a GPU) decoded far past the cap.

    Only the dataset's own ``DataContext`` (``ds.context``) changes, not the process's current one.

    Args:
        ds: a ``ray.data.Dataset`` whose actor stage (``ActorPoolStrategy``) follows a task stage.
        max_frames: the cap, at least one batch plus ``frames_per_task`` (see :func:`effective_frame_cap`); 0 = none.
        frames_per_task: the most rows a task of the upstream stage takes (``images_per_decode_task``).
    """
    if max_frames <= 0:
        return
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES,
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    )

    ctx = ds.context
    policies = list(ctx.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES))
    if QueuedFrameCap not in policies:
        policies.append(QueuedFrameCap)
    ctx.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, policies)
    ctx.set_config(FRAME_CAP_KEY, {"max_frames": int(max_frames), "frames_per_task": int(frames_per_task)})
    ctx.wait_for_min_actors_s = max(ctx.wait_for_min_actors_s, ACTOR_START_WAIT_S)


class QueuedFrameCap:
    """Ray Data backpressure policy (driver side): hold back a task stage while its actor stage has enough queued.

    For each operator that feeds an actor-pool operator, the rows it has sent into tasks minus the rows the actors
    have turned into output are the frames under way; a new task starts only if its ``frames_per_task`` more stay
    within ``max_frames``. Settings come from ``DataContext`` under :data:`FRAME_CAP_KEY`. Ray Data instantiates it
    per execution with ``(data_context, topology, resource_manager)`` and calls ``can_add_input`` before each task.
    """

    name = "QueuedFrameCap"

    def __init__(self, data_context: Any, topology: Any, resource_manager: Any) -> None:
        from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

        settings = data_context.get_config(FRAME_CAP_KEY, {}) or {}
        self.max_frames = int(settings.get("max_frames", 0))
        self.frames_per_task = int(settings.get("frames_per_task", 1))
        self._consumer: dict[Any, Any] = {}
        for op in topology:
            if isinstance(op, ActorPoolMapOperator):
                for upstream in op.input_dependencies:
                    self._consumer[upstream] = op

    def under_way(self, op: Any) -> int:
        """Rows ``op`` has sent into tasks that its actor stage has not output yet (0 for other operators)."""
        consumer = self._consumer.get(op)
        if consumer is None:
            return 0
        sent = op.metrics.rows_inputs_of_submitted_tasks
        return int(sent - consumer.metrics.rows_task_outputs_generated)

    def can_add_input(self, op: Any) -> bool:
        if self.max_frames <= 0 or op not in self._consumer:
            return True
        return self.under_way(op) + self.frames_per_task <= self.max_frames

    def max_task_output_bytes_to_read(self, op: Any) -> int | None:
        return None


def resource_problem(pl: PseudolabelConfig, resources: dict[str, float]) -> str | None:
    """Why the pipeline cannot run on a cluster with these resources (``ray.cluster_resources()``), or None.

    The classifier actors hold their CPUs and GPUs for the whole job, so at least ``decode_cpus`` must be left over
    for the decode tasks, and the GPUs must cover every actor; otherwise Ray Data waits forever.
    """
    gpus = float(pl.gpus_per_actor)
    return pool_problem("pseudolabel", pl.num_actors, pl.cpus_per_actor, gpus, pl.decode_cpus, resources)


def _todo_table(ms: MapStore, images: pa.Table, slots: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "slot": pa.array(slots, pa.int64()),
            "row": pa.array(ms.rows[slots], pa.int64()),
            "image_id": images.column("image_id").take(pa.array(slots)),
            "path": images.column("path").take(pa.array(slots)),
        }
    )


def _add_stats(summary: PseudolabelSummary, ds: Any) -> None:
    try:
        stats = ds.stats()
        summary.operators = pipeline_operators(stats)
        summary.busy_s = operator_busy_seconds(stats)
    except Exception:  # Stats are diagnostics; never fail a finished job over them.
        summary.operators = []


def _mismatch(
    key: str, stored: Any, wanted: Any, attrs: Mapping[str, Any], manifest: str, ckpts: Sequence[str], n_images: int
) -> str:
    if key == "manifest_fingerprint":
        return (
            f"store was written for another manifest or selection (manifest {attrs.get('manifest')!r}, "
            f"{attrs.get('n_images')} images, frontal_only={attrs.get('frontal_only')}); now {manifest!r} gives "
            f"{n_images} images. Resuming would put maps in the wrong slots: choose a new --store, or pass "
            "--overwrite to replace it."
        )
    if key == "precision":
        return (
            f"store holds {stored} maps; pseudolabel.precision={wanted}. Resuming would mix two precisions: set "
            f"pseudolabel.precision={stored} to resume it, choose a new --store, or pass --overwrite to replace it."
        )
    return (
        f"store holds maps of model {str(stored)[:12]}... (checkpoint(s) {attrs.get('checkpoints')}); --checkpoint "
        f"{','.join(ckpts)} is model {str(wanted)[:12]}... Resuming would mix two models' maps: choose a new "
        "--store, or pass --overwrite to replace it."
    )
