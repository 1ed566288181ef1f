"""The refine job (``chexseg refine``): every done row of a map store -> refined pseudo-masks in the student's frame,
bit-packed, in the store's ``refined/<key>`` subgroup (layout: :mod:`chexseg_dist.store.layout`).

Refinement costs far more than thresholding (a dense CRF per gated-in (image, pathology)), and the student would
otherwise redo it every time it draws a row. The job follows the writers' lifecycle:

1. **start** (driver): compute the recipe (:func:`~chexseg_dist.masks.recipe.student_recipe`: the maker and the key
   of everything that decides a mask: the refiner and its parameters, the binariser and its thresholds, the gates,
   the frame, the maps' model); the store's :class:`~chexseg_dist.store.refined.RefinedWriter` takes the lock and
   creates the subgroup or resumes it; list the chunks with pending rows.
2. **write per task**: a Ray Data ``map`` over those chunks, one task per chunk: it reads the chunk's maps, fetches and
   letterboxes the images, makes the masks with the one :class:`~chexseg_dist.masks.maker.MaskMaker` (gates first,
   then the refiner) and writes the chunk's rows, ``done`` last. A chunk belongs to one task only, so no two writers
   ever touch one Zarr chunk.
3. **commit** (driver): as tasks finish it prints progress and the writer appends their per-image failures
   (unreadable image, an image whose size differs from the one its maps were made from) to the recipe's failures
   table (``<store>.sidecar/refined-<key>/failures``).
4. **failure hook**: if the pipeline dies, what finished tasks wrote stays committed (``done`` per row) and the
   failures seen so far are recorded; a re-run does the rest. A job killed with SIGKILL leaves at most the chunks it
   was writing with ``done = 0`` rows, which the re-run recomputes: the result equals an uninterrupted run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from chexseg_dist.config import Config
from chexseg_dist.core.console import rate_eta, say
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.runs import new_run_id
from chexseg_dist.core.serialize import now_utc
from chexseg_dist.data.failures import failure_table
from chexseg_dist.errors import ConfigError, StoreError
from chexseg_dist.masks.gating import manifest_labels
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.recipe import student_maker, student_recipe
from chexseg_dist.store.mapstore import MapStore
from chexseg_dist.store.refined import RefinedMasks, RefinedWriter


@dataclass
class RefineSummary:
    """What one run of the refine job did."""

    store: str
    key: str
    total: int
    refined: int
    skipped: int
    failed: int
    missing_maps: int
    seconds: float
    run_id: str

    def line(self) -> str:
        rate = (self.refined + self.failed) / max(self.seconds, 1e-9)
        return (
            f"refine: {self.store} refined/{self.key}: refined {self.refined}, skipped {self.skipped} already done, "
            f"failed {self.failed}, without maps {self.missing_maps} of {self.total} images in {self.seconds:.1f} s "
            f"({rate:.1f} images/s)"
        )


def run_refine(
    cfg: Config, store_uri: str, manifest: str, thresholds: str | None = None, retry_failed: bool = False
) -> RefineSummary:
    """Refine every done row of a store into its ``refined/<key>`` subgroup; resumable and idempotent.

    Args:
        cfg: resolved config (``masks`` with a refiner, ``train_segmentation.label_gating``,
            ``segmentation.image_size`` as the frame, ``pseudolabel`` for the lock's staleness and progress pace).
        store_uri: the map store (``chexseg pseudolabel``).
        manifest: the manifest the store was written for (image paths and labels).
        thresholds: tuned thresholds (``masks.strategy=tuned`` or ``prob_cutoff``).
        retry_failed: recompute rows whose refinement failed before.

    Raises:
        ConfigError: ``masks.refiner=none`` (nothing to refine).
        StoreError: no store, or one another job is writing.
    """
    if cfg.masks.refiner == "none":
        raise ConfigError(
            "masks.refiner=none: nothing to refine (masks are made on the fly); pass --set masks.refiner=crf"
        )
    # A bad recipe (unknown refiner, tuned without thresholds, a network of another frame) fails before the lock.
    student_maker(cfg, thresholds).refiner.check_frame(cfg.segmentation.image_size)
    store = MapStore.open(store_uri, mode="r+")
    if not store.done().any():
        raise StoreError(f"map store {store.uri} holds no maps yet: run chexseg pseudolabel first, then chexseg refine")
    recipe = student_recipe(cfg, thresholds, store)
    paths, labels = _image_inputs(store, manifest)  # a manifest without the store's ids fails before any write
    frame = cfg.segmentation.image_size
    run_id = new_run_id()
    with RefinedWriter(store, recipe.key, recipe.spec, frame, run_id, cfg.pseudolabel.lock_stale_s) as writer:
        refined = writer.refined
        assert refined is not None
        if writer.created:
            say(
                f"refine: created {store.uri}/refined/{recipe.key} ({store.n} images, {frame} px, refiner "
                f"{recipe.spec['refiner']})"
            )
        maps_done = store.done()
        done, failed = refined.done(), refined.failed()
        todo = maps_done & ~done & (~failed | retry_failed)
        summary = RefineSummary(
            store=store.uri, key=recipe.key, total=store.n, refined=0, skipped=int((maps_done & done).sum()),
            failed=0, missing_maps=int((~maps_done).sum()), seconds=0.0, run_id=run_id,
        )  # fmt: skip
        if not todo.any():
            return summary
        items = _chunk_items(store, paths, labels, todo)
        say(
            f"refine: {int(todo.sum())} of {store.n} images to refine in {len(items)} chunk task(s) "
            f"({summary.skipped} already done), refiner {cfg.masks.refiner}, {frame} px"
        )
        t0 = time.time()
        _run_tasks(cfg, recipe.maker, items, writer, summary, int(todo.sum()))
        summary.seconds = time.time() - t0
        return summary


def _image_inputs(store: MapStore, manifest: str) -> tuple[list[str], np.ndarray]:
    """Each slot's image path and ``[14]`` labels from the manifest (naming ids it lacks)."""
    from chexseg_dist.masks.export import image_paths

    ids = store.image_ids
    return image_paths(manifest, ids), manifest_labels(manifest, [str(i) for i in ids])


def _chunk_items(store: MapStore, paths: list[str], labels: np.ndarray, todo: np.ndarray) -> list[dict[str, Any]]:
    """One work item per store chunk with pending rows: its slots, image paths and labels."""
    items = []
    for c in range(store.n_chunks):
        start, stop = store.chunk_range(c)
        slots = np.flatnonzero(todo[start:stop]) + start
        if slots.size:
            items.append(
                {
                    "chunk": c,
                    "slots": slots.tolist(),
                    "paths": [paths[s] for s in slots],
                    "labels": np.asarray(labels[slots], dtype=np.float64).tolist(),
                }
            )
    return items


def _run_tasks(
    cfg: Config,
    maker: MaskMaker,
    items: list[dict[str, Any]],
    writer: RefinedWriter,
    summary: RefineSummary,
    todo: int,
) -> None:
    import ray.data

    from chexseg_dist.core.ray_env import ray_session

    cpus = max(0.25, cfg.masks.refine_cpus)
    with ray_session():
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
            refine_chunk,  # type: ignore[arg-type]
            fn_kwargs={"store_uri": writer.store.uri, "key": writer.key, "maker": maker, "threads": max(1, int(cpus))},
            num_cpus=cpus,
        )
        started, next_line = time.time(), time.time() + cfg.pseudolabel.progress_interval_s
        failures: list[dict[str, Any]] = []
        try:
            for row in ds.iter_rows():
                writer.check()
                summary.refined += int(row["refined"])
                summary.failed += len(row["fail_slot"])
                failures += [
                    {k: row[f"fail_{k}"][i] for k in ("slot", "row", "image_id", "path", "stage", "error", "time")}
                    for i in range(len(row["fail_slot"]))
                ]
                if time.time() >= next_line:
                    finished = summary.refined + summary.failed
                    say(
                        f"refine: {finished}/{todo} images ({summary.failed} failed), "
                        f"{rate_eta(finished, todo, time.time() - started)}"
                    )
                    next_line = time.time() + cfg.pseudolabel.progress_interval_s
        finally:
            if failures:  # the failure hook: what was seen is recorded even when the pipeline died
                columns = {k: [f[k] for f in failures] for k in failures[0]}
                import pyarrow as pa

                slots = pa.array(np.asarray(columns.pop("slot"), dtype=np.int64))
                writer.record_failures(failure_table(columns, summary.run_id, extra={"slot": slots}))


def refine_chunk(
    item: dict[str, Any],
    store_uri: str,
    key: str,
    maker: MaskMaker,
    threads: int,
) -> dict[str, Any]:
    """Ray Data task: refine one chunk's pending rows and write them (this task is the chunk's only writer)."""
    import torch

    from chexseg_dist.data.frames import fetch_bytes, read_error
    from chexseg_dist.data.images import frame_from_bytes

    torch.set_num_threads(threads)
    store = MapStore.open(store_uri, mode="r+")
    refined = RefinedMasks.open(store, key)
    frame = refined.frame
    slots = np.asarray(item["slots"], dtype=np.int64)
    labels = np.asarray(item["labels"], dtype=np.float64)
    paths = [str(p) for p in item["paths"]]
    rows = store.read(slots)
    packed = np.zeros((len(slots), 10, frame, -(-frame // 8)), dtype=np.uint8)
    failed = np.zeros(len(slots), dtype=bool)
    fails: dict[str, list[Any]] = {k: [] for k in ("slot", "row", "image_id", "path", "stage", "error", "time")}
    for i, data in enumerate(fetch_bytes(paths)):
        stage, error = "", ""
        box = rows.letterboxes[i]
        if box is None:
            stage, error = "maps", f"slot {slots[i]} has no maps"
        elif isinstance(data, BaseException):
            stage, error = "read", read_error(data, paths[i])
        else:
            try:
                image, got = frame_from_bytes(bytes(data), frame, paths[i])
                if (got.height, got.width) != (box.height, box.width):
                    raise StoreError(
                        f"{paths[i]} is {got.height}x{got.width} but its maps were made from a "
                        f"{box.height}x{box.width} image"
                    )
                fbox = Letterbox(box.height, box.width, frame)
                m = maker.masks(rows.cams[i], fbox, rows.probs[i], labels[i], frame="model", image=image)
                packed[i] = np.packbits(m, axis=-1)
            except Exception as exc:
                stage, error = "refine", f"{paths[i]}: {type(exc).__name__}: {exc}"
        if stage:
            failed[i] = True
            for k, v in zip(fails, (int(slots[i]), int(rows.row[i]), str(rows.image_id[i]), paths[i], stage, error)):
                fails[k].append(v)
            fails["time"].append(now_utc())
    refined.write_chunk(int(item["chunk"]), slots, packed, failed)
    return {"chunk": int(item["chunk"]), "refined": int((~failed).sum()), **{f"fail_{k}": v for k, v in fails.items()}}
