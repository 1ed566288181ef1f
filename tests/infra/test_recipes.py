"""The cluster recipes in infra/ stay true to the code and safe to apply, checked statically (no cluster, no Docker).

- every YAML parses; every RayJob entrypoint parses with its command's parser; the launcher YAMLs pass Ray's schema;
- token authentication is on everywhere, and every Ray container carries the token;
- the image runs as a numeric non-root user without passwordless sudo; every pod forbids privilege escalation;
- each RayJob's cluster fits its job's settings (actors or training workers, GPUs, CPUs left for decoding);
- the dashboard never leaves the cluster (no LoadBalancer, NodePort, Ingress, host port, public launcher rule);
- the image's base tag matches the Ray and Python versions pinned in pyproject.toml, and its COPY sources exist;
- every Ray node sets object-store-memory, within its memory and below its /dev/shm.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from chexseg_dist.cli._args import load_command_config
from chexseg_dist.cli.main import build_command_parser
from chexseg_dist.core.ray_env import pool_problem

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
JOB_COMMANDS = {
    "jobs/pseudolabel.py": "pseudolabel",
    "jobs/train_classifier.py": "train-classifier",
    "jobs/train_segmentation.py": "train-segmentation",
}
INFRA_YAML = sorted(p.relative_to(ROOT).as_posix() for p in INFRA.rglob("*.yaml"))
LAUNCHER_YAML = sorted(p.relative_to(ROOT).as_posix() for p in (INFRA / "cluster-launcher").glob("*.yaml"))
GIB = 2**30
#: Memory of the cloud instance types the launcher recipes use (bytes; GCP's "GB" read as 10^9, the lower figure).
INSTANCE_MEMORY = {
    "m6i.xlarge": 16 * GIB,
    "c6i.4xlarge": 32 * GIB,
    "g5.2xlarge": 32 * GIB,
    "n2-standard-4": 16 * 10**9,
    "n2-highcpu-32": 32 * 10**9,
    "g2-standard-8": 32 * 10**9,
}
#: The largest share of a node's memory its object store may take (Ray's own default is 30%).
MAX_OBJECT_STORE_SHARE = 0.5


# ---------------------------------------------------------------------------------------------------- reading
def _docs(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if isinstance(d, dict)]


def _manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, document) for every Kubernetes manifest (a document with a ``kind``)."""
    for path in INFRA_YAML:
        for doc in _docs(path):
            if "kind" in doc:
                yield path, doc


def _rayjobs() -> list[tuple[str, dict[str, Any]]]:
    return [(path, doc) for path, doc in _manifests() if doc["kind"] == "RayJob"]


def _ray_clusters() -> list[tuple[str, dict[str, Any]]]:
    """(label, RayCluster spec): standalone RayClusters and the clusters RayJobs create."""
    found = [(f"{path} RayCluster", doc["spec"]) for path, doc in _manifests() if doc["kind"] == "RayCluster"]
    found += [(f"{path} RayJob", doc["spec"]["rayClusterSpec"]) for path, doc in _rayjobs()]
    return found


def _ray_groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group) for the head group and every worker group of a RayCluster spec."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every pod a manifest creates: Ray heads and workers, RayJob submitters."""
    pods = [
        (f"{label} {name}", group["template"]["spec"])
        for label, spec in _ray_clusters()
        for name, group in _ray_groups(spec)
    ]
    pods += [(f"{path} submitter", doc["spec"]["submitterPodTemplate"]["spec"]) for path, doc in _rayjobs()]
    return pods


def _ray_container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]  # KubeRay runs Ray in the first container


def _quantity(value: object) -> float:
    """A Kubernetes quantity ("16Gi", "500m", "8") as a number (bytes or cores)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in (*units, ""), f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def _launcher(path: str) -> dict[str, Any]:
    return _docs(path)[0]


def _start_command(cfg: dict[str, Any], key: str) -> list[str]:
    """The ``ray start`` command of ``head_start_ray_commands`` or ``worker_start_ray_commands``, as argv."""
    starts = [shlex.split(c) for c in cfg.get(key, []) if "ray start" in c]
    assert len(starts) == 1, f"{key}: expected one explicit `ray start` command (Ray's default opens the dashboard)"
    return starts[0]


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` or ``--name VALUE`` in argv (last one wins), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("path", INFRA_YAML)
def test_infra_yaml_parses(path: str) -> None:
    docs = list(yaml.safe_load_all((ROOT / path).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def _entrypoints() -> list[str]:
    return [doc["spec"]["entrypoint"] for _, doc in _rayjobs()]


def _entrypoint_ids() -> list[str]:
    return [path for path, _ in _rayjobs()]


def test_there_is_a_rayjob_for_every_job() -> None:
    submitted = {shlex.split(e)[1] for e in _entrypoints()}
    assert submitted == set(JOB_COMMANDS), (
        f"RayJobs submit {sorted(submitted)}; expected one per {sorted(JOB_COMMANDS)}"
    )


@pytest.mark.parametrize("entrypoint", _entrypoints(), ids=_entrypoint_ids())
def test_rayjob_entrypoints_parse_with_the_job_arguments(entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1] in JOB_COMMANDS
    assert (ROOT / argv[1]).is_file()
    args = build_command_parser(JOB_COMMANDS[argv[1]]).parse_args(argv[2:])
    assert args.preset == "paper"
    load_command_config(JOB_COMMANDS[argv[1]], args)  # every --set names a real field with a valid value


@pytest.mark.parametrize("path", LAUNCHER_YAML)
def test_launcher_config_passes_rays_schema(path: str) -> None:
    """What ``ray up`` does first: fill in the provider's defaults, then validate against Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_launcher(path)))


# ---------------------------------------------------------------------------------------------------- tokens
def _auth_modes(node: object) -> list[str]:
    """Every value a recipe gives RAY_AUTH_MODE: Kubernetes env entries and ``--env NAME=VALUE`` docker options."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("name") == "RAY_AUTH_MODE":
            found.append(str(node.get("value")))
        for value in node.values():
            found += _auth_modes(value)
    elif isinstance(node, list):
        for item in node:
            found += _auth_modes(item)
    elif isinstance(node, str):
        found += [m.split("=", 1)[1] for m in shlex.split(node) if m.startswith("RAY_AUTH_MODE=")]
    return found


@pytest.mark.parametrize("path", INFRA_YAML)
def test_every_recipe_keeps_token_authentication_on(path: str) -> None:
    """Every recipe that starts Ray sets RAY_AUTH_MODE, and to the value ``token`` (the cluster launcher included)."""
    modes = [m for doc in _docs(path) for m in _auth_modes(doc)]
    assert modes, f"{path} never sets RAY_AUTH_MODE: Ray token authentication must stay on"
    assert set(modes) == {"token"}, f"{path} sets RAY_AUTH_MODE to {sorted(set(modes))}, expected 'token'"


def test_every_ray_container_carries_the_token() -> None:
    """Heads, workers, RayJob submitters and the autoscaler sidecar: without the token Ray refuses them."""
    envs = [(label, _ray_container(pod).get("env", [])) for label, pod in _pod_specs()]
    envs += [
        (f"{label} autoscaler", spec.get("autoscalerOptions", {}).get("env", []))
        for label, spec in _ray_clusters()
        if spec.get("enableInTreeAutoscaling")
    ]
    for label, env in envs:
        assert {e["name"] for e in env} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{label}: no Ray token"


# ---------------------------------------------------------------------------------------------------- (a) non-root
def test_image_runs_as_a_numeric_non_root_user_without_passwordless_sudo() -> None:
    """The rayproject/ray base gives its user ``ray`` passwordless sudo; the image must remove it, as root, and end
    as a numeric non-root user (Kubernetes' runAsNonRoot cannot verify a user name)."""
    user, cleaned = "", False
    for instruction, args in _dockerfile():
        if instruction == "USER":
            user = args.split(":")[0].strip()
        elif instruction == "RUN" and "NOPASSWD" in args and "/NOPASSWD/d" not in args:
            raise AssertionError(f"Dockerfile grants passwordless sudo again: RUN {args}")
        elif instruction == "RUN" and "/NOPASSWD/d" in args and "/etc/sudoers.d/" in args:
            assert user in ("root", "0"), "removing the sudoers entries needs USER root before that RUN"
            cleaned = True
    assert cleaned, "Dockerfile must delete the base image's NOPASSWD sudoers entries (/etc/sudoers, /etc/sudoers.d/)"
    assert user.isdigit() and int(user) != 0, f"the image's last USER is {user!r}: give a numeric non-root uid"


@pytest.mark.parametrize("label", [label for label, _ in _pod_specs()])
def test_every_pod_runs_as_non_root_without_privilege_escalation(label: str) -> None:
    pod = dict(_pod_specs())[label]
    pod_security = pod.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True, f"{label}: set securityContext.runAsNonRoot: true"
    assert pod_security.get("runAsUser", 1) != 0, f"{label}: runAsUser 0 is root"
    for container in pod.get("initContainers", []) + pod["containers"]:
        security = container.get("securityContext", {})
        where = f"{label} container {container['name']}"
        assert security.get("allowPrivilegeEscalation") is False, f"{where}: set allowPrivilegeEscalation: false"
        assert "ALL" in security.get("capabilities", {}).get("drop", []), f"{where}: drop all capabilities"
        assert not security.get("privileged"), f"{where}: must not be privileged"


def test_the_autoscaler_sidecar_cannot_escalate_either() -> None:
    for label, spec in _ray_clusters():
        if spec.get("enableInTreeAutoscaling"):
            security = spec.get("autoscalerOptions", {}).get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, f"{label}: autoscalerOptions.securityContext"
            assert "ALL" in security.get("capabilities", {}).get("drop", []), f"{label}: autoscaler capabilities"


# ---------------------------------------------------------------------------------------------------- (b) sizing
def _pod_resources(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) that Ray sees in one pod of a group: rayStartParams first, else the container's limits."""
    params = group.get("rayStartParams") or {}
    limits = _ray_container(group["template"]["spec"])["resources"]["limits"]
    cpus = float(params["num-cpus"]) if "num-cpus" in params else _quantity(limits["cpu"])
    gpus = float(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get("nvidia.com/gpu", 0))
    return cpus, gpus


def _job_pool(entrypoint: str) -> tuple[str, int, float, float, float]:
    """(section, count, CPUs each, GPUs each, decode CPUs) of the fixed pool a RayJob's job asks for."""
    argv = shlex.split(entrypoint)
    command = JOB_COMMANDS[argv[1]]
    cfg = load_command_config(command, build_command_parser(command).parse_args(argv[2:]))
    if command == "pseudolabel":
        pl = cfg.pseudolabel
        return "pseudolabel", pl.num_actors, pl.cpus_per_actor, pl.gpus_per_actor, pl.decode_cpus
    section = command.replace("-", "_")
    train = getattr(cfg, section)
    return section, train.num_workers, train.cpus_per_worker, 1.0 if train.use_gpu else 0.0, train.decode_cpus


@pytest.mark.parametrize("path", [path for path, _ in _rayjobs()])
def test_rayjob_cluster_fits_its_job(path: str) -> None:
    """At the groups' maxReplicas: the job's actors or training workers fit (each on one pod), every GPU is used,
    and at least decode_cpus CPUs remain beside them for the decoding tasks (else Ray Data waits forever)."""
    doc = dict(_rayjobs())[path]
    section, count, cpus_each, gpus_each, decode_cpus = _job_pool(doc["spec"]["entrypoint"])
    pods = [
        (_pod_resources(g), int(g.get("maxReplicas", g.get("replicas", 1))))
        for _, g in _ray_groups(doc["spec"]["rayClusterSpec"])
    ]
    total = {"CPU": sum(c * n for (c, _), n in pods), "GPU": sum(g * n for (_, g), n in pods)}
    problem = pool_problem(section, count, cpus_each, gpus_each, decode_cpus, total)
    assert problem is None, f"{path}: {problem}"
    fit = sum(
        n * min(c // cpus_each if cpus_each else count, g // gpus_each if gpus_each else count) for (c, g), n in pods
    )
    assert fit >= count, f"{path}: only {fit:g} of {count} x (CPU {cpus_each}, GPU {gpus_each}) fit on single pods"
    assert count * gpus_each >= total["GPU"] - 1e-9, (
        f"{path}: the job uses {count * gpus_each:g} of the cluster's {total['GPU']:g} GPUs; the rest would sit idle"
    )


# ---------------------------------------------------------------------------------------------------- (c) dashboard
def _walk(node: object, key: str) -> Iterator[object]:
    """Every value stored under ``key`` anywhere in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


@pytest.mark.parametrize("path", [p for p in INFRA_YAML if p not in LAUNCHER_YAML])
def test_no_manifest_exposes_the_dashboard(path: str) -> None:
    """dashboard-host 0.0.0.0 is only reachable through the ClusterIP head Service, never from outside."""
    for doc in _docs(path):
        kind = doc.get("kind")
        assert kind not in ("Ingress", "Route", "Gateway", "HTTPRoute"), f"{path}: {kind} would expose the cluster"
        if kind == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path}: Service type {doc['spec']['type']}"
        for service_type in _walk(doc, "serviceType"):
            assert service_type == "ClusterIP", f"{path}: serviceType {service_type} exposes the head (dashboard)"
        for head_service in _walk(doc, "headService"):
            assert head_service.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", f"{path}: headService type"
        assert not any(_walk(doc, "enableIngress")), f"{path}: enableIngress creates an Ingress for the dashboard"
        assert not any(_walk(doc, "hostPort")), f"{path}: hostPort publishes a port on the node's address"
        assert not any(_walk(doc, "hostNetwork")), f"{path}: hostNetwork puts the dashboard on the node's address"


def _covers(rule: dict[str, Any], port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    return int(rule.get("FromPort", -1)) <= port <= int(rule.get("ToPort", -1))


@pytest.mark.parametrize("path", LAUNCHER_YAML)
def test_launcher_keeps_the_dashboard_private(path: str) -> None:
    """Reach it with ``ray dashboard CLUSTER.yaml`` (SSH forwarding): bound to localhost, no public rule for it."""
    cfg = _launcher(path)
    host = _flag(_start_command(cfg, "head_start_ray_commands"), "--dashboard-host")
    assert host in (None, "localhost", "127.0.0.1"), f"{path}: --dashboard-host={host} listens on every interface"
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        public = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        ]
        opened = _covers(rule, 8265) and {"0.0.0.0/0", "::/0"} & set(public)
        assert not opened, f"{path}: security group rule {rule} opens the dashboard port to the internet"


# ---------------------------------------------------------------------------------------------------- (d) versions
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _base_image() -> tuple[str, str]:
    """(Ray version, Python version) of the Dockerfile's rayproject/ray base image tag."""
    froms = [args for instruction, args in _dockerfile() if instruction == "FROM"]
    assert len(froms) == 1, "expected one FROM in the Dockerfile"
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(?:gpu|cu\d+)", froms[0].split()[0])
    assert match, f"base image {froms[0]!r}: expected rayproject/ray:X.Y.Z-py3NN-gpu (or -cuNNN)"
    return match.group(1), f"3.{match.group(2)}"


def test_base_image_matches_the_pinned_ray_and_python() -> None:
    ray_version, python_version = _base_image()
    (ray,) = [Requirement(d) for d in _pyproject()["dependencies"] if Requirement(d).name == "ray"]
    assert ray.specifier.contains(ray_version), f"base image Ray {ray_version} is outside pyproject's {ray}"
    assert SpecifierSet(_pyproject()["requires-python"]).contains(f"{python_version}.0"), (
        f"base image Python {python_version} is outside requires-python {_pyproject()['requires-python']}"
    )
    for label, spec in _ray_clusters():
        assert spec["rayVersion"] == ray_version, f"{label}: rayVersion {spec['rayVersion']} != image Ray {ray_version}"


def test_recipes_run_the_image_the_dockerfile_builds() -> None:
    """Every pod and launcher node runs REGISTRY/chexseg-dist:<project version>, the tag the Dockerfile documents."""
    tag = f"REGISTRY/chexseg-dist:{_pyproject()['version']}"
    assert f"-t {tag}" in DOCKERFILE.read_text(), f"the Dockerfile's build command should tag {tag}"
    images = [(label, _ray_container(pod)["image"]) for label, pod in _pod_specs()]
    images += [(path, _launcher(path)["docker"]["image"]) for path in LAUNCHER_YAML]
    for label, image in images:
        assert image == tag, f"{label}: image {image}, expected {tag}"


def test_dockerfile_copies_only_what_exists() -> None:
    for instruction, args in _dockerfile():
        if instruction in ("COPY", "ADD"):
            *sources, _ = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile {instruction} {source}: not in the repository"


# ---------------------------------------------------------------------------------------------------- (e) memory
@pytest.mark.parametrize(
    "label", [f"{label} {name}" for label, spec in _ray_clusters() for name, _ in _ray_groups(spec)]
)
def test_every_kuberay_node_sizes_its_object_store(label: str) -> None:
    """object-store-memory set, at most half the pod's memory limit, inside a memory-backed /dev/shm at least as
    large (Kubernetes gives /dev/shm 64 MiB; Ray then refuses a store over 10 GB or falls back to slow disk)."""
    group = {f"{lb} {name}": g for lb, spec in _ray_clusters() for name, g in _ray_groups(spec)}[label]
    raw = (group.get("rayStartParams") or {}).get("object-store-memory")
    assert raw is not None, f"{label}: set rayStartParams object-store-memory (bytes)"
    store = int(raw)
    pod = group["template"]["spec"]
    limit = _quantity(_ray_container(pod)["resources"]["limits"]["memory"])
    assert 0 < store <= MAX_OBJECT_STORE_SHARE * limit, f"{label}: object store {store} B vs memory limit {limit:g} B"
    mounts = {m["name"] for m in _ray_container(pod).get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    shm = [v["emptyDir"] for v in pod.get("volumes", []) if v["name"] in mounts and "emptyDir" in v]
    assert shm and shm[0].get("medium") == "Memory", f"{label}: mount an emptyDir {{medium: Memory}} at /dev/shm"
    assert _quantity(shm[0].get("sizeLimit", 0)) >= store, f"{label}: /dev/shm sizeLimit below the object store"


def _shm_size(options: list[str]) -> float:
    """Bytes of ``--shm-size`` among docker run options (docker's units are binary), 0 if absent."""
    argv = shlex.split(" ".join(options))
    value = _flag(argv, "--shm-size")
    if value is None:
        return 0.0
    match = re.fullmatch(r"(\d+)([bkmg]?)", value.lower())
    assert match, f"--shm-size={value}"
    return int(match.group(1)) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)]


@pytest.mark.parametrize("path", LAUNCHER_YAML)
def test_every_launcher_node_sizes_its_object_store(path: str) -> None:
    """--object-store-memory in both start commands, at most half of every node type's memory it runs on, and each
    node's container started with a /dev/shm (--shm-size) at least that large."""
    cfg = _launcher(path)
    docker = cfg["docker"]
    head_type = cfg["head_node_type"]
    for key, node_types in (
        ("head_start_ray_commands", [head_type]),
        ("worker_start_ray_commands", [t for t in cfg["available_node_types"] if t != head_type]),
    ):
        raw = _flag(_start_command(cfg, key), "--object-store-memory")
        assert raw is not None and raw.isdigit(), f"{path} {key}: pass --object-store-memory=BYTES"
        store = int(raw)
        for node_type in node_types:
            node = cfg["available_node_types"][node_type]
            machine = node["node_config"].get("InstanceType") or node["node_config"].get("machineType")
            assert machine in INSTANCE_MEMORY, f"{path} {node_type}: add {machine}'s memory to INSTANCE_MEMORY"
            memory = INSTANCE_MEMORY[machine]
            assert 0 < store <= MAX_OBJECT_STORE_SHARE * memory, f"{path} {node_type}: {store} B of {memory} B"
            # Ray replaces the global docker settings with a node type's own (dict.update), then adds run_options.
            role = "head_run_options" if node_type == head_type else "worker_run_options"
            options = docker.get("run_options", []) + {**docker, **node.get("docker", {})}.get(role, [])
            assert _shm_size(options) >= store, f"{path} {node_type}: --shm-size below --object-store-memory"
