"""The pseudo-labelling job: every radiograph of a manifest -> probabilities and all-task Grad-CAM maps in a map store.

Pipeline (Ray Data, streaming)::

    manifest (Parquet) -> slots (sorted manifest row) -> skip done -> blocks of (slot, row, image_id, path)
      -> read + decode + letterbox      CPU tasks          (num_cpus=decode_cpus, memory=decode_memory_mb)
      -> classifier + all-class CAMs    fixed actor pool   (ActorPoolStrategy(size=num_actors), num_gpus, batch_size)
      -> FragmentSink                   write tasks stage immutable fragments; the driver commits them per chunk

Decoding never runs inside the model actors: Ray Data fuses a task stage into a following actor stage only when
their Ray remote arguments are identical, and the decode stage always reserves ``memory`` (a large radiograph's
decode peaks at a few hundred MB) while the actors do not. :func:`pipeline_operators` lists the executed operators
(from ``Dataset.stats()``) so tests and users can check that ``decode_frames`` and the classifier are separate.

Per-image problems (missing object, empty, truncated or corrupt file, unsupported mode, non-finite model output)
never stop the job: the row is recorded as failed (``failed = 1`` in the store, a record in the failures table
next to it) and the rest completes. The job is resumable and idempotent (see docs/store-format.md): rows already
done are skipped, fragments left by an interrupted run are committed first, and a finished store is never
recomputed (Ray is not even started).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from chexseg_dist import fsio
from chexseg_dist.config import Config, save_config
from chexseg_dist.staging import (
    CONFIG_FILE,
    Failure,
    Fragment,
    StoreLock,
    commit_fragments,
    failures_path,
    list_fragments,
    now_utc,
    remove_temporaries,
    staging_path,
    write_fragment,
)
from chexseg_dist.store import (
    N_OBS,
    N_TASKS,
    EncodedRows,
    MapStore,
    StoreError,
    encode_cams,
    normalise_uri,
    select_tasks,
    sidecar_path,
)

log = logging.getLogger(__name__)

#: CPUs reserved per write task: staging a fragment is a little encoding and one PUT.
WRITE_TASK_CPUS = 0.25

Printer = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------------- inputs


def select_images(manifest: pa.Table, frontal_only: bool, source: str = "manifest") -> pa.Table:
    """The images to pseudo-label, in slot order: ``(row, image_id, path)`` sorted by manifest row.

    Args:
        manifest: a manifest table (columns ``row``, ``image_id``, ``path``, ``frontal``).
        frontal_only: drop rows whose ``frontal`` is false (lateral views); unknown (null) views are kept.
        source: named in error messages.

    Raises:
        ValueError: missing columns, null ids or paths (naming rows), duplicate ids or rows, or nothing left.
    """
    needed = ["row", "image_id", "path"] + (["frontal"] if frontal_only else [])
    missing = [c for c in needed if c not in manifest.column_names]
    if missing:
        raise ValueError(f"{source}: missing manifest column(s) {missing}; build it with 'chexseg manifest'")
    table = manifest.select(needed)
    if frontal_only:
        frontal = np.asarray(table.column("frontal").to_pylist(), dtype=object)
        table = table.filter(pa.array([f is not False for f in frontal]))
    for col in ("row", "image_id", "path"):
        nulls = np.flatnonzero(np.asarray(table.column(col).is_null().to_pylist(), dtype=bool))
        if nulls.size:
            rows = table.column("row").to_pylist()
            raise ValueError(f"{source}: column {col!r} is empty in row(s) {[rows[i] for i in nulls[:5]]}")
    table = table.select(["row", "image_id", "path"]).sort_by("row")
    if table.num_rows == 0:
        raise ValueError(
            f"{source}: no images to pseudo-label"
            + (" (all rows are lateral; set pseudolabel.frontal_only=false to keep them)" if frontal_only else "")
        )
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=str)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ValueError(f"{source}: duplicate image_id(s) {uniq[counts > 1][:5].tolist()}; ids must be unique")
    rows = np.asarray(table.column("row"))
    if np.unique(rows).size != rows.size:
        raise ValueError(f"{source}: duplicate values in column 'row'")
    return table


def manifest_fingerprint(images: pa.Table) -> str:
    """SHA-256 over the selected ``(row, image_id, path)`` triples in slot order: what the store's slots mean."""
    digest = hashlib.sha256()
    for row, image_id, path in zip(
        images.column("row").to_pylist(), images.column("image_id").to_pylist(), images.column("path").to_pylist()
    ):
        digest.update(f"{row}\t{image_id}\t{path}\n".encode())
    return digest.hexdigest()


def checkpoint_identity(checkpoints: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Fingerprint and metadata of a checkpoint or ensemble from ``checkpoint.json`` alone (no weights loaded).

    The fingerprint equals ``load_classifier(checkpoints).fingerprint`` (which verifies it against the weights).
    """
    from chexseg_dist.checkpoint import ensemble_fingerprint, read_meta

    metas = [read_meta(p) for p in checkpoints]
    if len(metas) == 1:
        fingerprint = str(metas[0]["fingerprint"])
    else:
        fingerprint = ensemble_fingerprint(str(m["fingerprint"]) for m in metas)
    sizes = {int(m["image_size"]) for m in metas}
    if len(sizes) != 1:
        raise ValueError(f"checkpoints {list(checkpoints)} were trained at different image sizes {sorted(sizes)}")
    info = {
        "arch": [m["arch"] for m in metas] if len(metas) > 1 else metas[0]["arch"],
        "target_layer": [m["target_layer"] for m in metas] if len(metas) > 1 else metas[0]["target_layer"],
        "image_size": sizes.pop(),
        "checkpoints": list(checkpoints),
    }
    return fingerprint, info


def probe_grid_shape(checkpoints: Sequence[str]) -> tuple[int, int]:
    """``(gh, gw)`` of the classifier's maps, from one forward pass on a blank frame (driver, CPU)."""
    import torch

    from chexseg_dist.checkpoint import load_classifier, predict_with_cams

    loaded = load_classifier(list(checkpoints), "cpu")
    size = loaded.image_size
    _, cams = predict_with_cams(loaded, torch.zeros(1, 1, size, size))
    return int(cams.shape[-2]), int(cams.shape[-1])


# ---------------------------------------------------------------------------------------------------- stages


def _fetch(paths: Sequence[str]) -> list[bytes | BaseException]:
    """Bytes of each path (local or URI); per-item exceptions are returned, not raised.

    Paths on one filesystem are fetched with one ``fs.cat`` call (s3fs fetches them concurrently). Filesystems are
    created here, inside the task, never pickled into it.
    """
    out: list[bytes | BaseException] = [b""] * len(paths)
    groups: dict[int, tuple[Any, list[int], list[str]]] = {}
    for i, path in enumerate(paths):
        try:
            fs, inner = fsio.filesystem(path)
        except Exception as exc:
            out[i] = exc
            continue
        key = id(fs)
        groups.setdefault(key, (fs, [], []))
        groups[key][1].append(i)
        groups[key][2].append(inner)
    for fs, idx, inners in groups.values():
        try:
            got = fs.cat(inners, on_error="return")
        except Exception as exc:
            got = {p: exc for p in inners}
        for i, inner in zip(idx, inners):
            value = got.get(inner)
            if value is None:
                # fsspec may key the result by a normalised path; fall back to a single read.
                try:
                    value = fs.cat_file(inner)
                except Exception as exc:
                    value = exc
            out[i] = value
    return out


def _read_error(exc: BaseException, path: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such file or object"
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, not an image"
    return f"{path}: {type(exc).__name__}: {exc}"


def decode_frames(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data stage (CPU tasks): read and letterbox each image; per-item failures become rows with an error.

    Args:
        batch: ``slot`` [n] int64, ``row`` [n] int64, ``image_id`` [n] str, ``path`` [n] str.
        image_size: side ``S`` of the model frame.

    Returns:
        The input columns plus ``frame`` [n, S, S] uint8 (zeros for failures), ``letterbox`` [n, 7] int32,
        ``stage`` [n] str (``""`` when fine, else ``read``/``decode``), ``error`` [n] str and ``time`` [n] str.
    """
    from chexseg_dist.images import ImageDecodeError, frame_from_bytes

    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    frames = np.zeros((n, image_size, image_size), dtype=np.uint8)
    boxes = np.zeros((n, 7), dtype=np.int32)
    stage = [""] * n
    error = [""] * n
    when = [""] * n
    for i, data in enumerate(_fetch(paths)):
        if isinstance(data, BaseException):
            stage[i], error[i], when[i] = "read", _read_error(data, paths[i]), now_utc()
            continue
        try:
            frame, box = frame_from_bytes(bytes(data), image_size, paths[i])
        except ImageDecodeError as exc:
            stage[i], error[i], when[i] = "decode", str(exc), now_utc()
            continue
        except Exception as exc:  # Anything else a decoder throws is still this one image's problem.
            stage[i], error[i], when[i] = "decode", f"{paths[i]}: {type(exc).__name__}: {exc}", now_utc()
            continue
        frames[i] = frame
        boxes[i] = box.params()
    return {
        "slot": np.asarray(batch["slot"], dtype=np.int64),
        "row": np.asarray(batch["row"], dtype=np.int64),
        "image_id": np.asarray(batch["image_id"], dtype=str),
        "path": np.asarray(paths, dtype=str),
        "frame": frames,
        "letterbox": boxes,
        "stage": np.asarray(stage, dtype=str),
        "error": np.asarray(error, dtype=str),
        "time": np.asarray(when, dtype=str),
    }


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

        from chexseg_dist.checkpoint import load_classifier

        torch.set_num_threads(max(1, threads))
        if use_gpu:
            torch.backends.cudnn.benchmark = True  # fixed frame size: let cuDNN pick the fastest kernels once
        self.device = "cuda" if use_gpu else "cpu"
        self.loaded = load_classifier(list(checkpoints), self.device)
        self.grid_shape = tuple(grid_shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``decode_frames`` output -> store-encoded rows (``frame`` dropped; failures pass through, marked)."""
        import torch

        from chexseg_dist.checkpoint import predict_with_cams

        n = len(batch["slot"])
        gh, gw = self.grid_shape
        stage = np.asarray(batch["stage"], dtype=object)
        error = np.asarray(batch["error"], dtype=object)
        when = np.asarray(batch["time"], dtype=object)
        ok = np.asarray([s == "" for s in stage], dtype=bool)
        probs = np.full((n, N_OBS), np.nan, dtype=np.float32)
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


def fragment_from_columns(columns: dict[str, np.ndarray], run_id: str) -> Fragment:
    """Predictor output columns -> a staging :class:`Fragment` (failures carry their records)."""
    failed = np.asarray(columns["failed"], dtype=np.uint8)
    boxes = np.asarray(columns["letterbox"], dtype=np.int32).reshape(-1, 7)
    rows = EncodedRows(
        slots=np.asarray(columns["slot"], dtype=np.int64),
        probs=np.asarray(columns["probs"], dtype=np.float32),
        cams=np.asarray(columns["cams"], dtype=np.float16),
        cam_max=np.asarray(columns["cam_max"], dtype=np.float32),
        orig_size=np.ascontiguousarray(boxes[:, :2]),
        letterbox=boxes,
        failed=failed,
    )
    bad = np.flatnonzero(failed == 1)
    failures = Failure(
        slots=rows.slots[bad],
        rows=np.asarray(columns["row"], dtype=np.int64)[bad],
        image_id=np.asarray(columns["image_id"], dtype=str)[bad],
        path=np.asarray(columns["path"], dtype=str)[bad],
        stage=np.asarray(columns["stage"], dtype=str)[bad],
        error=np.asarray(columns["error"], dtype=str)[bad],
        time=np.asarray(columns["time"], dtype=str)[bad],
    )
    return Fragment(rows=rows, failures=failures, run_id=run_id)


# ---------------------------------------------------------------------------------------------------- the sink


def _datasink_base() -> type:
    from ray.data import Datasink

    return Datasink  # type: ignore[no-any-return]


class Committer:
    """Driver-side: commits staged fragments every ``interval_s`` and prints a progress line.

    One committer per job, and commits are serialised by a mutex, so each chunk has exactly one writer.
    """

    def __init__(
        self,
        store: MapStore,
        lock: StoreLock | None,
        run_id: str,
        todo: int,
        interval_s: float,
        progress_interval_s: float,
        printer: Printer = _print,
    ) -> None:
        self.store = store
        self.lock = lock
        self.run_id = run_id
        self.todo = todo
        self.interval_s = interval_s
        self.progress_interval_s = progress_interval_s
        self.printer = printer
        self.committed = 0
        self.failed = 0
        self.commits = 0
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, name="pseudolabel-committer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_commit = time.time() + self.interval_s
        next_progress = time.time() + self.progress_interval_s
        tick = max(0.05, min(self.interval_s, self.progress_interval_s) / 4)
        while not self._stop.wait(tick):
            now = time.time()
            try:
                if now >= next_commit:
                    self.commit()
                    next_commit = now + self.interval_s
                if now >= next_progress:
                    self.report()
                    next_progress = now + self.progress_interval_s
            except Exception as exc:  # Recorded; the final commit on the driver raises it.
                self.error = exc
                log.exception("periodic commit failed")
                return

    def commit(self) -> None:
        """Commit every complete staged fragment now (serialised with other commits)."""
        with self._mutex:
            stats = commit_fragments(self.store, self.run_id, lock=self.lock)
            self.committed += stats.rows - stats.failed
            self.failed += stats.failed
            self.commits += int(stats.fragments > 0)

    def report(self) -> None:
        staged = sum(n for _, n in list_fragments(self.store.uri))
        elapsed = max(time.time() - self._started, 1e-9)
        finished = self.committed + self.failed + staged
        self.printer(
            f"pseudolabel: {finished}/{self.todo} images ({self.committed} committed, {staged} staged, "
            f"{self.failed} failed), {finished / elapsed:.1f} images/s, {elapsed:.0f} s"
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class FragmentSink(_datasink_base()):  # type: ignore[misc]
    """Ray Data Datasink: each write task stages its rows as one fragment; the driver commits them per chunk.

    Lifecycle: ``on_write_start`` (driver) checks the staging area; ``write`` (parallel tasks) writes one immutable
    fragment per task and never touches the Zarr arrays; ``on_write_complete`` (driver) commits every staged
    fragment (one owner per chunk) through the :class:`Committer`; ``on_write_failed`` (driver) commits what was
    staged, so finished work survives, and leaves the rest for the next run.

    Args:
        store_uri: the map store.
        run_id: this run's id (fragment names, failure records).
        rows_per_write: minimum rows per write task (Ray buffers smaller blocks), i.e. fragment size.
        committer: driver-side committer (not shipped to write tasks); None = commit without one.
    """

    def __init__(self, store_uri: str, run_id: str, rows_per_write: int, committer: Committer | None = None) -> None:
        self.store_uri = normalise_uri(store_uri)
        self.run_id = run_id
        self.rows_per_write = int(rows_per_write)
        self._committer = committer
        self.write_returns: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_committer"] = None  # Threads, zarr handles and the lock stay on the driver.
        return state

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def get_name(self) -> str:
        return "MapStoreFragments"

    def on_write_start(self, schema: Any = None) -> None:
        fsio.makedirs(staging_path(self.store_uri))

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        """Stage the rows of this task's blocks as one fragment. Empty blocks (no columns) are skipped."""
        from ray.data.block import BlockAccessor

        parts: list[dict[str, np.ndarray]] = []
        for block in blocks:
            acc = BlockAccessor.for_block(block)
            if acc.num_rows() == 0:
                continue
            columns: Any = acc.to_batch_format("numpy")
            parts.append({str(k): np.asarray(v) for k, v in columns.items()})
        if not parts:
            return {"fragment": None, "rows": 0, "failed": 0, "start": time.time(), "end": time.time()}
        start = time.time()
        columns = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        fragment = fragment_from_columns(columns, self.run_id)
        path = write_fragment(self.store_uri, fragment)
        return {
            "fragment": path,
            "rows": len(fragment.rows),
            "failed": int(fragment.rows.failed.sum()),
            "start": start,
            "end": time.time(),
        }

    def on_write_complete(self, write_result: Any) -> None:
        self.write_returns = list(write_result.write_returns)
        if self._committer is not None:
            self._committer.commit()

    def on_write_failed(self, error: Exception) -> None:
        log.error("pseudolabel pipeline failed (%s); committing what was staged", error)
        if self._committer is not None:
            try:
                self._committer.commit()
            except Exception:
                log.exception("commit after failure failed; staged fragments stay for the next run")


# ---------------------------------------------------------------------------------------------------- the job


@dataclass
class PseudolabelSummary:
    """Outcome of one :func:`run_pseudolabel` call.

    Attributes:
        store: the map store URI.
        total: images in the store.
        processed: rows written by this run.
        skipped: rows already done before this run's model stage (never recomputed), including rows recovered
            from fragments an interrupted run left.
        recovered: of ``skipped``, rows committed from an interrupted run's fragments.
        failed: rows that failed in this run (see the failures table).
        failed_before: rows that failed in an earlier run and were not retried (``pseudolabel.retry_failed``).
        seconds: wall time of the pipeline, from building the dataset to the last commit (actor start-up
            included, ``ray.init`` not; 0 when there was nothing to do).
        images_per_s: ``(processed + failed) / seconds``.
        model_started: whether the classifier actors were started.
        operators: executed Ray Data operators (from ``Dataset.stats()``), empty when nothing ran.
        run_id: this run's id.
        busy_s: seconds each operator's tasks or actors spent working, summed over them (from
            ``Dataset.stats()``; empty when nothing ran). See :meth:`stage_line`.
        num_actors: the classifier actor pool's size.
    """

    store: str
    total: int
    processed: int
    skipped: int
    recovered: int
    failed: int
    failed_before: int
    seconds: float
    images_per_s: float
    model_started: bool
    operators: list[str]
    run_id: str
    busy_s: dict[str, float] = field(default_factory=dict)
    num_actors: int = 1

    @property
    def exit_code(self) -> int:
        """0 unless there was work and none of it succeeded."""
        todo = self.total - self.skipped - self.failed_before
        return 1 if todo > 0 and self.processed == 0 else 0

    def line(self) -> str:
        extra = f", {self.failed_before} failed earlier (not retried)" if self.failed_before else ""
        return (
            f"pseudolabel: processed {self.processed}, skipped {self.skipped} (already done), failed {self.failed}"
            f"{extra}, {self.images_per_s:.1f} images/s; store {self.store}"
        )

    def actor_utilisation(self) -> float | None:
        """Share of the run the classifier actors spent on batches (start-up counts as idle); None if unknown.

        Near 1: the model stage is the bottleneck (add actors or GPUs). Well below 1 on a long run: the actors waited
        for decoded frames (add decode CPUs) or for their own start-up (short runs).
        """
        busy = next((v for k, v in self.busy_s.items() if "ClassifierPredictor" in k), None)
        if busy is None or self.seconds <= 0:
            return None
        return busy / (self.seconds * max(1, self.num_actors))

    def stage_line(self) -> str:
        """Where the time went, e.g. ``decode_frames 1.9 s, ClassifierPredictor 5.0 s (actors busy 43% of the run)``."""
        parts = []
        for op, busy in self.busy_s.items():
            if op.startswith("FromArrow"):  # handing the manifest slice to Ray: no work
                continue
            name = op.removeprefix("MapBatches(").removesuffix(")")
            parts.append(f"{name} {busy:.1f} s" if busy >= 1 else f"{name} {busy:.2f} s")
        util = self.actor_utilisation()
        tail = "" if util is None else f"; classifier actors busy {100 * util:.0f}% of the {self.seconds:.1f} s run"
        return f"pseudolabel: busy time per stage (summed over tasks): {', '.join(parts)}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TOTAL = re.compile(r"([0-9.]+)(us|ms|s) total")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def operator_busy_seconds(stats: str) -> dict[str, float]:
    """Each operator's summed remote wall time (``* Remote wall time: ... X total``) from ``Dataset.stats()`` text."""
    busy: dict[str, float] = {}
    current = None
    for line in stats.splitlines():
        line = line.strip()
        names = pipeline_operators(line)
        if names:
            current = names[0]
        elif current is not None and line.startswith("* Remote wall time:"):
            match = _TOTAL.search(line)
            if match:
                busy[current] = busy.get(current, 0.0) + float(match.group(1)) * _UNIT_S[match.group(2)]
    return busy


def pipeline_operators(stats: str) -> list[str]:
    """Operator names from ``Dataset.stats()`` text, e.g. ``["MapBatches(decode_frames)", ...]``.

    A fused stage shows as one name joined by ``->``; the pseudo-labelling pipeline must list ``decode_frames`` and
    ``ClassifierPredictor`` as separate operators.
    """
    names = []
    for line in stats.splitlines():
        line = line.strip()
        if line.startswith("Operator ") and ":" in line:
            head = line.split(":", 1)[0]
            parts = head.split(" ", 2)
            if len(parts) == 3:
                names.append(parts[2])
    return names


def _open_or_create(
    store_uri: str,
    images: pa.Table,
    cfg: Config,
    checkpoints: Sequence[str],
    manifest: str,
    overwrite: bool,
    printer: Printer,
) -> MapStore:
    manifest_fp = manifest_fingerprint(images)
    model_fp, info = checkpoint_identity(checkpoints)
    if MapStore.exists(store_uri) and not overwrite:
        store = MapStore.open(store_uri, mode="r+")
        attrs = store.attrs
        if attrs.get("manifest_fingerprint") != manifest_fp:
            raise StoreError(
                f"store {store_uri} was written for another manifest or selection (manifest "
                f"{attrs.get('manifest')!r}, {attrs.get('n_images')} images, frontal_only="
                f"{attrs.get('frontal_only')}); now {manifest!r} gives {images.num_rows} images. Resuming would "
                "put maps in the wrong slots: choose a new --store, or pass --overwrite to replace it."
            )
        if attrs.get("model_fingerprint") != model_fp:
            raise StoreError(
                f"store {store_uri} holds maps of model {str(attrs.get('model_fingerprint'))[:12]}... (checkpoint(s) "
                f"{attrs.get('checkpoints')}); --checkpoint {','.join(checkpoints)} is model {model_fp[:12]}... "
                "Resuming would mix two models' maps: choose a new --store, or pass --overwrite to replace it."
            )
        return store
    if overwrite:
        for path in (staging_path(store_uri), failures_path(store_uri)):
            fs, inner = fsio.filesystem(path)
            if fs.exists(inner):
                fs.rm(inner, recursive=True)
    grid = probe_grid_shape(checkpoints)
    attrs = {
        "manifest": manifest,
        "manifest_fingerprint": manifest_fp,
        "frontal_only": cfg.pseudolabel.frontal_only,
        "model_fingerprint": model_fp,
        "checkpoints": list(checkpoints),
        "arch": info["arch"],
        "target_layer": info["target_layer"],
        "image_size": info["image_size"],
        "config": cfg.to_dict(),
    }
    store = MapStore.create(
        store_uri,
        images.column("image_id").to_pylist(),
        np.asarray(images.column("row")),
        grid,
        attrs=attrs,
        images_per_chunk=cfg.pseudolabel.images_per_chunk,
        overwrite=overwrite,
    )
    printer(f"pseudolabel: created store {store_uri} ({store.n} images, grid {grid[0]}x{grid[1]})")
    return store


def build_dataset(
    todo: pa.Table,
    cfg: Config,
    checkpoints: Sequence[str],
    image_size: int,
    grid_shape: tuple[int, int],
) -> Any:
    """The Ray Data pipeline up to (not including) the sink.

    Args:
        todo: ``(slot, row, image_id, path)`` of the images to process.
        cfg: the resolved config (``pseudolabel`` section).
        checkpoints: checkpoint directories.
        image_size: the classifier's frame size ``S``.
        grid_shape: the store's ``(gh, gw)``.

    Returns:
        A ``ray.data.Dataset`` of store-encoded rows (see :class:`ClassifierPredictor`).
    """
    import ray.data

    pl = cfg.pseudolabel
    per_block = pl.images_per_decode_task
    blocks = [
        pa.table({name: todo.column(name).slice(i, per_block).combine_chunks() for name in todo.column_names})
        for i in range(0, todo.num_rows, per_block)
    ]
    source = ray.data.from_arrow(blocks)
    ds = source.map_batches(
        decode_frames,  # type: ignore[arg-type]
        fn_kwargs={"image_size": image_size},
        batch_size=None,
        batch_format="numpy",
        num_cpus=pl.decode_cpus,
        # A resource request the actors do not make: besides reserving decode memory, it keeps Ray Data from
        # fusing this task stage into the classifier actors (fusion needs identical remote arguments).
        memory=pl.decode_memory_mb * 1024 * 1024,
    )
    return ds.map_batches(
        ClassifierPredictor,
        fn_constructor_kwargs={
            "checkpoints": list(checkpoints),
            "grid_shape": tuple(grid_shape),
            "use_gpu": pl.gpus_per_actor > 0,
            "threads": pl.torch_threads or max(1, int(pl.cpus_per_actor)),
        },
        compute=ray.data.ActorPoolStrategy(size=pl.num_actors),
        batch_size=pl.batch_size,
        batch_format="numpy",
        num_cpus=pl.cpus_per_actor,
        num_gpus=pl.gpus_per_actor,
    )


def run_pseudolabel(
    cfg: Config,
    manifest: str,
    checkpoints: str | Sequence[str],
    store: str,
    overwrite: bool = False,
    printer: Printer = _print,
) -> PseudolabelSummary:
    """Pseudo-label every (frontal) image of a manifest into a map store; resumable and idempotent.

    Starts a local Ray (``ray.init()``, which attaches to a cluster when ``RAY_ADDRESS`` is set, e.g. under
    ``ray job submit``) only if there is model work to do and Ray is not running yet.

    Args:
        cfg: resolved config (``pseudolabel`` section; classifier geometry comes from the checkpoint).
        manifest: the Parquet manifest (local or URI).
        checkpoints: a checkpoint directory, a comma-separated list, or a list (ensemble).
        store: the map store (local directory or ``s3://...``).
        overwrite: replace an existing store (and its staged fragments and failures) instead of resuming it.
        printer: where progress lines go (stdout by default).

    Returns:
        The :class:`PseudolabelSummary` (its ``line()`` is the job's last output line).

    Raises:
        StoreError: the store belongs to another manifest or model (suggesting a new store or --overwrite).
        StoreLockedError: another job is writing the store.
        ValueError / FileNotFoundError: unusable manifest or checkpoint.
    """
    from chexseg_dist.checkpoint import split_paths
    from chexseg_dist.manifest import read_manifest

    pl = cfg.pseudolabel
    store_uri = normalise_uri(store)
    ckpts = split_paths(checkpoints)
    if not ckpts:
        raise ValueError("no checkpoint given (--checkpoint DIR or DIR1,DIR2 for an ensemble)")
    images = select_images(read_manifest(manifest, ["row", "image_id", "path", "frontal"]), pl.frontal_only, manifest)
    _, info = checkpoint_identity(ckpts)
    image_size = int(info["image_size"])
    if image_size != cfg.classifier.image_size:
        printer(
            f"pseudolabel: note: the checkpoint was trained at {image_size} px; using it "
            f"(classifier.image_size={cfg.classifier.image_size} is ignored here)"
        )
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    lock = StoreLock(store_uri, stale_after_s=pl.lock_stale_s, run_id=run_id)
    lock.acquire()
    try:
        ms = _open_or_create(store_uri, images, cfg, ckpts, manifest, overwrite, printer)
        extra = {"run_id": run_id, "manifest": manifest, "checkpoints": ckpts, "store": store_uri, "started": now_utc()}
        save_config(cfg, sidecar_path(store_uri), CONFIG_FILE, extra=extra)
        ms.update_attrs(last_run={**extra, "config": cfg.to_dict()})
        remove_temporaries(store_uri)
        recovered = commit_fragments(ms, run_id, lock=lock)
        if recovered.fragments:
            printer(
                f"pseudolabel: committed {recovered.rows} rows from {recovered.fragments} fragment(s) "
                "left by an interrupted run"
            )
        done0, failed0 = ms.done(), ms.failed()
        todo_mask = ~done0 & (~failed0 | pl.retry_failed)
        failed_before = int((failed0 & ~done0 & ~todo_mask).sum())
        summary = PseudolabelSummary(
            store=store_uri,
            total=ms.n,
            processed=0,
            skipped=int(done0.sum()),
            recovered=int(recovered.rows - recovered.failed),
            failed=0,
            failed_before=failed_before,
            seconds=0.0,
            images_per_s=0.0,
            model_started=False,
            operators=[],
            run_id=run_id,
            num_actors=pl.num_actors,
        )
        if not todo_mask.any():
            return summary
        slots = np.flatnonzero(todo_mask)
        todo = pa.table(
            {
                "slot": pa.array(slots, pa.int64()),
                "row": pa.array(ms.rows[slots], pa.int64()),
                "image_id": images.column("image_id").take(pa.array(slots)),
                "path": images.column("path").take(pa.array(slots)),
            }
        )
        printer(
            f"pseudolabel: {len(slots)} of {ms.n} images to process ({summary.skipped} already done); "
            f"{pl.num_actors} classifier actor(s), batch {pl.batch_size}"
        )
        summary.model_started = True
        committer = Committer(ms, lock, run_id, len(slots), pl.commit_interval_s, pl.progress_interval_s, printer)
        sink = FragmentSink(store_uri, run_id, rows_per_write=pl.images_per_chunk, committer=committer)
        can_grow = _ray_can_grow()
        started_ray = _ensure_ray()
        start = time.time()  # images/s covers the pipeline (actor start-up included), not starting Ray itself
        try:
            problem = resource_problem(cfg, _cluster_resources())
            if problem and not can_grow:
                raise ValueError(problem)  # A Ray started here never grows: the job would wait forever.
            if problem:
                printer(f"pseudolabel: warning: {problem} (it will wait for the cluster to grow)")
            ds = build_dataset(todo, cfg, ckpts, image_size, ms.grid_shape)
            committer.start()
            try:
                ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}, concurrency=pl.write_concurrency)
            finally:
                committer.stop()
            committer.commit()  # Anything staged after on_write_complete (nothing, normally).
            end = time.time()  # Stats and shutting Ray down are not pipeline time.
            if committer.error is not None:
                raise committer.error
            try:
                stats = ds.stats()
                summary.operators = pipeline_operators(stats)
                summary.busy_s = operator_busy_seconds(stats)
            except Exception:  # Stats are diagnostics; never fail a finished job over them.
                summary.operators = []
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        summary.seconds = end - start
        done1, failed1 = ms.done(), ms.failed()
        summary.processed = int((done1 & ~done0).sum())
        summary.failed = int((failed1 & todo_mask).sum())
        summary.images_per_s = (summary.processed + summary.failed) / max(summary.seconds, 1e-9)
        if summary.busy_s:
            printer(summary.stage_line())
        return summary
    finally:
        lock.release()


def resource_problem(cfg: Config, resources: dict[str, float]) -> str | None:
    """Why the pipeline cannot run on a cluster with these resources (``ray.cluster_resources()``), or None.

    The classifier actors hold their CPUs and GPUs for the whole job, so at least ``decode_cpus`` must be left over
    for the decode tasks, and the GPUs must cover every actor; otherwise Ray Data waits forever.
    """
    pl = cfg.pseudolabel
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    actor_cpus, actor_gpus = pl.num_actors * pl.cpus_per_actor, pl.num_actors * pl.gpus_per_actor
    if actor_gpus > gpus + 1e-9:
        return (
            f"pseudolabel.num_actors={pl.num_actors} x gpus_per_actor={pl.gpus_per_actor} need {actor_gpus:g} GPU(s) "
            f"but the Ray cluster has {gpus:g}; lower them, or set gpus_per_actor=0 to run on CPUs"
        )
    if cpus - actor_cpus < pl.decode_cpus - 1e-9:
        return (
            f"pseudolabel.num_actors={pl.num_actors} x cpus_per_actor={pl.cpus_per_actor} hold {actor_cpus:g} of the "
            f"Ray cluster's {cpus:g} CPUs, leaving less than decode_cpus={pl.decode_cpus} for decoding; lower "
            "num_actors or cpus_per_actor"
        )
    return None


def _cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def _ray_can_grow() -> bool:
    """Whether the Ray this job runs on (or will attach to with ``ray.init()``) is a cluster that may still grow.

    False for a single-node Ray started by this process (``ray.init()`` with no cluster to attach to, or an earlier
    ``ray.init(num_cpus=...)`` here): resources missing now will never come. True when ``ray.init()`` attaches to a
    cluster (``RAY_ADDRESS``, e.g. under ``ray job submit``, or one started with ``ray start``), and whenever Ray's
    private helpers used here change (then the job warns rather than refuses).
    """
    import ray

    try:
        if ray.is_initialized():
            from ray._private import worker

            node = worker._global_node
            return not (node is not None and node.head)
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None  # type: ignore[arg-type]
    except Exception:
        return True


def _ensure_ray() -> bool:
    """``ray.init()`` unless Ray is running; returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init()
    return True


def main_summary(summary: PseudolabelSummary, printer: Printer = _print) -> int:
    """Print the one-line summary and return the exit status."""
    printer(summary.line())
    sys.stdout.flush()
    return summary.exit_code
