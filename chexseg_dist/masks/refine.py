"""Pseudo-mask refinement against the radiograph: a dense CRF and random-walk propagation over learnt affinities.

Both refiners work per image on its frame (the letterboxed ``S x S`` image the classifier or the student sees),
inside the content box, on a working grid of ``stride`` frame pixels (average-pooled intensities), and return
masks in that content box; :class:`~chexseg_dist.masks.maker.MaskMaker` applies them after binarisation and
gating, so a pathology gated off stays empty and only gated-in maps are refined.

**Dense CRF** (Kraehenbuehl & Koltun 2011, two labels per (image, pathology)): the unary comes from a hard label
map, as ``pydensecrf``'s ``unary_from_labels`` does (``-log gt_prob`` for the given label, ``-log(1 - gt_prob)``
for the other); the pairwise term is a Potts model over a Gaussian kernel (``gauss_sxy``, ``gauss_compat``) and a
bilateral kernel over position and intensity (``bilat_sxy``, ``bilat_srgb`` on 0..255 intensities,
``bilat_compat``), each normalised symmetrically (``D^-1/2 K D^-1/2``, ``pydensecrf``'s default), and mean-field
inference runs ``iterations`` rounds. Instead of the permutohedral lattice the messages are exact sums over a
square window of ``radius`` frame pixels around each cell (the *convolutional CRF* truncation of Teichmann &
Cipolla 2018): with a window that covers the image this is the fully connected CRF exactly
(``tests/masks/test_refine.py`` checks it against a direct O(N^2) implementation). Kernels depend on the image
only, so they are computed once and shared by the image's pathologies.

**Seeds** (the IRNet step): the max-normalised map against a constant background plane, labelled by the CRF twice
(``fg_plane``: confident foreground; ``bg_plane``: confident background): 1 where the first says foreground, 0
where the second says background, :data:`IGNORE` elsewhere.

**Random walk** (Ahn et al. 2019): affinities ``a_ij = (1 - max boundary on the segment ij)^beta`` between cells
within ``rw_radius``, normalised over columns into a transition matrix ``T`` as IRNet's code does; a map ``v``
(max-normalised, damped by ``1 - boundary``) is propagated as ``v T^(2^rw_exp)`` and thresholded at
``fg_fraction`` of its maximum.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from chexseg_dist.core.registry import REFINERS

if TYPE_CHECKING:
    from chexseg_dist.config import MasksConfig
    from chexseg_dist.masks.thresholds import TunedThresholds

#: Seed value of a pixel neither confidently foreground nor background.
IGNORE = 255


# ---------------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class CrfParams:
    """The dense CRF's parameters (spatial ones in frame pixels; intensities on 0..255). Defaults: the original's."""

    iterations: int = 10
    gt_prob: float = 0.7
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bilat_sxy: float = 50.0
    bilat_srgb: float = 5.0
    bilat_compat: float = 10.0
    stride: int = 4
    radius: float = 48.0

    def cells(self) -> int:
        """Window half-width in grid cells."""
        return max(1, math.ceil(self.radius / self.stride))


# ---------------------------------------------------------------------------------------------------- grid helpers
def to_grid(image: np.ndarray | torch.Tensor, stride: int) -> torch.Tensor:
    """``[..., h, w]`` values -> ``[..., ceil(h/stride), ceil(w/stride)]`` float32 cell means (edge cells average what
    they cover); a stack of maps is pooled in one call."""
    t = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if stride == 1:
        return t
    lead, (h, w) = t.shape[:-2], t.shape[-2:]
    gh, gw = -(-h // stride), -(-w // stride)
    pad = (0, gw * stride - w, 0, gh * stride - h)
    s = F.avg_pool2d(F.pad(t.reshape(-1, 1, h, w), pad), stride)
    c = F.avg_pool2d(F.pad(torch.ones(1, 1, h, w), pad), stride)
    return (s / c).reshape(*lead, gh, gw)


def from_grid(grid: torch.Tensor, shape: tuple[int, int], stride: int) -> torch.Tensor:
    """``[..., gh, gw]`` -> ``[..., h, w]``: bilinear, cell centres at the centres of the cells' pixels."""
    if stride == 1:
        return grid
    lead = grid.shape[:-2]
    flat = grid.reshape(-1, 1, *grid.shape[-2:])
    gh, gw = grid.shape[-2:]
    up = F.interpolate(flat, size=(gh * stride, gw * stride), mode="bilinear", align_corners=False)
    return up[..., : shape[0], : shape[1]].reshape(*lead, *shape)


def _offsets(cells: int) -> torch.Tensor:
    r = torch.arange(-cells, cells + 1)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=1)


def _neighbours(x: torch.Tensor, cells: int, fill: float) -> torch.Tensor:
    """``[C, h, w]`` -> ``[C, K, h*w]``: the value at every offset of the ``(2 cells + 1)^2`` window (``fill`` off the
    grid)."""
    c, h, w = x.shape
    padded = F.pad(x[None], (cells, cells, cells, cells), value=fill)
    return F.unfold(padded, kernel_size=2 * cells + 1).reshape(c, (2 * cells + 1) ** 2, h * w)


# ---------------------------------------------------------------------------------------------------- dense CRF
@dataclass
class CrfKernels:
    """An image's normalised pairwise kernels on its working grid (shared by all its pathologies).

    The bilateral kernel is a sparse ``[N, N]`` CSR matrix (weights below :data:`KERNEL_EPS` of a row's total are
    dropped: with ``bilat_srgb`` 5 most of a window differs by more than 20 grey levels); the Gaussian kernel is a
    small fixed convolution with its border normalisation.
    """

    shape: tuple[int, int]
    bilateral: torch.Tensor  # sparse CSR [N, N], D^-1/2 K D^-1/2
    gauss_weight: torch.Tensor  # [1, 1, k, k]
    gauss_norm: torch.Tensor  # [h, w] D^-1/2 of the Gaussian kernel (border cells see fewer neighbours)

    def bilateral_message(self, q: torch.Tensor) -> torch.Tensor:
        """``[P, h, w]`` -> ``[P, h, w]``."""
        p = q.shape[0]
        return torch.sparse.mm(self.bilateral, q.reshape(p, -1).T).T.reshape(q.shape)

    def gaussian_message(self, q: torch.Tensor) -> torch.Tensor:
        """``[P, h, w]`` -> ``[P, h, w]``."""
        pad = self.gauss_weight.shape[-1] // 2
        x = (q * self.gauss_norm)[:, None]
        return F.conv2d(x, self.gauss_weight, padding=pad)[:, 0] * self.gauss_norm


#: Relative weight below which a bilateral kernel entry is dropped.
KERNEL_EPS = 1e-5


def crf_kernels(image: np.ndarray | torch.Tensor, params: CrfParams) -> CrfKernels:
    """The normalised Gaussian and bilateral kernels of one image (``[h, w]`` intensities on 0..255)."""
    grid = to_grid(image, params.stride)
    h, w = grid.shape
    n = h * w
    cells = min(params.cells(), max(h, w) - 1) if max(h, w) > 1 else 0
    offsets = _offsets(cells)
    dist2 = ((offsets.to(torch.float32) * params.stride) ** 2).sum(dim=1)[:, None]  # [K, 1] frame pixels^2
    valid = _neighbours(torch.ones(1, h, w), cells, 0.0)[0] > 0  # [K, N]
    neigh = _neighbours(grid[None], cells, 0.0)[0]
    diff2 = (neigh - grid.reshape(1, -1)) ** 2
    bil = torch.exp(-dist2 / (2 * params.bilat_sxy**2) - diff2 / (2 * params.bilat_srgb**2))
    bil = torch.where(valid, bil, 0.0)
    inv = bil.sum(dim=0).clamp_min(1e-20).rsqrt()  # D^-1/2; the window includes the cell itself
    bil = bil * inv[None, :] * _neighbours(inv.reshape(1, h, w), cells, 0.0)[0]
    keep = (bil > KERNEL_EPS * bil.sum(dim=0, keepdim=True)).T  # [N, K]: row-major nonzero gives a sorted CSR
    dst, k_idx = torch.nonzero(keep, as_tuple=True)
    side = 2 * cells + 1
    src = dst + (k_idx // side - cells) * w + (k_idx % side - cells)  # the neighbour's flat index, ascending per row
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(keep.sum(dim=1), dim=0)
    values = bil.T[dst, k_idx]
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": sparse.mm on CSR is all we use
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, src, values, (n, n), check_invariants=False)
    g_cells = max(1, math.ceil(4 * params.gauss_sxy / params.stride))  # 4 sigma: weights below 3e-4 dropped
    r = torch.arange(-g_cells, g_cells + 1, dtype=torch.float32) * params.stride
    g1 = torch.exp(-(r**2) / (2 * params.gauss_sxy**2))
    weight = (g1[:, None] * g1[None, :])[None, None]
    deg = F.conv2d(torch.ones(1, 1, h, w), weight, padding=g_cells)[0, 0]
    return CrfKernels((h, w), csr, weight, deg.clamp_min(1e-20).rsqrt())


def crf_foreground(labels: np.ndarray | torch.Tensor, kernels: CrfKernels, params: CrfParams) -> torch.Tensor:
    """Mean-field marginals of the foreground label on the working grid.

    Args:
        labels: ``[P, gh, gw]`` bool hard labels on the working grid (True = foreground).
        kernels: the image's :func:`crf_kernels`.
        params: the CRF's parameters.

    Returns:
        ``[P, gh, gw]`` float32 ``Q(foreground)``.
    """
    lab = torch.as_tensor(np.asarray(labels, dtype=bool)).to(torch.float32)
    h, w = lab.shape[1:]
    if (h, w) != kernels.shape:
        raise ValueError(f"labels on a {h}x{w} grid, kernels on {kernels.shape}")
    gain = math.log(params.gt_prob / (1.0 - params.gt_prob))
    unary = (2 * lab - 1) * gain  # logit(fg) - logit(bg) of the unary alone
    q = torch.sigmoid(unary)
    ones = torch.ones(1, h, w)
    base_b = kernels.bilateral_message(ones)
    base_g = kernels.gaussian_message(ones)
    for _ in range(params.iterations):
        mb = kernels.bilateral_message(q)
        mg = kernels.gaussian_message(q)
        # Potts: each label is rewarded by compat x the message of its own marginal; the bg marginal is 1 - q.
        q = torch.sigmoid(unary + params.bilat_compat * (2 * mb - base_b) + params.gauss_compat * (2 * mg - base_g))
    return q


def crf_refine(image: np.ndarray, masks: np.ndarray, params: CrfParams) -> np.ndarray:
    """Refine binary masks of one image with the dense CRF.

    Args:
        image: ``[h, w]`` intensities (0..255) of the content box.
        masks: ``[P, h, w]`` bool masks (the binarised, gated maps) to refine.
        params: the CRF's parameters.

    Returns:
        ``[P, h, w]`` bool: the CRF's labelling (``Q(foreground) > 0.5``) at the image's resolution. An all-empty
        mask stays empty.
    """
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros_like(masks)
    live = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    if live.size == 0:
        return out
    with torch.no_grad():
        kernels = crf_kernels(image, params)
        grid_labels = to_grid(masks[live], params.stride) >= 0.5
        q = crf_foreground(grid_labels, kernels, params)
        out[live] = (from_grid(q, masks.shape[1:], params.stride) > 0.5).numpy()
    return out


def crf_seeds(
    image: np.ndarray, norm_maps: np.ndarray, params: CrfParams, fg_plane: float = 0.25, bg_plane: float = 0.1
) -> np.ndarray:
    """IRNet's seeds of one image: 1 confident foreground, 0 confident background, :data:`IGNORE` elsewhere.

    Args:
        image: ``[h, w]`` intensities (0..255) of the content box.
        norm_maps: ``[P, h, w]`` max-normalised maps in [0, 1] (an all-zero map gives an all-background seed).
        params: the CRF's parameters.
        fg_plane, bg_plane: the constant background planes (foreground = map above the plane).

    Returns:
        ``[P, gh, gw]`` uint8 seeds on the working grid (``stride``).
    """
    maps = np.asarray(norm_maps, dtype=np.float32)
    with torch.no_grad():
        kernels = crf_kernels(image, params)
        grid = to_grid(maps, params.stride)
        fg = crf_foreground(grid > fg_plane, kernels, params) > 0.5
        bg = crf_foreground(grid > bg_plane, kernels, params) <= 0.5
    seeds = np.full(fg.shape, IGNORE, dtype=np.uint8)
    seeds[bg.numpy()] = 0
    seeds[fg.numpy()] = 1
    return seeds


# ---------------------------------------------------------------------------------------------------- random walk
def half_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` with ``0 < |o| <= radius``, one of each ``+-o`` pair (affinities are symmetric)."""
    out = []
    for dy in range(0, radius + 1):
        for dx in range(-radius, radius + 1):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx > radius * radius:
                continue
            out.append((dy, dx))
    return out


def shift_grid(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``y[..., i, j] = x[..., i + dy, j + dx]`` (``fill`` off the grid)."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), value=fill)
    return padded[..., p + dy : p + dy + h, p + dx : p + dx + w]


def path_affinity(boundary: torch.Tensor, radius: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """IRNet's affinity from a boundary map: ``1 - max boundary`` on the sampled segment between two cells.

    Args:
        boundary: ``[..., h, w]`` boundary probabilities in [0, 1].
        radius: cells.

    Returns:
        ``(offsets, affinity [..., len(offsets), h, w])``: affinity between cell ``i`` and ``i + offset`` (0 where the
        neighbour is off the grid).
    """
    offsets = half_offsets(radius)
    out = []
    for dy, dx in offsets:
        steps = max(abs(dy), abs(dx))
        worst = torch.maximum(boundary, shift_grid(boundary, dy, dx, 1.0))
        for s in range(1, steps):
            ry, rx = round(dy * s / steps), round(dx * s / steps)
            worst = torch.maximum(worst, shift_grid(boundary, ry, rx, 1.0))
        out.append(1.0 - worst)
    return offsets, torch.stack(out, dim=-3)


def random_walk(
    maps: torch.Tensor, affinity: torch.Tensor, offsets: list[tuple[int, int]], beta: float, exp_times: int
) -> torch.Tensor:
    """Propagate maps over symmetric affinities: ``v <- v T`` repeated ``2^exp_times`` times (IRNet's ``T^(2^e)``, with
    ``T = A D^-1`` normalised over its columns, so each step replaces a cell by the affinity-weighted mean of its
    window and a boundary stops the spread).

    Args:
        maps: ``[P, h, w]`` non-negative maps on the affinity's grid.
        affinity: ``[K, h, w]`` affinities to ``i + offsets[k]`` (:func:`path_affinity`), in [0, 1].
        offsets: the offsets (one of each symmetric pair; self-affinity is 1).
        beta: the affinities' power.
        exp_times: ``log2`` of the number of propagation steps.

    Returns:
        ``[P, h, w]`` propagated maps.
    """
    a = affinity.clamp(0, 1) ** beta
    deg = 1.0 + a.sum(dim=0)  # the self-loop plus the forward half ...
    for k, (dy, dx) in enumerate(offsets):
        deg = deg + shift_grid(a[k], -dy, -dx, 0.0)  # ... plus the backward half (neighbour j = i - o has a[k] at j)
    v = maps
    for _ in range(2**exp_times):
        out = v.clone()  # out_j = sum_i v_i a_ij / d_j (IRNet's column-normalised T: a weighted mean over j's window)
        for k, (dy, dx) in enumerate(offsets):
            out = out + shift_grid(v, dy, dx, 0.0) * a[k]  # i = j + o: a_ij is a[k] at j
            out = out + shift_grid(v * a[k], -dy, -dx, 0.0)  # i = j - o: a_ij is a[k] at i
        v = out / deg
    return v


def walk_maps(
    norm_maps: np.ndarray,
    boundary: np.ndarray,
    shape: tuple[int, int],
    stride: int,
    radius: int,
    beta: float,
    exp_times: int,
) -> np.ndarray:
    """The random walk of one image's maps, each divided by its maximum (``[P, h, w]`` in [0, 1]; an all-zero map
    stays zero): foreground is where it exceeds ``fg_fraction`` (:func:`propagate_masks`).

    Args:
        norm_maps: ``[P, h, w]`` normalised maps of the content box (frame resolution).
        boundary: ``[gh, gw]`` boundary probabilities on the ``stride`` grid of the content box.
        shape: ``(h, w)`` of the content box.
        stride, radius, beta, exp_times: the walk (radius in grid cells).
    """
    maps = np.asarray(norm_maps, dtype=np.float32)
    with torch.no_grad():
        grid = to_grid(maps, stride)
        b = torch.as_tensor(np.asarray(boundary, dtype=np.float32))
        if b.shape != grid.shape[-2:]:
            raise ValueError(f"boundary map is {tuple(b.shape)}, the maps' grid is {tuple(grid.shape[-2:])}")
        offsets, aff = path_affinity(b, radius)
        walked = random_walk(_by_max(grid) * (1.0 - b), aff, offsets, beta, exp_times)
        return _by_max(from_grid(walked, shape, stride).clamp_min(0)).numpy()


def _by_max(maps: torch.Tensor) -> torch.Tensor:
    """``[P, h, w]`` maps each divided by its maximum (an all-zero or negative map stays as it is)."""
    top = maps.reshape(len(maps), -1).amax(dim=1).clamp_min(0)
    return maps / torch.where(top > 0, top, 1.0)[:, None, None]


def propagate_masks(
    norm_maps: np.ndarray,
    boundary: np.ndarray,
    shape: tuple[int, int],
    stride: int,
    radius: int,
    beta: float,
    exp_times: int,
    fg_fraction: np.ndarray | float,
) -> np.ndarray:
    """Random-walk refined masks of one image: :func:`walk_maps` above ``fg_fraction`` (``[P]`` or scalar).

    Returns:
        ``[P, h, w]`` bool. An all-zero map stays empty.
    """
    walked = walk_maps(norm_maps, boundary, shape, stride, radius, beta, exp_times)
    frac = np.broadcast_to(np.asarray(fg_fraction, np.float32), (len(walked),))
    return walked > frac[:, None, None]


# ---------------------------------------------------------------------------------------------------- refiners
class Refiner:
    """A refinement strategy (``masks.refiner``): masks of one image's gated-in pathologies -> refined masks.

    Subclasses implement :meth:`refine`; :class:`~chexseg_dist.masks.maker.MaskMaker` calls it in the model frame's
    content box, after binarisation and gating, with the pathologies that passed the gates.
    """

    name = "none"

    def refine(self, image: np.ndarray, masks: np.ndarray, norm_maps: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        """``image`` ``[h, w]`` 0..255, ``masks`` ``[P, h, w]`` bool, ``norm_maps`` ``[P, h, w]`` in [0, 1], ``tasks``
        ``[P]`` TASKS indices -> ``[P, h, w]`` bool."""
        return masks

    def check_frame(self, size: int) -> None:
        """Refuse a model frame this refiner cannot work in (default: any)."""


class NoRefiner(Refiner):
    """Today's masks, unchanged."""


class CrfRefiner(Refiner):
    """The dense CRF (:func:`crf_refine`) seeded with the binarised mask."""

    name = "crf"

    def __init__(self, params: CrfParams) -> None:
        self.params = params

    def refine(self, image: np.ndarray, masks: np.ndarray, norm_maps: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        return crf_refine(image, masks, self.params)


class AffinityRefiner(Refiner):
    """Random walk of each gated-in map over a trained affinity network's boundaries (:func:`propagate_masks`); the
    binarised mask is not used: foreground is where the walked map exceeds ``fg_fraction`` of its maximum.

    Args:
        loaded: the affinity checkpoint (:func:`chexseg_dist.models.affinity.load_affinity`).
        radius, beta, exp_times: the walk.
        fg_fraction: ``[10]`` per-pathology fractions.
    """

    name = "affinity"

    def __init__(self, loaded: Any, radius: int, beta: float, exp_times: int, fg_fraction: np.ndarray) -> None:
        self.loaded = loaded
        self.radius, self.beta, self.exp_times = int(radius), float(beta), int(exp_times)
        self.fg_fraction = np.asarray(fg_fraction, dtype=np.float32)

    @classmethod
    def from_config(cls, cfg: MasksConfig, tuned: TunedThresholds | None = None) -> AffinityRefiner:
        from chexseg_dist.models.affinity import load_affinity

        loaded = load_affinity(cfg.affinity_checkpoint)
        fractions = np.full(10, cfg.fg_fraction, dtype=np.float32)
        tuned_fractions = tuned.meta.get("fg_fractions") if tuned is not None else None
        if tuned_fractions:  # tune-thresholds with masks.refiner=affinity chose them on expert-train
            from chexseg_dist.core.pathologies import TASKS

            fractions = np.asarray([tuned_fractions[t] for t in TASKS], dtype=np.float32)
        return cls(loaded, cfg.rw_radius, cfg.rw_beta, cfg.rw_exp, fractions)

    def check_frame(self, size: int) -> None:
        if size != self.loaded.frame:
            from chexseg_dist.errors import InputError

            raise InputError(
                f"affinity checkpoint {self.loaded.path} was trained on {self.loaded.frame} px frames, these masks are "
                f"made in {size} px frames: train one at this size (chexseg train-affinity with "
                f"segmentation.image_size={size})"
            )

    def boundary(self, image: np.ndarray) -> np.ndarray:
        """``[h, w]`` 0..255 -> ``[ceil(h/4), ceil(w/4)]`` boundary probabilities."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
            return self.loaded.model(x)[0].numpy()

    def walk(self, image: np.ndarray, norm_maps: np.ndarray) -> np.ndarray:
        """:func:`walk_maps` of one image's content box over this network's boundaries."""
        from chexseg_dist.models.affinity import STRIDE

        b = self.boundary(image)
        return walk_maps(norm_maps, b, norm_maps.shape[1:], STRIDE, self.radius, self.beta, self.exp_times)

    def refine(self, image: np.ndarray, masks: np.ndarray, norm_maps: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        if len(tasks) == 0:
            return np.zeros(masks.shape, dtype=bool)
        walked = self.walk(image, norm_maps)
        return walked > self.fg_fraction[tasks][:, None, None]


def create_refiner(cfg: MasksConfig, tuned: TunedThresholds | None = None) -> Refiner:
    """The refiner a ``masks`` config names (``tuned``: a thresholds file that may hold tuned fg fractions).

    Raises:
        ConfigError: an unknown refiner.
    """
    cls = REFINERS.get(cfg.refiner, "masks.refiner")
    if cls is CrfRefiner:
        return CrfRefiner(crf_params(cfg))
    if cls is NoRefiner:
        return NoRefiner()
    return cls.from_config(cfg, tuned)  # type: ignore[attr-defined]  # plug-ins


def crf_params(cfg: MasksConfig) -> CrfParams:
    """The CRF's parameters from the ``masks`` config section: field ``x`` is ``masks.crf_x``."""
    return CrfParams(**{f.name: getattr(cfg, f"crf_{f.name}") for f in dataclasses.fields(CrfParams)})
