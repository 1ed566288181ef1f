"""Overlays for a radiologist's eye: one PNG per radiograph, the 10 pathologies side by side.

Each panel shows the radiograph (original aspect ratio, grey), the normalised saliency map as a heatmap whose
opacity follows saliency, the predicted mask's contour (cyan, solid) and the expert mask's contour (green, dashed),
titled with the pathology and the classifier probability; panels of pathologies positive in the expert masks have a
green title. With a refiner (``masks.refiner``) the panel shows the map, the unrefined mask (orange, dotted) and the
refined mask (cyan, solid) side by side on the same image.
Masks are made exactly as ``chexseg export-masks`` makes them (:class:`chexseg_dist.masks.MaskMaker` at original
resolution) and then subsampled to the display size, so what is drawn is what is scored.

The layout is fixed (no automatic tight layout), so the PNG size depends only on the image's aspect ratio:
:func:`figure_size`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.errors import InputError
from chexseg_dist.masks.gating import task_values
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.maps import normalise_maps, upsample_maps
from chexseg_dist.masks.refine import NoRefiner

#: Panels per row and rows of the grid.
COLUMNS, ROWS = 5, 2
#: Width of one panel in pixels; its height follows the image's aspect ratio.
PANEL_PX = 320
#: Pixels above each panel for its title, and above the grid for the figure title.
TITLE_PX, HEADER_PX = 36, 30
DPI = 100
PRED_COLOR, GT_COLOR, BASE_COLOR = "#00e5ff", "#39ff14", "#ff9f1c"
#: Opacity of the heatmap where the normalised map is 1 (it fades to transparent at 0).
HEAT_ALPHA = 0.6


def figure_size(height: int, width: int, panel_px: int = PANEL_PX) -> tuple[int, int]:
    """``(png_width, png_height)`` in pixels of the overlay of a ``height x width`` radiograph."""
    panel_h = round(panel_px * height / width)
    return COLUMNS * panel_px, HEADER_PX + ROWS * (panel_h + TITLE_PX)


def _display_index(n: int, m: int) -> np.ndarray:
    """Nearest original pixel for each of ``m`` display pixels along an axis of ``n`` pixels (pixel centres)."""
    return np.minimum(((np.arange(m) + 0.5) * n / m).astype(np.int64), n - 1)


def render_overlay(
    path: str,
    image: np.ndarray,
    cams: np.ndarray,
    box: Letterbox,
    maker: MaskMaker,
    probs: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    gt_masks: Mapping[str, np.ndarray] | None = None,
    title: str = "",
    panel_px: int = PANEL_PX,
) -> tuple[int, int]:
    """Draw one radiograph's overlay grid and write it as PNG.

    Args:
        path: output PNG (local or URI).
        image: ``[height, width]`` float radiograph in ``[0, 1]`` (:func:`chexseg_dist.data.images.read_image`).
        cams: ``[10, gh, gw]`` raw maps (TASKS order).
        box: the letterbox of the image (its original size must be ``image.shape``).
        maker: how predicted masks are made.
        probs: ``[14]`` probabilities (OBSERVATIONS order) for the titles and cutoffs.
        labels: ``[14]`` labels, for label gating.
        gt_masks: ``{pathology: [height, width]}`` expert masks to outline.
        title: figure title (e.g. the image id).
        panel_px: panel width in pixels.

    Returns:
        The PNG size ``(width, height)`` in pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape
    if (h, w) != (box.height, box.width):
        raise InputError(f"overlay: image is {h}x{w} but its maps were made for {box.height}x{box.width}")
    fig_w, fig_h = figure_size(h, w, panel_px)
    panel_h = round(panel_px * h / w)
    # Display grid: panel_px wide (never upsampled beyond the original), masks subsampled at pixel centres.
    dw, dh = min(w, panel_px), min(h, panel_h)
    ri, ci = _display_index(h, dh), _display_index(w, dw)
    shown = image[np.ix_(ri, ci)]
    base = None
    if maker.refines:
        frame = np.clip(np.rint(box.image_to_frame(image) * 255.0), 0, 255).astype(np.uint8)
        pred = maker.masks(cams, box, probs, labels, frame="original", image=frame)
        base = dataclasses.replace(maker, refiner=NoRefiner()).masks(cams, box, probs, labels, frame="original")
    else:
        pred = maker.masks(cams, box, probs, labels, frame="original")
    heat = np.empty((len(TASKS), dh, dw), dtype=np.float32)
    for k in range(len(TASKS)):  # one full-size map at a time keeps memory at one map
        heat[k] = normalise_maps(upsample_maps(cams[k], box))[np.ix_(ri, ci)]
    task_probs = task_values(probs) if probs is not None else None

    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="black")
    try:
        fig.text(0.5, 1 - (HEADER_PX / 2) / fig_h, title, color="white", ha="center", va="center", fontsize=11)
        for k, task in enumerate(TASKS):
            r, c = divmod(k, COLUMNS)
            left = c * panel_px / fig_w
            bottom = 1 - (HEADER_PX + (r + 1) * (panel_h + TITLE_PX)) / fig_h
            ax = fig.add_axes((left, bottom, panel_px / fig_w, panel_h / fig_h))
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest", extent=(0, w, h, 0))
            ax.imshow(_heat_rgba(heat[k]), interpolation="bilinear", extent=(0, w, h, 0))
            if base is not None:
                _contour(ax, base[k][np.ix_(ri, ci)], ri, ci, BASE_COLOR, "dotted")
            _contour(ax, pred[k][np.ix_(ri, ci)], ri, ci, PRED_COLOR, "solid")
            gt = gt_masks.get(task) if gt_masks else None
            positive = gt is not None and bool(gt.any())
            if positive:
                assert gt is not None
                _contour(ax, np.asarray(gt)[np.ix_(ri, ci)], ri, ci, GT_COLOR, "dashed")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.axis("off")
            p = f"p={task_probs[k]:.2f}" if task_probs is not None and np.isfinite(task_probs[k]) else "p=?"
            ax.set_title(f"{task}\n{p}", color=GT_COLOR if positive else "white", fontsize=9, pad=2)
        from chexseg_dist.core.fsio import open_file

        with open_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI, facecolor="black")
    finally:
        plt.close(fig)
    return fig_w, fig_h


def _heat_rgba(heat: np.ndarray) -> np.ndarray:
    """A jet heatmap whose opacity grows with saliency (0 -> clear), so the anatomy stays visible under weak map."""
    from matplotlib import colormaps

    rgba = colormaps["jet"](np.clip(heat, 0, 1))
    rgba[..., 3] = HEAT_ALPHA * np.clip(heat, 0, 1)
    return rgba


def _contour(ax: Any, mask: np.ndarray, ri: np.ndarray, ci: np.ndarray, color: str, style: str) -> None:
    if not mask.any() or mask.all():
        return
    # Display pixel centres in original coordinates, so contours line up with the image extent.
    ax.contour(
        ci + 0.5, ri + 0.5, mask.astype(np.float32), levels=[0.5], colors=color, linewidths=1.2, linestyles=style
    )


def write_overlays(
    store_uri: str,
    manifest: str,
    image_ids: list[str],
    out_dir: str,
    maker: MaskMaker,
    gt_path: str | None = None,
    labels_from_manifest: bool = False,
    panel_px: int = PANEL_PX,
) -> list[str]:
    """One overlay PNG per image id, ``<out_dir>/<image_id>.png``; returns the written paths.

    Raises:
        ChexsegError: ids missing from the store, the manifest or the ground truth, naming them.
    """
    from chexseg_dist.core.fsio import join, makedirs
    from chexseg_dist.data.chexlocalize import decode_mask, read_segmentations
    from chexseg_dist.data.images import read_image
    from chexseg_dist.data.manifest import read_manifest
    from chexseg_dist.masks.gating import manifest_labels
    from chexseg_dist.store.mapstore import MapStore

    store = MapStore.open(store_uri)
    batch = store.read(store.index_of(image_ids, wanted_by="--ids"))
    not_done = [i for i, d in zip(image_ids, batch.done) if not d]
    if not_done:
        raise InputError(f"map store {store_uri}: no maps yet for {not_done[:5]}")
    table = read_manifest(manifest, columns=["image_id", "path"])
    paths = dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist()))
    missing = [i for i in image_ids if i not in paths]
    if missing:
        raise InputError(f"{manifest}: image id(s) not in the manifest: {missing[:5]}")
    gt = read_segmentations(gt_path) if gt_path else None
    if gt is not None:
        absent = [i for i in image_ids if i not in gt]
        if absent:
            raise InputError(f"{gt_path}: no expert masks for {absent[:5]}")
    labels = manifest_labels(manifest, image_ids) if labels_from_manifest else None
    makedirs(out_dir)
    written = []
    for j, image_id in enumerate(image_ids):
        box = batch.letterboxes[j]
        assert box is not None
        gt_masks = (
            {t: decode_mask(r, image_id=image_id, pathology=t, source=gt_path) for t, r in gt[image_id].items()}
            if gt is not None
            else None
        )
        target = join(out_dir, f"{image_id}.png")
        render_overlay(
            target,
            read_image(paths[image_id]),
            batch.cams[j],
            box,
            maker,
            batch.probs[j],
            labels[j] if labels is not None else None,
            gt_masks,
            title=image_id,
            panel_px=panel_px,
        )
        written.append(target)
    return written
