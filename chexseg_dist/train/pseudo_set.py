"""The pseudo-labelled set: the train split's map store read chunk by chunk, with masks derived on the fly.

docs/results.md decided, by measurement, that pseudo-masks are derived from the stored grids when they are needed
rather than materialised. The student's pipeline per worker:

1. The driver joins the store (done rows only; failed rows are counted and reported) to its manifest by ``row`` and
   ``image_id`` (a store of another manifest is refused) and deals the store's chunks out to the workers: worker
   ``r`` gets every chunk ``c`` with ``c % W == r``, as one Ray dataset of its own (``pseudo_<r>``), so workers never
   wait on each other for data (the Bernoulli mixing consumes pseudo rows at different rates on each worker).
2. One read task per chunk reads that chunk's grids, probabilities and geometry from the store (a per-sample read
   would fetch a whole chunk each time: ruinous on S3); the ~1 KB grids travel with the rows. The chunk order is
   shuffled every pass (``randomize_block_order``) and rows are shuffled within a buffer when iterated: memory stays
   flat in the store's size.
3. The one read-and-decode stage makes the student's frames; :func:`pseudo_targets` makes the masks with
   :class:`~chexseg_dist.masks.MaskMaker` in the model frame at the student's size, and the per-channel weights
   (``ignore_uncertain`` drops a channel whose image label is uncertain).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS, OBSERVATIONS
from chexseg_dist.data.labels import label_column
from chexseg_dist.data.manifest import read_manifest
from chexseg_dist.errors import InputError, StoreError
from chexseg_dist.masks.gating import task_values
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.store.mapstore import MapStore

#: Columns of a pseudo row before decoding (``path`` and ``row`` feed the decode stage).
PSEUDO_COLUMNS: tuple[str, ...] = ("slot", "row", "image_id", "path", "patient_id")


@dataclass
class PseudoSet:
    """What the driver knows about the pseudo-labelled set.

    Attributes:
        store: the map store URI.
        rows: ``slot, row, image_id, path, patient_id`` and the 14 labels of the done rows, in slot order.
        images_per_chunk: the store's chunk size.
        failed: rows of the store that failed pseudo-labelling (left out).
        pending: rows not yet done (left out; the store is unfinished).
    """

    store: str
    rows: pa.Table
    images_per_chunk: int
    failed: int
    pending: int

    def __len__(self) -> int:
        return int(self.rows.num_rows)

    def shares(self, world: int) -> list[list[pa.Table]]:
        """The rows dealt out to ``world`` workers: worker ``r`` gets every chunk ``c`` with ``c % world == r``.

        Each element of a share is one chunk's rows (one read task). When the store has fewer chunks than workers,
        chunks are cut into row ranges until every worker has one (a range still reads its whole chunk, but only
        ``world`` times in all).
        """
        slots = np.asarray(self.rows.column("slot"), dtype=np.int64)
        chunk = slots // self.images_per_chunk
        cuts = np.flatnonzero(np.diff(chunk)) + 1  # rows are in slot order: a chunk is a contiguous run
        bounds = [0, *cuts.tolist(), len(slots)]
        units = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        while 0 < len(units) < world:
            i = max(range(len(units)), key=lambda j: units[j][1] - units[j][0])
            a, b = units[i]
            if b - a < 2:
                break
            units[i : i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
        out: list[list[pa.Table]] = [[] for _ in range(world)]
        for k, (a, b) in enumerate(units):
            out[k % world].append(self.rows.slice(a, b - a))
        return out


def load_pseudo_set(store_uri: str, manifest: str) -> PseudoSet:
    """The done rows of a map store, joined to the manifest it was written for.

    Raises:
        StoreError: a store of another manifest (ids or rows that differ), or one without a done row.
    """
    store = MapStore.open(store_uri)
    table = read_manifest(manifest)
    index = {str(i): k for k, i in enumerate(table.column("image_id").to_pylist())}
    ids = [str(i) for i in store.image_ids]
    positions = [index.get(i) for i in ids]
    rows_in_manifest = np.asarray(table.column("row"), dtype=np.int64)
    bad = [i for i, p, r in zip(ids, positions, store.rows) if p is None or rows_in_manifest[p] != r]
    if bad:
        raise StoreError(
            f"map store {store.uri} was not written for {manifest}: {len(bad)} of its images are not that manifest's "
            f"rows (e.g. {bad[:3]}); pass the manifest the store was pseudo-labelled from"
        )
    done, failed = store.done(), store.failed()
    if not done.any():
        raise StoreError(f"map store {store.uri} has no done row; run chexseg pseudolabel to fill it")
    slots = np.flatnonzero(done)
    take = pa.array([positions[s] for s in slots])
    picked = table.take(take)
    columns = {"slot": pa.array(slots.astype(np.int64)), "row": picked.column("row"), "image_id": picked["image_id"]}
    columns.update(path=picked["path"], patient_id=picked["patient_id"])
    columns.update({name: picked[name] for name in OBSERVATIONS})
    return PseudoSet(
        store=store.uri,
        rows=pa.table(columns),
        images_per_chunk=store.images_per_chunk,
        failed=int((failed & ~done).sum()),
        pending=int((~failed & ~done).sum()),
    )


def read_chunk(batch: dict[str, np.ndarray], store_uri: str, refined_key: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data stage (one task per chunk): the rows' raw grids, probabilities and original sizes from the store,
    and with ``refined_key`` their bit-packed refined masks (``refined`` [n, 10, F, ceil(F/8)] uint8)."""
    store = MapStore.open(store_uri)
    slots = np.asarray(batch["slot"], dtype=np.int64)
    read = store.read(slots)
    out = {name: np.asarray(batch[name]) for name in batch}
    out.update(cams=read.cams.astype(np.float32), probs=read.probs.astype(np.float32), orig_size=read.orig_size)
    if refined_key:
        from chexseg_dist.store.refined import RefinedMasks

        refined = RefinedMasks.open(store, refined_key)
        bits, done = refined.read(slots, packed=True)
        if not done.all():
            raise StoreError(f"{store.uri}/refined/{refined_key}: slots {slots[~done][:5].tolist()} are not refined")
        out["refined"] = bits
    return out


def pseudo_targets(
    batch: dict[str, np.ndarray], maker: MaskMaker | None, ignore_uncertain: bool
) -> dict[str, np.ndarray]:
    """Ray Data stage after the decode stage: pseudo-masks in the student's frame and per-channel loss weights.

    Args:
        batch: ``frame`` [n, S, S] (the student's frame), ``letterbox`` [n, 7], ``cams`` [n, 10, gh, gw],
            ``probs`` [n, 14] and the 14 label columns.
        maker: how maps become masks (``masks`` section; tuned thresholds from expert-train); None for distillation
            (the teacher makes the targets).
        ignore_uncertain: weight 0 for a channel whose image-level label is uncertain (-1).

    Returns:
        ``image_id``, ``frame``, ``weights`` [n, 10] float32 and, with a maker, ``masks`` [n, 10, S, S] uint8.
    """
    frames = np.asarray(batch["frame"], dtype=np.uint8)
    n, size = frames.shape[0], frames.shape[-1]
    labels = np.stack([label_column(batch, name) for name in OBSERVATIONS], axis=1)
    weights = np.ones((n, N_TASKS), dtype=np.float32)
    if ignore_uncertain:
        weights[task_values(labels) == -1.0] = 0.0
    out = {"image_id": np.asarray(batch["image_id"], dtype=str), "frame": frames, "weights": weights}
    if "refined" in batch:  # precomputed by chexseg refine in this frame
        out["masks"] = np.unpackbits(np.asarray(batch["refined"]), axis=-1, count=size).astype(np.uint8)
    elif maker is not None:
        masks = np.zeros((n, N_TASKS, size, size), dtype=np.uint8)
        for i in range(n):
            params = [int(v) for v in batch["letterbox"][i]]
            box = Letterbox(params[0], params[1], size)
            masks[i] = maker.masks(batch["cams"][i], box, batch["probs"][i], labels[i], frame="model", image=frames[i])
        out["masks"] = masks
    return out


def check_disjoint(groups: dict[str, set[str]]) -> None:
    """Refuse patients that appear in two of the named sets (expert-train, expert-select, pseudo, test).

    Raises:
        InputError: naming the two sets and a few patients they share.
    """
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(groups[a] & groups[b])
            if shared:
                raise InputError(
                    f"{len(shared)} patient(s) are in both {a} and {b} (e.g. {shared[:3]}); the sets must not share "
                    "patients, or the scores measure memory: use the images of other patients"
                )
