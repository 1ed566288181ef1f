"""One job per store: a lock file with an owner and a heartbeat, taken over when its job is dead."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from chexseg_dist.core import fsio
from chexseg_dist.core.console import say
from chexseg_dist.errors import StoreLockedError
from chexseg_dist.store.layout import lock_path, normalise_uri

log = logging.getLogger(__name__)


class StoreLock:
    """One job per store: ``<store>.sidecar/lock.json`` with an owner id, its host and process, and a heartbeat.

    ``acquire`` creates the lock atomically: a hard link on local disks, a conditional PUT (``If-None-Match: *``)
    on object stores, so of two jobs started in the same instant exactly one gets it. An existing lock is taken
    over when its holder is dead: at once when it ran on this host and its process is gone (a job the user just
    SIGKILLed), otherwise when its heartbeat is older than ``stale_after_s`` (a holder on another host, a lost
    node). The takeover replaces only the version that was read (``If-Match`` on object stores), and so does every
    heartbeat: a job whose lock was taken over finds out at its next beat and stops before it commits.
    Object stores without conditional writes fall back to write-then-verify (two jobs starting within the same
    fraction of a second could both pass). Heartbeats compare wall clocks: hosts sharing a store need roughly
    synchronised clocks (NTP).
    """

    def __init__(self, store_uri: str, stale_after_s: float = 120.0, run_id: str | None = None) -> None:
        self.store_uri = normalise_uri(store_uri)
        self.path = lock_path(self.store_uri)
        self.stale_after_s = float(stale_after_s)
        self.owner = run_id or uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._tag: str | None = None  # the version of the lock we wrote last (None: no conditional writes)
        self.took_over: dict[str, Any] | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_started": _process_start(os.getpid()),
                "heartbeat": time.time(),
                "heartbeat_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        ).encode()

    def read(self) -> dict[str, Any] | None:
        """The current lock record, or None if there is none (an unreadable record counts as stale)."""
        got = fsio.read_tagged(self.path)
        return None if got is None else _parse(got[0])

    def acquire(self) -> None:
        """Take the lock and start the heartbeat.

        Raises:
            StoreLockedError: a live job holds it (naming the owner, host, pid, heartbeat age and what to do), or
                another job took it in the same instant.
        """
        try:
            self._acquire_conditional()
        except fsio.ConditionalWritesUnsupported as exc:
            log.warning("%s; taking the lock of %s by write-then-verify", exc, self.store_uri)
            self._acquire_unconditional()
        self._start()

    def _acquire_conditional(self) -> None:
        for _ in range(3):  # the lock may vanish between a failed create and the read (its holder released it)
            tag = fsio.create_exclusive(self.path, self._record())
            if tag is not None:
                self._tag = tag or self._current_tag()
                return
            got = fsio.read_tagged(self.path)
            if got is None:
                continue
            current = _parse(got[0])
            self._refuse_if_alive(current)
            new_tag = fsio.replace_if(self.path, self._record(), got[1])
            if new_tag is None:
                raise StoreLockedError(f"store {self.store_uri}: another job took the lock at the same time; retry")
            self._tag = new_tag or self._current_tag()
            self.took_over = current
            return
        raise StoreLockedError(f"store {self.store_uri}: the lock keeps changing hands; retry")

    def _acquire_unconditional(self) -> None:
        current = self.read()
        if current is not None:
            self._refuse_if_alive(current)
            self.took_over = current
        fsio.write_bytes_atomic(self.path, self._record())
        time.sleep(0.2)  # write-then-verify: if another job wrote after us, it wins and we refuse
        again = self.read()
        if again is None or again.get("owner") != self.owner:
            raise StoreLockedError(f"store {self.store_uri}: another job took the lock at the same time; retry")

    def _refuse_if_alive(self, current: dict[str, Any]) -> None:
        """Return if ``current`` belongs to a dead job (logging the takeover), else raise :class:`StoreLockedError`."""
        age = time.time() - float(current.get("heartbeat", 0.0))
        who = f"job {current.get('owner')} (host {current.get('host')}, pid {current.get('pid')})"
        if current.get("owner") == self.owner:
            return
        if holder_is_gone(current):
            say(f"store lock: taking over the lock of {who}: its process on this host is gone")
            return
        if age >= self.stale_after_s:
            say(f"store lock: taking over the stale lock of {who}: last heartbeat {age:.0f} s ago")
            return
        raise StoreLockedError(
            f"store {self.store_uri} is in use by {who}, last heartbeat {age:.0f} s ago. Wait for it to finish; "
            f"if that job is dead on another host, its lock goes stale {self.stale_after_s - age:.0f} s from now "
            f"(or delete {self.path})."
        )

    def _current_tag(self) -> str | None:
        got = fsio.read_tagged(self.path)
        return None if got is None else got[1]

    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="store-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.stale_after_s / 4)
        while not self._stop.wait(interval):
            try:
                self._heartbeat()
                if self._lost:
                    return
            except Exception as exc:  # A transient storage error must not kill the job; the next beat retries.
                log.warning("lock heartbeat failed: %s", exc)

    def _heartbeat(self) -> None:
        if self._tag is not None:
            new_tag = fsio.replace_if(self.path, self._record(), self._tag)
            if new_tag is not None:
                self._tag = new_tag or self._current_tag()
                return
        current = self.read()
        if current is None or current.get("owner") != self.owner:
            holder = "nobody" if current is None else f"job {current.get('owner')} on {current.get('host')}"
            self._lost = f"{holder} holds the lock now"
            return
        if self._tag is None:
            fsio.write_bytes_atomic(self.path, self._record())
        else:  # our record, another version (a local compare-and-replace raced a reader): adopt it
            self._tag = self._current_tag()

    def check(self) -> None:
        """Raise if the lock was lost (another job took over after our heartbeat went stale)."""
        if self._lost:
            raise StoreLockedError(f"store {self.store_uri}: lost the lock ({self._lost}); stopping without writing")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        current = self.read()
        if current is not None and current.get("owner") == self.owner:
            fsio.remove(self.path)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_is_gone(record: dict[str, Any]) -> bool:
    """True when a lock record's holder ran on this host and its process no longer exists (or is a zombie, or its
    pid now belongs to a process started later). Holders on other hosts are never judged here."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return False  # no /proc (not Linux): the process exists, so the holder may be alive
    state, started = stat
    return state == "Z" or (record.get("pid_started") is not None and record.get("pid_started") != started)


def _process_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` of a process from Linux's ``/proc``, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return fields[0], fields[19]


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"owner": "?", "heartbeat": 0.0}
    return record if isinstance(record, dict) else {"owner": "?", "heartbeat": 0.0}
