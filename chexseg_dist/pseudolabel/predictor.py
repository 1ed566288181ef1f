"""The model stage of pseudo-labelling: a fixed pool of classifier actors turning frames into store rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
        batch_size: run the model on exactly this many frames at a time, padding a partial batch with blank frames
            (0: as they come). Kernels can pick another algorithm for another batch shape (on CPU a batch of one
            differs from a batch of eight in the last bits), and how Ray Data cuts batches depends on arrival
            order, which differs between runs, object stores and local disks: a fixed shape makes every image's
            maps the same bits however its batch was cut.
        precision: ``fp32``, or ``bf16``: the forward and Grad-CAM's backward under bf16 autocast (on a GPU with
            channels-last weights and frames); maps and probabilities leave the actor as float32 either way.
    """

    def __init__(
        self,
        checkpoints: Sequence[str],
        grid_shape: tuple[int, int],
        use_gpu: bool,
        threads: int,
        batch_size: int = 0,
        precision: str = "fp32",
    ) -> None:
        import torch

        from chexseg_dist.saliency.classifier import LoadedEnsemble, load_classifier

        torch.set_num_threads(max(1, threads))
        if use_gpu:
            torch.backends.cudnn.benchmark = True  # fixed frame size: let cuDNN pick the fastest kernels once
        self.device = "cuda" if use_gpu else "cpu"
        self.loaded = load_classifier(list(checkpoints), self.device)
        self.grid_shape = tuple(grid_shape)
        self.batch_size = int(batch_size)
        self.precision = precision
        self.channels_last = precision == "bf16" and use_gpu
        if self.channels_last:
            members = self.loaded.members if isinstance(self.loaded, LoadedEnsemble) else [self.loaded]
            for member in members:
                member.model.to(memory_format=torch.channels_last)

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16)

    def _predict(self, frames: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 frames ``[n, S, S]`` -> probabilities ``[n, K]`` and task maps, each image at a fixed place.

        With ``batch_size`` B, the model always sees B frames and image ``slot`` sits at position ``slot % B``
        (blank frames elsewhere; a second pass when two rows want one position, which consecutive slots never do):
        a CPU GEMM can round a row differently by its position in the batch, so this makes an image's outputs the
        same bits whichever rows Ray Data put in its batch.
        """
        import torch

        from chexseg_dist.saliency.classifier import predict_with_cams

        n = len(frames)
        step = self.batch_size or n
        position = slots % step if self.batch_size else np.arange(n)
        seen: dict[int, int] = {}
        passes = np.empty(n, dtype=np.int64)
        for i, q in enumerate(position.tolist()):
            passes[i] = seen.get(q, 0)
            seen[q] = passes[i] + 1
        probs: np.ndarray | None = None
        cams: np.ndarray | None = None
        for k in range(int(passes.max()) + 1 if n else 0):
            rows = np.flatnonzero(passes == k)
            x = np.zeros((step, *frames.shape[1:]), frames.dtype)
            x[position[rows]] = frames[rows]
            frames_t = torch.from_numpy(x).unsqueeze(1).to(self.device).float().div_(255.0)
            if self.channels_last:
                frames_t = frames_t.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                p, c = predict_with_cams(self.loaded, frames_t)
            p_np = p.detach().float().cpu().numpy()[position[rows]]
            c_np = select_tasks(c.detach().float().cpu().numpy()[position[rows]])
            if probs is None or cams is None:
                probs = np.empty((n, *p_np.shape[1:]), np.float32)
                cams = np.empty((n, *c_np.shape[1:]), np.float32)
            probs[rows], cams[rows] = p_np, c_np
        assert probs is not None and cams is not None
        return probs, cams

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``decode_frames`` output -> store-encoded rows (``frame`` dropped; failures pass through, marked)."""

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
            slots = np.asarray(batch["slot"], dtype=np.int64)
            p_np, c_np = self._predict(np.ascontiguousarray(batch["frame"][ok]), slots[ok])
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
