"""The store's encoding of one row: probabilities, maps scaled to float16 by their per-map max, geometry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chexseg_dist.core.pathologies import N_OBSERVATIONS, N_TASKS, TASK_OBSERVATION_INDEX


@dataclass
class EncodedRows:
    """Rows in the store's encoding, ready for :meth:`MapStore.write_chunk` (also the staging fragment payload).

    Attributes:
        slots: ``[n]`` int64 slot indices (positions along the image axis).
        probs: ``[n, 14]`` float32 probabilities (NaN for failed rows).
        cams: ``[n, 10, gh, gw]`` float16 maps divided by ``cam_max`` (0 for failed rows).
        cam_max: ``[n, 10]`` float32 per-map max of the raw maps (NaN for failed rows).
        orig_size: ``[n, 2]`` int32 original (height, width) (0 when unknown).
        letterbox: ``[n, 7]`` int32 :meth:`Letterbox.params` (0 when unknown).
        failed: ``[n]`` uint8, 1 for rows whose processing failed.
    """

    slots: np.ndarray
    probs: np.ndarray
    cams: np.ndarray
    cam_max: np.ndarray
    orig_size: np.ndarray
    letterbox: np.ndarray
    failed: np.ndarray

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    def take(self, index: np.ndarray) -> EncodedRows:
        """The rows at positions ``index`` (an int array or boolean mask)."""
        return EncodedRows(**{name: getattr(self, name)[index] for name in _ENCODED_FIELDS})

    @staticmethod
    def concat(parts: Sequence[EncodedRows]) -> EncodedRows:
        """Concatenate along the row axis (at least one part)."""
        return EncodedRows(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in _ENCODED_FIELDS})

    @staticmethod
    def failures(slots: np.ndarray, grid_shape: tuple[int, int]) -> EncodedRows:
        """Rows that record a failure: no maps, NaN probabilities, ``failed = 1``."""
        n = len(slots)
        gh, gw = grid_shape
        return EncodedRows(
            slots=np.asarray(slots, dtype=np.int64),
            probs=np.full((n, N_OBSERVATIONS), np.nan, dtype=np.float32),
            cams=np.zeros((n, N_TASKS, gh, gw), dtype=np.float16),
            cam_max=np.full((n, N_TASKS), np.nan, dtype=np.float32),
            orig_size=np.zeros((n, 2), dtype=np.int32),
            letterbox=np.zeros((n, 7), dtype=np.int32),
            failed=np.ones(n, dtype=np.uint8),
        )


_ENCODED_FIELDS: tuple[str, ...] = ("slots", "probs", "cams", "cam_max", "orig_size", "letterbox", "failed")


def select_tasks(cams: np.ndarray) -> np.ndarray:
    """Maps of the 10 TASKS from maps of the 14 OBSERVATIONS (``[n, 14, h, w] -> [n, 10, h, w]``); 10 pass through."""
    if cams.ndim != 4 or cams.shape[1] not in (N_OBSERVATIONS, N_TASKS):
        raise ValueError(f"cams must be [n, {N_OBSERVATIONS} or {N_TASKS}, gh, gw], got shape {cams.shape}")
    if cams.shape[1] == N_OBSERVATIONS:
        return cams[:, list(TASK_OBSERVATION_INDEX)]
    return cams


def encode_cams(cams_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw maps -> (float16 maps divided by their per-map max, float32 per-map max).

    Args:
        cams_raw: ``[n, K, gh, gw]`` float maps (Grad-CAM maps are ``>= 0``; negative values are kept, scaled by
            the per-map max of the absolute value).

    Returns:
        ``(cams [n, K, gh, gw] float16 in [-1, 1], cam_max [n, K] float32 >= 0)``; an all-zero map has max 0 and
        is stored as zeros. Non-finite inputs give non-finite outputs (the pipeline rejects them before).
    """
    raw = np.asarray(cams_raw, dtype=np.float32)
    cam_max = np.abs(raw).max(axis=(2, 3)) if raw.size else np.zeros(raw.shape[:2], dtype=np.float32)
    scale = np.where(cam_max > 0, cam_max, 1.0).astype(np.float32)
    cams = (raw / scale[:, :, None, None]).astype(np.float16)
    return cams, cam_max.astype(np.float32)


def decode_cams(cams: np.ndarray, cam_max: np.ndarray) -> np.ndarray:
    """Stored maps -> raw maps: ``cams * cam_max`` as float32 ``[n, K, gh, gw]``."""
    return np.asarray(cams, dtype=np.float32) * np.asarray(cam_max, dtype=np.float32)[:, :, None, None]


def encode_rows(
    slots: np.ndarray,
    probs: np.ndarray,
    cams_raw: np.ndarray,
    orig_size: np.ndarray,
    letterbox: np.ndarray,
) -> EncodedRows:
    """Successful rows in the store's encoding (see :func:`encode_cams`; 14-observation maps are reduced to TASKS)."""
    cams16, cam_max = encode_cams(select_tasks(np.asarray(cams_raw)))
    n = len(slots)
    return EncodedRows(
        slots=np.asarray(slots, dtype=np.int64).reshape(n),
        probs=np.asarray(probs, dtype=np.float32).reshape(n, N_OBSERVATIONS),
        cams=cams16,
        cam_max=cam_max,
        orig_size=np.asarray(orig_size, dtype=np.int32).reshape(n, 2),
        letterbox=np.asarray(letterbox, dtype=np.int32).reshape(n, 7),
        failed=np.zeros(n, dtype=np.uint8),
    )
