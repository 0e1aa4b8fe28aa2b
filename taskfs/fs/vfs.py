"""The taskfs tree (DESIGN.md section 1) as plain async methods: all behaviour, no FUSE.

Owns: what every path shows and does: the root listing of tasks, each task's virtual files
(``status``, ``machine_type``, ``computation_time``, ``control``, ``wait``, ``info.json``) and
its ``outputs/`` tree; attributes and their cache timeouts; open handles; the lookup counts of
the inode table; freshness of task state; the one poller per task behind ``wait``.

Must stay true:
* nothing here imports pyfuse3; failures are ``TaskfsError`` subclasses whose ``errno`` the
  adapter answers with (the one errno table lives in ``taskfs.errors``);
* a live task's state is at most ``live_timeout`` old when shown, and its nodes carry that
  timeout; a terminal task never changes, so its nodes carry ``final_timeout`` and its output
  files the kernel page cache (``keep_cache``); virtual files are always ``direct_io`` with
  ``st_size`` equal to their current content;
* every reply that hands an inode to the kernel adds one to its lookup count, and readdir adds
  one only for entries the kernel accepted (``emit`` returned True);
* readdir offsets index a snapshot taken at ``opendir``, so they stay valid while tasks come and
  go;
* a name that cannot be a task id is ENOENT without any request; everything but ``control`` is
  read-only (EROFS);
* nothing a directory lists blocks a reader: ``wait`` is reachable by name only
  (``VirtualFile.listed``), so tools that walk a task directory and read every file finish.

How to add a file to every task directory: one ``VirtualFile`` entry in ``VIRTUAL`` (its
content from the task's state; ``fetch`` for content made at open; ``writable`` for
commands). A new kind of directory is a ``NodeKey`` kind with its branch in ``_child_key``,
``_attr_for``, ``opendir`` and ``open`` (as ``outputs`` has; the live and archive views of
``outputs`` are the two node types ``_output_node`` returns).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

import trio

from taskfs.api.client import PAGE_SIZE, ApiClient
from taskfs.api.models import (
    Task,
    TaskPage,
    TaskStatusCode,
    TaskWithStatusHistory,
    computation_time,
    is_task_id,
    machine_type,
)
from taskfs.archive.cache import SingleFlight
from taskfs.archive.member import MemberReader
from taskfs.archive.remote import RemoteArchive
from taskfs.archive.zipindex import DirNode, Entry
from taskfs.errors import (
    BusyError,
    ChecksumError,
    InvalidCommandError,
    IsDirError,
    LiveError,
    NoLiveChannelError,
    NotDirError,
    NotFoundError,
    ReaderGoneError,
    ReadOnlyError,
    ServiceError,
    StaleError,
    TaskfsError,
    UnmountingError,
)
from taskfs.fs import control
from taskfs.fs.inodes import ROOT_INODE, Inode, InodeTable, NodeKey
from taskfs.fs.stats import MountStats
from taskfs.outputs import Outputs
from taskfs.proc import wants_out
from taskfs.retry import operation_budget

if TYPE_CHECKING:
    from taskfs.live.mirror import LiveMirrors, LiveTask, Spool

log = logging.getLogger(__name__)

# List requests side by side for the first listing of a root of more than two pages.
LIST_PARALLEL = 4

OUTPUTS = "outputs"
INPUTS = "inputs"
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
CONTROL_MODE = stat.S_IFREG | 0o600


@dataclass(frozen=True)
class VirtualFile:
    """One file of every task directory (``VIRTUAL``). ``content`` is what ``stat`` sizes and
    a read gives; ``fetch`` (if any) makes it afresh at each ``open`` (``top``); ``blocking``:
    a read waits until the task has ended (``wait``); ``writable``: commands go to
    ``control.run`` (``control``); ``full``: needs the task's whole record (``info.json``);
    ``listed``: shown by ``readdir`` (else reachable by name only)."""

    name: str
    content: Callable[[Vfs, _TaskState], bytes]
    mode: int = FILE_MODE
    listed: bool = True
    full: bool = False
    blocking: bool = False
    writable: bool = False
    fetch: Callable[[Vfs, Task], Awaitable[bytes]] | None = None


def _wait_content(vfs: Vfs, state: _TaskState) -> bytes:
    task = state.task
    return f"{task.status}\n".encode() if task.is_terminated else b""


def _info_content(vfs: Vfs, state: _TaskState) -> bytes:
    assert state.info is not None
    return state.info


# The task directory's files, in listing order. A new one is one entry here.
VIRTUAL: dict[str, VirtualFile] = {
    spec.name: spec
    for spec in (
        VirtualFile("status", lambda vfs, s: f"{s.task.status}\n".encode()),
        VirtualFile("machine_type", lambda vfs, s: _line(machine_type(s.task))),
        VirtualFile("computation_time", lambda vfs, s: _line(computation_time(s.task))),
        VirtualFile(
            "control", lambda vfs, s: control.HELP.encode(), mode=CONTROL_MODE, writable=True
        ),
        # Reachable by name, not listed: a read of ``wait`` blocks until the task ends, which
        # would hang every tool that walks a directory and reads what it finds (grep -r,
        # cp -r, find -exec cat, rsync).
        VirtualFile("wait", _wait_content, listed=False, blocking=True),
        VirtualFile("info.json", _info_content, full=True),
        VirtualFile(
            "top",
            lambda vfs, s: vfs._top.get(s.task.task_id, b""),
            fetch=lambda vfs, task: vfs._fetch_top(task),
        ),
    )
}

# Views of the root: ``tasks/<view>/<group>/<id>``, a symbolic link to ``../../<id>``. Their
# names start with a dot, so they never clash with a task id and stay out of ``tasks/*``.
VIEWS: dict[str, Callable[[Task], object]] = {
    ".projects": lambda task: task.project,
    ".status": lambda task: task.status,
}
LINK_MODE = stat.S_IFLNK | 0o777
# ZIP compression methods by number, as ``user.taskfs.method`` names them.
METHODS = {0: "stored", 8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstd", 95: "xz"}
# The mount's own directory: ``tasks/.taskfs/stats``.
META = ".taskfs"
META_FILES = ("stats",)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
NS = 1_000_000_000
# A followed file continued from its compressed archive member is checked at the junction
# when the spool is at most this large (the check inflates the member up to there).
LIVE_CHECK = 16 << 20


@dataclass(frozen=True)
class VfsSettings:
    """Behaviour of the tree; the defaults are the documented ones (README)."""

    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    # Permission bits taken away from every node (``--umask``; 0: the modes the README gives).
    umask: int = 0
    # Live tasks: state at most this old; entry/attribute timeout of their nodes.
    live_timeout: float = 1.0
    # Terminal tasks: entry/attribute timeout (they never change again).
    final_timeout: float = 3600.0
    # The root listing is refetched when older than this.
    listing_ttl: float = 2.0
    # A task id the API did not know is not asked for again within this time.
    negative_ttl: float = 1.0
    # ``wait`` pollers: first interval and the most they back off to.
    wait_poll: float = 1.0
    wait_poll_max: float = 5.0
    # Readers blocked on ``wait`` at once; more get EAGAIN (FUSE handler slots are finite).
    max_waiters: int = 512
    # Open output archives kept (their indexes stay in memory), and the entries of all their
    # indexes together (an archive larger than that alone is kept alone).
    max_archives: int = 32
    max_index_entries: int = 400_000
    # Extended attributes (``user.taskfs.*``): off by default, since answering them makes
    # ``ls -l`` ask for two more per file (``--xattr``).
    xattr: bool = False
    # Time limit of one operation, all the remote calls it makes included (``--deadline``).
    deadline: float = 10.0
    # An archive that failed to open (corrupt, refused) is not tried again for this long.
    archive_retry: float = 10.0


@dataclass(frozen=True)
class Attr:
    """What ``stat`` shows, plus how long the kernel may cache it."""

    inode: Inode
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int
    timeout: float

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(frozen=True)
class OpenInfo:
    fh: int
    direct_io: bool
    keep_cache: bool


@dataclass
class _TaskState:
    task: Task
    fetched: float
    info: bytes | None = None  # info.json: the full GET /tasks/{id} answer, indented


@dataclass
class _DirHandle:
    entries: list[tuple[str, NodeKey, Attr]]


@dataclass
class _FileHandle:
    key: NodeKey
    content: bytes = b""
    reader: MemberReader | None = None
    inode: Inode = ROOT_INODE
    pid: int = 0  # wait: the process that opened it
    spool: Spool | None = None  # a running task's file, followed (then its archive member)


@dataclass(frozen=True)
class _LiveDir:
    """A directory of a running task's outputs, as its live channel lists it: ``dirs`` is the
    whole listing by directory, ``path`` this one."""

    live: LiveTask
    dirs: dict[str, dict[str, bool]]
    path: str

    @property
    def names(self) -> dict[str, bool]:
        return self.dirs.get(self.path, {})


@dataclass(frozen=True)
class _LiveFile:
    live: LiveTask
    path: str


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    status: str = ""
    readers: int = 0
    gone: NotFoundError | None = None  # the task disappeared: its readers get ENOENT


class Vfs:
    """The tree over one API. ``nursery`` hosts pollers and background fetches."""

    def __init__(
        self,
        api: ApiClient,
        outputs: Outputs,
        nursery: trio.Nursery,
        settings: VfsSettings | None = None,
        live: LiveMirrors | None = None,
    ) -> None:
        self.api = api
        # Running tasks' files over the live channel (None: aiortc is missing; their
        # ``outputs`` stay empty until they end).
        self.live = live
        self._top: dict[str, bytes] = {}
        # The counters of ``.taskfs/stats`` (the mount hooks them to its HTTP clients).
        self.stats = MountStats()
        self.outputs = outputs
        self.nursery = nursery
        self.settings = settings or VfsSettings()
        self.inodes = InodeTable()
        # Drop the kernel's cached pages of an inode: they may hold bytes nothing vouches for
        # (a corrupt or unverified member, an archive replaced under it). Set by the adapter.
        self.drop_cached: Callable[[Inode], None] = lambda inode: None
        self._states: dict[str, _TaskState] = {}
        self._state_flights: SingleFlight[str, _TaskState] = SingleFlight()
        self._listing: list[str] = []
        self._listing_at = -1e9
        self._listing_flight: SingleFlight[int, list[str]] = SingleFlight()
        self._missing: dict[str, float] = {}
        self._archives: OrderedDict[str, RemoteArchive] = OrderedDict()
        self._index_entries = 0  # of the archives in ``_archives``
        self._archive_flights: SingleFlight[str, RemoteArchive | None] = SingleFlight()
        # Archives that failed to open, and when: not tried again within ``archive_retry``.
        self._archive_failures: dict[str, tuple[float, TaskfsError]] = {}
        # Ended tasks found without an archive, and when (asked again after ``archive_retry``).
        self._no_archive: dict[str, float] = {}
        self._handles: dict[int, _FileHandle | _DirHandle] = {}
        self._next_fh = 1
        self._waiters: dict[str, _Waiter] = {}
        self._closing = False
        # The cancel scope of every request being answered (``shutdown`` cancels them).
        self._inflight: set[trio.CancelScope] = set()
        self._wait_slots = trio.CapacityLimiter(self.settings.max_waiters)
        self._mount_time_ns = _now_ns()

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """The context of one request from the kernel: its remote calls share one deadline,
        and ``shutdown`` ends it at once (``UnmountingError``) wherever it waits."""
        scope = trio.CancelScope()
        if self._closing:
            scope.cancel()  # answered at its first wait; work that never waits completes
        self._inflight.add(scope)
        try:
            with operation_budget(self.settings.deadline), scope:
                yield
        finally:
            self._inflight.discard(scope)
        if scope.cancelled_caught:
            raise UnmountingError("the mount is being unmounted")

    # -- task state ----------------------------------------------------------------------------

    async def _state(self, task_id: str, full: bool = False) -> _TaskState:
        """The task's state, fresh enough (live: ``live_timeout``; terminal: once fetched)."""
        state = self._states.get(task_id)
        now = trio.current_time()
        if (
            state is not None
            and (not full or state.info is not None)
            and (state.task.is_terminated or now - state.fetched < self.settings.live_timeout)
        ):
            return state
        missing_at = self._missing.get(task_id)
        if missing_at is not None and now - missing_at <= self.settings.negative_ttl:
            raise NotFoundError(f"no task {task_id}")
        return await self._state_flights.run(task_id, lambda: self._fetch_state(task_id))

    async def _fetch_state(self, task_id: str) -> _TaskState:
        try:
            task, raw = await self.api.get_task_raw(task_id)
        except NotFoundError:
            self._missing[task_id] = trio.current_time()
            self._states.pop(task_id, None)
            raise
        self._missing.pop(task_id, None)
        info = json.dumps(json.loads(raw), indent=2).encode() + b"\n"
        state = _TaskState(task, trio.current_time(), info)
        self._states[task_id] = state
        return state

    async def _task_ids(self) -> list[str]:
        """All task ids, newest first, refetched when older than ``listing_ttl``."""
        if trio.current_time() - self._listing_at <= self.settings.listing_ttl:
            return self._listing
        return await self._listing_flight.run(0, self._fetch_listing)

    async def _fetch_listing(self) -> list[str]:
        """The task ids, newest first. The first listing reads every page. A refresh reads
        pages from the newest until one where nothing is new and every task has ended (the
        API lists newest first, so what follows is what the last listing saw): an unchanged
        root costs one request. The previous listing's rest follows the pages read; if the
        count does not add up to the API's total (tasks were deleted), every page is read."""
        ids = await self._list_pages(refresh=bool(self._listing))
        if ids is None:
            ids = await self._list_pages(refresh=False)
            assert ids is not None
        self._listing = ids
        self._listing_at = trio.current_time()
        return ids

    async def _list_pages(self, refresh: bool) -> list[str] | None:
        known = set(self._listing) if refresh else set()
        seen: set[str] = set()
        fresh: list[str] = []
        page = 1
        while True:
            result = await self.api.list_page(page, PAGE_SIZE)
            if page == 1 and not refresh and result.total_size > 2 * PAGE_SIZE:
                rest = await self._other_pages(result.total_size)
                if rest is not None:  # every page, read side by side
                    return self._note_pages([result, *rest], seen, known)[0]
            changed = self._note_pages([result], seen, known, fresh)[1]
            if len(result.tasks) < PAGE_SIZE or page * PAGE_SIZE >= result.total_size:
                return fresh  # every page read
            if refresh and not changed:
                ids = fresh + [task_id for task_id in self._listing if task_id not in seen]
                return ids if len(ids) == result.total_size else None
            page += 1

    async def _other_pages(self, total: int) -> list[TaskPage] | None:
        """Pages 2 onwards of a listing of ``total`` tasks, ``LIST_PARALLEL`` at a time (the
        first listing of a large root costs about a page's round trip per ``LIST_PARALLEL``
        pages, not one each); ``None`` if the total moved meanwhile (tasks came or went: the
        pages may overlap or miss one, so the caller reads them one after another)."""
        count = -(-total // PAGE_SIZE)
        pages: list[TaskPage | None] = [None] * (count - 1)
        limiter = trio.CapacityLimiter(LIST_PARALLEL)

        async def fetch(number: int) -> None:
            async with limiter:
                pages[number - 2] = await self.api.list_page(number, PAGE_SIZE)

        async with trio.open_nursery() as nursery:
            for number in range(2, count + 1):
                nursery.start_soon(fetch, number)
        got = [page for page in pages if page is not None]
        if any(page.total_size != total for page in got):
            return None
        return got

    def _note_pages(
        self,
        pages: list[TaskPage],
        seen: set[str],
        known: set[str],
        ids: list[str] | None = None,
    ) -> tuple[list[str], bool]:
        """Take the tasks of ``pages`` (in order) into the listing ``ids`` and the states;
        whether any of them is new to ``known`` or still running."""
        ids = [] if ids is None else ids
        changed = False
        now = trio.current_time()
        for result in pages:
            for task in result.tasks:
                if task.task_id in seen:
                    continue  # shifted onto this page by a newer task
                seen.add(task.task_id)
                ids.append(task.task_id)
                changed = changed or task.task_id not in known or not task.is_terminated
                state = self._states.get(task.task_id)
                if state is None or not state.task.is_terminated:
                    self._states[task.task_id] = _TaskState(task, now)
        return ids, changed

    # -- attributes ----------------------------------------------------------------------------

    def _timeout(self, task: Task) -> float:
        return self.settings.final_timeout if task.is_terminated else self.settings.live_timeout

    def _attr(self, mode: int, size: int, mtime_ns: int, timeout: float, nlink: int = 1) -> Attr:
        return Attr(
            inode=ROOT_INODE,
            mode=mode & ~(self.settings.umask & 0o777),
            size=size,
            nlink=nlink,
            uid=self.settings.uid,
            gid=self.settings.gid,
            mtime_ns=mtime_ns,
            timeout=timeout,
        )

    async def _attr_for(self, key: NodeKey) -> Attr:
        if key.kind == "root":
            count = len(self._listing)
            return self._attr(
                DIR_MODE, 0, self._mount_time_ns, self.settings.live_timeout, 2 + count
            )
        if key.kind in ("views", "view", "link"):
            return await self._view_attr(key)
        if key.kind == "meta":
            if not key.name:
                return self._attr(DIR_MODE, 0, self._mount_time_ns, 0.0, 2)
            return self._attr(FILE_MODE, len(self._meta_content(key)), _now_ns(), 0.0)
        try:
            state = await self._state(key.task_id, full=key.kind == "file" and _spec(key).full)
        except ServiceError:
            followed = self._followed(key)
            if followed is None:
                raise
            # The API does not answer, but the file comes over the live channel: a follower
            # (tail -f polls fstat) goes on with what it brings.
            return self._live_attr(followed, _last_change_ns(self._states[key.task_id].task))
        task = state.task
        changed = _last_change_ns(task)
        timeout = self._timeout(task)
        if key.kind == "task":
            return self._attr(DIR_MODE, 0, changed, timeout, nlink=3)
        if key.kind == "file":
            spec = _spec(key)
            return self._attr(spec.mode, len(spec.content(self, state)), changed, timeout)
        # outputs
        if not key.path:
            # ``outputs`` itself needs no archive: ``ls`` of a task never opens one, and a broken
            # or unreachable archive shows only inside. Its link count is unknown (1) until the
            # archive is open.
            archive = self._archives.get(_slot(key))
            subdirs = len(archive.tree.dirs) if archive is not None else -1
            return self._attr(DIR_MODE, 0, changed, timeout, nlink=2 + subdirs)
        node = await self._output_node(key)
        if isinstance(node, _LiveDir | _LiveFile):
            return self._live_attr(node, changed)
        if isinstance(node, DirNode):
            subdirs = len(node.dirs)
            mtime = changed if not key.path else int(node.mtime * NS)
            return self._attr(DIR_MODE, 0, mtime, timeout, nlink=2 + subdirs)
        return self._attr(node.mode, node.size, int(node.mtime * NS), timeout)

    def _live_attr(self, node: _LiveDir | _LiveFile, changed_ns: int) -> Attr:
        """A running task's file or directory: a file's size is what its spool holds (0 until
        someone opens it), asked for afresh at every ``stat`` so that ``tail -f`` sees it
        grow."""
        if isinstance(node, _LiveDir):
            subdirs = sum(node.names.values())
            return self._attr(DIR_MODE, 0, changed_ns, self.settings.live_timeout, 2 + subdirs)
        spool = node.live.spools.get(node.path)
        size = 0 if spool is None else spool.size
        mtime = changed_ns if spool is None or not spool.changed_ns else spool.changed_ns
        return self._attr(FILE_MODE, size, mtime, 0.0)

    # -- outputs -------------------------------------------------------------------------------

    async def _archive(self, task_id: str, inputs: bool = False) -> RemoteArchive | None:
        """The task's outputs archive once it has ended (``inputs``: its input archive once
        uploaded), else ``None`` (an empty ``outputs``/``inputs``)."""
        state = await self._state(task_id)
        if inputs:
            uploaded = state.task.status != TaskStatusCode.PENDING_INPUT
            if not (uploaded and state.task.storage_input_path):
                return None
        elif not state.task.is_terminated:
            return None
        slot = _archive_slot(task_id, inputs)
        if slot in self._archives:
            self._archives.move_to_end(slot)
            return self._archives[slot]
        now = trio.current_time()
        failed = self._archive_failures.get(slot)
        if failed is not None and now - failed[0] < self.settings.archive_retry:
            raise failed[1]
        missing = self._no_archive.get(slot)
        if missing is not None and now - missing < self.settings.archive_retry:
            return None

        async def open_it() -> RemoteArchive | None:
            try:
                archive = await self.outputs.open(state.task, self.nursery, inputs=inputs)
            except ServiceError:
                raise  # an outage: the breaker remembers it, and it ends by itself
            except TaskfsError as exc:  # a broken archive stays broken
                self._archive_failures[slot] = (trio.current_time(), exc)
                raise
            self._archive_failures.pop(slot, None)
            if archive is None:
                # No archive (yet: storage may be catching up, or it was moved away for a
                # moment): an empty ``outputs``, asked again after ``archive_retry``.
                self._no_archive[slot] = trio.current_time()
                return None
            self._no_archive.pop(slot, None)
            if self.live is not None and not inputs:
                self.live.drop(task_id)  # the archive takes over from the live channel
            self._archives[slot] = archive
            self._index_entries += len(archive.entries)
            while len(self._archives) > 1 and (
                len(self._archives) > self.settings.max_archives
                or self._index_entries > self.settings.max_index_entries
            ):
                self._forget_archive(next(iter(self._archives)))
            return archive

        return await self._archive_flights.run(slot, open_it)

    def _forget_archive(self, slot: str) -> None:
        old = self._archives.pop(slot, None)
        if old is not None:
            self._index_entries -= len(old.entries)

    async def _output_node(self, key: NodeKey) -> DirNode | Entry | _LiveDir | _LiveFile:
        archive = await self._archive(key.task_id, _is_inputs(key))
        if archive is None:
            live = None if _is_inputs(key) else await self._live_node(key)
            if live is not None:
                return live
            if key.path:
                raise NotFoundError("/".join(key.path))
            return DirNode()
        node = archive.find(key.path)
        if node is None:
            raise NotFoundError("/".join(key.path))
        return node

    def statfs(self) -> tuple[int, int]:
        """What ``df`` shows: the bytes of the listed tasks' output archives (as the API
        reports their sizes), all of it used (nothing can be written), and the number of
        listed tasks as the files. No request: from the last listing."""
        size = 0
        for task_id in self._listing:
            state = self._states.get(task_id)
            if state is not None and state.task.metrics.output_zipped_size_bytes:
                size += int(state.task.metrics.output_zipped_size_bytes)
        return size, len(self._listing)

    def _meta_content(self, key: NodeKey) -> bytes:
        """``.taskfs/stats``: the counters, and what is open now."""
        return self.stats.document(
            cache=dict(self.outputs.cache.counts),
            open_archives=len(self._archives),
            open_handles=len(self._handles),
            wait_readers=sum(waiter.readers for waiter in self._waiters.values()),
            live_connections=0 if self.live is None else self.live.connections(),
            known_tasks=len(self._listing),
        )

    # -- extended attributes (``--xattr``) ------------------------------------------------------

    async def xattrs(self, inode: Inode) -> dict[str, bytes]:
        """The ``user.taskfs.*`` attributes of a node, from what is known already (no request
        beyond the ones that found the node)."""
        key = self._key(inode)
        if key.kind == "task":
            task = (await self._state(key.task_id)).task
            found = {
                "project": task.project or "",
                "status": str(task.status),
                "storage_path": task.storage_path or "",
            }
        elif key.kind == "outputs" and key.path:
            node = await self._output_node(key)
            archive = self._archives.get(_slot(key))
            if not isinstance(node, Entry) or archive is None:
                return {}
            found = {
                "crc32": f"{node.crc:08x}",
                "compressed_size": str(node.compressed_size),
                "method": METHODS.get(node.method, str(node.method)),
                "etag": archive.etag,
            }
        else:
            return {}
        return {f"user.taskfs.{name}": value.encode() for name, value in found.items() if value}

    # -- views ---------------------------------------------------------------------------------

    async def _groups(self, view: str) -> dict[str, list[str]]:
        """The listed tasks of ``view`` by group (project, status), newest first: from the
        root's listing, no request of its own."""
        groups: dict[str, list[str]] = {}
        for task_id in await self._task_ids():
            state = self._states.get(task_id)
            value = None if state is None else VIEWS[view](state.task)
            name = str(value) if value is not None else ""
            if name and name not in (".", "..") and "/" not in name and "\0" not in name:
                groups.setdefault(name, []).append(task_id)
        return groups

    async def _view_attr(self, key: NodeKey, groups: dict[str, list[str]] | None = None) -> Attr:
        timeout = self.settings.live_timeout
        if groups is None:
            groups = await self._groups(key.name)
        if key.kind == "views":
            return self._attr(DIR_MODE, 0, self._mount_time_ns, timeout, 2 + len(groups))
        if key.path[0] not in groups:
            raise NotFoundError(_describe(key))
        if key.kind == "view":
            return self._attr(DIR_MODE, 0, self._mount_time_ns, timeout, 2)
        if key.path[1] not in groups[key.path[0]]:
            raise NotFoundError(_describe(key))
        return self._attr(LINK_MODE, len(_link_target(key)), self._mount_time_ns, timeout)

    async def readlink(self, inode: Inode) -> bytes:
        key = self._key(inode)
        if key.kind != "link":
            raise InvalidCommandError(f"{_describe(key)} is not a symbolic link")
        return _link_target(key).encode()

    # -- running tasks: the live channel --------------------------------------------------------

    async def _live_node(self, key: NodeKey) -> _LiveDir | _LiveFile | None:
        """``key`` in a running task's outputs as its live channel shows them; None where
        there is no live view (no aiortc, a service without a live channel, a task that is
        neither computing nor was followed)."""
        if self.live is None:
            return None
        state = await self._state(key.task_id)
        computing = state.task.status == TaskStatusCode.COMPUTATION_STARTED
        live = self.live.get(key.task_id) if computing else self.live.find(key.task_id)
        if live is None:
            return None
        with self._live_deadline(key.task_id, "list its files"):
            try:
                dirs = await live.tree(connect=computing)
            except NoLiveChannelError:
                return None  # as before there was a live channel: empty until the task ends
            except LiveError:
                if not computing:
                    return None
                raise
        if not key.path:
            return _LiveDir(live, dirs, "")
        path = "/".join(key.path)
        is_dir = dirs.get("/".join(key.path[:-1]), {}).get(key.path[-1])
        if is_dir is None:
            raise NotFoundError(path)
        return _LiveDir(live, dirs, path) if is_dir else _LiveFile(live, path)

    @contextlib.contextmanager
    def _live_deadline(self, task_id: str, what: str) -> Iterator[None]:
        """A wait on a task's live channel, bounded by ``deadline``: ``LiveError`` saying
        what it did not do in time."""
        try:
            with trio.fail_after(self.settings.deadline):
                yield
        except trio.TooSlowError:
            raise LiveError(
                f"the live channel of task {task_id} did not {what} within "
                f"{self.settings.deadline:g} s"
            ) from None

    def _followed(self, key: NodeKey) -> _LiveFile | None:
        """``key`` as a file of a running task that is being followed (a spool exists and
        the task's state was seen), else None."""
        if self.live is None or key.kind != "outputs" or not key.path or _is_inputs(key):
            return None
        live = self.live.find(key.task_id)
        path = "/".join(key.path)
        if live is None or path not in live.spools or key.task_id not in self._states:
            return None
        return _LiveFile(live, path)

    async def _live_spool(self, node: _LiveFile) -> Spool:
        """The followed file, its first answer in; and, within half the deadline, the rest
        of the text it had (so that ``tail`` finds the end where the file's end is; a larger
        file goes on arriving while it is read)."""
        with self._live_deadline(node.live.task_id, f"send {node.path}"):
            spool = await node.live.spool(node.path)
        spool.hold()  # from here on it is read: kept while the rest arrives
        try:
            with trio.move_on_after(self.settings.deadline / 2):
                await spool.settled()
        except BaseException:
            spool.release()
            raise
        return spool

    async def _read_live(self, handle: _FileHandle, offset: int, size: int) -> bytes:
        """A followed file: its spool, then (once the task has ended and its archive is
        there) the archive member from where the spool stops, through the same handle."""
        spool = handle.spool
        assert spool is not None
        while spool.successor is not None:  # the file started again (truncated, replaced)
            spool.release()
            spool = handle.spool = spool.successor
            spool.hold()
        # The text the file had when it was opened is still arriving: wait for it.
        while offset >= spool.size and not (spool.caught_up or spool.ended):
            await spool.more()
        if offset < spool.size or not spool.ended:
            return spool.read(offset, size)
        task_id = handle.key.task_id
        if not (await self._state(task_id)).task.is_terminated:
            return b""
        archive = await self._archive(task_id)
        if archive is None:
            return b""
        if handle.reader is None:
            entry = archive.find(handle.key.path)
            if not isinstance(entry, Entry):
                return b""
            handle.reader = archive.open_member(entry)
            if not await self._continues(handle.reader, spool, entry):
                # The spool is not the start of the file as archived (a line cut in pieces,
                # a change the protocol could not tell): from now on, the archive alone.
                log.info("%s: the followed text differs from the archive", _describe(handle.key))
                spool.release()
                handle.spool = None
                return await handle.reader.read(offset, size)
        return await handle.reader.read(offset, size)

    @staticmethod
    async def _continues(reader: MemberReader, spool: Spool, entry: Entry) -> bool:
        """Whether the archived file goes on where ``spool`` stops: at least as long, and the
        same last 4 KiB before the junction where that is cheap to read (a stored member, or
        a compressed one of at most ``LIVE_CHECK`` bytes: one must inflate up to there)."""
        if entry.size < spool.size:
            return False
        if entry.method != 0 and spool.size > LIVE_CHECK:
            return True
        start = max(0, spool.size - 4096)
        return await reader.read(start, spool.size - start) == spool.read(start, spool.size - start)

    async def _fetch_top(self, task: Task) -> bytes:
        """``top`` of a computing task's machine (empty for any other task)."""
        if self.live is None or task.status != TaskStatusCode.COMPUTATION_STARTED:
            self._top.pop(task.task_id, None)
            return b""
        live = self.live.get(task.task_id)
        try:
            with self._live_deadline(task.task_id, "answer top"):
                text = await live.request("top")
        except NoLiveChannelError:
            return b""
        content = str(text).encode()
        if content and not content.endswith(b"\n"):
            content += b"\n"
        self._top[task.task_id] = content
        return content

    # -- the operations ------------------------------------------------------------------------

    def _ref(self, key: NodeKey, attr: Attr) -> Attr:
        inode = self.inodes.inode_for(key)
        self.inodes.ref(inode)
        return replace(attr, inode=inode)

    def _key(self, inode: Inode) -> NodeKey:
        key = self.inodes.key(inode)
        if key is None:
            raise NotFoundError(f"inode {inode} is not known")
        return key

    def _child_key(self, parent: NodeKey, name: str) -> NodeKey:
        if parent.kind == "root":
            if name in VIEWS:
                return NodeKey("views", name=name)
            if name == META:
                return NodeKey("meta")
            if not is_task_id(name):
                raise NotFoundError(f"{name!r} cannot be a task id")
            return NodeKey("task", name)
        if parent.kind == "meta" and not parent.name:
            if name not in META_FILES:
                raise NotFoundError(f"{META}/{name}")
            return NodeKey("meta", name=name)
        if parent.kind == "views":
            return NodeKey("view", name=parent.name, path=(name,))
        if parent.kind == "view":
            if not is_task_id(name):
                raise NotFoundError(f"{name!r} cannot be a task id")
            return NodeKey("link", name=parent.name, path=(*parent.path, name))
        if parent.kind == "task":
            if name in VIRTUAL:
                return NodeKey("file", parent.task_id, name=name)
            if name == OUTPUTS:
                return NodeKey("outputs", parent.task_id)
            if name == INPUTS:
                return NodeKey("outputs", parent.task_id, name=INPUTS)
            raise NotFoundError(name)
        if parent.kind == "outputs":
            return NodeKey("outputs", parent.task_id, name=parent.name, path=(*parent.path, name))
        raise NotFoundError(name)  # files have no children

    async def lookup(self, parent: Inode, name: str) -> Attr:
        key = self._child_key(self._key(parent), name)
        attr = await self._attr_for(key)
        return self._ref(key, attr)

    def forget(self, items: list[tuple[Inode, int]]) -> None:
        for inode, count in items:
            self.inodes.forget(inode, count)

    async def getattr(self, inode: Inode) -> Attr:
        key = self._key(inode)
        return replace(await self._attr_for(key), inode=inode)

    async def opendir(self, inode: Inode) -> int:
        key = self._key(inode)
        entries: list[tuple[str, NodeKey, Attr]] = []
        if key.kind == "root":
            ids = await self._task_ids()
            for name in (META, *VIEWS):
                child = self._child_key(key, name)
                entries.append((name, child, await self._attr_for(child)))
            for task_id in ids:
                child = NodeKey("task", task_id)
                state = self._states.get(task_id)
                if state is None:
                    continue
                task = state.task
                attr = self._attr(DIR_MODE, 0, _last_change_ns(task), self._timeout(task), 3)
                entries.append((task_id, child, attr))
        elif key.kind == "meta" and not key.name:
            for name in META_FILES:
                child = self._child_key(key, name)
                entries.append((name, child, await self._attr_for(child)))
        elif key.kind in ("views", "view"):
            groups = await self._groups(key.name)
            names = sorted(groups) if key.kind == "views" else groups.get(key.path[0], [])
            if key.kind == "view" and key.path[0] not in groups:
                raise NotFoundError(_describe(key))
            for name in names:
                child = self._child_key(key, name)
                entries.append((name, child, await self._view_attr(child, groups)))
        elif key.kind == "task":
            listed = (spec.name for spec in VIRTUAL.values() if spec.listed)
            for name in (*listed, INPUTS, OUTPUTS):
                child = self._child_key(key, name)
                entries.append((name, child, await self._attr_for(child)))
        elif key.kind == "outputs":
            node = await self._output_node(key)
            if isinstance(node, _LiveDir):
                changed = _last_change_ns((await self._state(key.task_id)).task)
                for name, is_dir in sorted(node.names.items()):
                    path = f"{node.path}/{name}" if node.path else name
                    shown: _LiveDir | _LiveFile = _LiveFile(node.live, path)
                    if is_dir:
                        shown = _LiveDir(node.live, node.dirs, path)
                    item_key = self._child_key(key, name)
                    entries.append((name, item_key, self._live_attr(shown, changed)))
                return self._new_handle(_DirHandle(entries))
            if not isinstance(node, DirNode):
                raise NotDirError(_describe(key))
            state = await self._state(key.task_id)
            timeout = self._timeout(state.task)
            archive = await self._archive(key.task_id, _is_inputs(key))
            for name, item in node.children.items():
                item_key = self._child_key(key, name)
                if isinstance(item, DirNode):
                    subdirs = len(item.dirs)
                    attr = self._attr(DIR_MODE, 0, int(item.mtime * NS), timeout, 2 + subdirs)
                else:
                    assert archive is not None
                    index = archive.entries
                    attr = self._attr(
                        index.modes[item], index.sizes[item], int(index.mtimes[item] * NS), timeout
                    )
                entries.append((name, item_key, attr))
        else:
            raise NotDirError(_describe(key))
        return self._new_handle(_DirHandle(entries))

    async def readdir(self, fh: int, start: int, emit: Callable[[str, Attr, int], bool]) -> None:
        """Emit entries from offset ``start``; stop when ``emit`` returns False."""
        handle = self._handles.get(fh)
        if not isinstance(handle, _DirHandle):
            raise NotFoundError(f"no open directory {fh}")
        for index in range(start, len(handle.entries)):
            name, key, attr = handle.entries[index]
            inode = self.inodes.inode_for(key)
            if not emit(name, replace(attr, inode=inode), index + 1):
                self.inodes.drop_unreferenced(inode)
                return
            self.inodes.ref(inode)

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def open(self, inode: Inode, flags: int, pid: int = 0) -> OpenInfo:
        key = self._key(inode)
        writing = bool(flags & WRITE_FLAGS)
        if key.kind == "file":
            spec = _spec(key)
            if writing and not spec.writable:
                raise ReadOnlyError(f"{key.name} is read-only")
            state = await self._state(key.task_id, full=spec.full)
            if spec.fetch is not None:
                content = await spec.fetch(self, state.task)
            else:
                content = spec.content(self, state)  # ``wait`` of a live task: b"", blocks
            handle = _FileHandle(key, content=content, inode=inode, pid=pid)
            return OpenInfo(self._new_handle(handle), direct_io=True, keep_cache=False)
        if key.kind == "meta" and key.name:
            if writing:
                raise ReadOnlyError(f"{META}/{key.name} is read-only")
            handle = _FileHandle(key, content=self._meta_content(key), inode=inode)
            return OpenInfo(self._new_handle(handle), direct_io=True, keep_cache=False)
        if key.kind == "outputs":
            if writing:
                raise ReadOnlyError("outputs are read-only")
            node = await self._output_node(key)
            if isinstance(node, _LiveFile):
                spool = await self._live_spool(node)  # held
                handle = _FileHandle(key, inode=inode, spool=spool)
                return OpenInfo(self._new_handle(handle), direct_io=True, keep_cache=False)
            archive = await self._archive(key.task_id, _is_inputs(key))
            if archive is None or not isinstance(node, Entry):
                raise IsDirError(_describe(key))
            reader = archive.open_member(node)
            handle = _FileHandle(key, reader=reader, inode=inode)
            # Without a strong ETag nothing tells a replaced archive from the one cached.
            keep = archive.strong_etag
            return OpenInfo(self._new_handle(handle), direct_io=False, keep_cache=keep)
        raise IsDirError(_describe(key))

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._file(fh)
        if handle.spool is not None:
            return await self._read_live(handle, offset, size)
        if handle.reader is not None:
            try:
                return await handle.reader.read(offset, size)
            except ChecksumError:
                self.drop_cached(handle.inode)
                raise
            except StaleError:
                self._forget_archive(_slot(handle.key))
                self.drop_cached(handle.inode)
                raise
        if handle.key.kind == "file" and _spec(handle.key).blocking and not handle.content:
            handle.content = await self._wait(handle.key.task_id, handle.pid)
        return handle.content[offset : offset + size]

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._file(fh)
        if handle.key.kind != "file" or not _spec(handle.key).writable:
            raise ReadOnlyError("read-only file")
        commands = control.parse(data.decode("utf-8", "replace"))
        for command in commands:
            await control.run(self.api, handle.key.task_id, command)
        state = self._states.get(handle.key.task_id)
        if commands and state is not None:
            # Show the new status at once: refetched on the next look, still listed meanwhile.
            self._states[handle.key.task_id] = replace(state, fetched=-math.inf)
        return len(data)

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _FileHandle) and handle.spool is not None:
            handle.spool.release()
        if not isinstance(handle, _FileHandle) or handle.reader is None:
            return
        if not handle.reader.close():
            # The last reader of a large member closed before every byte of it was seen:
            # what the kernel cached was not verified; it must come through us again.
            self.drop_cached(handle.inode)

    async def setattr(self, inode: Inode, size: int | None, ownership: bool, times: bool) -> Attr:
        """Only ``control`` may be truncated (``echo kill > control``) or touched."""
        key = self._key(inode)
        writable = key.kind == "file" and _spec(key).writable
        if not writable or ownership or size not in (None, 0):
            raise ReadOnlyError("taskfs is read-only except for control")
        del times  # control has no stored times to change
        return replace(await self._attr_for(key), inode=inode)

    # -- wait ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """The mount is going away: end every request in flight, blocked ``wait`` readers and
        reads waiting on the network alike, and every one that comes (ENOTCONN, what the
        gone mount answers next), so that unmounting waits neither for a task to end nor for
        a deadline."""
        self._closing = True
        for scope in self._inflight:
            scope.cancel()

    async def requests_answered(self) -> None:
        """Until no request is in flight (after ``shutdown``: a moment)."""
        while self._inflight:  # noqa: ASYNC110 - scopes have no event to wait on
            await trio.sleep(0.01)

    async def _wait(self, task_id: str, pid: int) -> bytes:
        """Block until the task has ended; one poller per task however many readers."""
        try:
            self._wait_slots.acquire_nowait()
        except trio.WouldBlock:
            raise BusyError("too many readers are waiting on tasks") from None
        waiter = self._waiters.get(task_id)
        if waiter is None:
            waiter = self._waiters[task_id] = _Waiter()
            self.nursery.start_soon(self._poll, task_id, waiter)
        waiter.readers += 1
        try:
            while not waiter.done.is_set():
                with trio.move_on_after(0.2):
                    await waiter.done.wait()
                if not waiter.done.is_set() and pid and wants_out(pid):
                    # Ctrl-C or a kill: the kernel waits for our answer, so give it one.
                    raise ReaderGoneError(f"the reader of {task_id}/wait was interrupted")
        finally:
            waiter.readers -= 1
            self._wait_slots.release()
        if waiter.gone is not None:
            raise NotFoundError(str(waiter.gone))
        return f"{waiter.status}\n".encode()

    async def _poll(self, task_id: str, waiter: _Waiter) -> None:
        """Poll until the task ends or nobody waits any more.

        Every ``wait_poll`` seconds for the first minute, then backing off to ``wait_poll_max``.
        """
        interval = self.settings.wait_poll
        started = trio.current_time()
        try:
            while waiter.readers > 0:
                try:
                    state = await self._state(task_id)
                except NotFoundError as exc:
                    log.info("wait: task %s disappeared", task_id)
                    waiter.gone = exc
                    waiter.done.set()
                    return
                except TaskfsError as exc:
                    log.info("wait: polling task %s failed: %s", task_id, exc)
                else:
                    if state.task.is_terminated:
                        waiter.status = state.task.status
                        waiter.done.set()
                        return
                await trio.sleep(interval)
                if trio.current_time() - started > 60:
                    interval = min(self.settings.wait_poll_max, interval * 1.25)
        finally:
            if self._waiters.get(task_id) is waiter:
                del self._waiters[task_id]

    # -- helpers -------------------------------------------------------------------------------

    def _new_handle(self, handle: _FileHandle | _DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _file(self, fh: int) -> _FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, _FileHandle):
            raise NotFoundError(f"no open file {fh}")
        return handle

    def open_handles(self) -> int:
        return len(self._handles)


def _is_inputs(key: NodeKey) -> bool:
    return key.kind == "outputs" and key.name == INPUTS


def _archive_slot(task_id: str, inputs: bool) -> str:
    """The key of a task's archive among the open ones (a task id holds no ``/``)."""
    return f"{task_id}/{INPUTS}" if inputs else task_id


def _slot(key: NodeKey) -> str:
    """The open-archive slot of an ``outputs``/``inputs`` node's archive."""
    return _archive_slot(key.task_id, _is_inputs(key))


def _link_target(key: NodeKey) -> str:
    return f"../../{key.path[-1]}"


def _spec(key: NodeKey) -> VirtualFile:
    spec = VIRTUAL.get(key.name)
    if spec is None:
        raise NotFoundError(key.name)
    return spec


def _describe(key: NodeKey) -> str:
    if key.kind == "meta":
        return "/".join(x for x in (META, key.name) if x)
    if key.kind in ("views", "view", "link"):
        return "/".join((key.name, *key.path))
    return "/".join((key.task_id, key.name or OUTPUTS, *key.path)) if key.task_id else "/"


def _line(text: str) -> bytes:
    return f"{text}\n".encode() if text else b""


def _now_ns() -> int:
    return int(datetime.now().timestamp() * NS)


def _last_change_ns(task: Task) -> int:
    """When the task last changed status, as well as the record tells."""
    if isinstance(task, TaskWithStatusHistory) and task.status_history:
        return int(task.status_history[-1].timestamp.timestamp() * NS)
    times = [
        t
        for t in (
            task.end_time,
            task.computation_end_time,
            task.computation_start_time,
            task.start_time,
            task.input_submit_time,
            task.create_time,
        )
        if t is not None
    ]
    return int(max(times).timestamp() * NS) if times else 0
