"""Plan the pseudo-labelling job for a million images without a single image: seconds per step and peak memory.

A synthetic CheXpert-format CSV of N rows (``bench_manifest.make_csv``: real-release path layout, labels, sex, age;
no image file exists, the paths point nowhere) becomes a Parquet manifest; then, each size in a fresh subprocess so
that ``ru_maxrss`` is that size's own peak, the job's real code path runs up to the point where images would be read:

1. ``plan_pseudolabel`` on a new store: read and select the manifest and fingerprint it, the checkpoint's identity
   and grid (a tiny random-weight CNN with the paper's 10 x 10 grid at 320 px), store creation for N ids (lock,
   arrays, sidecar), the skip-done scan and the todo table;
2. ``plan_pseudolabel`` again on the now existing store (a resumed run: identity check, scan, todo);
3. ``ray.init`` (timed apart) and ``build_dataset`` on the todo table, not executed: no image is read.

Memory: resident set before the work (after the imports: the fixed base) and ``ru_maxrss`` after each step; per row
above the base is ``(peak at the larger N - peak at the smaller N) / (difference in N)``. Listing: every fsspec
``ls``/``find``/``glob``/``walk``/``listdir``, zarr store ``list*`` call, and ``os.listdir``/``os.scandir``/``os.walk``
under the work directory is counted during steps 1-3 and printed by the directory it listed.

    .venv/bin/python benchmarks/bench_plan.py [--sizes 100000,1000000] [--preset paper] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)


def _status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: peak of this image) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux) in MiB.

    Linux carries the parent's resident set at ``fork`` into the child's ``ru_maxrss`` (it survives ``exec``), so
    the driver that starts the workers imports nothing heavy and generates nothing itself (see :func:`main`);
    ``VmHWM`` (reset by ``exec``) is printed beside it as a check.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------- inputs


def prepare(work: Path, sizes: list[int]) -> dict[str, Any]:
    """One manifest per size (cached) and the tiny checkpoint; nothing here is measured."""
    import torch
    from bench_manifest import make_csv

    from chexseg_dist.data.manifest import write_manifest
    from chexseg_dist.data.sources import manifest_from_csv
    from chexseg_dist.models.checkpoint import save_checkpoint
    from chexseg_dist.models.classifiers import create_classifier

    manifests = {}
    for n in sizes:
        path = work / f"manifest_{n}.parquet"
        if not path.exists():
            t0 = time.time()
            csv = work / f"csv_{n}" / "CheXpert-v1.0-small" / "train.csv"
            csv.parent.mkdir(parents=True, exist_ok=True)
            make_csv(str(csv), n)
            # The root is a folder that does not exist: every path in the manifest points nowhere.
            write_manifest(manifest_from_csv(str(csv), root=str(work / "no_images")), str(path))
            csv.unlink()
            print(f"manifest of {n} rows written in {time.time() - t0:.1f} s", flush=True)
        manifests[n] = str(path)
    ckpt = work / "ckpt_paper_grid"
    if not (ckpt / "checkpoint.json").exists():
        torch.manual_seed(0)
        model = create_classifier("tiny_cnn", widths=(16, 32, 64, 128, 128))  # 320 px / 32 = the paper's 10 x 10
        save_checkpoint(str(ckpt), model, arch="tiny_cnn", image_size=320, config={})
    return {"manifests": manifests, "checkpoint": str(ckpt)}


# ---------------------------------------------------------------------------------------------------- listing


class ListingCounter:
    """Counts directory listings under ``root`` while installed (fsspec, zarr stores, os)."""

    FSSPEC = ("ls", "find", "glob", "walk", "listdir", "du")
    ZARR = ("list", "list_prefix", "list_dir")

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.calls: Counter[str] = Counter()
        self._undo: list[Callable[[], None]] = []

    def _where(self, path: Any) -> str | None:
        text = str(path)
        text = text[len("file://") :] if text.startswith("file://") else text
        full = os.path.realpath(text) if text and not text.startswith(("s3://", "gs://")) else text
        if not full.startswith(self.root):
            return None
        return os.path.relpath(full, self.root)

    def _wrap(self, owner: Any, name: str, label: str, path_of: Callable[[tuple[Any, ...]], Any]) -> None:
        original = owner.__dict__.get(name)
        if original is None:
            return

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                where = self._where(path_of(args))
            except Exception:
                where = None
            if where is not None:
                self.calls[f"{label}.{name} {where}"] += 1
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        self._undo.append(lambda: setattr(owner, name, original))

    def __enter__(self) -> ListingCounter:
        import fsspec
        import zarr.storage
        from fsspec.implementations.local import LocalFileSystem

        for cls in (fsspec.AbstractFileSystem, LocalFileSystem):
            for name in self.FSSPEC:
                self._wrap(cls, name, f"fsspec:{cls.__name__}", lambda a: a[1] if len(a) > 1 else "")
        for cls in (zarr.storage.LocalStore, zarr.storage.FsspecStore):

            def store_path(a: tuple[Any, ...]) -> Any:
                root = getattr(a[0], "root", None) or getattr(a[0], "path", "")
                return os.path.join(str(root), str(a[1])) if len(a) > 1 else root

            for name in self.ZARR:
                self._wrap(cls, name, f"zarr:{cls.__name__}", store_path)
        for name in ("listdir", "scandir", "walk"):
            self._wrap(os, name, "os", lambda a: a[0] if a else ".")
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in reversed(self._undo):
            undo()


# ---------------------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np  # noqa: F401  (imports before the base measurement)
    import pyarrow  # noqa: F401
    import ray
    import torch  # noqa: F401
    import zarr  # noqa: F401

    from chexseg_dist.config.resolve import load_config
    from chexseg_dist.core.runs import new_run_id
    from chexseg_dist.pseudolabel.job import build_dataset, plan_pseudolabel, writer_settings
    from chexseg_dist.store import StoreWriter

    cfg = load_config(args.preset, None, args.set)
    pl = cfg.pseudolabel
    from chexseg_dist.store import sidecar_path

    for old in (args.store, sidecar_path(args.store)):  # a new store each time: step 1 creates it
        shutil.rmtree(old, ignore_errors=True)
    out: dict[str, Any] = {"n": args.n, "base_rss_mb": _status_mb("VmRSS"), "base_peak_mb": _peak_mb(), "steps": {}}
    steps: dict[str, Any] = out["steps"]
    counter = ListingCounter(args.work)
    with counter:
        plan = None
        for phase in ("new", "resume"):
            plan = None  # a run plans once: the resumed plan must not sit beside the first one
            t0 = time.perf_counter()
            with StoreWriter(args.store, new_run_id(), writer_settings(pl)) as writer:
                plan = plan_pseudolabel(cfg, args.manifest, args.checkpoint, writer, overwrite=False)
            steps[phase] = {
                "seconds": {k: round(v, 3) for k, v in plan.seconds.items()},
                "total_s": round(time.perf_counter() - t0, 3),
                "peak_mb": _peak_mb(),
                "rss_mb": _status_mb("VmRSS"),
                "slots": plan.store.n,
                "todo": plan.todo.num_rows,
            }
        listing_plan = dict(counter.calls)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        counter.calls.clear()
        t0 = time.perf_counter()
        assert plan is not None
        ds = build_dataset(plan.todo, pl, plan.checkpoints, plan.image_size, plan.store.grid_shape)
        steps["build_dataset"] = {"seconds": round(time.perf_counter() - t0, 3), "peak_mb": _peak_mb()}
        steps["ray_init_s"] = round(ray_init_s, 3)
        listing_build = dict(counter.calls)
    del ds  # never executed: no image was read
    ray.shutdown()
    out.update(peak_mb=_peak_mb(), hwm_mb=_status_mb("VmHWM"), listing_plan=listing_plan, listing_build=listing_build)
    return out


def measure(args: argparse.Namespace, n: int, manifest: str, checkpoint: str, store: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "_worker", "--n", str(n), "--manifest", manifest, "--checkpoint", checkpoint]
    argv += ["--store", store, "--work", str(Path(args.work).resolve()), "--preset", args.preset]
    for item in args.set:
        argv += ["--set", item]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker for N={n} failed with exit status {proc.returncode}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def report(results: list[dict[str, Any]]) -> None:
    print("\n| N | step | seconds | peak RSS MiB after it |")
    print("|---|---|---|---|")
    for r in results:
        n = r["n"]
        print(f"| {n:,} | (imports: base RSS) | | {r['base_rss_mb']:.0f} |")
        for phase in ("new", "resume"):
            s = r["steps"][phase]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in s["seconds"].items())
            print(f"| {n:,} | plan, {phase} store ({parts}) | {s['total_s']:.2f} | {s['peak_mb']:.0f} |")
        b = r["steps"]["build_dataset"]
        print(f"| {n:,} | ray.init | {r['steps']['ray_init_s']:.2f} | |")
        print(f"| {n:,} | build_dataset (not executed) | {b['seconds']:.2f} | {b['peak_mb']:.0f} |")
        print(f"| {n:,} | (check: VmHWM at the end) | | {r['hwm_mb']:.0f} |")
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        dn = hi["n"] - lo["n"]
        for label, key in (("planning (new + resume)", "resume"), ("planning + build_dataset", "build_dataset")):
            a, b = lo["steps"][key]["peak_mb"], hi["steps"][key]["peak_mb"]
            per_row = (b - a) * 2**20 / dn
            print(
                f"{label}: peak RSS {a:.0f} MiB at N={lo['n']:,} -> {b:.0f} MiB at N={hi['n']:,}: "
                f"{per_row:.0f} B per row above a fixed base of ~{a - lo['n'] * per_row / 2**20:.0f} MiB "
                f"(imports alone: {lo['base_rss_mb']:.0f} MiB)"
            )
    for r in results:
        for what in ("listing_plan", "listing_build"):
            calls = r[what]
            text = "none" if not calls else "; ".join(f"{k}: {v}" for k, v in sorted(calls.items()))
            print(f"N={r['n']:,} listings under the work dir during {what.split('_')[1]}: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="manifest rows, comma-separated (ascending)")
    parser.add_argument("--work", default="outputs/bench_plan", help="cache for manifests; stores go here too")
    parser.add_argument("--preset", default="paper", help="config preset (then --set)")
    parser.add_argument(
        "--set",
        action="append",
        # Every row an image (a store of exactly N slots); a CPU pool (the paper preset may say "auto" GPUs).
        default=["pseudolabel.frontal_only=false", "pseudolabel.gpus_per_actor=0"],
        help="config override (repeatable)",
    )
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Inputs are made in a subprocess: this process stays small, so the workers' ru_maxrss is their own.
    argv = [sys.executable, __file__, "_prepare", str(work), ",".join(map(str, sizes))]
    prep = json.loads(subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1])
    results = []
    for n in sizes:
        store = work / f"store_{n}.zarr"
        res = measure(args, n, prep["manifests"][str(n)], prep["checkpoint"], str(store))
        results.append(res)
        print(json.dumps(res), flush=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for name in ("--n", "--manifest", "--checkpoint", "--store", "--work", "--preset"):
        parser.add_argument(name, required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    args.n = int(args.n)
    result = worker(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        print(json.dumps(prepare(Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")])), flush=True)
    else:
        main()
