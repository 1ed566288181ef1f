"""Ceilings of the pseudo-labelling pipeline's stages, each measured alone, to say where its bottleneck is.

- ``decode``: :func:`chexseg_dist.pseudolabel.decode_frames` (read + decode + letterbox) on the manifest's images,
  in 1 process and in ``--decode-procs`` processes at once: images/s per core and for the machine.
- ``model``: what one classifier actor does per batch: uint8 frames -> device, probabilities and all-class
  Grad-CAM (:func:`predict_with_cams`), maps back to the host, store encoding. Timed after warm-up, per batch size,
  with the device synchronised; the plain forward pass on the same batch is given for reference.

The pipeline cannot run faster than the slower of (decode rate on the CPUs left for decoding) and (model rate x
actors). ``bench_pipeline.py`` measures the pipeline itself; this script says which stage limits it.

Usage::

    python benchmarks/bench_stages.py --manifest M.parquet --checkpoint CKPT --device cuda --batches 32,64,128 \\
        --decode-procs 14 --json stages.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _decode_block(args: tuple[list[str], int]) -> int:
    import numpy as np

    from chexseg_dist.data.frames import decode_frames

    paths, size = args
    n = len(paths)
    out = decode_frames(
        {
            "slot": np.arange(n),
            "row": np.arange(n),
            "image_id": np.asarray(paths, dtype=str),
            "path": np.asarray(paths, dtype=str),
        },
        size,
    )
    return int((out["stage"] == "").sum())


def bench_decode(paths: list[str], size: int, procs: int, block: int) -> dict[str, Any]:
    """Images/s of decode_frames in 1 process and in ``procs`` processes (blocks of ``block`` images)."""
    blocks = [(paths[i : i + block], size) for i in range(0, len(paths), block)]
    _decode_block(blocks[0])  # imports, page cache
    t0 = time.perf_counter()
    ok = sum(_decode_block(b) for b in blocks)
    one = len(paths) / (time.perf_counter() - t0)
    out: dict[str, Any] = {"images": len(paths), "ok": ok, "per_process_img_s": one}
    if procs > 1:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            pool.map(_decode_block, (blocks * procs)[:procs], chunksize=1)  # start and warm every process
            reps = max(1, -(-4 * procs // len(blocks)))  # at least 4 blocks per process
            t0 = time.perf_counter()
            pool.map(_decode_block, blocks * reps, chunksize=1)
            out["procs"] = procs
            out["all_procs_img_s"] = reps * len(paths) / (time.perf_counter() - t0)
    return out


def bench_model(
    checkpoint: str, device: str, batches: list[int], seconds: float, threads: int, precisions: list[str]
) -> list[dict[str, Any]]:
    """Images/s of one actor's batch work (the actor's own code: transfer, all-class Grad-CAM, maps back, store
    encoding) at each precision (``pseudolabel.precision``), and of a plain fp32 forward."""
    import numpy as np
    import torch

    from chexseg_dist.models.checkpoint import LoadedClassifier
    from chexseg_dist.pseudolabel.inputs import probe_grid_shape
    from chexseg_dist.pseudolabel.predictor import ClassifierPredictor
    from chexseg_dist.saliency.classifier import load_classifier
    from chexseg_dist.store.codec import encode_cams

    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    loaded = load_classifier(checkpoint, device)
    if not isinstance(loaded, LoadedClassifier):
        raise SystemExit("bench_stages: give one checkpoint, not an ensemble")
    size = loaded.image_size
    model = loaded.model
    grid = probe_grid_shape([checkpoint])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for b in batches:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (b, 1, size, size), dtype=np.uint8))
        if device.startswith("cuda"):
            frames = frames.pin_memory()

        def actor_step(precision: str, b: int = b) -> Callable[[torch.Tensor], None]:
            actor = ClassifierPredictor([checkpoint], grid, device.startswith("cuda"), threads, b, precision)
            slots = np.arange(b)

            def step(batch: torch.Tensor) -> None:
                p_np, c_np = actor._predict(batch[:, 0].numpy(), slots)
                encode_cams(c_np)
                assert np.isfinite(p_np).all()

            return step

        def forward(frames: torch.Tensor) -> None:
            with torch.no_grad():
                model(frames.to(device, non_blocking=True).float().div_(255.0)).float().cpu()

        row: dict[str, Any] = {"batch": b}
        steps = [(f"actor_step_{p}", actor_step(p)) for p in precisions]
        for name, fn in (*steps, ("forward", forward)):
            for _ in range(3):
                fn(frames)
            sync()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn(frames)
                n += 1
            sync()
            row[f"{name}_img_s"] = n * b / (time.perf_counter() - t0)
        if device.startswith("cuda"):
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        rates = ", ".join(f"actor step {p} {row[f'actor_step_{p}_img_s']:.0f} img/s" for p in precisions)
        print(f"model batch {b}: {rates}, forward fp32 {row['forward_img_s']:.0f} img/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="Parquet manifest whose images are decoded")
    parser.add_argument("--checkpoint", required=True, help="classifier checkpoint (its image_size is the frame)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="16,64", help="model batch sizes")
    parser.add_argument("--precisions", default="fp32", help="pseudolabel.precision values to time, e.g. fp32,bf16")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per model measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (CPU model)")
    parser.add_argument("--decode-images", type=int, default=512, help="images decoded per pass")
    parser.add_argument("--decode-procs", type=int, default=os.cpu_count() or 1, help="parallel decode processes")
    parser.add_argument("--decode-block", type=int, default=64, help="images per decode call")
    parser.add_argument("--no-model", action="store_true", help="measure decoding only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from chexseg_dist.data.manifest import read_manifest
    from chexseg_dist.models.checkpoint import read_meta

    size = int(read_meta(args.checkpoint)["image_size"])
    paths = read_manifest(args.manifest, ["path"]).column("path").to_pylist()[: args.decode_images]
    result: dict[str, Any] = {"cpus": os.cpu_count(), "device": args.device}
    if args.device.startswith("cuda"):
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    result["decode"] = bench_decode(paths, size, args.decode_procs, args.decode_block)
    d = result["decode"]
    print(
        f"decode ({size} px frames): {d['per_process_img_s']:.0f} img/s in 1 process"
        + (f", {d['all_procs_img_s']:.0f} img/s in {d['procs']}" if "procs" in d else ""),
        flush=True,
    )
    if not args.no_model:
        batches = [int(b) for b in args.batches.split(",")]
        precisions = args.precisions.split(",")
        result["model"] = bench_model(args.checkpoint, args.device, batches, args.seconds, args.threads, precisions)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
