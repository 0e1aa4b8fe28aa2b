"""What the CLI says when something it started or was given is wrong: one line that names
the cause, never a traceback squeezed onto a line."""

from __future__ import annotations

import importlib.metadata
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from taskfs.cli import NO_FUSE, _last_words
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


# A Python where pyfuse3 cannot be imported (macOS, a container without FUSE): ``None`` in
# sys.modules makes every ``import pyfuse3`` fail as a missing module would.
WITHOUT_FUSE = "import sys; sys.modules['pyfuse3'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_everything_but_mounting_works_without_pyfuse3(tmp_path: Path) -> None:
    """The Task class, the outputs reader and ``taskfs tasks`` never import pyfuse3; ``mount``
    and ``unmount`` say in one line what is missing, with no traceback."""
    imports = run_python(
        "import sys\n"
        "import taskfs.cli, taskfs.task, taskfs.outputs, taskfs.cli_tasks, taskfs.cli_live\n"
        "print('pyfuse3' in sys.modules)\n"
    )
    assert imports.returncode == 0 and imports.stdout.strip() == "False", imports.stderr
    helps = run_python(
        WITHOUT_FUSE + "from taskfs.cli import main\n"
        "for args in (['tasks', 'list', '--help'], ['serve', '--help'], ['--version']):\n"
        "    assert main(args) == 0, args\n"
    )
    assert helps.returncode == 0, helps.stderr
    for command in (["mount", str(tmp_path)], ["unmount", str(tmp_path)]):
        code = f"from taskfs.cli import main\nsys.exit(main({command!r}))\n"
        done = run_python(WITHOUT_FUSE + code)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == f"taskfs: error: {NO_FUSE}", done.stderr


def test_the_install_leaves_pyfuse3_out_where_there_is_no_linux() -> None:
    """What pip reads (the installed package's metadata): pyfuse3 only on Linux; fsspec and
    aiortc (the live channel) in every install."""
    requires = [Requirement(text) for text in importlib.metadata.requires("taskfs") or []]
    fuse = [r for r in requires if r.name == "pyfuse3"]
    assert fuse and all(r.marker is not None for r in fuse)
    assert all(r.marker.evaluate({"sys_platform": "linux"}) for r in fuse if r.marker)
    assert not any(r.marker.evaluate({"sys_platform": "darwin"}) for r in fuse if r.marker)
    assert {"fsspec", "aiortc"} <= {r.name for r in requires if r.marker is None}
