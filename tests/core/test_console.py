"""The quiet console: a command's own lines on the console, everything written to the process's stdout and stderr
(by any library, thread or child process) in the log once noisy work begins; and everything restored afterwards."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chexseg_dist.core.console import Progress, begin_quiet, quiet_session, rate_eta, say, say_error


def test_nothing_is_redirected_or_created_until_noisy_work_begins(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "logs" / "run.log"
    with quiet_session(str(log)):
        say("refused before Ray started")
        os.write(1, b"library output\n")
    out = capfd.readouterr().out
    assert "refused before Ray started" in out and "library output" in out
    assert not log.exists() and not (tmp_path / "logs").exists()  # a refused command leaves nothing behind


def test_after_begin_only_say_reaches_the_console_and_all_else_the_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run.log"
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with quiet_session(str(log)):
        assert begin_quiet() == str(log)
        assert begin_quiet() is None  # already redirecting
        say("epoch 1/3 loss 0.5")
        say_error("chexseg x: error: bad input")
        print("a library's print")
        os.write(2, b"C++ core worker line\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        logging.getLogger("some.library").info("Execution plan of Dataset ...")  # propagates to the root
        logging.getLogger("chexseg_dist.store").warning("taking over a stale lock")
    captured = capfd.readouterr()
    assert "epoch 1/3 loss 0.5" in captured.out and "chexseg x: error: bad input" in captured.err
    assert "warning: taking over a stale lock" in captured.out  # warnings about the user's data stay visible
    for noise in ("a library's print", "C++ core worker line", "a child process", "Execution plan"):
        assert noise not in captured.out + captured.err
    text = log.read_text()
    for line in ("a library's print", "C++ core worker line", "a child process", "Execution plan", "epoch 1/3"):
        assert line in text
    assert (list(root.handlers), root.level) == before  # logging as it was
    os.write(1, b"after the session\n")
    assert "after the session" in capfd.readouterr().out  # descriptors restored


def test_descriptors_are_restored_when_the_command_fails(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), quiet_session(str(tmp_path / "run.log")):
        begin_quiet()
        raise RuntimeError("a bug")
    os.write(2, b"visible again\n")
    assert "visible again" in capfd.readouterr().err


def test_a_nested_session_uses_the_outer_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    outer, inner = tmp_path / "demo.log", tmp_path / "stage.log"
    with quiet_session(str(outer)):
        with quiet_session(str(inner)):
            begin_quiet()
            print("stage noise")
            say("stage line")
        print("more demo noise")
    assert not inner.exists()
    assert "stage noise" in outer.read_text() and "more demo noise" in outer.read_text()
    assert "stage line" in capfd.readouterr().out


def test_verbose_configures_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    with quiet_session(str(tmp_path / "run.log"), verbose=True):
        assert begin_quiet() is None
        print("shown")
    assert "shown" in capfd.readouterr().out and root.handlers == before
    assert not (tmp_path / "run.log").exists()


def test_rates_and_progress_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert rate_eta(0, 10, 1.0) == "0.0 images/s, ETA --"
    assert rate_eta(50, 100, 10.0) == "5.0 images/s, ETA 10s"
    assert rate_eta(10, 1000, 1.0) == "10.0 images/s, ETA 1m39s"
    assert rate_eta(100, 100, 4.0) == "25.0 images/s"
    meter = Progress("synth", 100, interval_s=0.0, unit="studies")
    meter.update(40)
    meter.update(100)  # done: no line
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synth: 40/100 studies, ") and "ETA" in lines[0]
