"""The dataset: patients and studies per split, rendering them in worker processes, and writing the tree.

Files: all splits are JPEG (CheXpert's release is JPEG, and the classifier must see the same compression in
training and evaluation; the masks are exact whatever the encoding). A few train frontals are 16-bit PNGs
(12-bit values, like DICOM exports) and a few are RGB JPEGs, so odd decoding paths are exercised.

Determinism: each study draws from ``SeedSequence(seed, spawn_key=(split, kind, index))``, so output is byte-identical
for the same seed and config, whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
from collections.abc import Callable, Generator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from chexseg_dist.config.sections import SynthConfig
from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import CSV_HEADER, OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import encode_mask, image_id_from_path, mask_to_polygons
from chexseg_dist.synth.anatomy import sample_anatomy
from chexseg_dist.synth.annotator import annotate, rasterise
from chexseg_dist.synth.labels import label_prevalence, sample_study
from chexseg_dist.synth.render import encode_image, render_lateral, render_study

GENERATOR_VERSION = "phantom-1.1"  # 1.1: the expert annotator files; defaults 3000 / 234 / 668
#: The dataset folder that leads every CSV path, as in the real small release.
DATASET_DIR = "CheXpert-v1.0-small"
SPLITS: tuple[str, ...] = ("train", "valid", "test")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
# CheXpert numbers valid patients from 64541 and CheXlocalize's test patients from 64741.
_VALID_FIRST_PATIENT = 64541
_CHEXPERT_VALID_PATIENTS = 200

# Seed-key kinds under a split.
_KEY_LAYOUT, _KEY_STUDY, _KEY_PATIENT, _KEY_LATERAL, _KEY_ANNOTATOR = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class _Job:
    """One study to render: everything a worker process needs (picklable)."""

    split: str
    index: int  # frontal image index within the split
    patient: int  # patient number in the path
    patient_key: int  # seed key of the patient (index within the split)
    study: int
    lateral: bool
    mode: str  # "jpeg", "png16" or "rgb"
    seed: int
    size: int
    conspicuity: float
    jpeg_quality: int
    want_masks: bool
    annotate: bool = False


@dataclass
class _Result:
    """A rendered study: encoded files, CSV rows and (valid/test) ground truth."""

    files: list[tuple[str, bytes]]
    rows: list[list[str]]
    present: list[str]  # tasks with a non-empty mask
    image_id: str
    size: tuple[int, int]
    segmentation: dict[str, dict[str, Any]] | None
    polygons: dict[str, list[list[list[int]]]] | None
    expert_segmentation: dict[str, dict[str, Any]] | None = None
    expert_polygons: dict[str, list[list[list[float]]]] | None = None


def _seed(job_seed: int, split: str, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(job_seed, spawn_key=(_SPLIT_CODE[split], kind, index)))


def _rel_path(split: str, patient: int, study: int, view: str, ext: str) -> str:
    return f"{DATASET_DIR}/{split}/patient{patient:05d}/study{study}/{view}.{ext}"


def _render_job(job: _Job) -> _Result:
    """Render and encode one study (frontal plus an optional lateral view); runs in worker processes."""
    anat = sample_anatomy(_seed(job.seed, job.split, _KEY_PATIENT, job.patient_key))
    rng = _seed(job.seed, job.split, _KEY_STUDY, job.index)
    study = sample_study(rng)
    certain = job.split != "train"
    img, masks, comps = render_study(rng, anat, study, job.size, job.conspicuity, certain)
    ext = "png" if job.mode == "png16" else "jpg"
    path = _rel_path(job.split, job.patient, job.study, "view1_frontal", ext)
    meta = [anat.sex, str(anat.age)]
    labels = [study.labels[o] for o in OBSERVATIONS]
    files = [(path, encode_image(img, job.mode, job.jpeg_quality))]
    rows = [[path, *meta, "Frontal", "AP" if study.ap else "PA", *labels]]
    if job.lateral:
        lat_path = _rel_path(job.split, job.patient, job.study, "view2_lateral", "jpg")
        lat = render_lateral(_seed(job.seed, job.split, _KEY_LATERAL, job.index), anat, job.size)
        files.append((lat_path, encode_image(lat, "jpeg", job.jpeg_quality)))
        rows.append([lat_path, *meta, "Lateral", "", *labels])
    segmentation = polygons = None
    if job.want_masks:
        segmentation = {t: encode_mask(masks[t]) for t in TASKS}
        if certain:
            # Per drawn object, so that crossing devices do not enclose (and fill) the space between them.
            polygons = {t: [p for comp in comps[t] for p in mask_to_polygons(comp)] for t in TASKS if t in comps}
    h, w = img.shape
    expert_seg = expert_polys = None
    if job.annotate:
        # The annotator's own generator: the exact files and images are byte-identical with or without it.
        expert_polys = annotate(_seed(job.seed, job.split, _KEY_ANNOTATOR, job.index), masks)
        expert_seg = {t: encode_mask(m) for t, m in rasterise(expert_polys, h, w).items()}
    return _Result(
        files=files,
        rows=rows,
        present=[t for t in TASKS if masks[t].any()],
        image_id=image_id_from_path(path),
        size=(h, w),
        segmentation=segmentation,
        polygons=polygons,
        expert_segmentation=expert_seg,
        expert_polygons=expert_polys,
    )


def _layout(cfg: SynthConfig, split: str, n: int, first_patient: int) -> list[_Job]:
    """Patients, studies, lateral views and odd file modes of a split (deterministic from the seed)."""
    rng = _seed(cfg.seed, split, _KEY_LAYOUT, 0)
    train = split == "train"
    odd = math.ceil(cfg.odd_mode_fraction * n) if train and n > 0 and cfg.odd_mode_fraction > 0 else 0
    order = rng.permutation(n) if n else np.zeros(0, int)
    png16 = {int(i) for i in order[:odd]}
    rgb = {int(i) for i in order[odd : 2 * odd]}
    jobs: list[_Job] = []
    patient_key = 0
    while len(jobs) < n:
        # CheXpert has ~3.5 studies per patient in train; valid/test have one study per patient.
        n_studies = min(int(rng.geometric(0.45)), 6) if train else 1
        for study in range(1, n_studies + 1):
            if len(jobs) == n:
                break
            i = len(jobs)
            mode = "png16" if i in png16 else ("rgb" if i in rgb else "jpeg")
            jobs.append(
                _Job(
                    split=split,
                    index=i,
                    patient=first_patient + patient_key,
                    patient_key=patient_key,
                    study=study,
                    lateral=bool(train and rng.random() < cfg.lateral_fraction),
                    mode=mode,
                    seed=cfg.seed,
                    size=cfg.size,
                    conspicuity=cfg.conspicuity,
                    jpeg_quality=cfg.jpeg_quality,
                    want_masks=not train or cfg.train_masks,
                    annotate=not train and cfg.annotator,
                )
            )
        patient_key += 1
    return jobs


def _run_jobs(jobs: list[_Job], workers: int) -> Generator[_Result, None, None]:
    if workers <= 1 or len(jobs) < 2 * workers:
        for job in jobs:
            yield _render_job(job)
        return
    # Spawn, not fork: callers may hold threads (Ray, torch) that fork would copy in a broken state. An executor,
    # not a multiprocessing.Pool: a worker that dies (or cannot start, e.g. when __main__ is read from stdin) breaks
    # the executor with an error, where a Pool would replace it forever and hang.
    chunksize = max(1, min(16, len(jobs) // (8 * workers)))
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        yield from pool.map(_render_job, jobs, chunksize=chunksize)
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"phantom generator: a worker process died ({exc}); if the calling program is read from stdin or an "
            "interactive session, run it from a file, or use synth.workers=1"
        ) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # also when the caller stops early: no work left queued


def _write(out_dir: str, rel: str, data: bytes) -> None:
    with fsio.open_file(fsio.join(out_dir, rel), "wb") as f:
        f.write(data)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def _write_split(
    out_dir: str,
    split: str,
    jobs: list[_Job],
    results: Generator[_Result, None, None],
    train_masks: bool,
    progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write one split's images, CSV and ground truth from the next ``len(jobs)`` results; return its summary."""
    frontal_rows: list[list[str]] = []
    all_rows: list[list[str]] = []
    segs: dict[str, Any] = {}
    polys: dict[str, Any] = {}
    expert_segs: dict[str, Any] = {}
    expert_polys: dict[str, Any] = {}
    mask_counts = dict.fromkeys(TASKS, 0)
    modes = {"jpeg": 0, "png16": 0, "rgb": 0}
    for job in jobs:
        res = next(results)
        for rel, data in res.files:
            _write(out_dir, rel, data)
        frontal_rows.append(res.rows[0])
        all_rows.extend(res.rows)
        modes[job.mode] += 1
        for t in res.present:
            mask_counts[t] += 1
        if res.segmentation is not None:
            segs[res.image_id] = res.segmentation
        if res.polygons is not None:
            polys[res.image_id] = {"img_size": list(res.size), **res.polygons}
        if res.expert_segmentation is not None and res.expert_polygons is not None:
            expert_segs[res.image_id] = res.expert_segmentation
            expert_polys[res.image_id] = {"img_size": list(res.size), **res.expert_polygons}
        if progress is not None:
            progress()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(all_rows)
    _write(out_dir, f"{split}.csv", buf.getvalue().encode("utf-8"))
    if split != "train" or train_masks:
        _write(out_dir, f"gt_segmentations_{split}.json", _json_bytes(segs))
    if split != "train":
        _write(out_dir, f"gt_annotations_{split}.json", _json_bytes(polys))
    if any(job.annotate for job in jobs):
        _write(out_dir, f"expert_segmentations_{split}.json", _json_bytes(expert_segs))
        _write(out_dir, f"expert_annotations_{split}.json", _json_bytes(expert_polys))
    n = max(1, len(jobs))
    return {
        "frontal_images": len(jobs),
        "rows": len(all_rows),
        "lateral_images": len(all_rows) - len(frontal_rows),
        "patients": len({j.patient for j in jobs}),
        "file_modes": modes,
        "label_prevalence": label_prevalence(frontal_rows),
        "mask_prevalence": {t: round(c / n, 4) for t, c in mask_counts.items()},
    }


def generate(out_dir: str, cfg: SynthConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write a phantom CheXpert tree with CheXlocalize ground truth under ``out_dir``.

    Writes (paths relative to ``out_dir``): ``train.csv``, ``valid.csv``, ``test.csv`` (exactly CSV_HEADER; Path
    like ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``, relative to ``out_dir``); the
    images under ``CheXpert-v1.0-small/``; ``gt_segmentations_{valid,test}.json`` (all 10 tasks per image, COCO
    RLE at original size, empty for negatives); ``gt_annotations_{valid,test}.json`` (polygons of the positive
    tasks); ``gt_segmentations_train.json`` if ``cfg.train_masks``; with ``cfg.annotator``, an expert annotator's
    hand-drawn masks of valid and test (``expert_annotations_{valid,test}.json`` polygons and
    ``expert_segmentations_{valid,test}.json`` RLEs, :mod:`chexseg_dist.synth.annotator`); and ``phantom_meta.json``.

    Args:
        out_dir: local directory or fsspec URI.
        cfg: the generator settings; the same settings give byte-identical files whatever ``cfg.workers``.
        progress: called with ``(studies written, total)`` after each study (progress lines; no effect on output).

    Returns:
        The contents of ``phantom_meta.json``: generator version, seed, settings, counts and per-split label
        prevalences (share of frontal rows that are positive / negative / uncertain / blank) and mask prevalences.
    """
    fsio.makedirs(out_dir)
    layouts: dict[str, list[_Job]] = {}
    layouts["train"] = _layout(cfg, "train", cfg.n_train, 1)
    n_train_patients = layouts["train"][-1].patient if layouts["train"] else 0
    first_valid = max(_VALID_FIRST_PATIENT, n_train_patients + 1)
    layouts["valid"] = _layout(cfg, "valid", cfg.n_valid, first_valid)
    layouts["test"] = _layout(cfg, "test", cfg.n_test, first_valid + max(_CHEXPERT_VALID_PATIENTS, cfg.n_valid))
    meta: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "splits": {},
    }
    meta["config"].pop("workers")  # an execution detail: the output does not depend on it
    # One pool for all splits (spawning workers costs seconds); results arrive in job order.
    jobs = [job for split in SPLITS for job in layouts[split]]
    results = _run_jobs(jobs, cfg.workers)
    written = [0]

    def one_more() -> None:
        written[0] += 1
        if progress is not None:
            progress(written[0], len(jobs))

    try:
        for split in SPLITS:
            meta["splits"][split] = _write_split(out_dir, split, layouts[split], results, cfg.train_masks, one_more)
    finally:
        results.close()  # stops the worker pool even if writing failed
    _write(out_dir, "phantom_meta.json", _json_bytes(meta))
    return meta
