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
from typing import IO, Any

#: Loggers whose warnings concern the user's data and therefore reach the console even in a quiet session.
PROJECT_LOGGER = "chexseg_dist"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_console: IO[str] | None = None  # where say() writes while a quiet session redirects stdout
_log_path: str | None = None
_pending: str | None = None  # the log of the session in effect, before and while it redirects
_saved: tuple[int, int] | None = None  # the original stdout and stderr file descriptors
_previous_handlers: list[logging.Handler] | None = None


def say(line: str = "") -> None:
    """Print one line for the user (on the console even inside a quiet session) and record it in the log."""
    stream = _console if _console is not None else sys.stdout
    print(line, file=stream, flush=True)
    if _console is not None:
        logging.getLogger(PROJECT_LOGGER).info(line)


def log_path() -> str | None:
    """The log file of the current quiet session, or None outside one (or in verbose mode)."""
    return _log_path


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


def _is_stdout_fd(stream: Any) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.fstat(1))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def quiet_session(path: str | None, verbose: bool = False) -> Iterator[None]:
    """Within the block, once :func:`begin_quiet` is called, send everything but :func:`say` lines to ``path``.

    The redirection starts only when noisy work starts (Ray, through
    :func:`~chexseg_dist.core.ray_env.ensure_ray`), so a command refused for bad input leaves no log file behind
    and prints nothing but its error line.

    Args:
        path: a local log file (appended to; its folder is created on :func:`begin_quiet`); None: no log.
        verbose: keep all output on the console (only configures logging).
    """
    global _pending
    if _pending is not None or _console is not None:  # an enclosing session (the demo's) decides
        yield
        return
    if verbose or path is None:
        _configure_logging(None)
        yield
        return
    _pending = os.path.abspath(path)
    try:
        yield
    finally:
        _end_quiet()
        _pending = None


def begin_quiet() -> str | None:
    """Start redirecting the process's output to the pending session's log (no-op outside one, or if started).

    Returns:
        The log path, when this call started the redirection.
    """
    global _console, _log_path, _saved, _previous_handlers
    if _pending is None or _console is not None:
        return None
    os.makedirs(os.path.dirname(_pending) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(_pending, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _saved = (os.dup(1), os.dup(2))
    # The console: the original stdout, unless sys.stdout is not fd 1 (e.g. a test's capture object).
    console: IO[str] = (
        os.fdopen(os.dup(_saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        if _is_stdout_fd(sys.stdout)
        else sys.stdout
    )
    _previous_handlers = _configure_logging(console)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _console, _log_path = console, _pending
    say(f"(Ray's and the libraries' output goes to {_pending}; -v shows it here)")
    return _pending


def _end_quiet() -> None:
    global _console, _log_path, _saved, _previous_handlers
    if _console is None or _saved is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(_saved[0], 1)
    os.dup2(_saved[1], 2)
    for fd in _saved:
        os.close(fd)
    _restore_logging(_previous_handlers or [])
    if _console is not sys.stdout:
        _console.close()
    _console, _log_path, _saved, _previous_handlers = None, None, None, None


def _configure_logging(console: IO[str] | None) -> list[logging.Handler]:
    """Root logger -> stderr (the log file in a quiet session); project warnings also -> the console."""
    root = logging.getLogger()
    previous = list(root.handlers)
    for handler in previous:
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
        user.set_name("chexseg-console")
        logging.getLogger(PROJECT_LOGGER).addHandler(user)
    return previous


def _restore_logging(previous: list[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in previous:
        root.addHandler(handler)
    project = logging.getLogger(PROJECT_LOGGER)
    for handler in list(project.handlers):
        if handler.get_name() == "chexseg-console":
            project.removeHandler(handler)
    logging.captureWarnings(False)


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
