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
from chexseg_dist.errors import StoreLockedError
from chexseg_dist.store.layout import lock_path, normalise_uri

log = logging.getLogger(__name__)


class StoreLock:
    """One job per store: ``<store>.sidecar/lock.json`` with an owner id and a heartbeat.

    ``acquire`` refuses while another owner's heartbeat is fresher than ``stale_after_s`` and takes over an older
    (stale) lock, e.g. one left by a SIGKILLed job. A background thread refreshes the heartbeat every
    ``stale_after_s / 4`` seconds. Exclusive creation is atomic locally (``O_EXCL``); on object stores acquisition is
    write-then-verify (two jobs starting within the same second could both pass; document: start one job per store).
    Heartbeats compare wall clocks: hosts sharing a store need roughly synchronised clocks (NTP).
    """

    def __init__(self, store_uri: str, stale_after_s: float = 120.0, run_id: str | None = None) -> None:
        self.store_uri = normalise_uri(store_uri)
        self.path = lock_path(self.store_uri)
        self.stale_after_s = float(stale_after_s)
        self.owner = run_id or uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self.took_over: dict[str, Any] | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
            "heartbeat_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def read(self) -> dict[str, Any] | None:
        """The current lock record, or None if there is none (an unreadable record counts as stale)."""
        try:
            data = json.loads(fsio.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"owner": "?", "heartbeat": 0.0}
        return data if isinstance(data, dict) else {"owner": "?", "heartbeat": 0.0}

    def _write(self) -> None:
        data = json.dumps(self._record()).encode()
        if fsio.is_uri(self.path):
            with fsio.open_file(self.path, "wb") as f:
                f.write(data)
        else:
            tmp = f"{self.path}.{self.owner}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)

    def _create_exclusive(self) -> bool:
        """Local only: create the lock file if absent, atomically. False if it exists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(self._record()).encode())
        return True

    def acquire(self) -> None:
        """Take the lock and start the heartbeat.

        Raises:
            StoreLockedError: a live job holds it (naming the owner, host, pid, heartbeat age and what to do).
        """
        if not fsio.is_uri(self.path) and self._create_exclusive():
            self._start()
            return
        current = self.read()
        if current is not None and current.get("owner") != self.owner:
            age = time.time() - float(current.get("heartbeat", 0.0))
            if age < self.stale_after_s:
                raise StoreLockedError(
                    f"store {self.store_uri} is in use by job {current.get('owner')} (host {current.get('host')}, "
                    f"pid {current.get('pid')}, last heartbeat {age:.0f} s ago). Wait for it to finish; if that job "
                    f"is dead, its lock goes stale {self.stale_after_s - age:.0f} s from now (or delete {self.path})."
                )
            self.took_over = current
            log.warning("taking over stale lock of job %s (heartbeat %.0f s ago)", current.get("owner"), age)
        self._write()
        if fsio.is_uri(self.path):
            # Write-then-verify: if another job wrote after us, it wins and we refuse.
            time.sleep(0.2)
            again = self.read()
            if again is None or again.get("owner") != self.owner:
                raise StoreLockedError(f"store {self.store_uri}: another job took the lock at the same time; retry")
        self._start()

    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="store-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.stale_after_s / 4)
        while not self._stop.wait(interval):
            try:
                current = self.read()
                if current is not None and current.get("owner") != self.owner:
                    self._lost = f"job {current.get('owner')} on {current.get('host')} took over the lock"
                    return
                self._write()
            except Exception as exc:  # A transient storage error must not kill the job; the next beat retries.
                log.warning("lock heartbeat failed: %s", exc)

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
