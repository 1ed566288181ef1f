"""Running a job as a user does: a subprocess with its own local Ray, cleaned up by PID afterwards."""

from __future__ import annotations

import os
from pathlib import Path


def job_env(tmp: Path) -> dict[str, str]:
    """The environment of a job subprocess: unbuffered output, its own Ray temp dir, no cluster to attach to."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_TMPDIR"] = str(tmp)
    env.pop("RAY_ADDRESS", None)
    return env


def kill_session_processes(marker: str) -> None:
    """SIGKILL leftover processes of one subprocess job's Ray session (identified by its temp dir), by PID."""
    import importlib

    import ray  # noqa: F401  (importing Ray puts its vendored psutil on sys.path)

    psutil = importlib.import_module("psutil")

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass
