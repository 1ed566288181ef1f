"""The arrow rule: a stage imports only its own package and the stages before it, and no two modules import each other.

The order below is the one source of truth (docs/architecture.md draws it). Every import counts, including those
inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "chexseg_dist"

#: Lowest first. A module may import its own package and any package to its left, never one to its right.
ORDER: tuple[str, ...] = (
    "errors",
    "core",
    "config",
    "data",
    "models",
    "saliency",
    "store",
    "metrics",
    "pseudolabel",
    "masks",
    "train",
    "predict",
    "evaluation",
    "synth",
    "cli",
)


def module_name(path: Path) -> str:
    parts = ["chexseg_dist", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path], me: str | None = None) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    me = me or module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("chexseg_dist") and target != me:
                found.add(target)
    return found


def stage(module: str) -> str | None:
    """The stage package of a module; None for the package root (the public API, which may import anything)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    modules = known_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_stage_is_in_the_order() -> None:
    stages = {stage(m) for m in known_modules()} - {None}
    assert stages <= set(ORDER), f"add {sorted(stages - set(ORDER))} to ORDER"


def test_imports_only_go_down_the_order() -> None:
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = []
    for module, targets in graph().items():
        own = stage(module)
        for target in targets:
            other = stage(target)
            if other is None:
                upward.append(f"{module} imports the package root (import from the stage instead)")
            elif own is not None and rank[other] > rank[own]:
                upward.append(f"{module} ({own}) imports {target} ({other}), which comes later in the order")
    assert not upward, "\n".join(sorted(upward))


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_cycle_between_modules() -> None:
    cycle = _cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in graph().items():
        own = stage(module) or "chexseg_dist"
        edges.setdefault(own, set()).update((stage(t) or "chexseg_dist") for t in targets if stage(t) != own)
    cycle = _cycle(edges)
    assert cycle is None, "package cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_upward_lazy_imports(tmp_path: Path) -> None:
    """The rule is only as good as the import scan: a lazy import inside a function must be found."""
    source = "def f():\n    from chexseg_dist.cli.main import main\n    return main\n"
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = imports_of(probe, known_modules(), me="chexseg_dist.core.probe")
    assert "chexseg_dist.cli.main" in found
