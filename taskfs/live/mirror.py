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
* a spool lives while a reader holds it (``handles``), even after its task was dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from taskfs.api.client import ApiClient
from taskfs.errors import LiveError, LiveUnavailableError
from taskfs.live import protocol
from taskfs.live.client import LiveConnection, LiveStream

log = logging.getLogger(__name__)

IDLE: Final = 30.0
RETRY: Final = 10.0
MAX_SPOOL: Final = 256 << 20
# The initial part of a followed file arrives as a burst of messages: a reader is answered
# once none came for this long (or the deadline passed).
QUIET: Final = 0.15
NOT_TEXT = "File is not a text file"


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
    changed_ns: int = 0  # wall clock of the last growth (the file's mtime as shown)
    orphan: bool = False  # its task was dropped: close it when the last reader goes
    last_used: float = 0.0
    first: trio.Event = field(default_factory=trio.Event)
    grew: trio.Event = field(default_factory=trio.Event)
    stream: LiveStream | None = None

    def append(self, lines: list[str]) -> None:
        if self.full or not lines:
            return
        data = "".join(f"{line}\n" for line in lines).encode()
        if self.size + len(data) > MAX_SPOOL:
            self.full = True
            return
        os.pwrite(self.file.fileno(), data, self.size)
        self.size += len(data)
        self.changed_ns = time.time_ns()

    def read(self, offset: int, size: int) -> bytes:
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        return os.pread(self.file.fileno(), end - offset, offset)

    def hold(self) -> None:
        self.handles += 1

    def release(self) -> None:
        self.handles -= 1
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
        """The followed file ``path``, with what has arrived once its first burst is in (the
        caller bounds the wait)."""
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
        while not spool.ended:
            with trio.move_on_after(QUIET) as quiet:
                await spool.grew.wait()
            if quiet.cancelled_caught:
                break
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
        if any(spool.handles for spool in self.spools.values()):
            return False
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
        connection = LiveConnection(self.mirrors.api, self.task_id)
        try:
            with self._scope():
                stream = await connection.connect(protocol.Request("ls", True, {}))
                self.connection = connection
                self.connected.set()
                async for tree in stream:
                    self.listing = by_directory(protocol.listing_paths(tree))
                    self.listed.set()
        except (LiveError, protocol.LiveProtocolError) as exc:
            self._fail(exc)
        except Exception as exc:  # a broken peer must not take the mount down
            log.warning("live channel of task %s failed: %r", self.task_id, exc)
            self._fail(exc)
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            self.connection = None
            self._starting = False
            self.connected = trio.Event()
            for spool in self.spools.values():
                spool.ended = True
                spool.first.set()

    def _fail(self, exc: Exception) -> None:
        error = exc if isinstance(exc, LiveError) else LiveError(str(exc))
        log.info("live channel of task %s: %s", self.task_id, error)
        self.error = error
        self.failed_at = trio.current_time()
        self.listed.set()  # waiters see the error at once

    async def _follow(self, spool: Spool) -> None:
        try:
            with self._scope():
                self._start()
                with trio.fail_after(self.mirrors.connect_timeout):
                    await self._connected()
                connection = self.connection
                assert connection is not None
                request = protocol.Request(
                    "tail",
                    True,
                    {"filename": spool.path, "lines": protocol.MAX_LINES, "wait": False},
                )
                stream = spool.stream = await connection.request(request)
                async for lines in stream:
                    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
                        raise LiveError("the task's live channel sent no lines")
                    spool.append(lines)
                    spool.first.set()
                    spool.grew.set()
                    spool.grew = trio.Event()
        except trio.TooSlowError:
            spool.error = LiveError(f"no live channel to task {self.task_id}")
        except LiveError as exc:
            text = str(exc)
            if text.startswith(NOT_TEXT):
                spool.error = LiveUnavailableError(
                    f"{spool.path}: not text, so the live channel cannot carry it; it is in "
                    "the outputs when the task ends"
                )
            elif text.startswith("File not found"):
                spool.error = LiveUnavailableError(f"{spool.path}: gone from the running task")
            else:
                spool.error = exc
        except Exception as exc:  # a broken peer must not take the mount down
            log.warning("following %s of task %s failed: %r", spool.path, self.task_id, exc)
            spool.error = LiveError(f"{spool.path}: the live channel failed: {exc}")
        finally:
            spool.ended = True
            spool.first.set()
            spool.grew.set()
            if spool.stream is not None:
                with trio.CancelScope(shield=True):
                    await spool.stream.aclose()

    def close(self) -> None:
        self.closed = True
        for scope in self._scopes:
            scope.cancel()
        for spool in self.spools.values():
            spool.orphan = True
            if spool.handles == 0:
                spool.close()
        self.spools.clear()


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

    def connections(self) -> int:
        return sum(task.connection is not None for task in self.tasks.values())

    async def _reap(self, every: float = 5.0) -> None:
        while True:
            await trio.sleep(every)
            now = trio.current_time()
            for task_id, task in list(self.tasks.items()):
                if task.idle(now):
                    log.debug("closing the idle live channel of task %s", task_id)
                    self.drop(task_id)
