"""Running a pipeline of ``chexseg`` subcommands in one process (``chexseg demo``, ``chexseg experiment``).

Each stage is printed as the command line a user would type, run through the same entry point, and timed; a
stage whose output already exists can be reused on a re-run instead of run again.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field

from chexseg_dist.core import fsio
from chexseg_dist.core.console import say


@dataclass
class Stages:
    """Runs and times stages; ``seconds`` keeps each stage's wall time (0 when reused), in order.

    Args:
        what: the pipeline's name, used in the error when a stage fails.
        verbose: pass ``-v`` to the commands that take it.
    """

    what: str
    verbose: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, title: str, argv: list[str], reuse: str | None = None) -> None:
        """Run ``chexseg ARGV`` (or reuse it when ``reuse``, a path the stage writes last, exists).

        Raises:
            SystemExit: the stage failed (its own error is already printed).
        """
        from chexseg_dist.cli.main import accepts_verbose, main

        say(f"\n=== {title}\n$ chexseg {shlex.join(argv)}")
        if reuse is not None and fsio.exists(reuse):
            say(f"--- {title}: reused ({reuse} exists)")
            self.seconds[title] = 0.0
            return
        t0 = time.perf_counter()
        rc = main([*argv, "-v"] if self.verbose and accepts_verbose(argv[0]) else argv)
        if rc != 0:
            raise SystemExit(f"{self.what}: stage '{title}' failed with exit status {rc}")
        self.seconds[title] = time.perf_counter() - t0
        say(f"--- {title}: {self.seconds[title]:.1f} s")
