"""The inter-pixel affinity network as a training task on the shared loop (``chexseg train-affinity``).

IRNet's step, adapted to 10 independent binary pathologies: for every done image of a map store, in the student's
frame, each pathology whose image-level label is positive gets CRF seeds (:func:`~chexseg_dist.masks.refine.crf_seeds`:
1 confident foreground, 0 confident background, ignore elsewhere; cells in the letterbox padding are ignored) on
the network's stride-4 grid. A pair of cells within ``train_affinity.radius`` where some pathology is confident at
both ends is **negative** (affinity 0) if that pathology's labels differ at the two ends for any pathology, otherwise
**positive** (affinity 1; foreground-positive if both are foreground for some pathology). The loss is IRNet's:
``(mean -log a over fg-positive + mean -log a over bg-positive) / 2 + mean -log(1 - a) over negatives``, with
``a = 1 - max boundary on the segment`` (:func:`~chexseg_dist.masks.refine.path_affinity`). The data parallelism,
checkpoints, resume and fault tolerance are the loop's (:mod:`chexseg_dist.train._loop`); the epoch's score is minus
the mean loss on a held-out share of the store's images (the original chose the lowest training loss).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from chexseg_dist.config import Config, MasksConfig, save_config
from chexseg_dist.core import fsio
from chexseg_dist.core.console import say
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS, OBSERVATIONS
from chexseg_dist.core.runs import new_run_id
from chexseg_dist.data.frames import with_decode_stage
from chexseg_dist.data.labels import label_column
from chexseg_dist.errors import InputError
from chexseg_dist.masks.gating import task_values
from chexseg_dist.masks.maps import normalise_maps, upsample_maps
from chexseg_dist.masks.refine import IGNORE, crf_params, crf_seeds, path_affinity, shift_grid, to_grid
from chexseg_dist.models.affinity import STRIDE, BoundaryNet, save_affinity
from chexseg_dist.train._loop import (
    FaultInjection,
    StepResult,
    TrainResult,
    TrainTask,
    WorkerContext,
    fit,
    resolve_run,
    write_failures,
    write_history,
)
from chexseg_dist.train.pseudo_set import PseudoSet, load_pseudo_set, read_chunk

DECODE_BATCH = 16
EPS = 1e-5


# ---------------------------------------------------------------------------------------------------- targets
def affinity_seeds(batch: dict[str, np.ndarray], masks: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data stage after decoding: CRF seeds ``[n, 10, g, g]`` uint8 on the stride-4 grid of each frame.

    Pathologies whose label is not positive, and cells touching the letterbox padding, are :data:`IGNORE`.
    """
    cfg = MasksConfig(**masks)
    params = crf_params(cfg)
    params = type(params)(**{**asdict(params), "stride": STRIDE})
    frames = np.asarray(batch["frame"], dtype=np.uint8)
    n, size = frames.shape[0], frames.shape[-1]
    g = -(-size // STRIDE)
    labels = task_values(np.stack([label_column(batch, name) for name in OBSERVATIONS], axis=1))
    seeds = np.full((n, N_TASKS, g, g), IGNORE, dtype=np.uint8)
    for i in range(n):
        p = [int(v) for v in batch["letterbox"][i]]
        box = Letterbox(p[0], p[1], size)
        tasks = np.flatnonzero(labels[i] == 1.0)
        if tasks.size == 0:
            continue
        norm = normalise_maps(upsample_maps(np.asarray(batch["cams"][i], np.float32)[tasks], box, "model"))
        s = crf_seeds(frames[i], norm, params, cfg.seed_fg_plane, cfg.seed_bg_plane)
        content = np.zeros((size, size), dtype=np.float32)
        content[box.pad_top : box.pad_top + box.new_height, box.pad_left : box.pad_left + box.new_width] = 1.0
        inside = to_grid(content, STRIDE).numpy() >= 1.0
        s[:, ~inside] = IGNORE
        seeds[i, tasks] = s
    return {"image_id": np.asarray(batch["image_id"], dtype=str), "frame": frames, "seeds": seeds}


def affinity_loss(boundary: Tensor, seeds: Tensor, radius: int) -> tuple[Tensor, dict[str, float]]:
    """IRNet's affinity loss (module docstring) of a batch.

    Args:
        boundary: ``[B, g, g]`` boundary probabilities.
        seeds: ``[B, 10, g, g]`` uint8 seeds (0, 1, :data:`IGNORE`).
        radius: pair radius in cells.

    Returns:
        ``(loss, counts)``: a scalar (0 with no pair) and the numbers of fg-positive, bg-positive and negative pairs.
    """
    offsets, aff = path_affinity(boundary, radius)
    s = seeds.to(torch.int16)
    valid = s != IGNORE
    sums = {"fg": boundary.new_zeros(()), "bg": boundary.new_zeros(()), "neg": boundary.new_zeros(())}
    counts = {"fg": 0.0, "bg": 0.0, "neg": 0.0}
    for k, (dy, dx) in enumerate(offsets):
        t = shift_grid(s, dy, dx, float(IGNORE))
        both = valid & (t != IGNORE)
        neg = (both & (s != t)).any(dim=1)
        pos = both.any(dim=1) & ~neg
        fg = pos & (both & (s == 1) & (t == 1)).any(dim=1)
        bg = pos & ~fg
        a = aff[:, k]
        for name, sel, value in (
            ("fg", fg, -torch.log(a + EPS)),
            ("bg", bg, -torch.log(a + EPS)),
            ("neg", neg, -torch.log(1 - a + EPS)),
        ):
            sums[name] = sums[name] + value[sel].sum()
            counts[name] += float(sel.sum())
    terms = []
    pos_terms = [sums[n] / counts[n] for n in ("fg", "bg") if counts[n]]
    if pos_terms:
        terms.append(sum(pos_terms) / len(pos_terms))
    if counts["neg"]:
        terms.append(sums["neg"] / counts["neg"])
    loss = sum(terms) if terms else boundary.sum() * 0.0
    assert isinstance(loss, Tensor)
    return loss, counts


def held_out(image_id: str, fraction: float) -> bool:
    """Whether an image is in the held-out share (a stable hash of its id: the same split on every run)."""
    h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16)
    return h < fraction * 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------- the task
class AffinityTask(TrainTask):
    """The boundary network on the shared loop (module docstring)."""

    name = "train-affinity"

    def __init__(self, cfg: Config, store: str, manifest: str, failures_dir: str, run_id: str) -> None:
        self.cfg = cfg
        self.ta = cfg.train_affinity
        self.loop = self.ta
        self.frame = cfg.segmentation.image_size
        self.store, self.manifest = store, manifest
        self.failures_dir, self.run_id = failures_dir, run_id
        self.n_train = self.n_valid = 0
        self._tables: dict[str, pa.Table] = {}
        self._chunk: int = 256

    def prepare(self) -> None:
        pseudo: PseudoSet = load_pseudo_set(self.store, self.manifest)
        rows = pseudo.rows
        ids = [str(i) for i in rows.column("image_id").to_pylist()]
        mask = np.asarray([held_out(i, self.ta.valid_fraction) for i in ids], dtype=bool)
        if mask.all() or not mask.any():
            raise InputError(
                f"{self.store}: {len(ids)} image(s) leave no held-out or no training image at "
                f"train_affinity.valid_fraction={self.ta.valid_fraction}; pseudo-label more images"
            )
        self._tables = {"train": rows.filter(pa.array(~mask)), "valid": rows.filter(pa.array(mask))}
        self.n_train, self.n_valid = int((~mask).sum()), int(mask.sum())
        self._chunk = pseudo.images_per_chunk
        self.pseudo_store = pseudo.store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_tables", None)
        return state

    def datasets(self) -> dict[str, Any]:
        import ray.data

        out: dict[str, Any] = {}
        for what, table in self._tables.items():
            slots = np.asarray(table.column("slot"), dtype=np.int64)
            chunks = slots // self._chunk
            blocks = [table.filter(pa.array(chunks == c)) for c in np.unique(chunks)]
            ds: Any = ray.data.from_arrow(blocks)
            if what == "train":
                ds = ds.randomize_block_order()
            ds = ds.map_batches(
                read_chunk,
                fn_kwargs={"store_uri": self.pseudo_store},
                batch_format="numpy",
                batch_size=None,
                num_cpus=self.ta.decode_cpus,
            )
            failures = fsio.join(self.failures_dir, what)
            ds = with_decode_stage(
                ds, self.frame, self.ta.decode_cpus, failures_dir=failures, run_id=self.run_id, batch_size=DECODE_BATCH
            )
            # Seeds are the same every epoch and cost two CRFs per (image, positive pathology): computed once, kept
            # in Ray's object store (frame + seeds: ~26 KB per image at 128 px) and streamed from there each epoch.
            out[what] = ds.map_batches(
                affinity_seeds,
                fn_kwargs={"masks": asdict(self.cfg.masks)},
                batch_format="numpy",
                batch_size=DECODE_BATCH,
                num_cpus=self.ta.decode_cpus,
            ).materialize()
        return out

    def identity(self) -> dict[str, Any]:
        return {"task": self.name, "frame": self.frame, "width": self.ta.width, "radius": self.ta.radius}

    def describe(self) -> str:
        ta = self.ta
        return (
            f"{self.n_train} train / {self.n_valid} held-out images of {self.store}; boundary net width {ta.width} "
            f"at {self.frame} px (stride {STRIDE}), pairs within {ta.radius} cells; batch {ta.batch_size}, "
            f"{ta.epochs} epochs on {ta.num_workers} worker(s) ({'GPU' if self.use_gpu else 'CPU'})"
        )

    def export(
        self, state: Mapping[str, Any], best: Mapping[str, Any], history: list[dict[str, Any]], out: str, extra: dict
    ) -> dict[str, str]:
        model = BoundaryNet(self.ta.width)
        model.load_state_dict(state["model"])
        files = {"checkpoint": out, **write_history(out, dict(best), history)}
        failures = write_failures(out, self.failures_dir, ("train", "valid"))
        if failures:
            files["failures"] = failures
        files["config"] = save_config(self.cfg, out, extra=extra)
        # Last: affinity.json marks a finished export.
        save_affinity(
            out, model, frame=self.frame, radius=self.ta.radius, config=self.cfg.to_dict(), metrics=dict(best)
        )
        return files

    # ---------------------------------------------------------------- worker
    def steps_per_epoch(self, world: int) -> int:
        return max(1, math.ceil((self.n_train // world) / self.ta.batch_size))

    def build(self, steps_per_epoch: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = BoundaryNet(self.ta.width)
        return model, torch.optim.Adam(model.parameters(), lr=self.ta.lr), None

    def train_batches(self, shards: Mapping[str, Any], ctx: WorkerContext) -> Iterator[Any]:
        for batch in shards["train"].iter_batches(
            batch_size=self.ta.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * self.ta.batch_size,
            local_shuffle_seed=self.ta.seed * 1000 + ctx.rank + ctx.epoch,
        ):
            yield {
                "image": torch.from_numpy(np.asarray(batch["frame"], dtype=np.uint8)).to(ctx.device),
                "seeds": torch.from_numpy(np.asarray(batch["seeds"], dtype=np.uint8)).to(ctx.device),
                "ids": [str(i) for i in batch["image_id"]],
            }

    def train_step(self, model: nn.Module, batch: Any, ctx: WorkerContext) -> StepResult:
        x = batch["image"].unsqueeze(1).float().div_(255.0)
        loss, counts = affinity_loss(model(x), batch["seeds"], self.ta.radius)
        n = int(x.shape[0])
        return StepResult(loss=loss, images=n, parts={"neg_pairs": counts["neg"]}, ids=batch["ids"])

    def part_keys(self) -> list[str]:
        return ["neg_pairs"]

    def validate(self, model: nn.Module, shards: Mapping[str, Any], ctx: WorkerContext) -> dict[str, Any]:
        if ctx.rank != 0:
            return {}
        total, images = 0.0, 0
        was = model.training
        model.eval()
        with torch.no_grad():
            for batch in shards["valid"].iter_batches(batch_size=2 * self.ta.batch_size, batch_format="numpy"):
                x = torch.from_numpy(np.asarray(batch["frame"], dtype=np.uint8)).to(ctx.device)
                seeds = torch.from_numpy(np.asarray(batch["seeds"], dtype=np.uint8)).to(ctx.device)
                loss, _ = affinity_loss(model(x.unsqueeze(1).float().div_(255.0)), seeds, self.ta.radius)
                total += float(loss) * int(x.shape[0])
                images += int(x.shape[0])
        model.train(was)
        valid_loss = total / max(images, 1)
        return {"valid_loss": valid_loss, "valid_images": images, "score": -valid_loss}

    def epoch_line(self, epoch: int, metrics: Mapping[str, Any]) -> str:
        return (
            f"epoch {epoch + 1}/{self.ta.epochs} train_loss {metrics['train_loss']:.4f} held-out loss "
            f"{metrics['valid_loss']:.4f} ({metrics['valid_images']} images)"
        )


def train_affinity(
    cfg: Config, store: str, manifest: str, out: str, *, fault: FaultInjection | None = None
) -> TrainResult:
    """Train the affinity network with Ray Train on a store's CRF seeds; writes the best epoch into ``out``.

    Re-running with the same ``out`` (or ``train_affinity.run_name`` and ``storage_path``) resumes at the next epoch.

    Raises:
        ChexsegError: a store of another manifest, too few images, a resumed run of another identity.
    """
    storage, run_name = resolve_run(cfg.train_affinity, out, "affinity")
    run_id = new_run_id()
    task = AffinityTask(cfg, store, manifest, fsio.join(storage, run_name, "failures"), run_id)
    result = fit(task, out, fault=fault, default_name="affinity")
    best = result.best_metrics
    say(
        f"affinity network: best epoch {result.best_epoch + 1} of {len(result.history)} (held-out loss "
        f"{best['valid_loss']:.4f} on {best['valid_images']} images); wall time {result.wall_time_s:.1f} s; "
        f"checkpoint {result.out}"
    )
    return result
