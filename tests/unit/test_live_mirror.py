"""The mount's followed files (``taskfs.live.mirror``) without a live channel: what a file that
starts again (truncated, replaced) does to its spools and their readers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import cast

import trio
import trio.testing

from taskfs.api.client import ApiClient
from taskfs.live.mirror import RESTART_SHOWN, LiveMirrors, Spool

TAIL, OTHER = 4242, 4343  # the follower's process, and another


def spool(path: str, directory: Path, text: bytes) -> Spool:
    made = Spool(path, tempfile.TemporaryFile(dir=directory))  # noqa: SIM115 - the spool owns it
    made.append(text)
    made.first.set()
    return made


async def test_a_file_that_starts_again_keeps_its_readers(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A reader holding the old spool has yet to move to the new one: nothing may close the
    new one under it (the idle reaper, the task's end), and a poller must see the file
    shrink even though the new file is longer than what it had read."""
    mirrors = LiveMirrors(cast(ApiClient, None), nursery, tmp_path, idle=1)
    task = mirrors.get("t")
    old = task.spools["log"] = spool("log", tmp_path, b"old\n")
    old.hold(TAIL)  # tail -f has read it, and polls
    new = task._successor(old, 0)
    new.append(b"a new text, longer than the old\n")
    assert task.spools["log"] is new and old.latest() is new
    assert new.shown_size(TAIL) == 0  # looks truncated to the next poll
    assert new.shown_size(OTHER) == new.size  # to anyone else: as it is (a fresh cat, cp)
    await trio.sleep(RESTART_SHOWN + 0.1)
    assert new.shown_size(TAIL) == new.size  # nobody read it again: as it is after a while
    await trio.sleep(10)  # the reaper ran: the task is not idle while a reader holds its file
    assert "t" in mirrors.tasks
    assert old.latest().read(0, 5) == b"a new"
    third = task._successor(new, 2)  # started again, keeping its first two bytes
    third.append(b"other\n")
    assert third.shown_size(TAIL) == 0
    third.read_from_start(TAIL)  # the poller saw it shrink and went back to the start
    assert third.shown_size(TAIL) == third.size == len(b"a other\n")
    mirrors.drop("t")  # the task ended: its spools are kept while read
    assert old.latest().read(0, 100) == b"a other\n"
    old.latest().release(TAIL)
    assert third.file.closed and new.file.closed and old.file.closed
