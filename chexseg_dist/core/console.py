"""What a person sees while a command runs: its own lines on the console, everything else in a log file.

A command prints what matters to its user: the command it runs, one line per epoch or chunk with rate and ETA,
warnings about the user's data, and its summary (:func:`say`). Ray and the libraries print far more (execution
plans, checkpoint notices, dashboard and token messages, C++ core-worker lines from every process). In a
:func:`quiet_session`, from the moment noisy work begins (:func:`begin_quiet`, called when Ray starts), the
process's own standard output and error *file descriptors* point at a log file, so all of that, from any thread,
any library and any Ray process started meanwhile, lands in the log, while :func:`say` writes to the console through
a saved copy of the original stdout. ``-v`` (``verbose``) leaves everything on the console.

Ray Train workers run in other processes; what rank 0 says reaches the driver's console through a :class:`Relay` (a
zero-CPU queue actor drained by a driver thread), or plain stdout when there is none.

Nothing here imports Ray at module import.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

#: Loggers whose warnings concern the user's data and therefore reach the console even in a quiet session.
PROJECT_LOGGER = "chexseg_dist"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class _Session:
    """The quiet session in effect: its log, and, once redirecting, the saved descriptors and logging state."""

    log: str
    console: IO[str] | None = None  # where say() writes while fds 1 and 2 point at the log
    errors: IO[str] | None = None  # where error lines go meanwhile (the original stderr)
    owns_streams: bool = False  # console/errors were opened here (and are closed at the end)
    saved: tuple[int, int] | None = None  # duplicates of the original fds 1 and 2
    sys_streams: tuple[Any, Any] | None = None  # the sys.stdout / sys.stderr objects in place before
    logging_state: tuple[list[logging.Handler], int, bool] | None = None


_session: _Session | None = None


def say(line: str = "") -> None:
    """Print one line for the user (on the console even while Ray's output goes to the log) and log it."""
    console = _session.console if _session is not None else None
    print(line, file=console or sys.stdout, flush=True)
    if console is not None:
        logging.getLogger(PROJECT_LOGGER).info(line)


def say_error(line: str) -> None:
    """Print an error line on the console's standard error (even while fds 1 and 2 point at the log)."""
    errors = _session.errors if _session is not None else None
    print(line, file=errors or sys.stderr, flush=True)
    if errors is not None:
        logging.getLogger(PROJECT_LOGGER).error(line)


def rate_eta(done: int, total: int, elapsed: float) -> str:
    """``"123.4 images/s, ETA 1m05s"`` (or ``"ETA --"`` before any progress)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if rate <= 0 or done >= total:
        return f"{rate:.1f} images/s" + ("" if done >= total else ", ETA --")
    return f"{rate:.1f} images/s, ETA {format_seconds((total - done) / rate)}"


def format_seconds(seconds: float) -> str:
    """``"42s"``, ``"3m05s"``, ``"2h07m"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """A progress line every ``interval_s`` seconds while a long loop runs: done/total, rate and ETA.

    Call :meth:`update` with the running count (cheap: it prints only when the interval has passed).
    """

    def __init__(self, label: str, total: int, interval_s: float = 10.0, unit: str = "images") -> None:
        self.label, self.total, self.interval_s, self.unit = label, total, interval_s, unit
        self._start = time.perf_counter()
        self._next = self._start + interval_s

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now >= self._next and done < self.total:
            self._next = now + self.interval_s
            say(f"{self.label}: {done}/{self.total} {self.unit}, {rate_eta(done, self.total, now - self._start)}")


def _is_fd(stream: Any, fd: int) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.fstat(fd))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def quiet_session(path: str | None, verbose: bool = False) -> Iterator[None]:
    """Within the block, once :func:`begin_quiet` is called, send everything but :func:`say` lines to ``path``.

    The redirection starts only when noisy work starts (Ray, through
    :func:`~chexseg_dist.core.ray_env.ensure_ray`), so a command refused for bad input leaves no log file behind
    and prints nothing but its error line. Nested sessions (a command run by another, as in the demo) use the
    outer one's log. On leaving the block, the descriptors, ``sys`` streams and logging set-up are restored
    whatever happened inside.

    Args:
        path: a local log file (appended to; its folder is created on :func:`begin_quiet`); None: no log.
        verbose: keep everything on the console (no log, nothing reconfigured).
    """
    global _session
    if _session is not None or verbose or path is None:
        yield
        return
    _session = _Session(log=os.path.abspath(path))
    try:
        yield
    finally:
        try:
            _end_quiet(_session)
        finally:
            _session = None


def begin_quiet() -> str | None:
    """Start sending the process's output to the session's log (no-op outside a session, or if started).

    Returns:
        The log path, when this call started the redirection.
    """
    session = _session
    if session is None or session.saved is not None:
        return None
    os.makedirs(os.path.dirname(session.log) or ".", exist_ok=True)
    log_fd = os.open(session.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        session.saved = (os.dup(1), os.dup(2))
        # The console: the original descriptors, unless sys.stdout / sys.stderr are not them (a test's capture).
        session.owns_streams = _is_fd(sys.stdout, 1)
        if session.owns_streams:
            session.console = _reopen(session.saved[0])
            session.errors = _reopen(session.saved[1])
        else:
            session.console, session.errors = sys.stdout, sys.stderr
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Python-level writes follow the descriptors (sys.stdout may be something else, e.g. a test's capture).
        session.sys_streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _reopen(1), _reopen(2)
        session.logging_state = _configure_logging(session.console)
    except BaseException:
        _end_quiet(session)
        raise
    finally:
        os.close(log_fd)
    say(f"(Ray's and the libraries' output goes to {session.log}; -v shows it here)")
    return session.log


def _end_quiet(session: _Session) -> None:
    """Undo :func:`begin_quiet`, as far as it got: logging, then the ``sys`` streams, then the descriptors."""
    if session.saved is None:
        return
    if session.logging_state is not None:
        _restore_logging(session.logging_state)
        session.logging_state = None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if session.sys_streams is not None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.close()
        sys.stdout, sys.stderr = session.sys_streams
        session.sys_streams = None
    os.dup2(session.saved[0], 1)
    os.dup2(session.saved[1], 2)
    for fd in session.saved:
        os.close(fd)
    session.saved = None
    if session.owns_streams:
        for stream in (session.console, session.errors):
            if stream is not None:
                stream.close()
    session.console = session.errors = None


def _reopen(fd: int) -> IO[str]:
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


def _configure_logging(console: IO[str] | None) -> tuple[list[logging.Handler], int, bool]:
    """Root logger -> stderr (the log file once redirected); project warnings also -> the console.

    Returns:
        What :func:`_restore_logging` needs: the root's previous handlers and level, and whether warnings were
        captured.
    """
    root = logging.getLogger()
    state = (list(root.handlers), root.level, _warnings_captured())
    for handler in state[0]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    if console is not None:
        user = logging.StreamHandler(console)
        user.setLevel(logging.WARNING)
        user.setFormatter(logging.Formatter("warning: %(message)s"))
        user.set_name(_CONSOLE_HANDLER)
        logging.getLogger(PROJECT_LOGGER).addHandler(user)
    return state


def _restore_logging(state: tuple[list[logging.Handler], int, bool]) -> None:
    handlers, level, captured = state
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    project = logging.getLogger(PROJECT_LOGGER)
    for handler in list(project.handlers):
        if handler.get_name() == _CONSOLE_HANDLER:
            project.removeHandler(handler)
    logging.captureWarnings(captured)


def _warnings_captured() -> bool:
    return bool(getattr(logging, "_warnings_showwarning", None) is not None)


_CONSOLE_HANDLER = "chexseg-console"


class Relay:
    """Lines said in Ray worker processes, printed on the driver's console by a driver thread.

    Create it on the driver (Ray running), pass :attr:`handle` to the workers and call :func:`relay_say` there;
    :meth:`close` drains what is left. The queue actor asks for no CPU, so it never competes with the job.
    """

    def __init__(self, prefix: str = "") -> None:
        from ray.util.queue import Queue

        self.prefix = prefix
        self.handle: Any = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="chexseg-relay", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._flush(timeout=0.5)

    def _flush(self, timeout: float) -> None:
        from ray.util.queue import Empty

        try:
            lines = [self.handle.get(timeout=timeout)]
            lines += self.handle.get_nowait_batch(self.handle.qsize())
        except Empty:
            return
        except Exception:  # The actor is gone (shutdown): nothing more will come.
            self._stop.set()
            return
        for line in lines:
            say(self.prefix + str(line))

    def close(self) -> None:
        """Print what is still queued, then stop the thread and the queue actor."""
        self._stop.set()
        self._thread.join(timeout=5)
        deadline = time.time() + 2
        with contextlib.suppress(Exception):
            while self.handle.qsize() and time.time() < deadline:
                self._flush(timeout=0.1)
            self.handle.shutdown()


def relay_say(handle: Any, line: str) -> None:
    """In a worker: send ``line`` to the driver's console through a :class:`Relay` handle (stdout if None)."""
    if handle is not None:
        try:
            handle.put_nowait(line)
            return
        except Exception:  # A gone relay must never fail training: fall back to the worker's stdout.
            pass
    # sys.__stdout__: Ray Train patches print() in workers and would emit every line twice.
    print(line, file=sys.__stdout__, flush=True)
