"""The model stage of ``chexseg segment``: a fixed pool of student actors turning frames into probabilities."""

from __future__ import annotations

import numpy as np

from chexseg_dist.core.pathologies import N_TASKS


class SegmentationPredictor:
    """Ray Data stage (fixed actor pool): the student's sigmoid outputs in its frame, as float16.

    Args:
        checkpoint: a segmentation checkpoint directory (``chexseg train-segmentation``).
        use_gpu: run on ``cuda`` (the actor was given a GPU) instead of the CPU.
        threads: torch intra-op threads (the CPUs the actor reserved).
        amp: bf16 autocast on a GPU.
    """

    def __init__(self, checkpoint: str, use_gpu: bool, threads: int, amp: bool = True) -> None:
        import torch

        from chexseg_dist.models.segmentation import load_segmentation

        torch.set_num_threads(max(1, threads))
        if use_gpu:
            torch.backends.cudnn.benchmark = True  # fixed frame size
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.loaded = load_segmentation(checkpoint, self.device)
        self.amp = amp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``decode_frames`` output -> ``probs`` ``[n, 10, S, S]`` float16 (``frame`` dropped; failures pass
        through with zero probabilities and their ``stage`` / ``error``)."""
        from chexseg_dist.models.segmentation import predict_probs

        frames = np.asarray(batch["frame"])
        n, size = frames.shape[0], frames.shape[-1]
        ok = np.asarray([s == "" for s in batch["stage"]], dtype=bool)
        probs = np.zeros((n, N_TASKS, size, size), dtype=np.float16)
        if ok.any():
            p = predict_probs(self.loaded.model, frames[ok], max(1, int(ok.sum())), self.device, self.amp)
            probs[ok] = p.astype(np.float16)
        out = {k: np.asarray(v) for k, v in batch.items() if k != "frame"}
        out["probs"] = probs
        return out
