"""Where a student's rows come from: the Ray Data pipelines of its expert and pseudo-labelled sets, the refined masks
it reads when the store has them, and each step's batch as tensors (docs/architecture.md, "Where a student batch
comes from"). The task (:mod:`chexseg_dist.train.segmentation`) decides what to draw; this module only builds.

Importing it imports neither Ray nor torch's distributed parts; the pipelines import Ray Data when built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from chexseg_dist.config import Config
from chexseg_dist.core.console import say
from chexseg_dist.data.expert import expert_targets
from chexseg_dist.data.frames import with_decode_stage
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.recipe import student_recipe
from chexseg_dist.store.mapstore import MapStore
from chexseg_dist.train.pseudo_set import pseudo_targets, read_chunk

#: Expert manifest rows per Ray Data block before decoding.
EXPERT_ROWS_PER_BLOCK = 32
#: Images per decode batch inside a Ray Data task.
DECODE_BATCH = 16


def expert_dataset(table: pa.Table, size: int, cpus: float, failures_dir: str, run_id: str) -> Any:
    """Expert rows -> frames and masks in the student's ``size`` frame, with their letterboxes (decode failures
    left out and recorded in ``failures_dir``)."""
    import ray.data

    columns = ["row", "image_id", "path", "masks_json"]
    blocks = [
        table.select(columns).slice(i, EXPERT_ROWS_PER_BLOCK) for i in range(0, table.num_rows, EXPERT_ROWS_PER_BLOCK)
    ]
    ds = with_decode_stage(
        ray.data.from_arrow(blocks), size, cpus, failures_dir=failures_dir, run_id=run_id, batch_size=DECODE_BATCH
    )
    return ds.map_batches(expert_rows, batch_format="numpy", batch_size=DECODE_BATCH, num_cpus=cpus)


def pseudo_dataset(
    share: list[pa.Table],
    store_uri: str,
    refined_key: str | None,
    maker: MaskMaker | None,
    ignore_uncertain: bool,
    size: int,
    cpus: float,
    failures_dir: str,
    run_id: str,
) -> Any:
    """One worker's share of the pseudo set (store chunks, in a new order each pass) -> frames, pseudo-masks (made
    by ``maker``, or read from ``refined/<refined_key>``; none for distillation) and per-channel loss weights."""
    import ray.data

    ds: Any = ray.data.from_arrow(share).randomize_block_order()
    ds = ds.map_batches(
        read_chunk,
        fn_kwargs={"store_uri": store_uri, "refined_key": refined_key},
        batch_format="numpy",
        batch_size=None,  # one task per chunk: a chunk is read once
        num_cpus=cpus,
    )
    ds = with_decode_stage(ds, size, cpus, failures_dir=failures_dir, run_id=run_id, batch_size=DECODE_BATCH)
    return ds.map_batches(
        pseudo_targets,
        fn_kwargs={"maker": maker, "ignore_uncertain": ignore_uncertain},
        batch_format="numpy",
        batch_size=DECODE_BATCH,
        num_cpus=cpus,
    )


def refined_key_for(cfg: Config, thresholds: str | None, store: MapStore, slots: np.ndarray, name: str) -> str | None:
    """The store's refined masks of the student's recipe when they cover the pseudo set's ``slots``, else None (the
    masks are then refined on the fly, at a cost: the CRF slows the weak student ~5x on 2 cores)."""
    from chexseg_dist.store.refined import RefinedMasks

    key = student_recipe(cfg, thresholds, store).key
    where = f"{store.uri}/refined/{key}"
    if RefinedMasks.exists(store, key):
        done = RefinedMasks.open(store, key).done()
        if done[slots].all():
            say(f"[{name}] reading {cfg.masks.refiner}-refined pseudo-masks from {where}")
            return key
        say(
            f"[{name}] note: {where} covers {int(done[slots].sum())} of {len(slots)} pseudo images; refining on the "
            "fly (re-run chexseg refine to finish it)"
        )
        return None
    say(
        f"[{name}] note: no {cfg.masks.refiner}-refined masks of this recipe in {store.uri}; refining on the fly "
        "(chexseg refine precomputes them once)"
    )
    return None


def collect_shard(shard: Any, batch_size: int = 64) -> dict[str, np.ndarray]:
    """A whole (small) dataset shard in memory, column -> array."""
    parts: list[dict[str, np.ndarray]] = [
        {k: np.asarray(v) for k, v in batch.items()}
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy")
    ]
    parts = [p for p in parts if p and len(next(iter(p.values())))]
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def expert_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage: the expert rows' frames and masks in the student's frame, with their letterboxes."""
    out = expert_targets(batch)
    out["letterbox"] = np.asarray(batch["letterbox"], dtype=np.int32)
    return out


def step_batch(parts: Sequence[dict[str, np.ndarray]], experts: int, device: torch.device) -> dict[str, Any]:
    """One step's batch (expert rows first) as tensors on the worker's device: ``image`` [B, S, S] uint8,
    ``weights`` [B, 10] float32, ``masks`` [B, 10, S, S] uint8 (absent for distillation), ``ids`` and ``experts``."""
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0] if all(name in p for p in parts)}
    batch: dict[str, Any] = {
        "image": torch.from_numpy(np.ascontiguousarray(joined["frame"], dtype=np.uint8)).to(device),
        "weights": torch.from_numpy(np.ascontiguousarray(joined["weights"], dtype=np.float32)).to(device),
        "ids": [str(i) for i in joined["image_id"]],
        "experts": experts,
    }
    if "masks" in joined:
        batch["masks"] = torch.from_numpy(np.ascontiguousarray(joined["masks"], dtype=np.uint8)).to(device)
    return batch
