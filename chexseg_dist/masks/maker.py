"""Maps -> masks in one object: a binariser plus probability cutoffs and label gating, in any frame."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chexseg_dist.config import MasksConfig
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS
from chexseg_dist.errors import ConfigError
from chexseg_dist.masks.binarize import Binarizer, create_binarizer
from chexseg_dist.masks.gating import gate, task_values
from chexseg_dist.masks.maps import content_window, frame_shape, normalise_maps, upsample_maps
from chexseg_dist.masks.refine import NoRefiner, Refiner, create_refiner
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
        refiner: refinement against the radiograph after binarisation and gating (:mod:`chexseg_dist.masks.refine`);
            it runs in the model frame's content box and needs the image's frame (``masks(..., image=frame)``).
    """

    binarizer: Binarizer
    cutoffs: np.ndarray | None = None
    label_gating: bool = False
    max_pixels: int = 20_000_000
    refiner: Refiner = field(default_factory=NoRefiner)

    @property
    def refines(self) -> bool:
        """True when masks need the image (a refiner other than ``none``)."""
        return not isinstance(self.refiner, NoRefiner)

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
        refiner = create_refiner(cfg, tuned)
        return cls(binarizer=binarizer, cutoffs=cutoffs, label_gating=cfg.label_gating, refiner=refiner)

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
        image: np.ndarray | None = None,
    ) -> np.ndarray:
        """The 10 masks of one image.

        Args:
            cams: ``[10, gh, gw]`` float raw Grad-CAM grids in TASKS order (as read from the map store).
            box: the image's letterbox.
            probs: ``[14]`` classifier probabilities in OBSERVATIONS order (needed with cutoffs).
            labels: ``[14]`` image-level labels in OBSERVATIONS order, NaN for blank (needed with label gating).
            frame: ``"original"`` (``[10, height, width]``) or ``"model"`` (``[10, S, S]``, padding always 0).
            image: ``[S, S]`` the image's model frame (0..255; :meth:`Letterbox.image_to_frame`), needed by a refiner.
                Refinement runs in the frame's content box; original-frame masks are its result mapped back
                (nearest), so they are made at the model frame's resolution.

        Returns:
            ``[10, h, w]`` bool masks.
        """
        cams = np.asarray(cams, dtype=np.float32)
        if cams.ndim != 3 or cams.shape[0] != N_TASKS:
            raise ValueError(f"expected [{N_TASKS}, gh, gw] maps in TASKS order, got shape {cams.shape}")
        if self.refines:
            return self._refined(cams, box, probs, labels, frame, image)
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

    def _refined(
        self,
        cams: np.ndarray,
        box: Letterbox,
        probs: np.ndarray | None,
        labels: np.ndarray | None,
        frame: str,
        image: np.ndarray | None,
    ) -> np.ndarray:
        if image is None:
            raise ValueError(
                f"masks.refiner={self.refiner.name} refines against the radiograph: pass its frame (image=)"
            )
        image = np.asarray(image)
        if image.shape != (box.size, box.size):
            raise ValueError(f"the image's frame is {image.shape}, its letterbox is {box.size} x {box.size}")
        s = box.size
        self.refiner.check_frame(s)
        rows, cols = content_window(box, "model")
        model = np.zeros((N_TASKS, s, s), dtype=bool)
        todo = np.flatnonzero(self.keep(probs, labels))
        if todo.size:
            norm = normalise_maps(upsample_maps(cams[todo], box, "model")[:, rows, cols])
            binar = self.binarizer.binarise(norm, todo)
            content = image[rows, cols].astype(np.float32)
            model[todo, rows, cols] = self.refiner.refine(content, binar, norm, todo)
        if frame == "model":
            return model
        h, w = frame_shape(box, frame)
        out = np.zeros((N_TASKS, h, w), dtype=bool)
        if todo.size:
            out[todo] = box.frame_to_original(model[todo], mode="nearest")
        return out
