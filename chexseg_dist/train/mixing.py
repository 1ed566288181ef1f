"""Mixing expert and pseudo-labelled samples into the student's batches, on every worker.

``Dataset.mix`` holds a ratio only globally and per block (measured 0.115 and 0.346 on two workers for a 0.30
target), so the batches are built on each worker instead: a policy says how many of the ``B`` rows of a step come
from the expert set, an :class:`ExpertPool` (the small expert-train set, decoded once per worker and kept in memory)
hands them out, reshuffled whenever it runs out, and the rest come from this worker's share of the pseudo-labelled
stream.

- :class:`ExactMixing`: ``round(w * B)`` expert rows in every batch (refused when that is 0 or B while 0 < w < 1:
  the batch could not hold the ratio).
- :class:`BernoulliMixing`: the paper's per-sample draw, each row expert with probability ``w``; the count is drawn
  from a generator seeded by ``(seed, rank, step)``, so a resumed or retried run draws the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from chexseg_dist.errors import ConfigError, TrainingError


class ExactMixing:
    """``round(w * B)`` expert rows in every batch.

    Raises:
        ConfigError: ``0 < w < 1`` but ``round(w * B)`` is 0 or ``B`` (naming both fields and the fix).
    """

    name = "exact"

    def __init__(self, expert_ratio: float, batch_size: int, seed: int = 0, rank: int = 0) -> None:
        self.count = round(expert_ratio * batch_size)
        if 0.0 < expert_ratio < 1.0 and self.count in (0, batch_size):
            raise ConfigError(
                f"config train_segmentation.mixing=exact: round(expert_ratio={expert_ratio} x batch_size={batch_size})"
                f" = {self.count} leaves no {'expert' if self.count == 0 else 'pseudo-labelled'} row in a batch; raise "
                "batch_size or use mixing=bernoulli"
            )

    def experts(self, step: int) -> int:
        """Expert rows in the batch of global step ``step``."""
        return self.count


class BernoulliMixing:
    """Each of the ``B`` rows is an expert row with probability ``w`` (the paper's sampling)."""

    name = "bernoulli"

    def __init__(self, expert_ratio: float, batch_size: int, seed: int = 0, rank: int = 0) -> None:
        self.expert_ratio, self.batch_size, self.seed, self.rank = expert_ratio, batch_size, seed, rank

    def experts(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, self.rank, step])
        return int(rng.binomial(self.batch_size, self.expert_ratio))


class ExpertPool:
    """The expert-train rows of one worker, in memory, drawn without replacement and reshuffled when exhausted.

    Args:
        rows: column name -> array with the rows along the first axis (frames, masks, weights, ids).
        seed, rank: the generator of the draws (each worker shuffles its own way).
    """

    def __init__(self, rows: Mapping[str, np.ndarray], seed: int, rank: int) -> None:
        self.rows = {k: np.asarray(v) for k, v in rows.items()}
        self.n = len(next(iter(self.rows.values()))) if self.rows else 0
        self.rng = np.random.default_rng([seed, rank, 104729])
        self.order = np.zeros(0, dtype=np.int64)
        self.pos = 0
        self.passes = 0

    def take(self, k: int) -> dict[str, np.ndarray]:
        """The next ``k`` rows (``k`` may exceed the pool: it wraps, reshuffling at every restart)."""
        if k and self.n == 0:
            raise ConfigError("the expert set is empty: nothing to draw expert rows from")
        picked: list[np.ndarray] = []
        need = k
        while need > 0:
            if self.pos >= len(self.order):
                self.order = self.rng.permutation(self.n)
                self.pos = 0
                self.passes += 1
            take = min(need, len(self.order) - self.pos)
            picked.append(self.order[self.pos : self.pos + take])
            self.pos += take
            need -= take
        index = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        return {name: values[index] for name, values in self.rows.items()}


class RowStream:
    """Rows of a (possibly endless) stream of batches, drawn ``k`` at a time.

    The student's pseudo-labelled rows arrive from Ray Data in batches; a step needs ``B - k_expert`` of them, a
    number that changes from step to step under Bernoulli mixing. When the stream ends (one pass over this worker's
    share of the store), ``restart`` begins the next pass (Ray Data shuffles the chunk order anew) and the count in
    :attr:`passes` goes up.

    Args:
        restart: returns a fresh iterator of batches (column -> array, rows along the first axis).
        what: named in the error when a pass yields no row at all.
    """

    def __init__(self, restart: Callable[[], Iterator[Mapping[str, np.ndarray]]], what: str) -> None:
        self.restart, self.what = restart, what
        self.iterator: Iterator[Mapping[str, np.ndarray]] | None = None
        self.parts: list[dict[str, np.ndarray]] = []
        self.buffered = 0
        self.passes = 0
        self._rows_this_pass = 0

    def take(self, k: int) -> dict[str, np.ndarray]:
        """The next ``k`` rows (as one dict of arrays)."""
        while self.buffered < k:
            if self.iterator is None:
                self.iterator = iter(self.restart())
                self.passes += 1
                self._rows_this_pass = 0
            try:
                batch = next(self.iterator)
            except StopIteration:
                self.iterator = None
                if self._rows_this_pass == 0:
                    raise TrainingError(f"{self.what}: no row to draw from (every image failed to decode?)") from None
                continue
            part = {name: np.asarray(values) for name, values in batch.items()}
            n = len(next(iter(part.values()))) if part else 0
            if n:
                self.parts.append(part)
                self.buffered += n
                self._rows_this_pass += n
        if not k:
            return {}
        joined = {name: np.concatenate([p[name] for p in self.parts]) for name in self.parts[0]}
        out = {name: values[:k] for name, values in joined.items()}
        rest = {name: values[k:] for name, values in joined.items()}
        self.buffered -= k
        self.parts = [rest] if self.buffered else []
        return out
