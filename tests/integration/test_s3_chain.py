"""The pipeline on object storage, as a cloud user runs it, against the moto server on 127.0.0.1 (real HTTP): phantom
data uploaded to a bucket -> manifests read from S3 -> classifier trained from S3 with Ray Train storage on S3 (and
resumed by re-running from that storage) -> pseudo-labels into S3 stores -> thresholds, masks, evaluation and
overlays on S3. The same chain on local disk gives the same bits: the stores image by image, the checkpoints, the
thresholds and the evaluation. The test server's secret key appears in nothing printed (Ray worker logs included)
and nothing written (objects, stores, sidecars, configs, checkpoints, reports, Ray Train storage, logs)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TEST_SECRET
from maps_helpers import assert_stores_identical

from chexseg_dist.cli import main
from chexseg_dist.core import fsio

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.s3]

SETTINGS = [
    "classifier.image_size=32",
    "train_classifier.batch_size=8",
    "train_classifier.num_workers=1",
    "train_classifier.cpus_per_worker=1",
    "train_classifier.decode_cpus=0.5",
    "train_classifier.torch_threads=1",
    "train_classifier.preserve_order=true",
    "train_classifier.log_every_steps=0",
    "pseudolabel.batch_size=4",
    "pseudolabel.images_per_chunk=4",
    "pseudolabel.images_per_decode_task=4",
    "pseudolabel.decode_cpus=0.5",
    "pseudolabel.torch_threads=1",
]


def _run(argv: list[str], capfd: pytest.CaptureFixture[str], printed: list[str]) -> str:
    settings = [] if argv[0] == "manifest" else SETTINGS  # manifest takes no config
    status = main([*argv, *(a for s in settings for a in ("--set", s))])
    out = capfd.readouterr()
    printed.append(out.out + out.err)
    assert status == 0, f"chexseg {' '.join(argv)} -> {status}:\n{(out.out + out.err)[-4000:]}"
    return out.out


def _chain(base: str, data: str, capfd: pytest.CaptureFixture[str], printed: list[str]) -> dict[str, str]:
    """Every stage with its inputs and outputs under ``base`` (a local folder or an s3:// prefix)."""
    p = {
        "manifests": f"{base}/manifests",
        "ckpt": f"{base}/classifier",
        "ray": f"{base}/ray-train",
        "maps": f"{base}/maps",
        "thresholds": f"{base}/thresholds.json",
        "pred": f"{base}/predictions/test_tuned.json",
        "eval": f"{base}/eval",
        "overlays": f"{base}/overlays",
    }
    for split in ("train", "valid", "test"):
        _run(["manifest", "--csv", f"{data}/{split}.csv", "--root", data, "--out", f"{p['manifests']}/{split}.parquet"],
             capfd, printed)  # fmt: skip
    train = ["train-classifier", "--train", f"{p['manifests']}/train.parquet", "--valid",
             f"{p['manifests']}/valid.parquet", "--out", p["ckpt"], "--set",
             f"train_classifier.storage_path={p['ray']}"]  # fmt: skip
    _run([*train, "--set", "train_classifier.epochs=1"], capfd, printed)
    # Re-run with a longer schedule: Ray Train finds epoch 1's checkpoint in its storage and goes on from there.
    resumed = _run([*train, "--set", "train_classifier.epochs=2"], capfd, printed)
    assert "resuming" in resumed and "at epoch 2/2" in resumed, resumed[-3000:]
    for split in ("valid", "test"):
        _run(["pseudolabel", "--manifest", f"{p['manifests']}/{split}.parquet", "--checkpoint", p["ckpt"], "--store",
              f"{p['maps']}/{split}.zarr"], capfd, printed)  # fmt: skip
    _run(["tune-thresholds", "--store", f"{p['maps']}/valid.zarr", "--gt", f"{data}/gt_segmentations_valid.json",
          "--out", p["thresholds"]], capfd, printed)  # fmt: skip
    _run(["export-masks", "--store", f"{p['maps']}/test.zarr", "--strategy", "tuned", "--thresholds",
          p["thresholds"], "--out", p["pred"]], capfd, printed)  # fmt: skip
    _run(["evaluate", "--gt", f"{data}/gt_segmentations_test.json", "--pred", p["pred"], "--maps",
          f"{p['maps']}/test.zarr", "--out", p["eval"], "--n-bootstrap", "50"], capfd, printed)  # fmt: skip
    ids = pq.read_table(io.BytesIO(fsio.read_bytes(f"{p['manifests']}/test.parquet")), columns=["image_id"])
    _run(["overlay", "--store", f"{p['maps']}/test.zarr", "--manifest", f"{p['manifests']}/test.parquet", "--ids",
          ids.column("image_id")[0].as_py(), "--gt", f"{data}/gt_segmentations_test.json", "--thresholds",
          p["thresholds"], "--out", p["overlays"]], capfd, printed)  # fmt: skip
    return p


def _state(ckpt: str) -> dict[str, torch.Tensor]:
    state = torch.load(io.BytesIO(fsio.read_bytes(f"{ckpt}/model.pt")), map_location="cpu", weights_only=False)
    return state.get("model", state) if isinstance(state, dict) else state


def test_the_chain_on_s3_equals_the_chain_on_local_disk_and_leaks_no_secret(
    ray_cluster: None, s3_bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import ray

    started = time.time()
    printed: list[str] = []
    data = str(tmp_path / "data")
    _run(["synth", "--out", data, "--n-train", "24", "--n-valid", "8", "--n-test", "8", "--size", "64", "--seed", "5"],
         capfd, printed)  # fmt: skip
    fs, inner = fsio.filesystem(s3_bucket)
    fs.put(data + "/", f"{inner}/upload/data", recursive=True)  # the user's upload: aws s3 sync, rclone, ...

    remote = _chain(f"{s3_bucket}/run", f"{s3_bucket}/upload/data", capfd, printed)
    local = _chain(str(tmp_path / "run"), data, capfd, printed)

    assert fs.ls(f"{inner}/run/ray-train"), "Ray Train's run is not in its S3 storage"
    assert not any(p.name == "classifier.ray" for p in tmp_path.rglob("*")), "a local default storage was used"
    sa, sb = _state(remote["ckpt"]), _state(local["ckpt"])
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "the classifiers differ"
    for split in ("valid", "test"):
        assert_stores_identical(f"{remote['maps']}/{split}.zarr", f"{local['maps']}/{split}.zarr")
    ta, tb = (json.loads(fsio.read_bytes(c["thresholds"])) for c in (remote, local))
    assert all(ta[k] == tb[k] for k in ("thresholds", "cutoffs", "curves", "n_images")), "the thresholds differ"
    assert fsio.read_bytes(remote["pred"]) == fsio.read_bytes(local["pred"])
    for name in ("summary.json", "per_image.csv"):
        assert fsio.read_bytes(f"{remote['eval']}/{name}") == fsio.read_bytes(f"{local['eval']}/{name}"), name
    assert fs.ls(f"{inner}/run/overlays") and fs.ls(f"{inner}/run/eval")

    # The secret: in nothing printed, nothing written to the bucket or to disk, no Ray log.
    secret = TEST_SECRET.encode()
    for text in printed:
        assert TEST_SECRET not in text
    for key in fs.find(inner):
        assert secret not in fs.cat_file(key), f"s3://{key}"
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # type: ignore[attr-defined]
    logs = [tmp_path, session / "logs", Path(os.environ.get("TMPDIR", "/tmp")) / "chexseg-logs"]
    scanned = 0
    for root in logs:
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file() and (root != logs[2] or path.stat().st_mtime >= started):
                assert secret not in path.read_bytes(), str(path)
                scanned += 1
    assert scanned > 50
