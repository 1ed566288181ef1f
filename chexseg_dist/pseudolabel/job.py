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

Per-image problems (missing object, empty, truncated or corrupt file, unsupported mode, non-finite model output)
never stop the job: the row is recorded as failed (``failed = 1`` in the store, a record in the failures table
next to it) and the rest completes. The job is resumable and idempotent (see docs/store-format.md): rows already
done are skipped, fragments left by an interrupted run are committed first, and a finished store is never
recomputed (Ray is not even started).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from chexseg_dist.config import Config, PseudolabelConfig
from chexseg_dist.core.console import say
from chexseg_dist.core.ray_env import cluster_resources, pool_problem, ray_can_grow, ray_session
from chexseg_dist.data.frames import decode_frames
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
    ckpts = split_paths(checkpoints)
    if not ckpts:
        raise InputError("no checkpoint given (--checkpoint DIR or DIR1,DIR2 for an ensemble)")
    images, views = select_images(
        read_manifest(manifest, ["row", "image_id", "path", "frontal"]), pl.frontal_only, manifest
    )
    if note := views.note("pseudolabel"):
        say(note)
    model_fp, info = checkpoint_identity(ckpts)
    grid = probe_grid_shape(ckpts)  # loads every member: a damaged checkpoint fails here, before the store is touched
    image_size = int(info["image_size"])
    if image_size != cfg.classifier.image_size:
        say(f"pseudolabel: note: the checkpoint was trained at {image_size} px (classifier.image_size is ignored)")
    spec = StoreSpec(
        image_ids=images.column("image_id").to_pylist(),
        rows=np.asarray(images.column("row")),
        identity={"manifest_fingerprint": manifest_fingerprint(images), "model_fingerprint": model_fp},
        attrs={
            "manifest": manifest,
            "frontal_only": pl.frontal_only,
            "checkpoints": ckpts,
            "config": cfg.to_dict(),
            **{k: info[k] for k in ("arch", "target_layer", "image_size")},
        },
        grid_shape=grid,
        images_per_chunk=pl.images_per_chunk,
        mismatch=lambda key, stored, wanted, attrs: _mismatch(
            key, stored, wanted, attrs, manifest, ckpts, images.num_rows
        ),
    )
    settings = WriterSettings(pl.lock_stale_s, pl.commit_interval_s, pl.progress_interval_s, pl.write_concurrency)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    with StoreWriter(store, run_id, settings) as writer:
        ms = writer.open(spec, overwrite, cfg, {"manifest": manifest, "checkpoints": ckpts})
        done0, failed0 = ms.done(), ms.failed()
        todo_mask = writer.pending(pl.retry_failed)
        summary = PseudolabelSummary(
            store=ms.uri, total=ms.n, processed=0, skipped=int(done0.sum()),
            recovered=int(writer.recovered.rows - writer.recovered.failed), failed=0,
            failed_before=int((failed0 & ~done0 & ~todo_mask).sum()), seconds=0.0, images_per_s=0.0,
            model_started=False, operators=[], run_id=run_id, num_actors=pl.num_actors,
        )  # fmt: skip
        if not todo_mask.any():
            return summary
        todo = _todo_table(ms, images, np.flatnonzero(todo_mask))
        say(
            f"pseudolabel: {todo.num_rows} of {ms.n} images to process ({summary.skipped} already done); "
            f"{pl.num_actors} classifier actor(s), batch {pl.batch_size}"
        )
        summary.model_started = True
        can_grow = ray_can_grow()
        with ray_session():
            start = time.time()  # images/s covers the pipeline (actor start-up included), not starting Ray itself
            problem = resource_problem(pl, cluster_resources())
            if problem and not can_grow:
                raise InputError(problem)  # A Ray started here never grows: the job would wait forever.
            if problem:
                say(f"pseudolabel: warning: {problem} (it will wait for the cluster to grow)")
            ds = build_dataset(todo, pl, ckpts, image_size, ms.grid_shape)
            writer.write(ds, todo.num_rows)
            summary.seconds = time.time() - start  # Stats and shutting Ray down are not pipeline time.
            _add_stats(summary, ds)
        done1, failed1 = ms.done(), ms.failed()
        summary.processed = int((done1 & ~done0).sum())
        summary.failed = int((failed1 & todo_mask).sum())
        summary.images_per_s = (summary.processed + summary.failed) / max(summary.seconds, 1e-9)
        if summary.busy_s:
            say(summary.stage_line())
        return summary


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
        A ``ray.data.Dataset`` of rows in the store sink's input contract (see :class:`ClassifierPredictor`).
    """
    import ray.data

    per_block = pl.images_per_decode_task
    blocks = [
        pa.table({name: todo.column(name).slice(i, per_block).combine_chunks() for name in todo.column_names})
        for i in range(0, todo.num_rows, per_block)
    ]
    ds = ray.data.from_arrow(blocks).map_batches(
        decode_frames,  # type: ignore[arg-type]
        fn_kwargs={"image_size": image_size, "keep_failed": True},
        batch_size=None,
        batch_format="numpy",
        num_cpus=pl.decode_cpus,
        # A resource request the actors do not make: besides reserving decode memory, it keeps Ray Data from
        # fusing this task stage into the classifier actors (fusion needs identical remote arguments).
        memory=pl.decode_memory_mb * 1024 * 1024,
    )
    return ds.map_batches(
        ClassifierPredictor,
        fn_constructor_kwargs={
            "checkpoints": list(checkpoints),
            "grid_shape": tuple(grid_shape),
            "use_gpu": pl.gpus_per_actor > 0,
            "threads": pl.torch_threads or max(1, int(pl.cpus_per_actor)),
            "batch_size": pl.batch_size,  # fixed-shape model batches: maps independent of how rows were batched
        },
        compute=ray.data.ActorPoolStrategy(size=pl.num_actors),
        batch_size=pl.batch_size,
        batch_format="numpy",
        num_cpus=pl.cpus_per_actor,
        num_gpus=pl.gpus_per_actor,
    )


def resource_problem(pl: PseudolabelConfig, resources: dict[str, float]) -> str | None:
    """Why the pipeline cannot run on a cluster with these resources (``ray.cluster_resources()``), or None.

    The classifier actors hold their CPUs and GPUs for the whole job, so at least ``decode_cpus`` must be left over
    for the decode tasks, and the GPUs must cover every actor; otherwise Ray Data waits forever.
    """
    return pool_problem("pseudolabel", pl.num_actors, pl.cpus_per_actor, pl.gpus_per_actor, pl.decode_cpus, resources)


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
    return (
        f"store holds maps of model {str(stored)[:12]}... (checkpoint(s) {attrs.get('checkpoints')}); --checkpoint "
        f"{','.join(ckpts)} is model {str(wanted)[:12]}... Resuming would mix two models' maps: choose a new "
        "--store, or pass --overwrite to replace it."
    )
