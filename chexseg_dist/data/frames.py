"""The one read-and-decode stage of every Ray Data pipeline: bytes -> letterboxed model frames.

Pseudo-labelling, classifier training and the segmentation student all turn manifest rows into ``S x S`` frames
here, with one failure policy: any per-image problem (a missing object, a permission error, a directory, an empty,
truncated or undecodable file, an unsupported mode) is recorded with the image's row and reason, and the image is
left out; it never kills the task. How a failure travels depends on the caller:

- ``keep_failed=True`` (pseudo-labelling): the row stays in the stream with a zero frame and its ``stage`` /
  ``error`` / ``time`` filled in, so the store records ``failed = 1`` and its failures table gets the record.
- ``keep_failed=False`` (training): the row is dropped from the stream and its record appended to
  ``failures_dir`` (:mod:`chexseg_dist.data.failures`); the loop only ever sees decodable images.

Bytes are fetched with one ``fs.cat`` per filesystem per task (s3fs fetches concurrently). Filesystems are created
inside the task, never pickled into it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from chexseg_dist.core import fsio
from chexseg_dist.core.serialize import now_utc
from chexseg_dist.data.failures import append_failure_table, failure_table
from chexseg_dist.data.images import frame_from_bytes
from chexseg_dist.errors import ImageDecodeError

log = logging.getLogger(__name__)


def fetch_bytes(paths: Sequence[str]) -> list[bytes | BaseException]:
    """Bytes of each path (local or URI); per-item exceptions are returned, not raised."""
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


def read_error(exc: BaseException, path: str) -> str:
    """The failure record's reason for a file that could not be read."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such file or object"
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, not an image"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied"
    return f"{path}: {type(exc).__name__}: {exc}"


def decode_frames(
    batch: dict[str, np.ndarray],
    image_size: int,
    keep_failed: bool = True,
    failures_dir: str | None = None,
    run_id: str = "",
) -> dict[str, np.ndarray]:
    """Ray Data stage (CPU tasks): read, decode and letterbox each image of a batch.

    Args:
        batch: at least ``path`` [n] str, ``row`` [n] int64 and ``image_id`` [n] str; every column is passed through.
        image_size: side ``S`` of the model frame.
        keep_failed: keep failed rows (zero frame, reason in ``stage``/``error``/``time``) or drop them.
        failures_dir: with ``keep_failed=False``, where the dropped rows' records are appended (None: not kept).
        run_id: recorded with the failures.

    Returns:
        The input columns plus ``frame`` [n, S, S] uint8 (0 = padding; zeros for a failure), ``letterbox`` [n, 7]
        int32 (:meth:`Letterbox.params`), ``stage`` [n] str (``""`` when fine, else ``read`` / ``decode``),
        ``error`` [n] str and ``time`` [n] str. Without ``keep_failed``, only the rows that decoded.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    frames = np.zeros((n, image_size, image_size), dtype=np.uint8)
    boxes = np.zeros((n, 7), dtype=np.int32)
    stage, error, when = [""] * n, [""] * n, [""] * n
    for i, data in enumerate(fetch_bytes(paths)):
        if isinstance(data, BaseException):
            stage[i], error[i], when[i] = "read", read_error(data, paths[i]), now_utc()
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
    out: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in batch.items()}
    out.update(
        frame=frames,
        letterbox=boxes,
        stage=np.asarray(stage, dtype=str),
        error=np.asarray(error, dtype=str),
        time=np.asarray(when, dtype=str),
    )
    if keep_failed:
        return out
    failed = out["stage"] != ""
    if failed.any() and failures_dir is not None:
        records = {k: out[k][failed] for k in ("image_id", "path", "row", "stage", "error", "time")}
        try:
            append_failure_table(failures_dir, failure_table(records, run_id))
        except Exception:  # Recording a failure must not become one: the task goes on, the worker log keeps it.
            log.exception("could not record %d failed image(s) in %s: %s", int(failed.sum()), failures_dir, records)
    return {k: v[~failed] for k, v in out.items()}


def with_decode_stage(
    ds: Any,
    image_size: int,
    num_cpus: float,
    *,
    failures_dir: str | None = None,
    run_id: str = "",
    batch_size: int | None = None,
    memory_mb: float = 0.0,
) -> Any:
    """``ds`` followed by the decode stage (:func:`decode_frames` as Ray Data CPU tasks), the one way a pipeline
    adds it.

    Args:
        ds: a Ray dataset of manifest rows (``path``, ``row``, ``image_id``, ...).
        image_size: side ``S`` of the model frame.
        num_cpus: CPUs per decode task.
        failures_dir: training: failed rows are dropped and recorded there (with ``run_id``); None (inference): they
            stay in the stream with a zero frame and their reason, for the writer to record.
        batch_size: rows per call; None = one call per block (a pipeline that sized its blocks itself).
        memory_mb: a memory request per task (0: none). Inference pipelines set it: besides reserving decode memory,
            a resource the model actors do not request keeps Ray Data from fusing this stage into them.
    """
    kwargs: dict[str, Any] = {"image_size": image_size, "keep_failed": failures_dir is None}
    if failures_dir is not None:
        kwargs.update(failures_dir=failures_dir, run_id=run_id)
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if memory_mb:
        options["memory"] = memory_mb * 1024 * 1024
    return ds.map_batches(decode_frames, fn_kwargs=kwargs, batch_size=batch_size, batch_format="numpy", **options)
