"""Maps -> masks in one object: a binariser plus probability cutoffs and label gating, in any frame."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chexseg_dist.config import MasksConfig
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS
from chexseg_dist.errors import ConfigError
from chexseg_dist.masks.binarize import Binarizer, create_binarizer
from chexseg_dist.masks.gating import gate, task_values
from chexseg_dist.masks.maps import content_window, frame_shape, normalise_maps, upsample_maps
from chexseg_dist.masks.thresholds import TunedThresholds


# ---------------------------------------------------------------------------------------------------- the pipeline
@dataclass
class MaskMaker:
    """Maps -> masks: a binarisation strategy plus optional probability cutoffs and label gating.

    Attributes:
        binarizer: the strategy (:func:`create_binarizer`).
        cutoffs: ``[10]`` probability cutoffs, or None for no probability gate.
        label_gating: empty masks where the image-level label is not positive.
        max_pixels: pathologies are processed in groups of at most this many pixels (bounds memory: ten
            2800 x 2300 float32 maps are 260 MB).
    """

    binarizer: Binarizer
    cutoffs: np.ndarray | None = None
    label_gating: bool = False
    max_pixels: int = 20_000_000

    @classmethod
    def from_config(cls, cfg: MasksConfig, thresholds_path: str | None = None) -> MaskMaker:
        """Build from the ``masks`` config section (``thresholds_path`` overrides ``cfg.thresholds``).

        Raises:
            ConfigError: ``tuned`` or ``prob_cutoff`` without a thresholds file.
        """
        path = thresholds_path or cfg.thresholds
        tuned = TunedThresholds.load(path) if path else None
        if (cfg.strategy == "tuned" or cfg.prob_cutoff) and tuned is None:
            what = "strategy=tuned" if cfg.strategy == "tuned" else "prob_cutoff"
            raise ConfigError(
                f"masks.{what} needs a thresholds file: pass --thresholds T.json (chexseg tune-thresholds)"
            )
        binarizer = create_binarizer(cfg.strategy, tuned.thresholds if tuned is not None else None)
        cutoffs = tuned.cutoffs if (cfg.prob_cutoff and tuned is not None) else None
        return cls(binarizer=binarizer, cutoffs=cutoffs, label_gating=cfg.label_gating)

    def keep(self, probs: np.ndarray | None, labels: np.ndarray | None) -> np.ndarray:
        """``[10]`` bool: pathologies whose mask passes the gates (``probs``/``labels`` in OBSERVATIONS order)."""
        return gate(
            task_values(probs) if probs is not None else None,
            self.cutoffs,
            task_values(labels) if labels is not None else None,
            self.label_gating,
        )

    def masks(
        self,
        cams: np.ndarray,
        box: Letterbox,
        probs: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        frame: str = "original",
    ) -> np.ndarray:
        """The 10 masks of one image.

        Args:
            cams: ``[10, gh, gw]`` float raw Grad-CAM grids in TASKS order (as read from the map store).
            box: the image's letterbox.
            probs: ``[14]`` classifier probabilities in OBSERVATIONS order (needed with cutoffs).
            labels: ``[14]`` image-level labels in OBSERVATIONS order, NaN for blank (needed with label gating).
            frame: ``"original"`` (``[10, height, width]``) or ``"model"`` (``[10, S, S]``, padding always 0).

        Returns:
            ``[10, h, w]`` bool masks.
        """
        cams = np.asarray(cams, dtype=np.float32)
        if cams.ndim != 3 or cams.shape[0] != N_TASKS:
            raise ValueError(f"expected [{N_TASKS}, gh, gw] maps in TASKS order, got shape {cams.shape}")
        h, w = frame_shape(box, frame)
        rows, cols = content_window(box, frame)
        out = np.zeros((N_TASKS, h, w), dtype=bool)
        todo = np.flatnonzero(self.keep(probs, labels))
        per_group = max(1, self.max_pixels // max(1, h * w))
        for start in range(0, len(todo), per_group):
            tasks = todo[start : start + per_group]
            up = upsample_maps(cams[tasks], box, frame)
            if frame == "model":
                up = up[:, rows, cols]
            out[tasks, rows, cols] = self.binarizer.binarise(normalise_maps(up), tasks)
        return out
