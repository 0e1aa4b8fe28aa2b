"""The mount's view of computing tasks: their current files, followed over the live channel.

Owns: one ``LiveTask`` per computing task the mount is asked about, each with one
``LiveConnection`` shared by every reader: a followed ``ls`` keeps the task's listing fresh
(the answering side sends it again when it changes), and each file someone opens gets a
followed ``tail`` from its first line, spooled to an unlinked temporary file (``Spool``) whose
size grows as lines arrive, so ``tail -f`` through the mount sees new lines.

What a spool holds: the file's complete lines, each with its ``\\n`` (the protocol carries
lines, not bytes: a followed ``tail`` sends only complete lines, so the spool is the file's
bytes up to its last newline; a line longer than the protocol's piece size arrives cut, and a
file that is not UTF-8 text cannot be carried at all: ``error`` says so).

Must stay true:
* one connection per task however many readers; a file's stream is opened once and shared;
  a task nobody has used for ``idle`` seconds (no open spool, no listing asked for) has its
  connection closed and its spools dropped (``reap``), so a mount holds no connection to a
  task nobody watches;
* every wait is bounded (by the caller; connecting by ``connect_timeout``); a failed
  connection is not retried for ``RETRY`` seconds (an unreachable live channel costs one
  deadline, not one per request);
* a spool never shrinks and holds at most ``MAX_SPOOL`` bytes (then it stops growing: the
  rest comes from the outputs archive when the task ends). (A file truncated while followed
  is sent again from its start by the answering side, and the protocol cannot say so: its
  spool then holds both; solvers append to their logs.)
* a spool lives while a reader holds it (``handles``), even after its task was dropped; when
  its file starts again, its readers' holds move to the new spool (``latest``) at once.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode
from taskfs.errors import LiveError, LiveUnavailableError, NoLiveChannelError, TaskfsError
from taskfs.live import protocol

if TYPE_CHECKING:
    from taskfs.live.client import LiveConnection

log = logging.getLogger(__name__)

IDLE: Final = 30.0
LIVE_CLIENT: Final = "taskfs.live.client"
RETRY: Final = 10.0
MAX_SPOOL: Final = 256 << 20
# The text a followed file had when asked arrives as a burst of messages, ended by an empty
# one (taskfs's answering side); from a side that does not mark it, a pause this long.
QUIET: Final = 1.0
# A followed file's stream is asked for again this many times in a row without an answer.
MAX_RESUMES = 6
# A file that started again (truncated, replaced) shows size 0 to ``stat`` until its readers
# from before have read it from its start, for at most this long (longer than GNU tail's poll
# of once a second): a follower sees the file shrink, and prints it again from its start, even
# when the new file is already longer than what it had read.
RESTART_SHOWN: Final = 1.5


@dataclass(eq=False)
class Spool:
    """One followed file's complete lines so far, on disk."""

    path: str
    file: Any = field(repr=False)
    size: int = 0
    error: LiveError | None = None
    ended: bool = False  # the stream closed: nothing more will come
    full: bool = False  # reached MAX_SPOOL
    handles: int = 0
    holders: Counter[int] = field(default_factory=Counter)  # the handles by process
    changed_ns: int = 0  # wall clock of the last growth (the file's mtime as shown)
    orphan: bool = False  # its task was dropped: close it when the last reader goes
    last_used: float = 0.0
    first: trio.Event = field(default_factory=trio.Event)
    grew: trio.Event = field(default_factory=trio.Event)
    caught_up: bool = False  # the file's text so far has arrived (a pause came after it)
    successor: Spool | None = None  # the file went on in another spool (truncated, replaced)
    restarted_at: float = -math.inf  # when it took over from a spool whose file started again
    # The processes that read the file before it started again and have yet to read it anew
    # (their handles' count each).
    rereaders: Counter[int] = field(default_factory=Counter)

    @property
    def restarting(self) -> bool:
        """The file started again moments ago (``RESTART_SHOWN``) and some of its readers
        have yet to read it from its start."""
        return bool(self.rereaders) and trio.current_time() - self.restarted_at < RESTART_SHOWN

    def restarting_for(self, pid: int) -> bool:
        """Whether process ``pid`` is one of those readers: ``stat`` shows it size 0 (its
        followers poll, and must see it shrink even when the new file is already longer than
        what they read); any other process sees the file as it is."""
        return self.rereaders[pid] > 0 and self.restarting

    def shown_size(self, pid: int) -> int:
        return 0 if self.restarting_for(pid) else self.size

    def restart(self, holders: Counter[int]) -> None:
        """The file started again: ``holders``' processes are to read it anew."""
        self.restarted_at = trio.current_time()
        self.rereaders = +holders

    def read_from_start(self, pid: int) -> None:
        """A reader of process ``pid`` from before the file started again went back to its
        start (``tail -f`` saw it shrink); when all of a process's have, ``stat`` shows it the
        size again, so that its next polls do not see it shrink once more."""
        self.rereaders[pid] -= 1
        self.rereaders = +self.rereaders  # drop those at 0

    def append(self, data: bytes) -> None:
        if self.full or not data:
            return
        if self.size + len(data) > MAX_SPOOL:
            self.full = True
            return
        os.pwrite(self.file.fileno(), data, self.size)
        self.size += len(data)
        self.changed_ns = time.time_ns()

    def arrived(self) -> None:
        """Wake whoever waits for this spool (its first answer, its growth, its end)."""
        self.first.set()
        self.grew.set()
        self.grew = trio.Event()

    async def settled(self) -> None:
        """Until the text the file had when it was opened has arrived (no answer for
        ``QUIET``), or the stream ended; the caller bounds the wait."""
        await self.first.wait()
        while not (self.caught_up or self.ended):
            await self.more()

    async def more(self) -> None:
        """Until the spool grows, or ``QUIET`` passes without it (then it has caught up)."""
        with trio.move_on_after(QUIET) as quiet:
            await self.grew.wait()
        if quiet.cancelled_caught:
            self.caught_up = True

    def read(self, offset: int, size: int) -> bytes:
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        return os.pread(self.file.fileno(), end - offset, offset)

    def latest(self) -> Spool:
        """The spool the file goes on in: itself, or its last ``successor`` (the holds of
        its readers moved there with the file)."""
        spool = self
        while spool.successor is not None:
            spool = spool.successor
        return spool

    def hold(self, pid: int = 0) -> None:
        self.handles += 1
        self.holders[pid] += 1

    def release(self, pid: int = 0) -> None:
        self.handles -= 1
        self.holders[pid] -= 1
        if self.handles < 0:  # a reader released a spool it did not hold
            log.warning("spool of %s released more often than held", self.path)
        self.last_used = trio.current_time()
        if self.handles <= 0 and self.orphan:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


class LiveTask:
    """One computing task's live view (see the module docstring)."""

    def __init__(self, mirrors: LiveMirrors, task_id: str) -> None:
        self.mirrors = mirrors
        self.task_id = task_id
        self.connection: LiveConnection | None = None
        self.connected = trio.Event()
        self.error: LiveError | None = None
        self.failed_at = -1e9
        self.listing: dict[str, dict[str, bool]] | None = None
        self.listed = trio.Event()
        self.spools: dict[str, Spool] = {}
        self.last_used = trio.current_time()
        self.closed = False
        self._starting = False
        self._scopes: set[trio.CancelScope] = set()

    # -- asked for by the filesystem ------------------------------------------------------------

    async def tree(self, connect: bool = True) -> dict[str, dict[str, bool]]:
        """The task's files now, by directory: ``{"dir/path": {name: is_dir}}`` (``""`` is the
        top), the last listing seen when the connection has ended. ``connect``: open the
        connection if it is not (only while the task computes). The caller bounds the wait."""
        self.last_used = trio.current_time()
        if connect:
            self._start()
        if self.listing is None and self.error is None and self._starting:
            await self.listed.wait()
        if self.listing is not None:
            return self.listing
        raise self.error or LiveError(f"no live channel to task {self.task_id}")

    async def spool(self, path: str) -> Spool:
        """The followed file ``path`` once its first answer is in (``Spool.settled`` waits
        for the rest of what it had; the caller bounds the waits)."""
        now = trio.current_time()
        self.last_used = now
        spool = self.spools.get(path)
        if spool is None or (spool.error is not None and spool.handles == 0):
            if spool is not None:
                spool.close()
            # Unlinked at once: closed with the spool, never left behind by a crash.
            spool = Spool(path, tempfile.TemporaryFile(dir=self.mirrors.spool_dir))  # noqa: SIM115
            self.spools[path] = spool
            self.mirrors.nursery.start_soon(self._follow, spool)
        spool.last_used = now
        await spool.first.wait()
        if spool.error is not None:
            raise spool.error
        return spool

    async def request(self, kind: str) -> Any:
        """The one answer of ``top`` (or ``last_modified_file``) on the shared connection (the
        caller bounds the wait)."""
        self.last_used = trio.current_time()
        self._start()
        await self._connected()
        assert self.connection is not None
        stream = await self.connection.request(protocol.Request(kind, False, {}))
        try:
            return await stream.first()
        finally:
            await stream.aclose()

    async def _connected(self) -> None:
        while not self.connected.is_set():
            if self.error is not None:
                raise self.error
            if not self._starting:
                raise LiveError(f"no live channel to task {self.task_id}")
            with trio.move_on_after(0.05):
                await self.connected.wait()

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        """A background task's scope, cancelled by ``close``."""
        scope = trio.CancelScope()
        if self.closed:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)

    def idle(self, now: float) -> bool:
        if any(spool.handles or not spool.first.is_set() for spool in self.spools.values()):
            return False  # read, or being opened
        latest = max([self.last_used, *(spool.last_used for spool in self.spools.values())])
        return now - latest > self.mirrors.idle

    # -- the connection ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._starting or self.closed:
            return
        if self.error is not None and trio.current_time() - self.failed_at < RETRY:
            return
        self._starting = True
        self.error = None
        if self.listing is None:
            self.listed = trio.Event()
        self.mirrors.nursery.start_soon(self._run)

    async def _run(self) -> None:
        connection: LiveConnection | None = None
        try:
            with self._scope():
                # The WebRTC stack (aiortc, PyAV: about 35 MB resident, 0.5 s to load) is
                # loaded when the mount first follows a running task, in a worker thread.
                client = await trio.to_thread.run_sync(importlib.import_module, LIVE_CLIENT)
                connection = client.LiveConnection(self.mirrors.api, self.task_id)
                stream = await connection.connect(protocol.Request("ls", True, {}))
                self.connection = connection
                self.connected.set()
                self.mirrors.answered = True
                async for answer in stream:
                    self.listing = by_directory(protocol.listing_paths(answer.message))
                    self.listed.set()
        except (LiveError, protocol.LiveProtocolError) as exc:
            self._fail(exc)
        except Exception as exc:  # a broken peer must not take the mount down
            log.warning("live channel of task %s failed: %r", self.task_id, exc)
            self._fail(exc)
        finally:
            if connection is not None:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
            self.connection = None
            self._starting = False
            self.connected = trio.Event()
            # Each followed file's own stream ends with the connection: ``_follow`` decides
            # whether the file ended with the task or is to be asked for again.

    def _fail(self, exc: Exception) -> None:
        error = exc if isinstance(exc, LiveError) else LiveError(str(exc))
        log.info("live channel of task %s: %s", self.task_id, error)
        self.error = error
        self.failed_at = trio.current_time()
        self.listed.set()  # waiters see the error at once

    async def _follow(self, spool: Spool) -> None:
        """Follow ``spool.path`` until the task stops computing.

        When the stream breaks off while the task still computes (the connection failed, or
        the file was truncated or replaced: the answering side ends the stream), the file is
        asked for again from its first line; what matches the spool is skipped, and on the
        first difference the file goes on in a new spool (``successor``) holding the new
        text from its start, which a reader sees as a truncation (``tail -f`` prints "file
        truncated" and the file again)."""
        current = spool
        failures = 0
        try:
            with self._scope():
                while True:
                    try:
                        got = await self._follow_once(current)
                    except NoLiveChannelError:
                        return  # the task stopped computing: nothing more to follow
                    except LiveError as exc:
                        if _unavailable(exc) is not None:
                            raise
                        log.info("following %s of task %s: %s", current.path, self.task_id, exc)
                        got = False
                    finally:
                        while current.successor is not None:  # it started again meanwhile
                            current = current.successor
                    if not await self._still_computing():
                        return
                    failures = 0 if got else failures + 1
                    if failures > MAX_RESUMES:
                        raise LiveError(f"{current.path}: the live channel keeps breaking off")
                    await trio.sleep(min(5.0, 0.2 * 2**failures))
        except trio.TooSlowError:
            current.error = LiveError(f"no live channel to task {self.task_id}")
        except LiveError as exc:
            current.error = _unavailable(exc) or exc
        except Exception as exc:  # a broken peer must not take the mount down
            log.warning("following %s of task %s failed: %r", current.path, self.task_id, exc)
            current.error = LiveError(f"{current.path}: the live channel failed: {exc}")
        finally:
            current.ended = True
            current.arrived()

    async def _follow_once(self, spool: Spool) -> bool:
        """One stream of the file from its first line into ``spool`` (checking what the
        spool holds already; a difference starts a ``successor``); whether anything came."""
        self._start()
        with trio.fail_after(self.mirrors.connect_timeout):
            await self._connected()
        connection = self.connection
        assert connection is not None
        args = {"filename": spool.path, "lines": protocol.MAX_LINES, "wait": False}
        args["last_partial"] = False  # the archive gives the unterminated end
        stream = await connection.request(protocol.Request("tail", True, args))
        seen = 0  # bytes of the file's text this stream has given
        check = spool.size  # bytes the spool holds already: compared, not appended
        got = False
        try:
            async for answer in stream:
                lines = answer.message
                if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
                    raise LiveError("the task's live channel sent no lines")
                data = protocol.text_of(lines, answer.continued).encode()
                if seen < check:
                    same = min(len(data), check - seen)
                    if spool.read(seen, same) == data[:same]:
                        seen += same
                        data = data[same:]
                    else:  # not the text the spool holds: the file starts again
                        spool = self._successor(spool, seen)
                        check = seen
                seen += len(data)
                spool.append(data)
                got = got or bool(lines)
                if not lines:  # taskfs's answerer: what the file had is all in
                    if seen < check:  # and it is shorter than the spool: it started again
                        spool = self._successor(spool, seen)
                        check = seen
                    spool.caught_up = True
                spool.arrived()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        return got

    def _successor(self, old: Spool, keep: int) -> Spool:
        """A new spool for ``old``'s file, holding ``old``'s first ``keep`` bytes; readers of
        ``old`` move to it, their holds at once (``latest``), so that nothing closes it while
        they have yet to read it; ``old`` is closed."""
        new = Spool(old.path, tempfile.TemporaryFile(dir=self.mirrors.spool_dir))  # noqa: SIM115
        for start in range(0, keep, 1 << 20):
            new.append(old.read(start, min(1 << 20, keep - start)))
        new.first.set()
        new.last_used = trio.current_time()
        new.restart(old.holders)
        new.handles, old.handles = old.handles, 0
        new.holders, old.holders = old.holders, Counter()
        self.mirrors.restarts[(self.task_id, old.path)] = new
        new.orphan = old.orphan
        old.successor = new
        old.ended = True
        old.arrived()
        if self.spools.get(old.path) is old:
            self.spools[old.path] = new
        old.close()
        return new

    async def _still_computing(self) -> bool:
        try:
            status = await self.mirrors.api.get_status(self.task_id)
        except TaskfsError:
            return False  # cannot tell: stop here (the archive takes over at the end)
        return status.status == TaskStatusCode.COMPUTATION_STARTED

    def close(self) -> None:
        self.closed = True
        for scope in self._scopes:
            scope.cancel()
        for spool in self.spools.values():
            spool.orphan = True
            if spool.handles == 0:
                spool.close()
        self.spools.clear()


_UNAVAILABLE = (
    (protocol.NOT_TEXT, "not text, so the live channel cannot carry it"),
    (protocol.NOT_FOUND, "gone from the running task"),
    (protocol.OUTSIDE, "a link out of the task's directory"),
    (protocol.NOT_REGULAR, "not a regular file"),
    (protocol.NOT_A_FILE, "not a regular file"),
    (protocol.BAD_NAME, "a name the live channel refuses"),
    (protocol.CANNOT_OPEN, "the task's machine cannot open it"),
)


def _unavailable(exc: LiveError) -> LiveUnavailableError | None:
    """The answering side's refusal of a file, as ENODATA; None for anything else."""
    text = str(exc)
    for prefix, why in _UNAVAILABLE:
        if text.startswith(prefix):
            return LiveUnavailableError(
                f"{text}: {why}; the whole file is in the outputs once the task has ended"
            )
    return None


def by_directory(paths: list[tuple[str, bool]]) -> dict[str, dict[str, bool]]:
    """``(path, is_dir)`` pairs as ``{directory: {name: is_dir}}``; every directory named
    (and every parent of a path) has an entry."""
    dirs: dict[str, dict[str, bool]] = {"": {}}

    def ensure(path: str) -> dict[str, bool]:
        found = dirs.get(path)
        if found is None:  # a path listed before its parent, or without it
            found = dirs[path] = {}
            parent, _, name = path.rpartition("/")
            ensure(parent)[name] = True
        return found

    for path, is_dir in paths:
        parent, _, name = path.rpartition("/")
        ensure(parent)[name] = is_dir or ensure(parent).get(name, False)
        if is_dir:
            ensure(path)
    return dirs


class LiveMirrors:
    """Every ``LiveTask`` of one mount. ``spool_dir`` holds the (unlinked) spool files."""

    def __init__(
        self,
        api: ApiClient,
        nursery: trio.Nursery,
        spool_dir: Path,
        connect_timeout: float = 20.0,
        idle: float = IDLE,
    ) -> None:
        self.api = api
        self.idle = idle
        self.nursery = nursery
        self.spool_dir = spool_dir
        self.connect_timeout = connect_timeout
        self.tasks: dict[str, LiveTask] = {}
        # The service gave a live channel once: it has them, so "no live channel" (204) for a
        # task the mount thought computing means that it has just stopped.
        self.answered = False
        # Files that started again, by (task, path), kept past their task's end: until their
        # followers have read them anew, the archive's file shows size 0 too (``restarting``).
        self.restarts: dict[tuple[str, str], Spool] = {}
        try:
            spool_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # an unusable cache dir: spools are unlinked, /tmp will do
            self.spool_dir = Path(tempfile.gettempdir())
            log.info("live spools go to %s (%s: %s)", self.spool_dir, spool_dir, exc.strerror)
        nursery.start_soon(self._reap, min(5.0, idle / 2))

    def get(self, task_id: str) -> LiveTask:
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = LiveTask(self, task_id)
        return task

    def find(self, task_id: str) -> LiveTask | None:
        return self.tasks.get(task_id)

    def drop(self, task_id: str) -> None:
        """The task ended (its outputs archive takes over): close its connection."""
        task = self.tasks.pop(task_id, None)
        if task is not None:
            task.close()

    def restarted_at_end(self, task_id: str, path: str, spool: Spool) -> None:
        """``spool`` (of ``path``) turned out not to be the start of the file as archived
        (found as the archive takes over): the file started again as the task ended. Its
        readers get ``restarting`` as if the live channel had said so."""
        if self.restarts.get((task_id, path)) is spool:
            return
        spool.restart(spool.latest().holders)
        self.restarts[(task_id, path)] = spool

    def restarting(self, task_id: str, path: str) -> Spool | None:
        """The spool of ``path`` of the task if the file started again moments ago and is
        yet to be read anew by some of its readers (see ``Spool.restarting``)."""
        spool = self.restarts.get((task_id, path))
        return spool if spool is not None and spool.restarting else None  # the reaper forgets

    def connections(self) -> int:
        return sum(task.connection is not None for task in self.tasks.values())

    async def _reap(self, every: float = 5.0) -> None:
        while True:
            await trio.sleep(every)
            now = trio.current_time()
            for key, spool in list(self.restarts.items()):
                if not spool.restarting:
                    del self.restarts[key]
            for task_id, task in list(self.tasks.items()):
                if task.idle(now):
                    log.debug("closing the idle live channel of task %s", task_id)
                    self.drop(task_id)
