"""The taskfs tree (DESIGN.md section 1) as plain async methods: all behaviour, no FUSE.

Owns: the operations the adapter calls (lookup, getattr, readdir, open, read, write, ...),
dispatched to the node each inode stands for (``taskfs.fs.nodes``: what each kind of node
shows and does), and the machinery nodes share: freshness of task state, the root's listing,
the open archives, open handles, the lookup counts of the inode table, the one poller per task
behind ``wait``, reading a followed running file into its archive.

Must stay true:
* nothing here imports pyfuse3; failures are ``TaskfsError`` subclasses whose ``errno`` the
  adapter answers with (the one errno table lives in ``taskfs.errors``);
* a live task's state is at most ``live_timeout`` old when shown, and its nodes carry that
  timeout; a terminal task never changes, so its nodes carry ``final_timeout`` and its output
  files the kernel page cache (``keep_cache``); virtual files are always ``direct_io`` with
  ``st_size`` equal to their current content (0 for content made at open: ``top``);
* every reply that hands an inode to the kernel adds one to its lookup count, and readdir adds
  one only for entries the kernel accepted (``emit`` returned True);
* readdir offsets index a snapshot taken at ``opendir``, so they stay valid while tasks come and
  go;
* a name that cannot be a task id is ENOENT without any request; everything but ``control`` is
  read-only (EROFS);
* nothing a directory lists blocks a reader: ``wait`` is reachable by name only
  (``VirtualFile.listed``), so tools that walk a task directory and read every file finish.

How to add a node (a file, a view, a directory): see ``taskfs.fs.nodes``; nothing here
changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from taskfs.api.client import PAGE_SIZE, ApiClient
from taskfs.api.models import Task, TaskPage, TaskStatusCode, TaskWithStatusHistory
from taskfs.archive.cache import Buffer
from taskfs.archive.member import MemberReader
from taskfs.archive.remote import RemoteArchive
from taskfs.archive.zipindex import Entry
from taskfs.errors import (
    BusyError,
    ChecksumError,
    LiveError,
    NotFoundError,
    ReaderGoneError,
    ReadOnlyError,
    ServiceError,
    StaleError,
    TaskfsError,
    UnmountingError,
)
from taskfs.flight import SingleFlight
from taskfs.fs.inodes import ROOT_INODE, Inode, InodeTable
from taskfs.fs.nodes import (
    DIR_MODE,
    FILE_MODE,
    NS,
    Attr,
    Handle,
    Node,
    OutputTree,
    Root,
    archive_slot,
    now_ns,
)
from taskfs.fs.stats import MountStats
from taskfs.outputs import Outputs
from taskfs.proc import wants_out
from taskfs.retry import operation_budget

if TYPE_CHECKING:
    from taskfs.live.mirror import LiveMirrors, Spool

__all__ = ["Attr", "OpenInfo", "TaskState", "Vfs", "VfsSettings"]

log = logging.getLogger(__name__)

# List requests side by side for the first listing of a root of more than two pages.
LIST_PARALLEL = 4

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
DOTS = frozenset({".", ".."})
# A task that stopped computing this recently (seconds) is about to end: its outputs wait
# for the archive (half the deadline at most) rather than show empty.
ENDING = 10.0
ENDING_STATUSES = frozenset({TaskStatusCode.COMPUTATION_ENDED, TaskStatusCode.PENDING_KILL})
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
    max_archives: int = 256
    max_index_entries: int = 400_000
    # Extended attributes (``user.taskfs.*``): off by default, since answering them makes
    # ``ls -l`` ask for two more per file (``--xattr``).
    xattr: bool = False
    # Time limit of one operation, all the remote calls it makes included (``--deadline``).
    deadline: float = 10.0
    # An archive that failed to open (corrupt, refused) is not tried again for this long.
    archive_retry: float = 10.0


@dataclass(frozen=True)
class OpenInfo:
    fh: int
    direct_io: bool
    keep_cache: bool


@dataclass
class TaskState:
    task: Task
    fetched: float
    info: bytes | None = None  # info.json: the full GET /tasks/{id} answer, indented
    changed_ns: int = 0  # the mtime of the task's nodes: when its status last changed


@dataclass
class _DirHandle:
    entries: list[tuple[str, Node, Attr]]


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
        # The counters of ``.taskfs/stats`` (the mount hooks them to its HTTP clients).
        self.stats = MountStats()
        self.outputs = outputs
        self.nursery = nursery
        self.settings = settings or VfsSettings()
        self.inodes: InodeTable[Node] = InodeTable(Root())
        # Drop the kernel's cached pages of an inode: they may hold bytes nothing vouches for
        # (a corrupt or unverified member, an archive replaced under it). Set by the adapter.
        self.drop_cached: Callable[[Inode], None] = lambda inode: None
        self._states: dict[str, TaskState] = {}
        self._state_flights: SingleFlight[str, TaskState] = SingleFlight()
        self.listing: list[str] = []
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
        self._handles: dict[int, Handle | _DirHandle] = {}
        self._next_fh = 1
        self._waiters: dict[str, _Waiter] = {}
        self._closing = False
        # The cancel scope of every request being answered (``shutdown`` cancels them).
        self._inflight: set[trio.CancelScope] = set()
        self._wait_slots = trio.CapacityLimiter(self.settings.max_waiters)
        self.mount_time_ns = now_ns()

    @property
    def requester(self) -> int:
        """The process whose request is being answered (0: unknown). Followers of a file that
        started again see it otherwise than everyone else (``Spool.restarting_for``)."""
        return _REQUESTER.get()

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

    async def task_state(self, task_id: str, full: bool = False) -> TaskState:
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

    async def _fetch_state(self, task_id: str) -> TaskState:
        try:
            task, raw = await self.api.get_task_raw(task_id)
        except NotFoundError:
            self._missing[task_id] = trio.current_time()
            self._states.pop(task_id, None)
            raise
        self._missing.pop(task_id, None)
        return self._remember(task, json.dumps(json.loads(raw), indent=2).encode() + b"\n")

    def _remember(self, task: Task, info: bytes | None = None) -> TaskState:
        """Take a record of the task (from the listing or its own) as its state. The time of
        its last change stays while its status does: the listing and the task's own record
        tell it differently (its times, its status history), and an mtime that moves by
        itself tells tar, rsync or make that a file changed while nothing did."""
        old = self._states.get(task.task_id)
        same = old is not None and old.task.status == task.status
        changed = old.changed_ns if old is not None and same else last_change_ns(task)
        state = self._states[task.task_id] = TaskState(task, trio.current_time(), info, changed)
        return state

    async def task_ids(self) -> list[str]:
        """All task ids, newest first, refetched when older than ``listing_ttl``."""
        if trio.current_time() - self._listing_at <= self.settings.listing_ttl:
            return self.listing
        return await self._listing_flight.run(0, self._fetch_listing)

    async def _fetch_listing(self) -> list[str]:
        """The task ids, newest first. The first listing reads every page. A refresh reads
        pages from the newest until one that brings nothing new, once every task that had not
        ended has been seen (its state comes with its page; the API lists newest first, so
        what follows is what the last listing saw): an unchanged root costs one request,
        running tasks on page 1 included. The previous listing's rest follows the pages read;
        if the count does not add up to the API's total (tasks were deleted), every page is
        read."""
        ids = await self._list_pages(refresh=bool(self.listing))
        if ids is None:
            ids = await self._list_pages(refresh=False)
            assert ids is not None
        self.listing = ids
        self._listing_at = trio.current_time()
        return ids

    async def _list_pages(self, refresh: bool) -> list[str] | None:
        known = set(self.listing) if refresh else set()
        # Tasks to see again (their states come with their pages): those not ended.
        running = {task_id for task_id in known if not self._ended(task_id)}
        seen: set[str] = set()
        fresh: list[str] = []
        page = 1
        while True:
            result = await self.api.list_page(page, PAGE_SIZE)
            if page == 1 and not refresh and result.total_size > 2 * PAGE_SIZE:
                rest = await self._other_pages(result.total_size)
                if rest is not None:  # every page, read side by side
                    return self._note_pages([result, *rest], seen, known)[0]
            new = self._note_pages([result], seen, known, fresh)[1]
            if len(result.tasks) < PAGE_SIZE or page * PAGE_SIZE >= result.total_size:
                return fresh  # every page read
            if refresh and not new and running <= seen:
                ids = fresh + [task_id for task_id in self.listing if task_id not in seen]
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
        whether any of them is new to ``known``."""
        ids = [] if ids is None else ids
        new = False
        for result in pages:
            for task in result.tasks:
                if task.task_id in seen:
                    continue  # shifted onto this page by a newer task
                seen.add(task.task_id)
                ids.append(task.task_id)
                new = new or task.task_id not in known
                if not self._ended(task.task_id):
                    self._remember(task)
        return ids, new

    def _ended(self, task_id: str) -> bool:
        """Whether the task is known to have ended (its state never changes again)."""
        state = self._states.get(task_id)
        return state is not None and state.task.is_terminated

    def known(self, task_id: str) -> TaskState | None:
        """The task's state as last seen (listing or fetch), without asking."""
        return self._states.get(task_id)

    async def stopped_computing(self, task_id: str) -> bool:
        """After the task's live channel failed: whether the task has stopped computing (asked
        afresh), and if so, within half the deadline, until it has ended (then its archive
        takes over from the channel, which ends as the task stops computing)."""
        self.refetch(task_id)
        task = (await self.task_state(task_id)).task
        if task.status == TaskStatusCode.COMPUTATION_STARTED:
            return False
        await self._until_ended(task)
        return True

    async def ending(self, task_id: str) -> bool:
        """Whether the task stopped computing moments ago (``ENDING``: its outputs are being
        stored, or it is being killed), and then, within half the deadline, until it has
        ended: what it wrote is asked for as it ends, and its archive is moments away."""
        state = await self.task_state(task_id)
        if state.task.status not in ENDING_STATUSES:
            return False
        if now_ns() - state.changed_ns > ENDING * 1e9:
            return False  # a task that takes long to store its outputs: empty until then
        await self._until_ended(state.task)
        return True

    async def _until_ended(self, task: Task) -> None:
        """Until ``task`` has ended (its state asked again every 0.25 s), for at most half
        the deadline."""
        with trio.move_on_after(self.settings.deadline / 2):
            while not task.is_terminated:
                await trio.sleep(0.25)
                self.refetch(task.task_id)
                task = (await self.task_state(task.task_id)).task

    def refetch(self, task_id: str) -> None:
        """The task's state is to be asked for again on the next look (a command was sent,
        or its end is awaited); it is still listed meanwhile."""
        state = self._states.get(task_id)
        if state is not None:
            self._states[task_id] = replace(state, fetched=-math.inf)

    # -- attributes ----------------------------------------------------------------------------

    def timeout(self, task: Task) -> float:
        return self.settings.final_timeout if task.is_terminated else self.settings.live_timeout

    def attr(self, mode: int, size: int, mtime_ns: int, timeout: float, nlink: int = 1) -> Attr:
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

    # -- outputs -------------------------------------------------------------------------------

    async def archive(self, task_id: str, inputs: bool = False) -> RemoteArchive | None:
        """The task's outputs archive once it has ended (``inputs``: its input archive once
        uploaded), else ``None`` (an empty ``outputs``/``inputs``)."""
        state = await self.task_state(task_id)
        if inputs:
            uploaded = state.task.status != TaskStatusCode.PENDING_INPUT
            if not (uploaded and state.task.storage_input_path):
                return None
        elif not state.task.is_terminated:
            return None
        slot = archive_slot(task_id, inputs)
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
                await self._hand_over(task_id, archive)
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

    def open_archive(self, slot: str) -> RemoteArchive | None:
        """The archive of ``slot`` if it is open (no request)."""
        return self._archives.get(slot)

    def _forget_archive(self, slot: str) -> None:
        old = self._archives.pop(slot, None)
        if old is not None:
            self._index_entries -= len(old.entries)

    def statfs(self) -> tuple[int, int]:
        """What ``df`` shows: the bytes of the listed tasks' output archives (as the API
        reports their sizes), all of it used (nothing can be written), and the number of
        listed tasks as the files. No request: from the last listing."""
        size = 0
        for task_id in self.listing:
            state = self._states.get(task_id)
            if state is not None and state.task.metrics.output_zipped_size_bytes:
                size += int(state.task.metrics.output_zipped_size_bytes)
        return size, len(self.listing)

    def stats_document(self) -> bytes:
        """``.taskfs/stats``: the counters, and what is open now."""
        return self.stats.document(
            cache=dict(self.outputs.cache.counts),
            open_archives=len(self._archives),
            open_handles=len(self._handles),
            wait_readers=sum(waiter.readers for waiter in self._waiters.values()),
            live_connections=0 if self.live is None else self.live.connections(),
            known_tasks=len(self.listing),
        )

    @contextlib.contextmanager
    def live_deadline(self, task_id: str, what: str) -> Iterator[None]:
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

    async def _read_live(self, handle: Handle, offset: int, size: int) -> Buffer:
        """A followed file: its spool while the task computes; once the task has ended, its
        archive member, through the same handle, at every offset (what a local file shows a
        reader that holds it: the file as it ended, never text it no longer holds)."""
        node = handle.node
        assert handle.spool is not None and isinstance(node, OutputTree)
        task_id = node.task_id
        if not self._ended(task_id):
            # ``latest``: the file may have started again (truncated, replaced) meanwhile.
            spool = handle.spool.latest()
            # The text the file had when it was opened is still arriving: wait for it.
            while offset >= spool.size and not (spool.caught_up or spool.ended):
                await spool.more()
                spool = spool.latest()
            if offset == 0 and handle.spool is not spool:  # moved here: reads it anew
                spool.read_from_start(handle.pid)
            handle.spool = spool
            if not spool.ended:
                return spool.read(offset, size)
            # The stream ended: the task stopped computing (then its archive is moments
            # away: wait for it, up to half the deadline), or the channel failed.
            if not (await self.task_state(task_id)).task.is_terminated:
                if offset < spool.size:
                    return spool.read(offset, size)  # what the failed channel brought
                await self.stopped_computing(task_id)
                if not (await self.task_state(task_id)).task.is_terminated:
                    return b""
        return await self._read_archived(handle, offset, size)

    async def _read_archived(self, handle: Handle, offset: int, size: int) -> Buffer:
        """The task of a followed file has ended: the handle reads its archive member from
        now on (the spool goes). A file the archive does not hold ends here."""
        node = handle.node
        assert handle.spool is not None and isinstance(node, OutputTree)
        archive = await self.archive(node.task_id)  # compares the spools: ``_hand_over``
        entry = None if archive is None else archive.find(node.path)
        if archive is None or not isinstance(entry, Entry):
            return b""
        spool = handle.spool.latest()
        if self.live is not None and self.live.restarts.get(self._live_key(node)) is spool:
            handle.rereading = spool  # it started again: this reader is yet to go back
        handle.reader = archive.open_member(entry)
        handle.spool = None
        spool.release(handle.pid)
        return await self._read_member(handle, offset, size)

    @staticmethod
    def _live_key(node: OutputTree) -> tuple[str, str]:
        return node.task_id, "/".join(node.path)

    async def _hand_over(self, task_id: str, archive: RemoteArchive) -> None:
        """The archive takes over from the live channel as the task ended. A followed file
        whose archived text does not go on from what was followed (it shrank or was replaced
        as the task ended, too late for the channel to say) is marked as started again
        before anyone is answered from the archive: ``stat`` shows its followers size 0 for
        a moment (``tail -f`` says "file truncated"), and they read it anew from its start.
        Where the check cannot be made (storage fails), the file is taken as it is: every
        byte comes from the archive either way."""
        live = None if self.live is None else self.live.find(task_id)
        if live is None:
            return
        for path, spool in list(live.spools.items()):
            entry = archive.find(path.split("/"))
            if spool.handles <= 0 or not isinstance(entry, Entry):
                continue
            reader = archive.open_member(entry)
            try:
                same = await self._continues(reader, spool, entry)
            except TaskfsError as exc:
                log.info("%s/outputs/%s: not compared with the archive: %s", task_id, path, exc)
                same = True
            finally:
                reader.close()
            if not same:
                log.info("%s/outputs/%s: the followed text differs from the archive", task_id, path)
                live.mirrors.restarted_at_end(task_id, path, spool)

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

    # -- the operations ------------------------------------------------------------------------

    def _ref(self, node: Node, attr: Attr) -> Attr:
        inode = self.inodes.inode_for(node)
        self.inodes.ref(inode)
        return replace(attr, inode=inode)

    def _node(self, inode: Inode) -> Node:
        node = self.inodes.key(inode)
        if node is None:
            raise NotFoundError(f"inode {inode} is not known")
        return node

    async def lookup(self, parent: Inode, name: str, pid: int = 0) -> Attr:
        node = self._node(parent).child(name)
        with _requested_by(pid):
            return self._ref(node, await node.attr(self))

    def forget(self, items: list[tuple[Inode, int]]) -> None:
        for inode, count in items:
            self.inodes.forget(inode, count)

    async def getattr(self, inode: Inode, pid: int = 0) -> Attr:
        with _requested_by(pid):
            try:
                return replace(await self._node(inode).attr(self), inode=inode)
            except NotFoundError:
                unlinked = self._unlinked_attr(inode)
                if unlinked is None:
                    raise
                return unlinked

    def _unlinked_attr(self, inode: Inode) -> Attr | None:
        """A followed file held open whose name is gone (deleted in the running task, or not
        in its archive): what ``fstat`` of a local file deleted under its reader shows, its
        attributes with link count 0 (the reader reads on what it had)."""
        for handle in self._handles.values():
            if isinstance(handle, Handle) and handle.inode == inode and handle.spool is not None:
                spool = handle.spool.latest()
                attr = self.attr(FILE_MODE, spool.size, spool.changed_ns, 0.0, nlink=0)
                return replace(attr, inode=inode)
        return None

    async def opendir(self, inode: Inode, pid: int = 0) -> int:
        node = self._node(inode)
        with _requested_by(pid):
            entries = await node.entries(self)
        # ``.`` and ``..`` first, as every file system lists them (``ls -a``); the kernel
        # takes no attributes and no lookup count from them.
        dot = self.attr(DIR_MODE, 0, self.mount_time_ns, 0.0)
        return self._new_handle(
            _DirHandle([(".", node, dot), ("..", node.parent(), dot), *entries])
        )

    async def readdir(self, fh: int, start: int, emit: Callable[[str, Attr, int], bool]) -> None:
        """Emit entries from offset ``start``; stop when ``emit`` returns False. Each one the
        kernel accepted counts as a lookup, but ``.`` and ``..`` (readdirplus does not count
        them)."""
        handle = self._handles.get(fh)
        if not isinstance(handle, _DirHandle):
            raise NotFoundError(f"no open directory {fh}")
        for index in range(start, len(handle.entries)):
            name, node, attr = handle.entries[index]
            inode = self.inodes.inode_for(node)
            accepted = emit(name, replace(attr, inode=inode), index + 1)
            if not accepted or name in DOTS:
                self.inodes.drop_unreferenced(inode)
            else:
                self.inodes.ref(inode)
            if not accepted:
                return

    def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def open(self, inode: Inode, flags: int, pid: int = 0) -> OpenInfo:
        with _requested_by(pid):
            handle = await self._node(inode).open(self, writing=bool(flags & WRITE_FLAGS))
        handle.inode, handle.pid = inode, pid
        fh = self._new_handle(handle)
        return OpenInfo(fh, direct_io=handle.direct_io, keep_cache=handle.keep_cache)

    async def read(self, fh: int, offset: int, size: int) -> Buffer:
        handle = self._file(fh)
        if handle.spool is not None:
            return await self._read_live(handle, offset, size)
        if handle.reader is not None:
            return await self._read_member(handle, offset, size)
        if handle.wait_for and not handle.content:
            handle.content = await self._wait(handle.wait_for, handle.pid)
        return handle.content[offset : offset + size]

    async def _read_member(self, handle: Handle, offset: int, size: int) -> Buffer:
        assert handle.reader is not None
        if handle.rereading is not None and offset == 0:  # went back to the start
            handle.rereading.read_from_start(handle.pid)
            handle.rereading = None
        try:
            return await handle.reader.read(offset, size)
        except ChecksumError:
            self.drop_cached(handle.inode)
            raise
        except StaleError:
            if isinstance(handle.node, OutputTree):
                self._forget_archive(handle.node.slot)
            self.drop_cached(handle.inode)
            raise

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self._file(fh).node.write(self, data)

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, Handle) and handle.spool is not None:
            handle.spool.latest().release(handle.pid)
        if not isinstance(handle, Handle) or handle.reader is None:
            return
        if not handle.reader.close():
            # The last reader of a large member closed before every byte of it was seen:
            # what the kernel cached was not verified; it must come through us again.
            self.drop_cached(handle.inode)

    async def setattr(self, inode: Inode, size: int | None, ownership: bool, times: bool) -> Attr:
        """Only ``control`` may be truncated (``echo kill > control``) or touched."""
        node = self._node(inode)
        if not node.writable or ownership or size not in (None, 0):
            raise ReadOnlyError("taskfs is read-only except for control")
        del times  # control has no stored times to change
        return replace(await node.attr(self), inode=inode)

    async def readlink(self, inode: Inode) -> bytes:
        return self._node(inode).link_target().encode()

    async def xattrs(self, inode: Inode) -> dict[str, bytes]:
        """The ``user.taskfs.*`` attributes of a node (``--xattr``), from what is known
        already (no request beyond the ones that found the node)."""
        found = await self._node(inode).xattrs(self)
        return {f"user.taskfs.{name}": value.encode() for name, value in found.items() if value}

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
                    state = await self.task_state(task_id)
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

    def _new_handle(self, handle: Handle | _DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _file(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if not isinstance(handle, Handle):
            raise NotFoundError(f"no open file {fh}")
        return handle

    def open_handles(self) -> int:
        return len(self._handles)


_REQUESTER: contextvars.ContextVar[int] = contextvars.ContextVar("taskfs_requester", default=0)


@contextlib.contextmanager
def _requested_by(pid: int) -> Iterator[None]:
    token = _REQUESTER.set(pid)
    try:
        yield
    finally:
        _REQUESTER.reset(token)


def last_change_ns(task: Task) -> int:
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
