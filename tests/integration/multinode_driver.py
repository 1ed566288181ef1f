"""Run ``chexseg`` commands on a simulated multi-node Ray cluster started here; report where the work ran.

Used by ``test_multinode.py`` in a subprocess of its own (the test process may already hold a Ray instance). The
one argument is a JSON spec::

    {"nodes": [{"num_cpus": 0, "resources": {"head": 1}}, ...],   # the first is the head
     "dashboard": true,                    # on the head; needed for the state API (where actors and tasks ran)
     "commands": [{"argv": ["pseudolabel", ...], "probe": true}, ...],   # probe: read the state API after it
     "result": "/tmp/rm123_/result.json"}

Ray's files go under ``$RAY_TMPDIR/ray`` (keep it short: socket paths must stay under 107 bytes). Every node
gets explicit free ports (other Ray instances on this machine hold the defaults). Token authentication
is whatever the environment says (the test sets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``). Each command runs
through ``chexseg_dist.cli.main`` with ``RAY_ADDRESS`` pointing at the cluster, so it attaches as a job does. After
each command marked ``probe`` the actors and tasks it created are read from the state API (with their node ids).
The result file holds, per command, its exit status, seconds, and those actors and tasks; the nodes (node id -> the
custom resource naming it); the status code of a state-API request made without the token; and every file the
driver process opened for writing outside Ray's temp dir (``written``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from typing import Any

#: Ray's port parameters that would otherwise take a default (or a shared) port on every node.
NODE_PORTS = (
    "node_manager_port",
    "object_manager_port",
    "dashboard_agent_listen_port",
    "metrics_agent_port",  # the dashboard agent's gRPC port
    "metrics_export_port",
    "runtime_env_agent_port",
)
HEAD_PORTS = ("gcs_server_port", "dashboard_port", "ray_client_server_port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (all bound at once, so none is handed out twice)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))  # every interface: Ray binds its servers to the node's address, not the loopback
        return [int(s.getsockname()[1]) for s in socks]


def node_args(spec: dict[str, Any], head: bool, ports: list[int], dashboard: bool) -> dict[str, Any]:
    names = NODE_PORTS + (HEAD_PORTS if head else ())
    args: dict[str, Any] = dict(zip(names, ports))
    args.update(
        num_cpus=spec["num_cpus"],
        resources=spec.get("resources", {}),
        object_store_memory=100 * 1024 * 1024,
    )
    if head:
        args.update(include_dashboard=dashboard, dashboard_host="127.0.0.1")
    return args


def _state(dashboard: str, kind: str) -> list[dict[str, Any]]:
    from ray.util.state import list_actors, list_tasks

    if kind == "actors":
        rows = list_actors(address=dashboard, limit=10_000, detail=True, raise_on_missing_output=False)
        keep: tuple[str, ...] = ("actor_id", "class_name", "repr_name", "node_id", "state", "job_id", "pid")
    else:  # plain tasks only: the long-lived actors' method calls would never let the count settle
        rows = list_tasks(
            address=dashboard, filters=[("type", "=", "NORMAL_TASK")], limit=10_000, raise_on_missing_output=False
        )
        keep = ("task_id", "attempt_number", "name", "func_or_class_name", "node_id", "state", "job_id")
    return [{k: getattr(r, k, None) for k in keep} for r in rows]


def _new_since(dashboard: str, seen: dict[str, set[str]]) -> dict[str, list[dict[str, Any]]]:
    """Actors and tasks not seen before; polls until the state API has caught up (task events arrive each second)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in ("actors", "tasks"):
        key = "actor_id" if kind == "actors" else "task_id"
        last: list[dict[str, Any]] = []
        for _ in range(15):
            rows = [r for r in _state(dashboard, kind) if r[key] not in seen[kind]]
            if rows and len(rows) == len(last) and all(r["node_id"] for r in rows):
                break
            last = rows
            time.sleep(1.0)
        seen[kind] |= {r[key] for r in last}
        out[kind] = last
    return out


def unauthenticated_status(dashboard: str) -> int:
    """HTTP status of a state-API request without the token (401 or 403 when authentication is on)."""
    try:
        with urllib.request.urlopen(f"{dashboard}/api/v0/actors", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def watch_writes() -> set[str]:
    """Record every file this process opens for writing from now on, also those deleted since (an audit hook: it sees
    Python's ``open``/``os.open``, not writes made inside C++ libraries such as pyarrow's filesystems)."""
    written: set[str] = set()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or isinstance(args[0], int):
            return
        if sys._getframe(1).f_code.co_name == "_get_default_tempdir":
            return  # tempfile.gettempdir() probing that TMPDIR is writable (a file it deletes at once)
        path, mode, flags = args
        if (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and int(flags) & write_flags):
            written.add(os.path.abspath(os.fsdecode(path)))

    sys.addaudithook(hook)
    return written


def main(spec: dict[str, Any]) -> int:
    from ray.cluster_utils import Cluster

    from chexseg_dist.cli import main as cli_main

    dashboard_on = bool(spec.get("dashboard"))
    n_ports = len(NODE_PORTS) * len(spec["nodes"]) + len(HEAD_PORTS)
    ports = free_ports(n_ports)
    result: dict[str, Any] = {"commands": [], "nodes": {}}
    written = watch_writes()
    t0 = time.time()
    cluster = Cluster()
    try:
        for i, node_spec in enumerate(spec["nodes"]):
            head = i == 0
            n = len(NODE_PORTS) + (len(HEAD_PORTS) if head else 0)
            node = cluster.add_node(**node_args(node_spec, head, ports[:n], dashboard_on))
            ports = ports[n:]
            label = ",".join(sorted(node_spec.get("resources", {}))) or f"node{i}"
            result["nodes"][node.node_id] = {"label": label, "head": head, "num_cpus": node_spec["num_cpus"]}
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        dashboard = f"http://{cluster.webui_url}" if dashboard_on else ""
        if dashboard:
            os.environ["RAY_API_SERVER_ADDRESS"] = dashboard  # the state API would otherwise follow RAY_ADDRESS
            result["unauthenticated_status"] = unauthenticated_status(dashboard)
        print(f"driver: {len(spec['nodes'])} node(s) up in {time.time() - t0:.1f} s", flush=True)
        seen: dict[str, set[str]] = {"actors": set(), "tasks": set()}
        for command in spec["commands"]:
            t0 = time.time()
            status = cli_main(command["argv"])
            entry: dict[str, Any] = {"argv": command["argv"], "status": status, "seconds": round(time.time() - t0, 1)}
            t0 = time.time()
            if dashboard and status == 0 and command.get("probe"):
                entry.update(_new_since(dashboard, seen))
            print(
                f"driver: {command['argv'][0]} -> {status} in {entry['seconds']} s; state API {time.time() - t0:.1f} s"
            )
            result["commands"].append(entry)
            if status != 0:
                break
    finally:
        # Ray's own files (session, logs, sockets) live under RAY_TMPDIR; Python caches its bytecode.
        skip = (os.path.abspath(os.environ["RAY_TMPDIR"]) + os.sep, "/dev/")
        result["written"] = sorted(p for p in list(written) if not p.startswith(skip) and not p.endswith(".pyc"))
        with open(spec["result"], "w") as f:
            json.dump(result, f)
        t0 = time.time()
        cluster.shutdown()
        print(f"driver: cluster shut down in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
