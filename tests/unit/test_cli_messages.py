"""What the CLI says when something it started or was given is wrong: one line that names
the cause, never a traceback squeezed onto a line."""

from __future__ import annotations

from pathlib import Path

from taskfs.cli import _last_words

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
