"""The model stage of pseudo-labelling: a fixed pool of classifier actors turning frames into store rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chexseg_dist.core.pathologies import N_OBSERVATIONS, N_TASKS
from chexseg_dist.core.serialize import now_utc
from chexseg_dist.errors import StoreError
from chexseg_dist.store.codec import encode_cams, select_tasks


class ClassifierPredictor:
    """Ray Data stage (fixed actor pool): classifier probabilities and all-task Grad-CAM maps, store-encoded.

    Args:
        checkpoints: checkpoint directories (one, or an ensemble).
        grid_shape: ``(gh, gw)`` the store expects; a different model grid is an error.
        use_gpu: run on ``cuda`` (the actor was given a GPU) instead of the CPU.
        threads: torch intra-op threads (the CPUs the actor reserved).
    """

    def __init__(self, checkpoints: Sequence[str], grid_shape: tuple[int, int], use_gpu: bool, threads: int) -> None:
        import torch

        from chexseg_dist.saliency.classifier import load_classifier

        torch.set_num_threads(max(1, threads))
        if use_gpu:
            torch.backends.cudnn.benchmark = True  # fixed frame size: let cuDNN pick the fastest kernels once
        self.device = "cuda" if use_gpu else "cpu"
        self.loaded = load_classifier(list(checkpoints), self.device)
        self.grid_shape = tuple(grid_shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``decode_frames`` output -> store-encoded rows (``frame`` dropped; failures pass through, marked)."""
        import torch

        from chexseg_dist.saliency.classifier import predict_with_cams

        n = len(batch["slot"])
        gh, gw = self.grid_shape
        stage = np.asarray(batch["stage"], dtype=object)
        error = np.asarray(batch["error"], dtype=object)
        when = np.asarray(batch["time"], dtype=object)
        ok = np.asarray([s == "" for s in stage], dtype=bool)
        probs = np.full((n, N_OBSERVATIONS), np.nan, dtype=np.float32)
        cams = np.zeros((n, N_TASKS, gh, gw), dtype=np.float16)
        cam_max = np.full((n, N_TASKS), np.nan, dtype=np.float32)
        if ok.any():
            frames = torch.from_numpy(np.ascontiguousarray(batch["frame"][ok])).unsqueeze(1).to(self.device)
            p, c = predict_with_cams(self.loaded, frames.float().div_(255.0))
            p_np = p.detach().float().cpu().numpy()
            c_np = select_tasks(c.detach().float().cpu().numpy())
            if c_np.shape[-2:] != (gh, gw):
                raise StoreError(f"the classifier's maps are {c_np.shape[-2:]} but the store expects {(gh, gw)}")
            finite = np.isfinite(p_np).all(axis=1) & np.isfinite(c_np).all(axis=(1, 2, 3))
            c16, cmax = encode_cams(c_np)
            idx = np.flatnonzero(ok)
            probs[idx] = p_np
            cams[idx] = c16
            cam_max[idx] = cmax
            for j in idx[~finite]:
                stage[j], error[j], when[j] = "model", "non-finite classifier output (NaN or inf)", now_utc()
                probs[j], cams[j], cam_max[j] = np.nan, 0, np.nan
            ok[idx[~finite]] = False
        boxes = np.asarray(batch["letterbox"], dtype=np.int32)
        return {
            "slot": np.asarray(batch["slot"], dtype=np.int64),
            "row": np.asarray(batch["row"], dtype=np.int64),
            "image_id": np.asarray(batch["image_id"], dtype=str),
            "path": np.asarray(batch["path"], dtype=str),
            "probs": probs,
            "cams": cams,
            "cam_max": cam_max,
            "letterbox": boxes,
            "failed": (~ok).astype(np.uint8),
            "stage": np.asarray(stage, dtype=str),
            "error": np.asarray(error, dtype=str),
            "time": np.asarray(when, dtype=str),
        }
