"""The store lock against a local disk and the moto S3 server: exactly one of several jobs started together gets it,
a live holder is refused, a dead one is taken over (at once when it ran on this host, after its heartbeat goes stale
otherwise), and a holder whose lock was taken over finds out at its next heartbeat."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chexseg_dist.core import fsio
from chexseg_dist.errors import StoreLockedError
from chexseg_dist.store import lock_path
from chexseg_dist.store.lock import StoreLock

REPO = Path(__file__).resolve().parents[2]


def _race(store: str, barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:  # type: ignore[name-defined]
    lock = StoreLock(store, stale_after_s=60)
    barrier.wait()
    try:
        lock.acquire()
    except StoreLockedError:
        results.put((os.getpid(), False, False))
        return
    results.put((os.getpid(), True, lock._tag is not None))
    time.sleep(2.0)  # hold it while the others try
    lock.release()


def _run_race(store: str, n: int) -> list[tuple[int, bool, bool]]:
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited s3fs event loop
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(store, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return got


@pytest.mark.s3
def test_of_jobs_started_together_on_s3_exactly_one_gets_the_lock(s3_bucket: str) -> None:
    for round_ in range(3):
        got = _run_race(f"{s3_bucket}/race{round_}.zarr", 4)
        winners = [g for g in got if g[1]]
        assert len(winners) == 1, got
        assert winners[0][2], "the lock was taken without a conditional write on a server that supports them"


def test_of_jobs_started_together_on_a_local_disk_exactly_one_gets_the_lock(tmp_path: Path) -> None:
    got = _run_race(str(tmp_path / "race.zarr"), 4)
    assert sum(g[1] for g in got) == 1, got


def _holder_script(store: str) -> str:
    return textwrap.dedent(
        f"""
        import time
        from chexseg_dist.store.lock import StoreLock
        lock = StoreLock({store!r}, stale_after_s=120)
        lock.acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_sigkilled_holder_on_this_host_is_taken_over_at_once(where: str, tmp_path: Path, s3_bucket: str) -> None:
    """A user who just killed a job re-runs at once, although the dead job's heartbeat is fresh (stale after 120 s)."""
    store = str(tmp_path / "k.zarr") if where == "local" else f"{s3_bucket}/k.zarr"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=rf"pid {holder.pid}\).*last heartbeat \d+ s ago"):
            StoreLock(store, stale_after_s=120).acquire()  # alive: refused
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    lock = StoreLock(store, stale_after_s=120)
    lock.acquire()
    try:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
        assert lock.read() is not None and lock.read()["owner"] == lock.owner  # type: ignore[index]
    finally:
        lock.release()
    assert not fsio.exists(lock_path(store))


def _foreign_record(heartbeat: float) -> bytes:
    return json.dumps(
        {"owner": "elsewhere", "host": f"not-{socket.gethostname()}", "pid": 1, "heartbeat": heartbeat}
    ).encode()


@pytest.mark.s3
def test_a_holder_on_another_host_is_refused_until_its_heartbeat_is_stale(s3_bucket: str) -> None:
    store = f"{s3_bucket}/h.zarr"
    fsio.write_bytes_atomic(lock_path(store), _foreign_record(time.time()))
    with pytest.raises(StoreLockedError, match=r"job elsewhere \(host not-.*goes stale \d+ s from now"):
        StoreLock(store, stale_after_s=30).acquire()
    assert json.loads(fsio.read_bytes(lock_path(store)))["owner"] == "elsewhere"  # a refusal writes nothing

    fsio.write_bytes_atomic(lock_path(store), _foreign_record(time.time() - 31))
    lock = StoreLock(store, stale_after_s=30)
    lock.acquire()
    lock.release()
    assert lock.took_over is not None and lock.took_over["owner"] == "elsewhere"


@pytest.mark.s3
def test_a_job_whose_lock_was_taken_over_on_s3_notices_at_its_next_heartbeat(s3_bucket: str) -> None:
    store = f"{s3_bucket}/t.zarr"
    first = StoreLock(store, stale_after_s=0.4)  # beats every 0.1 s
    first.acquire()
    try:
        fsio.write_bytes_atomic(lock_path(store), _foreign_record(time.time()))  # a takeover by another host
        deadline = time.time() + 10
        while first._lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(StoreLockedError, match=r"lost the lock \(job elsewhere"):
            first.check()
        time.sleep(0.3)
        assert json.loads(fsio.read_bytes(lock_path(store)))["owner"] == "elsewhere"  # no beat overwrote it
    finally:
        first.release()
    assert fsio.exists(lock_path(store))  # release leaves another job's lock alone
