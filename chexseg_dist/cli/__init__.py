"""The ``chexseg`` command line: one module per subcommand (parse, build, run, report: nothing else)."""

from chexseg_dist.cli.main import main

__all__ = ["main"]
