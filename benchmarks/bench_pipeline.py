"""Benchmark the pseudo-labelling pipeline: Ray Data vs a single-process loop, store bytes, peak memory.

Side by side, on the same phantom radiographs, the same random-weight classifier and the same store format:

- ``ray``: :func:`chexseg_dist.pseudolabel.run_pseudolabel` on a local Ray (decode tasks, a fixed actor pool,
  staged fragments committed per chunk).
- ``loop``: one process reading, decoding, letterboxing, running :func:`predict_with_cams` in batches and writing
  the store chunk by chunk with :class:`MapStore` (no Ray, torch using every core).

Each measurement runs in its own subprocess; a sampler sums the proportional set size (PSS: shared pages such as
Ray's object store counted once in total) and the RSS of that process and all its descendants (driver, GCS,
raylet, workers) every 0.25 s. Throughput is images / seconds of the processing stage (Ray: from the first
dataset operator to the last commit, actor start-up included, ``ray.init`` excluded) and end-to-end wall time.
Store bytes per image come from the files on disk, split into maps (``cams`` + ``cam_max``), ``probs`` and the rest,
for the tiny geometry (128 px, 8 x 8 grid) and the paper geometry (10 x 10 grid at 320 px, 1024 images per chunk;
maps from a 5-stage tiny_cnn with random weights, since a DenseNet121 on 2 CPU cores would take hours).

Usage::

    python benchmarks/bench_pipeline.py --sizes 300,3000 --json bench.json

``--max-queued-frames 0,1024`` runs the Ray pipeline once per value of ``pseudolabel.max_queued_frames`` (0 = Ray
Data's default budget; modes ``ray`` and ``ray_q1024``) and reports each one's peak memory at N and 10N; with
``--loop-threads ""`` the single-process loop is skipped. On a GPU node, one command (docs/benchmarks.md)::

    python benchmarks/bench_pipeline.py --work /tmp/bq --arch densenet121 --size 320 --preset paper \
        --phantom-size 390 --sizes 2000,20000 --repeat 10 --gen-workers $(nproc) --cpus $(nproc) --gpus 1 \
        --device cuda --loop-threads "" --set pseudolabel.gpus_per_actor=1 --no-paper \
        --max-queued-frames 0,2048 --json queued_frames_gpu.json

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


# ---------------------------------------------------------------------------------------------------- data


def prepare(
    work: Path,
    n_max: int,
    sizes: list[int],
    arch: str = "tiny_cnn",
    arch_size: int = 128,
    phantom_size: int = 256,
    repeat: int = 1,
    workers: int = 2,
) -> dict[str, Any]:
    """Phantom radiographs (cached), one manifest per size (first N frontal rows), random-weight checkpoints.

    With ``repeat`` > 1, ``ceil(n_max / repeat)`` radiographs are generated and the manifest lists each of them
    ``repeat`` times under distinct image ids (``<id>~r<k>``): long runs without generating every image. Every
    listed image is still read and decoded; the files are in the page cache for the loop and Ray alike.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from chexseg_dist.config.sections import SynthConfig
    from chexseg_dist.data.manifest import write_manifest
    from chexseg_dist.data.sources import manifest_from_csv
    from chexseg_dist.models.checkpoint import save_checkpoint
    from chexseg_dist.models.classifiers import create_classifier
    from chexseg_dist.synth import generate

    if repeat < 1:
        raise SystemExit(f"--repeat must be >= 1, got {repeat}")
    n_unique = -(-n_max // repeat)
    data = work / f"phantom_{phantom_size}px_{n_unique}"
    if not (data / "train.csv").exists():
        t0 = time.time()
        synth = SynthConfig(
            n_train=n_unique, n_valid=0, n_test=0, size=phantom_size, lateral_fraction=0.0, workers=workers
        )
        generate(str(data), synth)
        print(f"generated {n_unique} phantom radiographs ({phantom_size} px) in {time.time() - t0:.0f} s", flush=True)
    full = manifest_from_csv(str(data / "train.csv"), root=str(data / "CheXpert-v1.0-small"))
    if repeat > 1:
        copies = []
        for k in range(repeat):
            ids = pa.array([f"{i}~r{k}" for i in full.column("image_id").to_pylist()])
            rows = pc.add(full.column("row"), k * (full.num_rows + 1))
            copy = full.set_column(full.column_names.index("image_id"), "image_id", ids)
            copy = copy.set_column(copy.column_names.index("row"), "row", rows)
            copies.append(copy.cast(full.schema))
        full = pa.concat_tables(copies)
    manifests = {}
    for n in sizes:
        path = work / f"manifest_{phantom_size}px_{n_unique}x{repeat}_{n}.parquet"
        if not path.exists():
            write_manifest(full.slice(0, n), str(path))
        manifests[n] = str(path)
    ckpts = {}
    for name, size, widths in (("tiny", 128, (16, 32, 64, 128)), ("paper_grid", 320, (16, 32, 64, 128, 128))):
        path = work / f"ckpt_{name}"
        if not (path / "checkpoint.json").exists():
            torch.manual_seed(0)
            model = create_classifier("tiny_cnn", widths=widths)
            save_checkpoint(str(path), model, arch="tiny_cnn", image_size=size, config={})
        ckpts[name] = str(path)
    if arch != "tiny_cnn" or arch_size != 128:
        # The model under test (--arch/--size, e.g. the paper's densenet121 at 320 px) replaces the tiny one.
        path = work / f"ckpt_{arch}_{arch_size}"
        if not (path / "checkpoint.json").exists():
            torch.manual_seed(0)
            save_checkpoint(str(path), create_classifier(arch), arch=arch, image_size=arch_size, config={})
        ckpts["tiny"] = str(path)
    return {"manifests": manifests, "checkpoints": ckpts}


def store_bytes(store: str) -> dict[str, int]:
    """Bytes on disk per array of a local store (metadata files included in 'meta')."""
    out: dict[str, int] = {}
    for root, _, files in os.walk(store):
        rel = os.path.relpath(root, store).split(os.sep)[0]
        key = "meta" if rel == "." else rel
        out[key] = out.get(key, 0) + sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return out


# ---------------------------------------------------------------------------------------------------- workers


def worker_ray(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from chexseg_dist.config.resolve import load_config
    from chexseg_dist.pseudolabel.job import run_pseudolabel

    t0 = time.time()
    ray.init(num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=False, log_to_driver=False)
    t_init = time.time() - t0
    cfg = load_config(args.preset, None, args.set)
    t1 = time.time()
    summary = run_pseudolabel(cfg, args.manifest, args.checkpoint, args.store, overwrite=True)
    wall = time.time() - t1
    ray.shutdown()
    return {
        "images": summary.processed,
        "failed": summary.failed,
        "stage_s": summary.seconds,
        "wall_s": wall,
        "ray_init_s": t_init,
        "operators": summary.operators,
        "busy_s": summary.busy_s,
        "actor_utilisation": summary.actor_utilisation(),
    }


def worker_loop(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from chexseg_dist.config.resolve import load_config
    from chexseg_dist.core import fsio
    from chexseg_dist.data.images import frame_from_bytes
    from chexseg_dist.data.manifest import read_manifest
    from chexseg_dist.pseudolabel.inputs import probe_grid_shape, select_images
    from chexseg_dist.saliency.classifier import load_classifier, predict_with_cams
    from chexseg_dist.store.codec import EncodedRows, encode_rows
    from chexseg_dist.store.mapstore import MapStore, split_by_chunk

    t1 = time.time()
    cfg = load_config(args.preset, None, args.set).pseudolabel
    torch.set_num_threads(args.cpus)
    torch.backends.cudnn.benchmark = True  # as the pipeline's GPU actors do
    loaded = load_classifier(args.checkpoint, args.device)
    size = loaded.image_size
    images, _ = select_images(read_manifest(args.manifest), True)
    store = MapStore.create(
        args.store,
        images.column("image_id").to_pylist(),
        np.asarray(images.column("row")),
        probe_grid_shape([args.checkpoint]),
        images_per_chunk=cfg.images_per_chunk,
        overwrite=True,
    )
    paths = images.column("path").to_pylist()
    t0 = time.time()
    ipc = cfg.images_per_chunk
    pending: list[EncodedRows] = []
    for start in range(0, len(paths), cfg.batch_size):
        chunk_paths = paths[start : start + cfg.batch_size]
        decoded = [frame_from_bytes(fsio.read_bytes(p), size, p) for p in chunk_paths]
        frames = torch.from_numpy(np.stack([f for f, _ in decoded]))[:, None].to(args.device)
        probs, cams = predict_with_cams(loaded, frames.float() / 255.0)
        probs, cams = probs.cpu(), cams.cpu()
        boxes = np.asarray([b.params() for _, b in decoded], dtype=np.int32)
        slots = np.arange(start, start + len(chunk_paths))
        pending.append(encode_rows(slots, probs.numpy(), cams.numpy(), boxes[:, :2], boxes))
        end = start + len(chunk_paths)
        last = end >= len(paths)
        # Slots arrive in order: every chunk below end // ipc is complete and written once, whole.
        if last or end // ipc > pending[0].slots[0] // ipc:
            parts = split_by_chunk(EncodedRows.concat(pending), ipc)
            for c in sorted(parts):
                if last or c < end // ipc:
                    store.write_chunk(c, parts[c])
            pending = [] if last else [parts[c] for c in sorted(parts) if c >= end // ipc]
    stage = time.time() - t0
    return {"images": len(paths), "failed": 0, "stage_s": stage, "wall_s": time.time() - t1, "ray_init_s": 0.0}


# ---------------------------------------------------------------------------------------------------- driver


def _tree_memory(pid: int) -> tuple[int, int]:
    import importlib

    import ray  # noqa: F401  (importing Ray puts its vendored psutil on sys.path)

    psutil = importlib.import_module("psutil")

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    pss = rss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            pss += int(getattr(info, "pss", info.rss))
            rss += int(info.rss)
        except psutil.Error:
            pass
    return pss, rss


def measure(argv: list[str]) -> dict[str, Any]:
    """Run one worker subprocess, sampling its process tree's memory; returns its JSON result plus peaks."""
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    peaks = {"pss": 0, "rss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pss, rss = _tree_memory(proc.pid)
            peaks["pss"], peaks["rss"] = max(peaks["pss"], pss), max(peaks["rss"], rss)
            stop.wait(0.25)

    _tree_memory(os.getpid())  # fail here, loudly, if psutil is unavailable
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"worker {argv[:2]} failed with exit status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_pss_mb=peaks["pss"] / 2**20, peak_rss_mb=peaks["rss"] / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="300,3000", help="dataset sizes N and 10N (comma-separated)")
    parser.add_argument("--work", default="outputs/bench_pipeline", help="cache for images, manifests, stores")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    parser.add_argument(
        "--loop-threads",
        default="1,2",
        help='torch threads of the single-process loop to try; the best is compared ("" = no loop run)',
    )
    parser.add_argument(
        "--max-queued-frames",
        default="0",
        help="pseudolabel.max_queued_frames of the Ray runs, comma-separated to compare (0 = Ray Data's budget)",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="pipeline config override for both (e.g. pseudolabel.batch_size=16)"
    )
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-geometry bytes measurement")
    parser.add_argument("--arch", default="tiny_cnn", help="classifier under test (random weights), e.g. densenet121")
    parser.add_argument("--size", type=int, default=128, help="its input frame size S, e.g. 320")
    parser.add_argument("--preset", default="tiny", help="config preset both run under (then --set)")
    parser.add_argument("--phantom-size", type=int, default=256, help="typical side of the generated radiographs")
    parser.add_argument("--repeat", type=int, default=1, help="list each generated radiograph this many times")
    parser.add_argument("--gen-workers", type=int, default=2, help="processes generating the phantoms")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs given to Ray (set pseudolabel.gpus_per_actor too)")
    parser.add_argument("--device", default="cpu", help="the loop's model device (cpu or cuda)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--prepare-only", action="store_true", help="write the images, manifests, checkpoints; exit")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare(work, max(sizes), sizes, args.arch, args.size, args.phantom_size, args.repeat, args.gen_workers)
    if args.prepare_only:
        print(json.dumps(prep))
        return
    common = ["--preset", args.preset, "--set", "pseudolabel.progress_interval_s=1000"]
    for item in args.set:
        common += ["--set", item]
    loops = [("loop", int(t), 0) for t in args.loop_threads.split(",") if t.strip()]
    variants = loops + [("ray", args.cpus, int(q)) for q in args.max_queued_frames.split(",")]
    results: list[dict[str, Any]] = []
    for n in sizes:
        for mode, cpus, queued in variants:
            name = f"{mode}{cpus}" if mode == "loop" else ("ray" if queued == 0 else f"ray_q{queued}")
            store = str(work / f"store_{name}_{n}.zarr")
            argv = ["_worker", mode, "--manifest", prep["manifests"][n], "--checkpoint", prep["checkpoints"]["tiny"]]
            argv += ["--store", store, "--cpus", str(cpus), *common]
            if mode == "ray":
                argv += ["--gpus", str(args.gpus), "--set", f"pseudolabel.max_queued_frames={queued}"]
            else:
                argv += ["--device", args.device]
            load = os.getloadavg()[0]
            res = measure(argv)
            res.update(mode=name, n=n, bytes=store_bytes(store), load_before=load, max_queued_frames=queued)
            results.append(res)
            print(
                f"{name:>9} N={n:>5}: {res['images'] / res['stage_s']:7.1f} images/s (stage {res['stage_s']:.1f} s, "
                f"wall {res['wall_s']:.1f} s), peak PSS {res['peak_pss_mb']:.0f} MB, load {load:.1f}",
                flush=True,
            )
    paper = None
    if not args.no_paper:
        n = min((s for s in sizes if s >= 3000), default=max(sizes))  # a few 1024-image chunks are enough
        store = str(work / "store_paper_grid.zarr")
        argv = ["_worker", "loop", "--manifest", prep["manifests"][n], "--cpus", "1"]
        argv += ["--checkpoint", prep["checkpoints"]["paper_grid"], "--store", store, *common]
        paper = measure([*argv, "--set", "pseudolabel.images_per_chunk=1024"])
        paper.update(mode="loop1", n=n, bytes=store_bytes(store), geometry="paper (320 px, 10x10, 1024/chunk)")
    report(results, paper, sizes, f"{args.arch} at {args.size} px")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "paper_bytes": paper}, indent=2))


def _per_image(b: dict[str, int], n: int) -> dict[str, float]:
    maps = b.get("cams", 0) + b.get("cam_max", 0)
    probs = b.get("probs", 0)
    total = sum(b.values())
    return {"maps": maps / n, "probs": probs / n, "other": (total - maps - probs) / n, "total": total / n}


def _rate(r: dict[str, Any]) -> float:
    return float(r["images"] / r["stage_s"])


def report(results: list[dict[str, Any]], paper: dict[str, Any] | None, sizes: list[int], model: str) -> None:
    print("\n| mode | N | images/s (stage) | stage s | wall s | ray.init s | peak PSS MB | peak RSS MB | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['n']} | {_rate(r):.1f} | {r['stage_s']:.1f} | {r['wall_s']:.1f} | "
            f"{r['ray_init_s']:.1f} | {r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['load_before']:.1f} |"
        )
    print()
    ray_modes = sorted({r["mode"] for r in results if r["mode"].startswith("ray")})
    loop_modes = sorted({r["mode"] for r in results if r["mode"].startswith("loop")})
    for n in sizes:
        loops = [r for r in results if r["n"] == n and r["mode"] in loop_modes]
        if not loops:
            break
        best = max(loops, key=_rate)
        for mode in ray_modes:
            ray_r = next(r for r in results if r["n"] == n and r["mode"] == mode)
            ratio = _rate(ray_r) / _rate(best)
            ratio_wall = (ray_r["images"] / (ray_r["wall_s"] + ray_r["ray_init_s"])) / (best["images"] / best["wall_s"])
            print(
                f"N={n}: {mode} / best loop ({best['mode']}) throughput = {ratio:.2f}x (stage), "
                f"{ratio_wall:.2f}x (end to end incl. ray.init and store creation)"
            )
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        pairs = {
            mode: (
                next(r for r in results if r["n"] == lo and r["mode"] == mode),
                next(r for r in results if r["n"] == hi and r["mode"] == mode),
            )
            for mode in sorted({r["mode"] for r in results})
        }
        # Steady state: the extra images of the larger run over its extra seconds; fixed costs (actor start-up,
        # model load, first-batch latency) cancel out.
        marginal = {}
        for mode, (a, b) in pairs.items():
            dt = b["stage_s"] - a["stage_s"]
            marginal[mode] = (b["images"] - a["images"]) / dt if dt > 0 else float("nan")
            fixed = a["stage_s"] - a["images"] / marginal[mode] if dt > 0 else float("nan")
            print(f"{mode}: steady state {marginal[mode]:.1f} images/s; fixed cost {fixed:.1f} s")
        if loop_modes:
            best_loop = max(loop_modes, key=lambda m: marginal[m])
            for mode in ray_modes:
                print(
                    f"steady state: {mode} / best loop ({best_loop}) = {marginal[mode] / marginal[best_loop]:.2f}x "
                    f"(from N={lo} and N={hi})"
                )
        for mode, (a, b) in pairs.items():
            print(
                f"{mode}: peak PSS {a['peak_pss_mb']:.0f} MB at N={lo} -> {b['peak_pss_mb']:.0f} MB at N={hi} "
                f"({b['peak_pss_mb'] / a['peak_pss_mb']:.2f}x for {hi / lo:.0f}x the images); peak RSS "
                f"{a['peak_rss_mb']:.0f} -> {b['peak_rss_mb']:.0f} MB ({b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x)"
            )
    print("\nstore bytes per image (on disk, compressed):")
    rows = [(f"{model}, {r['mode']}, N={r['n']}", _per_image(r["bytes"], r["n"])) for r in results]
    if paper is not None:
        rows.append((f"{paper['geometry']}, N={paper['n']}", _per_image(paper["bytes"], paper["n"])))
    for name, b in rows:
        print(
            f"  {name}: maps {b['maps']:.0f} B + probs {b['probs']:.0f} B = {b['maps'] + b['probs']:.0f} B; "
            f"other {b['other']:.0f} B; total {b['total']:.0f} B"
        )


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("ray", "loop"))
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    result = worker_ray(args) if args.mode == "ray" else worker_loop(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        main()
