"""Mixing expert and pseudo-labelled rows: exact counts, Bernoulli draws, the expert pool and the pseudo stream."""

from __future__ import annotations

import numpy as np
import pytest

from chexseg_dist.errors import ConfigError, TrainingError
from chexseg_dist.train.mixing import BernoulliMixing, ExactMixing, ExpertPool, RowStream


def test_exact_mixing_holds_round_w_b_and_refuses_a_batch_that_cannot_hold_the_ratio() -> None:
    assert ExactMixing(0.9, 8).experts(0) == 7
    assert ExactMixing(0.5, 4).experts(123) == 2
    assert ExactMixing(0.0, 8).experts(5) == 0 and ExactMixing(1.0, 8).experts(5) == 8  # weak / full shapes
    with pytest.raises(ConfigError, match=r"round\(expert_ratio=0.9 x batch_size=4\) = 4 .*pseudo-labelled"):
        ExactMixing(0.9, 4)
    with pytest.raises(ConfigError, match=r"= 0 leaves no expert row.*mixing=bernoulli"):
        ExactMixing(0.05, 8)


def test_bernoulli_draws_are_a_function_of_seed_rank_and_step_and_stay_within_binomial_bounds() -> None:
    a, b = BernoulliMixing(0.3, 8, seed=1, rank=0), BernoulliMixing(0.3, 8, seed=1, rank=0)
    assert [a.experts(s) for s in range(50)] == [b.experts(s) for s in range(50)]  # a retried run draws the same
    other = BernoulliMixing(0.3, 8, seed=1, rank=1)
    assert [a.experts(s) for s in range(50)] != [other.experts(s) for s in range(50)]
    steps = 2000
    total = sum(a.experts(s) for s in range(steps))
    n = steps * 8
    sd = (n * 0.3 * 0.7) ** 0.5
    assert abs(total - 0.3 * n) < 4 * sd
    assert {a.experts(s) for s in range(steps)} > {1, 2, 3}  # a real per-sample draw, not a constant count


def test_expert_pool_hands_out_every_row_once_per_pass_and_reshuffles_at_each_restart() -> None:
    pool = ExpertPool({"id": np.arange(5), "x": np.arange(5) * 10}, seed=0, rank=0)
    passes = [pool.take(5)["id"].tolist() for _ in range(3)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # reshuffled
    assert pool.passes == 3
    wrapped = pool.take(7)  # more than the pool: wraps within one call
    assert len(wrapped["id"]) == 7 and (wrapped["x"] == wrapped["id"] * 10).all()
    with pytest.raises(ConfigError, match="expert set is empty"):
        ExpertPool({"id": np.zeros(0)}, 0, 0).take(1)


def test_row_stream_draws_across_batches_and_restarts_the_dataset_when_it_runs_out() -> None:
    starts = []

    def restart():  # type: ignore[no-untyped-def]
        starts.append(1)
        return iter([{"id": np.arange(3)}, {"id": np.arange(3, 5)}])

    stream = RowStream(restart, "test")
    got = [stream.take(k)["id"].tolist() for k in (2, 2, 2, 3)]
    assert got == [[0, 1], [2, 3], [4, 0], [1, 2, 3]]
    assert stream.passes == 2 and len(starts) == 2
    assert stream.take(0) == {}
    empty = RowStream(lambda: iter([]), "worker 0's share")
    with pytest.raises(TrainingError, match="worker 0's share: no row"):
        empty.take(1)
