"""Several nodes, simulated: the pipeline on a three-node Ray cluster whose nodes share nothing but S3.

``ray.cluster_utils.Cluster`` starts, on this machine and with token authentication on, a head that runs no work
(``num_cpus=0``, as in the KubeRay recipe) and two worker nodes of 2 CPUs (Ray wants whole numbers), each with a
custom resource naming it: two classifier actors, or two Ray Train workers, of 1.5 CPUs each cannot share a node, and
each node keeps 0.5 CPU for the data tasks. The cluster and the commands run in a subprocess
(:mod:`multinode_driver`; this process may hold the session's Ray) whose working directory is an empty folder.
Every input and output lives on the moto S3 server: phantom data, manifests, the classifier and its Ray Train
storage, the map store. Checked: the work spread over both worker nodes (Ray's state API), the results equal those
of a one-node cluster bit for bit, and the driver wrote nothing to its local disk but the commands' logs.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from job_helpers import kill_session_processes
from maps_helpers import assert_stores_identical

from chexseg_dist.core import fsio
from chexseg_dist.store import MapStore

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.s3]

DRIVER = Path(__file__).with_name("multinode_driver.py")

MULTI_NODE = [
    {"num_cpus": 0, "resources": {"head": 1}},
    {"num_cpus": 2, "resources": {"node_a": 1}},
    {"num_cpus": 2, "resources": {"node_b": 1}},
]
ONE_NODE = [{"num_cpus": 4, "resources": {"head": 1}}]

SETTINGS = [
    "classifier.image_size=32",
    "train_classifier.epochs=1",
    "train_classifier.batch_size=4",
    "train_classifier.num_workers=2",
    "train_classifier.cpus_per_worker=1.5",
    "train_classifier.decode_cpus=0.5",
    "train_classifier.torch_threads=1",
    # Ray Data then ignores the workers' locality when splitting rows: the same rows reach the same rank anywhere.
    "train_classifier.preserve_order=true",
    "train_classifier.log_every_steps=0",
    "pseudolabel.num_actors=2",
    "pseudolabel.cpus_per_actor=1.5",
    "pseudolabel.batch_size=4",
    "pseudolabel.images_per_chunk=4",
    "pseudolabel.images_per_decode_task=2",
    "pseudolabel.decode_cpus=0.5",
    "pseudolabel.torch_threads=1",
]
SETS = [a for s in SETTINGS for a in ("--set", s)]


def _command(*argv: str, probe: bool = False) -> dict[str, Any]:
    """A driver command; ``probe``: read the actors and tasks it created from the state API afterwards."""
    return {"argv": list(argv), "probe": probe}


def _train(manifests: str, run: str) -> dict[str, Any]:
    train, valid = f"{manifests}/train.parquet", f"{manifests}/valid.parquet"
    storage = f"train_classifier.storage_path={run}/ray-train"
    out = f"{run}/classifier"
    return _command(
        "train-classifier", "--train", train, "--valid", valid, "--out", out, "--set", storage, *SETS, probe=True
    )


def _pseudolabel(manifests: str, checkpoint: str, store: str) -> dict[str, Any]:
    manifest = f"{manifests}/train.parquet"
    return _command(
        "pseudolabel", "--manifest", manifest, "--checkpoint", checkpoint, "--store", store, *SETS, probe=True
    )


def _drive(name: str, nodes: list[dict], commands: list[dict[str, Any]], env: dict[str, str], cwd: Path) -> dict:
    """Run the commands on a fresh cluster of ``nodes`` in a driver subprocess; returns its report (see the driver)."""
    temp = Path(f"/tmp/r{name}{os.getpid()}_")  # short: Ray's socket paths must stay under 107 bytes
    temp.mkdir(exist_ok=True)
    spec = {"nodes": nodes, "dashboard": len(nodes) > 1, "commands": commands, "result": str(temp / "result.json")}
    log = temp / "driver.log"
    report: dict[str, Any] = {}
    try:
        with log.open("w") as sink:
            proc = subprocess.run(
                [sys.executable, str(DRIVER), json.dumps(spec)],
                env={**env, "RAY_TMPDIR": str(temp)},
                cwd=cwd,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            )
        if proc.returncode == 0:
            report = json.loads((temp / "result.json").read_text())
    except subprocess.TimeoutExpired:
        pass
    finally:
        printed = log.read_text(errors="replace")
        kill_session_processes(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert report, f"the {name} driver failed or hung:\n{printed[-6000:]}"
    for entry in report["commands"]:
        assert entry["status"] == 0, f"chexseg {' '.join(entry['argv'])} -> {entry['status']}:\n{printed[-4000:]}"
    assert len(report["commands"]) == len(commands)
    return report


def _on(report: dict, rows: list[dict]) -> list[str]:
    """The nodes (by their custom resource) the actors or tasks ran on, e.g. ``["node_a", "node_b"]``."""
    return sorted(report["nodes"][r["node_id"]]["label"] for r in rows)


def _files(root: Path) -> set[str]:
    """Regular files under ``root``. Not sockets: killing the cluster leaves the Unix socket of the dashboard's
    forkserver (``pymp-*/listener-*`` in $TMPDIR), which holds no data."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _weights(checkpoint: str) -> dict[str, Any]:
    import torch

    state = torch.load(io.BytesIO(fsio.read_bytes(f"{checkpoint}/model.pt")), map_location="cpu", weights_only=False)
    return state.get("model", state)


def test_pseudolabels_and_training_spread_over_nodes_that_share_only_s3(s3_bucket: str, tmp_path: Path) -> None:
    import torch

    # All the test itself writes locally: three empty folders (the driver's cwd, TMPDIR and HOME).
    cwd, tmp, home = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "home"
    for folder in (cwd, tmp, home):
        folder.mkdir()
    env = dict(os.environ)  # the S3 endpoint and credentials of the s3_server fixture
    env.pop("RAY_ADDRESS", None)
    env.update(
        PYTHONUNBUFFERED="1",
        RAY_AUTH_MODE="token",  # never off: the nodes, the jobs and the state API all authenticate
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        TMPDIR=str(tmp),
        HOME=str(home),  # Ray's ~/ray_results, caches: anything under ~ would show
    )
    data, manifests = f"{s3_bucket}/data", f"{s3_bucket}/manifests"
    multi, one = f"{s3_bucket}/multi", f"{s3_bucket}/one"
    checkpoint = f"{multi}/classifier"  # both clusters pseudo-label with the classifier trained on several nodes

    synth = ["synth", "--out", data, "--n-train", "16", "--n-valid", "8", "--n-test", "2", "--size", "64"]
    manifest = [
        _command("manifest", "--csv", f"{data}/{split}.csv", "--root", data, "--out", f"{manifests}/{split}.parquet")
        for split in ("train", "valid")
    ]
    commands = [_command(*synth, "--seed", "3", "--workers", "1"), *manifest, _train(manifests, multi)]
    report = _drive("m", MULTI_NODE, [*commands, _pseudolabel(manifests, checkpoint, f"{multi}/maps.zarr")], env, cwd)
    reference = _drive(
        "o", ONE_NODE, [_train(manifests, one), _pseudolabel(manifests, checkpoint, f"{one}/maps.zarr")], env, cwd
    )
    assert report["unauthenticated_status"] in (401, 403), "the cluster answered a request without the token"

    # Training: one Ray Train worker on each worker node.
    train, label = report["commands"][3], report["commands"][4]
    workers = [a for a in train["actors"] if a["class_name"] == "RayTrainWorker"]
    assert _on(report, workers) == ["node_a", "node_b"], train["actors"]
    # Pseudo-labelling: a classifier actor on each worker node, and decode tasks on both.
    actors = [a for a in label["actors"] if "ClassifierPredictor" in (a["repr_name"] or "")]
    assert _on(report, actors) == ["node_a", "node_b"], label["actors"]
    decode = [t for t in label["tasks"] if "decode_frames" in t["name"]]
    assert len(decode) >= 8 and set(_on(report, decode)) == {"node_a", "node_b"}, label["tasks"]

    # The same results as on one node: the store image by image and bit for bit; the classifier weight by weight.
    assert MapStore.open(f"{multi}/maps.zarr").done().sum() == 16
    assert_stores_identical(f"{multi}/maps.zarr", f"{one}/maps.zarr")
    wa, wb = _weights(checkpoint), _weights(f"{one}/classifier")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "the classifiers differ"

    # Nothing on the driver's disk. Ray Train's run is in its S3 storage (no local default); the empty cwd (relative
    # paths), TMPDIR (temp files) and HOME stayed empty; the driver process opened no file for writing, not even one
    # deleted since (a temp file handed to a worker), but (a) the commands' logs: a log must be a local file, and for
    # S3 outputs it goes under $TMPDIR/chexseg-logs; (b) the lock file of the temp copy Ray Train's
    # Checkpoint.as_directory() makes when the driver reads the best epoch's state, read there and deleted.
    fs, inner = fsio.filesystem(multi)
    assert fs.ls(f"{inner}/ray-train/classifier"), "Ray Train's run is not in its S3 storage"
    allowed = (str(tmp / "chexseg-logs") + os.sep, str(tmp / "checkpoint_tmp_"))
    for rep in (report, reference):
        assert [p for p in rep["written"] if not p.startswith(allowed)] == [], "\n".join(rep["written"])
    left = {p for p in _files(tmp_path) if not p.startswith("tmp/chexseg-logs/")}
    assert not left, sorted(left)
    assert _files(tmp / "chexseg-logs"), "the commands' logs are missing: were TMPDIR and the driver's env honoured?"
