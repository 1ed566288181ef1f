"""Running the CLI in tests: refused commands (one error line, exit status 2) and file-tree snapshots."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from chexseg_dist.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), folders included as entries."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """Run the CLI, check exit status 2 and a one-line error containing every ``expected`` text; return it."""
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"chexseg {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]
