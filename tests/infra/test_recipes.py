"""The cluster recipes in infra/ stay true to the code: valid YAML, and every job entrypoint they submit parses."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from chexseg_dist.cli.main import build_command_parser

ROOT = Path(__file__).resolve().parents[2]
JOB_COMMANDS = {"jobs/pseudolabel.py": "pseudolabel", "jobs/train_classifier.py": "train-classifier"}


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "infra").rglob("*.yaml")))
def test_infra_yaml_parses(path: str) -> None:
    docs = list(yaml.safe_load_all((ROOT / path).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def _entrypoints() -> list[str]:
    found = []
    for p in (ROOT / "infra").rglob("*.yaml"):
        for doc in yaml.safe_load_all(p.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                found.append(doc["spec"]["entrypoint"])
    return found


@pytest.mark.parametrize("entrypoint", _entrypoints())
def test_rayjob_entrypoints_parse_with_the_job_arguments(entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1] in JOB_COMMANDS
    assert (ROOT / argv[1]).is_file()
    args = build_command_parser(JOB_COMMANDS[argv[1]]).parse_args(argv[2:])
    assert args.preset == "paper"


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


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "infra").rglob("*.yaml")))
def test_every_recipe_keeps_token_authentication_on(path: str) -> None:
    """Every recipe that starts Ray sets RAY_AUTH_MODE, and to the value ``token`` (the cluster launcher included)."""
    modes = [m for doc in yaml.safe_load_all((ROOT / path).read_text()) for m in _auth_modes(doc)]
    assert modes, f"{path} never sets RAY_AUTH_MODE: Ray token authentication must stay on"
    assert set(modes) == {"token"}, f"{path} sets RAY_AUTH_MODE to {sorted(set(modes))}, expected 'token'"


def test_rayjob_submitter_carries_the_token() -> None:
    for p in (ROOT / "infra").rglob("*.yaml"):
        for doc in yaml.safe_load_all(p.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                env = doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]
                assert {e["name"] for e in env} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, p
