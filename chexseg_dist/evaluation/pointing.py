"""The pointing game (hit rate): does the argmax of a stored saliency map fall inside the expert mask?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from chexseg_dist.core.pathologies import N_TASKS, TASKS
from chexseg_dist.errors import InputError
from chexseg_dist.metrics.segmentation import RLE, HitStats, _as_coco


def point_in_rle(rle: RLE, row: int, col: int) -> bool:
    """True if pixel ``(row, col)`` is foreground in a COCO RLE (without decoding the mask)."""
    h, w = int(rle["size"][0]), int(rle["size"][1])
    idx = int(col) * h + int(row)  # COCO RLE runs over the column-major (Fortran) pixel order
    point = coco_mask.frPyObjects({"size": [h, w], "counts": [idx, 1, h * w - idx - 1]}, h, w)
    return bool(coco_mask.area(coco_mask.merge([_as_coco(rle), point], intersect=True)) > 0)


def hit_stats(store_uri: str, gt: Mapping[str, Mapping[str, RLE]], image_ids: Sequence[str]) -> HitStats:
    """Pointing game of the stored maps against the ground truth.

    Args:
        store_uri: a map store (``chexseg pseudolabel``) holding every image of ``image_ids``.
        gt: ground-truth RLEs.
        image_ids: the images, in the order of the result rows.

    Raises:
        KeyError: images missing from the store; ValueError: rows not done or sizes that differ from the gt.
    """
    from chexseg_dist.masks.maps import map_argmax
    from chexseg_dist.store.mapstore import MapStore

    store = MapStore.open(store_uri)
    slots = store.index_of(list(image_ids), wanted_by="the ground truth")
    n = len(image_ids)
    hit = np.zeros((n, N_TASKS), dtype=bool)
    valid = np.zeros((n, N_TASKS), dtype=bool)
    step = 256
    for start in range(0, n, step):
        batch = store.read(slots[start : start + step])
        not_done = [str(i) for i, d in zip(batch.image_id, batch.done) if not d]
        if not_done:
            raise InputError(f"map store {store_uri}: {len(not_done)} image(s) have no maps yet, e.g. {not_done[:5]}")
        for j in range(len(batch)):
            i = start + j
            image_id = str(batch.image_id[j])
            box = batch.letterboxes[j]
            assert box is not None
            entry = gt[image_id]
            size = tuple(entry[TASKS[0]]["size"])
            if (box.height, box.width) != size:
                raise InputError(
                    f"image {image_id!r}: map store {store_uri} has size {box.height}x{box.width}, the ground truth "
                    f"{size[0]}x{size[1]}"
                )
            rows, cols, constant = map_argmax(batch.cams[j], box)
            for k, task in enumerate(TASKS):
                rle = entry[task]
                if coco_mask.area(_as_coco(rle)) == 0:
                    continue
                valid[i, k] = True
                hit[i, k] = (not constant[k]) and point_in_rle(rle, int(rows[k]), int(cols[k]))
    return HitStats(hit=hit, valid=valid)
