"""Exporting every map of a store as CheXlocalize segmentation JSON at original resolution (a process pool)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from chexseg_dist.config import MasksConfig
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.parallel import process_map
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.errors import InputError
from chexseg_dist.masks.gating import manifest_labels
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.thresholds import TunedThresholds, check_thresholds_store

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- export
#: Below this many original-resolution pixels in total, export and tuning run in the calling process.
IN_PROCESS_PIXELS = 50_000_000


def _export_job(
    job: tuple[MaskMaker, str, np.ndarray, tuple[int, int, int], np.ndarray, np.ndarray | None, str | None],
) -> Any:
    """Worker: one image's 10 masks at original resolution, as RLEs (a refiner reads the image from ``path``)."""
    from chexseg_dist.data.chexlocalize import encode_mask

    maker, image_id, cams, params, probs, labels, path = job
    box = Letterbox(*params)
    image = refine_frame(path, box) if maker.refines and path else None
    masks = maker.masks(cams, box, probs, labels, frame="original", image=image)
    return image_id, {task: encode_mask(masks[k]) for k, task in enumerate(TASKS)}


def export_masks(
    store_uri: str,
    out: str,
    cfg: MasksConfig,
    manifest: str | None = None,
    skip_missing: bool = False,
    workers: int | None = None,
    images: str | None = None,
) -> int:
    """Write the masks of every image and pathology of a map store as CheXlocalize segmentation JSON.

    Args:
        store_uri: the map store.
        out: the JSON to write (local or URI).
        cfg: a :class:`~chexseg_dist.config.MasksConfig` (strategy, thresholds file, cutoffs, label gating, workers).
        manifest: labels for label gating (required when ``cfg.label_gating``).
        skip_missing: leave out images without maps (failed or not yet processed) instead of raising.
        workers: processes (default ``cfg.workers``).
        images: a manifest whose paths a refiner reads (default: ``manifest``); it does not turn on label gating.

    Returns:
        The number of images written.

    Raises:
        InputError: images without maps (unless ``skip_missing``), or label gating without a manifest.
    """
    from chexseg_dist.data.chexlocalize import write_segmentations
    from chexseg_dist.store.mapstore import MapStore

    maker = MaskMaker.from_config(cfg)
    if maker.label_gating and not manifest:
        raise InputError("masks.label_gating needs --manifest with the images' labels")
    images = images or manifest
    if maker.refines and not images:
        raise InputError(
            f"masks.refiner={cfg.refiner} refines against the radiographs: pass --images (or --manifest) with their "
            "paths"
        )
    store = MapStore.open(store_uri)
    if cfg.thresholds and (cfg.strategy == "tuned" or cfg.prob_cutoff):
        check_thresholds_store(TunedThresholds.load(cfg.thresholds), cfg.thresholds, store.uri, store.attrs)
    done = store.done()
    if not done.all():
        missing = [str(i) for i in store.image_ids[~done]]
        msg = f"map store {store_uri}: {len(missing)} of {store.n} images have no maps (e.g. {missing[:5]})"
        if not skip_missing:
            raise InputError(msg + "; re-run chexseg pseudolabel, or pass --skip-missing to leave them out")
        log.warning(msg + "; leaving them out of the predictions (--skip-missing)")
    labels = None
    if maker.label_gating:
        assert manifest is not None
        labels = manifest_labels(manifest, [str(i) for i in store.image_ids])
    paths = image_paths(images, store.image_ids) if maker.refines and images else None

    def jobs() -> Any:
        for batch in store.iter_batches(batch_size=max(store.images_per_chunk, 64)):
            for j in range(len(batch)):
                box = batch.letterboxes[j]
                assert box is not None
                slot = int(batch.slots[j])
                yield (
                    maker,
                    str(batch.image_id[j]),
                    batch.cams[j],
                    (box.height, box.width, box.size),
                    batch.probs[j],
                    labels[slot] if labels is not None else None,
                    paths[slot] if paths is not None else None,
                )

    n_workers = cfg.workers if workers is None else workers
    sizes = np.asarray(store.array("orig_size")[:], dtype=np.int64)[done]
    if int((sizes[:, 0] * sizes[:, 1]).sum()) < IN_PROCESS_PIXELS:
        n_workers = 1  # starting processes (~1 s each) would cost more than it saves
    results: dict[str, dict[str, Any]] = {}
    for image_id, rles in process_map(_export_job, jobs(), n_workers):
        results[image_id] = rles
    write_segmentations(out, results)
    return len(results)


def image_paths(manifest: str, image_ids: np.ndarray) -> list[str]:
    """The manifest's path of each image id, in the given order.

    Raises:
        InputError: naming ids the manifest does not have.
    """
    from chexseg_dist.data.manifest import read_manifest

    table = read_manifest(manifest, ["image_id", "path"])
    index = dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist()))
    missing = [str(i) for i in image_ids if str(i) not in index]
    if missing:
        raise InputError(f"{manifest}: {len(missing)} image id(s) of the store are not in it, e.g. {missing[:5]}")
    return [str(index[str(i)]) for i in image_ids]


def refine_frame(path: str, box: Letterbox) -> np.ndarray:
    """The image's model frame for a refiner, checked against the letterbox the store recorded.

    Raises:
        InputError: the image's size differs from the one its maps were made from (another file at that path).
    """
    from chexseg_dist.data.images import load_frame

    frame, got = load_frame(path, box.size)
    if (got.height, got.width) != (box.height, box.width):
        raise InputError(
            f"{path} is {got.height}x{got.width} but its maps were made from a {box.height}x{box.width} image; "
            "the manifest must point at the images the store was made from"
        )
    return frame
