"""What the CLI says when something it started or was given is wrong: one line that names
the cause, never a traceback squeezed onto a line."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from taskfs.cli import _last_words
from taskfs.cli_live import Printer
from taskfs.errors import LiveError

TRACEBACK = """\
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/src/taskfs/cli.py", line 35, in <module>
    from taskfs import __version__
ImportError: cannot import name '__version__' from 'taskfs' (unknown location)
"""


def test_a_detached_process_that_died_is_named_by_its_last_words(tmp_path: Path) -> None:
    log = tmp_path / "mount.log"
    earlier = "taskfs: error: an earlier run's error\n"
    log.write_text(earlier + TRACEBACK)
    said = _last_words(log, len(earlier), 1)
    assert said == (
        "ImportError: cannot import name '__version__' from 'taskfs' (unknown location) "
        f"(see {log})"
    )
    log.write_text("starting\ntaskfs: error: cannot serve on 127.0.0.1:1: Permission denied\n")
    assert _last_words(log, 0, 1) == "cannot serve on 127.0.0.1:1: Permission denied"
    log.write_text("")
    assert _last_words(log, 0, 3) == f"exit status 3 (see {log})"
    assert (
        _last_words(tmp_path / "gone.log", 0, 3) == f"exit status 3 (see {tmp_path / 'gone.log'})"
    )


def test_a_line_in_pieces_is_not_cut_by_another_files_header() -> None:
    """The pieces of a long line of one file come whole before another file's text that came
    between them; a line left open (no newline yet) holds the others only for a moment."""
    out = io.StringIO()
    printer = Printer(["a", "b"], out)
    printer.text("a", "first\n")
    printer.text("a", "x" * 1000)  # a piece of a long line
    printer.text("b", "b1\n")  # came between two pieces: waits
    printer.text("a", "y" * 1000)
    assert "==> b <==" not in out.getvalue()
    printer.text("a", "z\n")  # the line ends: b's text follows
    printer.text("b", "b2\n")
    assert out.getvalue() == (
        "==> a <==\nfirst\n" + "x" * 1000 + "y" * 1000 + "z\n\n==> b <==\nb1\nb2\n"
    )
    printer.text("a", "no newline yet")
    printer.text("b", "b3\n")
    printer.tick(time.monotonic())  # a moment: still held
    assert out.getvalue().endswith("no newline yet")
    printer.tick(time.monotonic() + Printer.HOLD)
    assert out.getvalue().endswith("no newline yet\n==> b <==\nb3\n")
    printer.text("a", "\r10%")  # a progress bar: held at most MAX_HOLD in all
    printer.text("b", "b4\n")
    printer.text("a", "\r20%")
    printer.tick(time.monotonic() + Printer.MAX_HOLD)
    printer.finish()
    assert out.getvalue().endswith("\r10%\r20%\n==> b <==\nb4\n")


def test_a_file_the_channel_refuses_is_named_once(capsys: pytest.CaptureFixture[str]) -> None:
    Printer.error("nope.txt", LiveError("File not found: nope.txt"))
    Printer.error("bin.dat", LiveError("File is not a text file"))
    assert capsys.readouterr().err == (
        "taskfs: nope.txt: File not found\ntaskfs: bin.dat: File is not a text file\n"
    )
