"""Benchmark the segmentation student's input pipeline: Ray Data ingestion against in-memory tensors, and peak
memory as the pseudo-labelled set grows.

Side by side, with the same model (the preset's student), loss, optimizer, batch size, torch threads and steps:

- ``ray``: :func:`chexseg_dist.train.segmentation.train_segmentation` in ``semi`` mode on a local Ray with 2 CPUs:
  the expert set decoded once into the worker's pool, the pseudo-labelled set read from a map store chunk by chunk,
  decoded and letterboxed with its pseudo-masks derived on the fly by ``MaskMaker`` in the CPU decode stage, then
  mixed per batch at the exact ratio.
- ``memory``: a plain loop over frames and masks already in memory as tensors (nothing read or decoded while
  timed): the cost of the model alone.

Throughput is the steady state: training images per second of training time over the epochs after the first (the
first carries Ray Train's start-up and the pipeline's warm-up). The ingestion overhead is ``1 - ray / memory``.
Memory: ``ray`` at N and at 10 N pseudo-labelled rows (the manifest lists the N phantom radiographs 10 times under
distinct ids, the store holds random maps of every row: the maps' content costs nothing extra). Each run is its
own subprocess; a sampler records every 0.25 s the RSS of the driver process and of each Ray worker process
(the largest one is reported), and the PSS of the whole tree.

Usage::

    python benchmarks/bench_segmentation.py --n 300 --json bench_segmentation.json

Prints a table (and writes JSON with --json). Nothing here is used by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: The classifier frame and map grid of the tiny preset (what a real store of the tiny classifier holds).
CLASSIFIER_FRAME, GRID = 128, (8, 8)


# ---------------------------------------------------------------------------------------------------- data


def prepare(work: Path, n: int, repeat: int, n_expert: int, workers: int = 2) -> dict[str, str]:
    """Phantom radiographs (cached), the expert set (valid split with exact masks), pseudo manifests and stores."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from PIL import Image

    from chexseg_dist.config.sections import SynthConfig
    from chexseg_dist.core.geometry import Letterbox
    from chexseg_dist.core.pathologies import N_OBSERVATIONS, N_TASKS
    from chexseg_dist.data.manifest import read_manifest, write_manifest
    from chexseg_dist.data.sources import manifest_from_csv
    from chexseg_dist.store.mapstore import MapStore
    from chexseg_dist.synth import generate

    data = work / f"phantom_{n}_{n_expert}"
    if not (data / "valid.csv").exists():
        t0 = time.time()
        generate(str(data), SynthConfig(n_train=n, n_valid=n_expert, n_test=0, lateral_fraction=0.0, workers=workers))
        print(f"generated {n} + {n_expert} phantom radiographs in {time.time() - t0:.0f} s", flush=True)
    out = {
        "expert_manifest": str(work / "expert.parquet"),
        "expert_annotations": str(data / "gt_segmentations_valid.json"),
    }
    if not os.path.exists(out["expert_manifest"]):
        write_manifest(manifest_from_csv(str(data / "valid.csv")), out["expert_manifest"])
    base = manifest_from_csv(str(data / "train.csv"))
    for k in (1, repeat):
        manifest, store = str(work / f"pseudo_x{k}.parquet"), str(work / f"pseudo_x{k}.zarr")
        out[f"manifest_x{k}"], out[f"store_x{k}"] = manifest, store
        if os.path.exists(os.path.join(store, "zarr.json")):
            continue
        copies = []
        for r in range(k):
            ids = pa.array([f"{i}~r{r}" for i in base.column("image_id").to_pylist()])
            copy = base.set_column(base.column_names.index("image_id"), "image_id", ids)
            copy = copy.set_column(copy.column_names.index("row"), "row", pc.add(base.column("row"), r * 10**7))
            copies.append(copy.cast(base.schema))
        write_manifest(pa.concat_tables(copies), manifest)
        table = read_manifest(manifest)
        sizes: dict[str, tuple[int, int]] = {}
        for path in table.column("path").to_pylist():
            if path not in sizes:
                with Image.open(path) as img:
                    sizes[path] = (img.size[1], img.size[0])
        hw = np.asarray([sizes[p] for p in table.column("path").to_pylist()])
        ms = MapStore.create(store, table.column("image_id").to_pylist(), np.asarray(table.column("row")), GRID)
        rng = np.random.default_rng(k)
        for start in range(0, table.num_rows, 1024):
            slots = np.arange(start, min(start + 1024, table.num_rows))
            ms.write_rows(
                slots,
                rng.uniform(size=(len(slots), N_OBSERVATIONS)).astype(np.float32),
                rng.uniform(size=(len(slots), N_TASKS, *GRID)).astype(np.float32),
                hw[slots],
                np.asarray([Letterbox(int(hw[i, 0]), int(hw[i, 1]), CLASSIFIER_FRAME).params() for i in slots]),
            )
        print(f"wrote a map store of {table.num_rows} rows: {store}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- workers


def worker_ray(args: argparse.Namespace) -> dict[str, Any]:
    from chexseg_dist.config import load_config
    from chexseg_dist.core.ray_env import ray_session
    from chexseg_dist.train.segmentation import StudentInputs, train_segmentation

    cfg = load_config(args.preset, overrides=args.set)
    inputs = StudentInputs(
        expert_manifest=args.expert_manifest,
        expert_annotations=args.expert_annotations,
        pseudo_store=args.store,
        pseudo_manifest=args.manifest,
    )
    t0 = time.time()
    with ray_session():
        res = train_segmentation(cfg, inputs, args.out, verbose=False)
    steady = res.history[1:] or res.history
    images = sum(m["train_images"] for m in steady)
    seconds = sum(m["train_time_s"] for m in steady)
    return {
        "mode": "ray",
        "images_per_s": images / seconds,
        "steady_images": images,
        "first_epoch_images_per_s": res.history[0]["train_images_per_s"],
        "expert_share": res.history[-1]["expert_share"],
        "wall_s": time.time() - t0,
    }


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from chexseg_dist.config import load_config
    from chexseg_dist.core.pathologies import N_TASKS
    from chexseg_dist.core.registry import SEGMENTATION_LOSSES
    from chexseg_dist.models.segmentation import create_segmentation
    from chexseg_dist.train import losses  # noqa: F401  (registers the losses)

    cfg = load_config(args.preset, overrides=args.set)
    m, ts = cfg.segmentation, cfg.train_segmentation
    torch.set_num_threads(ts.torch_threads)
    torch.manual_seed(ts.seed)
    model = create_segmentation(m.arch, m.encoder)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=ts.lr)
    loss_fn = SEGMENTATION_LOSSES.get(ts.loss, "train_segmentation.loss")
    s, b = m.image_size, ts.batch_size
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (64, 1, s, s), dtype=torch.uint8, generator=gen)
    masks = (torch.rand((64, N_TASKS, s, s), generator=gen) < 0.2).float()
    weights = torch.ones((b, N_TASKS))
    rates = []
    for _epoch in range(ts.epochs):
        t0 = time.perf_counter()
        for step in range(ts.steps_per_epoch):
            i = (step * b) % (64 - b + 1)
            x = frames[i : i + b].float().div_(255.0)
            loss = loss_fn(model(x), masks[i : i + b], weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append((ts.steps_per_epoch * b, time.perf_counter() - t0))
    steady = rates[1:] or rates
    return {
        "mode": "memory",
        "images_per_s": sum(n for n, _ in steady) / sum(t for _, t in steady),
        "steady_images": sum(n for n, _ in steady),
        "first_epoch_images_per_s": rates[0][0] / rates[0][1],
    }


# ---------------------------------------------------------------------------------------------------- driver


def _psutil() -> Any:
    import importlib

    import ray  # noqa: F401  (importing Ray puts its vendored psutil on sys.path)

    return importlib.import_module("psutil")


def measure(argv: list[str]) -> dict[str, Any]:
    """Run one worker subprocess, sampling memory; returns its JSON result plus the peaks (MB)."""
    psutil = _psutil()
    proc = subprocess.Popen([sys.executable, __file__, "_worker", *argv], stdout=subprocess.PIPE, text=True)
    peaks = {"driver_rss": 0, "worker_rss": 0, "tree_pss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                children = root.children(recursive=True)
                rss_root, pss = root.memory_info().rss, 0
                workers = []
                for p in [root, *children]:
                    info = p.memory_full_info()
                    pss += int(getattr(info, "pss", info.rss))
                    if p is not root and "ray::" in " ".join(p.cmdline()[:1]):
                        workers.append(int(info.rss))
            except psutil.Error:
                stop.wait(0.25)
                continue
            peaks["driver_rss"] = max(peaks["driver_rss"], rss_root)
            peaks["worker_rss"] = max(peaks["worker_rss"], max(workers, default=0))
            peaks["tree_pss"] = max(peaks["tree_pss"], pss)
            stop.wait(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"worker {argv[:1]} failed with exit status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({f"peak_{k}_mb": v / 2**20 for k, v in peaks.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/chexseg_bench_segmentation", help="cache of data and stores")
    parser.add_argument("--n", type=int, default=300, help="phantom radiographs in the pseudo-labelled set")
    parser.add_argument("--repeat", type=int, default=10, help="the larger pseudo set is N x repeat rows")
    parser.add_argument("--n-expert", type=int, default=60, help="expert images (the valid split, exact masks)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], help="config overrides for both modes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args.n, args.repeat, args.n_expert)
    overrides = [
        *args.set,
        f"train_segmentation.epochs={args.epochs}",
        f"train_segmentation.steps_per_epoch={args.steps}",
        "train_segmentation.log_every_steps=0",
    ]
    common = ["--preset", args.preset, *[a for o in overrides for a in ("--set", o)]]
    results = []
    runs: list[tuple[str, int]] = [("memory", 1), ("ray", 1), ("ray", args.repeat)]
    for mode, k in runs:
        argv = [mode, *common, "--expert-manifest", paths["expert_manifest"], "--expert-annotations",
                paths["expert_annotations"], "--manifest", paths[f"manifest_x{k}"], "--store", paths[f"store_x{k}"],
                "--out", str(work / f"student_{mode}_x{k}_{time.time_ns()}")]  # fmt: skip
        res = measure(argv)
        res["pseudo_rows"] = args.n * k if mode == "ray" else 0
        results.append(res)
        print(
            f"{mode:6s} pseudo rows {res['pseudo_rows']:6d}: {res['images_per_s']:.1f} images/s steady "
            f"(first epoch {res['first_epoch_images_per_s']:.1f}), peak RSS driver {res['peak_driver_rss_mb']:.0f} MB, "
            f"largest Ray worker {res['peak_worker_rss_mb']:.0f} MB, tree PSS {res['peak_tree_pss_mb']:.0f} MB",
            flush=True,
        )
    mem, small, large = results
    print(
        "\n| mode | pseudo rows | images/s (steady) | driver peak RSS MB | largest worker peak RSS MB | "
        "tree peak PSS MB |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['pseudo_rows']} | {r['images_per_s']:.1f} | {r['peak_driver_rss_mb']:.0f} | "
            f"{r['peak_worker_rss_mb']:.0f} | {r['peak_tree_pss_mb']:.0f} |"
        )
    overhead = 1.0 - small["images_per_s"] / mem["images_per_s"]
    print(f"\ningestion overhead (1 - ray / memory): {overhead:+.1%} (target <= 15%)")
    for key, what in (("driver_rss", "driver"), ("worker_rss", "largest worker"), ("tree_pss", "process tree")):
        ratio = large[f"peak_{key}_mb"] / small[f"peak_{key}_mb"]
        print(f"{what} peak memory at {args.repeat}x the pseudo rows: {ratio:.2f}x (target <= 1.25x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "overhead": overhead, "args": vars(args)}, f, indent=2)


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("ray", "memory"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--expert-manifest", required=True)
    parser.add_argument("--expert-annotations", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = worker_ray(args) if args.mode == "ray" else worker_memory(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        main()
