"""What every path of the tree is: one class per kind of node (DESIGN.md section 1).

Owns: the kinds of node and, for each, what it shows and does: its attributes, its children
(a directory), what opening it gives (a file), its link target, its extended attributes; the
tables behind the task directory's files (``VIRTUAL``), the root's views (``VIEWS``) and the
mount's own files (``META_FILES``). The machinery they use (task state, the root's listing,
open archives, the live channel, handles, ``wait``) is ``Vfs``'s.

Must stay true:
* a node is a frozen dataclass whose fields say which node it is: equal nodes are the same
  inode (the inode table's key), so a node holds no state of its own;
* ``child`` asks nothing remote: a name that cannot be there (not a task id, not in a table)
  is ENOENT at once; every failure is a ``TaskfsError`` (the errno table is ``taskfs.errors``);
* virtual files are ``direct_io`` and their ``st_size`` is their content now (0 where it is
  made at each open: ``top``, ``.taskfs/stats``); output files of ended tasks are cached by
  the kernel only where a strong ETag vouches for them.

How to add:
* a file to every task directory: one ``VirtualFile`` entry in ``VIRTUAL`` (its content from
  the task's state; ``fetch`` for content made at open; ``writable`` for commands);
* a file to ``tasks/.taskfs``: one ``META_FILES`` entry (its content from the ``Vfs``);
* a view of the root (``tasks/.<view>/<group>/<id>`` links): one ``VIEWS`` entry (the task's
  field it groups by);
* a directory of every task (as ``inputs``, ``outputs``): one ``Node`` class, named in
  ``TASK_DIRS``;
* any other kind of node: one ``Node`` subclass with ``attr``, ``describe`` and either
  ``child`` + ``entries`` (a directory) or ``open`` (a file), named by its parent's ``child``.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

import trio

from taskfs.api.models import (
    Task,
    TaskStatusCode,
    computation_time,
    is_task_id,
    machine_type,
)
from taskfs.archive.codecs import METHOD_NAMES
from taskfs.archive.member import MemberReader
from taskfs.archive.zipindex import DirNode, Entry
from taskfs.errors import (
    InvalidCommandError,
    IsDirError,
    LiveError,
    NoLiveChannelError,
    NotDirError,
    NotFoundError,
    ReadOnlyError,
    ServiceError,
)
from taskfs.fs import control
from taskfs.fs.inodes import ROOT_INODE, Inode

if TYPE_CHECKING:
    from taskfs.fs.vfs import TaskState, Vfs
    from taskfs.live.mirror import LiveTask, Spool

log = logging.getLogger(__name__)

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
CONTROL_MODE = stat.S_IFREG | 0o600
LINK_MODE = stat.S_IFLNK | 0o777
NS = 1_000_000_000
# The mount's own directory: ``tasks/.taskfs``.
META = ".taskfs"


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


@dataclass
class Handle:
    """An open file: its content (virtual files), the archive member it reads, or the spool
    of a followed running file; ``wait_for``: a read blocks until this task has ended."""

    node: Node
    content: bytes = b""
    reader: MemberReader | None = None
    spool: Spool | None = None
    wait_for: str = ""
    # A followed file found not to be its archive's start at the task's end: the spool it
    # was, until this reader reads the file anew from its start.
    rereading: Spool | None = None
    direct_io: bool = True
    keep_cache: bool = False
    inode: Inode = ROOT_INODE
    pid: int = 0  # the process that opened it (a blocked ``wait`` reader may be interrupted)


Entries = list[tuple[str, "Node", Attr]]


class Node:
    """One kind of node. Directories give ``child`` and ``entries``, files ``open``."""

    async def attr(self, vfs: Vfs) -> Attr:
        raise NotImplementedError

    def describe(self) -> str:
        """The node's path under the mount, for messages."""
        raise NotImplementedError

    def child(self, name: str) -> Node:
        """The node called ``name`` in this directory (without asking whether it exists)."""
        raise NotFoundError(f"{self.describe()}/{name}")  # files have no children

    def parent(self) -> Node:
        """The directory this node is in (``..``; the root's is the root)."""
        return Root()

    async def entries(self, vfs: Vfs) -> Entries:
        """What ``ls`` shows, with attributes (a snapshot: readdir's offsets index it)."""
        raise NotDirError(self.describe())

    async def open(self, vfs: Vfs, writing: bool) -> Handle:
        raise IsDirError(self.describe())

    @property
    def writable(self) -> bool:
        """Takes writes (``write``), truncation to 0 and ``touch``."""
        return False

    async def write(self, vfs: Vfs, data: bytes) -> int:
        raise ReadOnlyError(f"{self.describe()} is read-only")

    def link_target(self) -> str:
        raise InvalidCommandError(f"{self.describe()} is not a symbolic link")

    async def xattrs(self, vfs: Vfs) -> dict[str, str]:
        """``user.taskfs.*`` by short name, from what is known already."""
        return {}

    async def _listed(self, vfs: Vfs, names: list[str]) -> Entries:
        entries: Entries = []
        for name in names:
            child = self.child(name)
            entries.append((name, child, await child.attr(vfs)))
        return entries


# -- the root -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Root(Node):
    async def attr(self, vfs: Vfs) -> Attr:
        count = len(vfs.listing)
        return vfs.attr(DIR_MODE, 0, vfs.mount_time_ns, vfs.settings.live_timeout, 2 + count)

    def describe(self) -> str:
        return "/"

    def child(self, name: str) -> Node:
        if name in VIEWS:
            return View(name)
        if name == META:
            return MetaDir()
        if not is_task_id(name):
            raise NotFoundError(f"{name!r} cannot be a task id")
        return TaskDir(name)

    async def entries(self, vfs: Vfs) -> Entries:
        ids = await vfs.task_ids()
        entries = await self._listed(vfs, [META, *VIEWS])
        for task_id in ids:
            state = vfs.known(task_id)
            if state is not None:  # its state came with the listing: no request per task
                entries.append((task_id, TaskDir(task_id), TaskDir.attr_of(vfs, state)))
        return entries


# -- the mount's own files: tasks/.taskfs ----------------------------------------------------

# The files of ``tasks/.taskfs``, in listing order: name -> content. A new one is one entry.
# Their content is a snapshot made at each open (the counters move with every request, the
# reads of the file itself included), which ``stat`` cannot know: size 0 and the mount's
# time, as /proc's files (``cat`` and ``cp`` read it whole; ``tar`` and ``rsync``, which trust
# the size, store it empty and see nothing change while they read).
META_FILES: dict[str, Callable[[Vfs], bytes]] = {
    "stats": lambda vfs: vfs.stats_document(),
}


@dataclass(frozen=True)
class MetaDir(Node):
    async def attr(self, vfs: Vfs) -> Attr:
        return vfs.attr(DIR_MODE, 0, vfs.mount_time_ns, 0.0, 2)

    def describe(self) -> str:
        return META

    def child(self, name: str) -> Node:
        if name not in META_FILES:
            raise NotFoundError(f"{META}/{name}")
        return MetaFile(name)

    async def entries(self, vfs: Vfs) -> Entries:
        return await self._listed(vfs, list(META_FILES))


@dataclass(frozen=True)
class MetaFile(Node):
    name: str

    async def attr(self, vfs: Vfs) -> Attr:
        return vfs.attr(FILE_MODE, 0, vfs.mount_time_ns, 0.0)

    def describe(self) -> str:
        return f"{META}/{self.name}"

    async def open(self, vfs: Vfs, writing: bool) -> Handle:
        if writing:
            raise ReadOnlyError(f"{self.describe()} is read-only")
        return Handle(self, content=META_FILES[self.name](vfs))


# -- views of the root: tasks/.projects/<project>/<id> -> ../../<id> --------------------------

# Views of the root: ``tasks/<view>/<group>/<id>``, a symbolic link to ``../../<id>``. Their
# names start with a dot, so they never clash with a task id and stay out of ``tasks/*``.
VIEWS: dict[str, Callable[[Task], object]] = {
    ".projects": lambda task: task.project,
    ".status": lambda task: task.status,
}


async def _groups(vfs: Vfs, view: str) -> dict[str, list[str]]:
    """The listed tasks of ``view`` by group (project, status), newest first: from the root's
    listing, no request of its own."""
    groups: dict[str, list[str]] = {}
    for task_id in await vfs.task_ids():
        state = vfs.known(task_id)
        value = None if state is None else VIEWS[view](state.task)
        name = str(value) if value is not None else ""
        if _file_name(name):
            groups.setdefault(name, []).append(task_id)
    return groups


def _file_name(name: str) -> bool:
    """Whether ``name`` can be a file's name: not empty, ``.`` or ``..``, without ``/`` or
    NUL, at most ``NAME_MAX`` (255) bytes."""
    size = len(name.encode("utf-8", "surrogateescape"))
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name and size <= 255


@dataclass(frozen=True)
class View(Node):
    view: str

    async def attr(self, vfs: Vfs) -> Attr:
        groups = await _groups(vfs, self.view)
        timeout = vfs.settings.live_timeout
        return vfs.attr(DIR_MODE, 0, vfs.mount_time_ns, timeout, 2 + len(groups))

    def describe(self) -> str:
        return self.view

    def child(self, name: str) -> Node:
        return ViewGroup(self.view, name)

    async def entries(self, vfs: Vfs) -> Entries:
        groups = await _groups(vfs, self.view)
        return [(name, self.child(name), ViewGroup.attr_of(vfs)) for name in sorted(groups)]


@dataclass(frozen=True)
class ViewGroup(Node):
    view: str
    group: str

    @staticmethod
    def attr_of(vfs: Vfs) -> Attr:
        return vfs.attr(DIR_MODE, 0, vfs.mount_time_ns, vfs.settings.live_timeout, 2)

    async def members(self, vfs: Vfs) -> list[str]:
        members = (await _groups(vfs, self.view)).get(self.group)
        if members is None:
            raise NotFoundError(self.describe())
        return members

    async def attr(self, vfs: Vfs) -> Attr:
        await self.members(vfs)
        return self.attr_of(vfs)

    def describe(self) -> str:
        return f"{self.view}/{self.group}"

    def parent(self) -> Node:
        return View(self.view)

    def child(self, name: str) -> Node:
        if not is_task_id(name):
            raise NotFoundError(f"{name!r} cannot be a task id")
        return ViewLink(self.view, self.group, name)

    async def entries(self, vfs: Vfs) -> Entries:
        members = await self.members(vfs)
        links = (ViewLink(self.view, self.group, task_id) for task_id in members)
        return [(link.task_id, link, link.attr_of(vfs)) for link in links]


@dataclass(frozen=True)
class ViewLink(Node):
    view: str
    group: str
    task_id: str

    def attr_of(self, vfs: Vfs) -> Attr:
        size = len(self.link_target())
        return vfs.attr(LINK_MODE, size, vfs.mount_time_ns, vfs.settings.live_timeout)

    async def attr(self, vfs: Vfs) -> Attr:
        if self.task_id not in await ViewGroup(self.view, self.group).members(vfs):
            raise NotFoundError(self.describe())
        return self.attr_of(vfs)

    def describe(self) -> str:
        return f"{self.view}/{self.group}/{self.task_id}"

    def link_target(self) -> str:
        return f"../../{self.task_id}"


# -- a task's directory and its files ----------------------------------------------------------


@dataclass(frozen=True)
class VirtualFile:
    """One file of every task directory (``VIRTUAL``). ``content`` is what ``stat`` sizes and
    a read gives; ``fetch`` (if any) makes what a read gives afresh at each ``open`` (``top``);
    ``blocking``: a read waits until the task has ended (``wait``); ``writable``: commands go
    to ``control.run`` (``control``); ``full``: needs the task's whole record (``info.json``);
    ``listed``: shown by ``readdir`` (else reachable by name only)."""

    name: str
    content: Callable[[Vfs, TaskState], bytes]
    mode: int = FILE_MODE
    listed: bool = True
    full: bool = False
    blocking: bool = False
    writable: bool = False
    fetch: Callable[[Vfs, Task], Awaitable[bytes]] | None = None


def _wait_content(vfs: Vfs, state: TaskState) -> bytes:
    task = state.task
    return f"{task.status}\n".encode() if task.is_terminated else b""


def _info_content(vfs: Vfs, state: TaskState) -> bytes:
    assert state.info is not None
    return state.info


async def _fetch_top(vfs: Vfs, task: Task) -> bytes:
    """``top`` of a computing task's machine (empty for any other task)."""
    if vfs.live is None or task.status != TaskStatusCode.COMPUTATION_STARTED:
        return b""
    live = vfs.live.get(task.task_id)
    try:
        with vfs.live_deadline(task.task_id, "answer top"):
            text = await live.request("top")
    except NoLiveChannelError:
        return b""
    except LiveError:
        if await vfs.stopped_computing(task.task_id):
            return b""  # it stopped computing meanwhile: no machine to show
        raise
    content = str(text).encode()
    if content and not content.endswith(b"\n"):
        content += b"\n"
    return content


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
        # A snapshot made at each open, which ``stat`` cannot know: size 0, as /proc's files
        # (tar and rsync, which trust the size, copy it empty and say nothing changed).
        VirtualFile("top", lambda vfs, s: b"", fetch=_fetch_top),
    )
}


@dataclass(frozen=True)
class TaskDir(Node):
    task_id: str

    @staticmethod
    def attr_of(vfs: Vfs, state: TaskState) -> Attr:
        nlink = 2 + len(TASK_DIRS)  # its subdirectories' ``..`` links too
        return vfs.attr(DIR_MODE, 0, state.changed_ns, vfs.timeout(state.task), nlink=nlink)

    async def attr(self, vfs: Vfs) -> Attr:
        return self.attr_of(vfs, await vfs.task_state(self.task_id))

    def describe(self) -> str:
        return self.task_id

    def child(self, name: str) -> Node:
        if name in VIRTUAL:
            return TaskFile(self.task_id, name)
        kind = TASK_DIRS.get(name)
        if kind is None:
            raise NotFoundError(f"{self.task_id}/{name}")
        return kind(self.task_id)

    async def entries(self, vfs: Vfs) -> Entries:
        listed = [spec.name for spec in VIRTUAL.values() if spec.listed]
        return await self._listed(vfs, [*listed, *TASK_DIRS])

    async def xattrs(self, vfs: Vfs) -> dict[str, str]:
        task = (await vfs.task_state(self.task_id)).task
        return {
            "project": task.project or "",
            "status": str(task.status),
            "storage_path": task.storage_path or "",
        }


@dataclass(frozen=True)
class TaskFile(Node):
    task_id: str
    name: str

    @property
    def spec(self) -> VirtualFile:
        return VIRTUAL[self.name]

    async def attr(self, vfs: Vfs) -> Attr:
        spec = self.spec
        state = await vfs.task_state(self.task_id, full=spec.full)
        size = len(spec.content(vfs, state))
        return vfs.attr(spec.mode, size, state.changed_ns, vfs.timeout(state.task))

    def describe(self) -> str:
        return f"{self.task_id}/{self.name}"

    async def open(self, vfs: Vfs, writing: bool) -> Handle:
        spec = self.spec
        if writing and not spec.writable:
            raise ReadOnlyError(f"{self.name} is read-only")
        state = await vfs.task_state(self.task_id, full=spec.full)
        if spec.fetch is not None:
            content = await spec.fetch(vfs, state.task)
        else:
            content = spec.content(vfs, state)  # ``wait`` of a live task: b"", blocks
        wait_for = self.task_id if spec.blocking and not content else ""
        return Handle(self, content=content, wait_for=wait_for)

    @property
    def writable(self) -> bool:
        return self.spec.writable

    async def write(self, vfs: Vfs, data: bytes) -> int:
        if not self.writable:
            raise ReadOnlyError(f"{self.describe()} is read-only")
        commands = control.parse(data.decode("utf-8", "replace"))
        for command in commands:
            await control.run(vfs.api, self.task_id, command)
        if commands:
            vfs.refetch(self.task_id)  # show the new status at once
        return len(data)


# -- a task's archives: outputs/ and inputs/ --------------------------------------------------


@dataclass(frozen=True)
class LiveDir:
    """A directory of a running task's outputs, as its live channel lists it: ``dirs`` is the
    whole listing by directory, ``path`` this one."""

    live: LiveTask
    dirs: dict[str, dict[str, bool]]
    path: str

    @property
    def names(self) -> dict[str, bool]:
        return self.dirs.get(self.path, {})


@dataclass(frozen=True)
class LiveFile:
    live: LiveTask
    path: str


@dataclass(frozen=True)
class OutputTree(Node):
    """``outputs`` (``path`` ()) or a path inside it: the task's output archive once it has
    ended, its live channel's view while it computes, empty otherwise."""

    task_id: str
    path: tuple[str, ...] = ()
    name: ClassVar[str] = "outputs"
    inputs: ClassVar[bool] = False  # which of the task's archives

    @property
    def slot(self) -> str:
        """The key of this node's archive among the open ones (a task id holds no ``/``)."""
        return archive_slot(self.task_id, self.inputs)

    def describe(self) -> str:
        return "/".join((self.task_id, self.name, *self.path))

    def child(self, name: str) -> Node:
        return type(self)(self.task_id, (*self.path, name))  # replace() costs 5x: ls -lR

    def parent(self) -> Node:
        return type(self)(self.task_id, self.path[:-1]) if self.path else TaskDir(self.task_id)

    async def find(self, vfs: Vfs, again: bool = False) -> DirNode | Entry | LiveDir | LiveFile:
        """What this node is now: in the archive, or over the live channel (which ends as
        the task stops computing: then, once it has ended, in the archive)."""
        archive = await vfs.archive(self.task_id, self.inputs)
        if archive is None:
            try:
                live = await self._live(vfs)
            except LiveError as exc:
                if not again and await vfs.stopped_computing(self.task_id):
                    return await self.find(vfs, again=True)  # as the task is now
                if not isinstance(exc, NoLiveChannelError):
                    raise
                live = None  # no live channel after all: empty until the task ends
            if live is not None:
                return live
            if not again and not self.inputs and await vfs.ending(self.task_id):
                return await self.find(vfs, again=True)  # ended meanwhile, or empty
            if self.path:
                raise NotFoundError("/".join(self.path))
            return DirNode()
        node = archive.find(self.path)
        if node is None:
            raise NotFoundError("/".join(self.path))
        return node

    async def attr(self, vfs: Vfs) -> Attr:
        try:
            state = await vfs.task_state(self.task_id)
        except ServiceError:
            followed = self.followed(vfs)
            known = vfs.known(self.task_id)
            if followed is None or known is None:
                raise
            # The API does not answer, but the file comes over the live channel: a follower
            # (tail -f polls fstat) goes on with what it brings.
            return live_attr(vfs, followed, known.changed_ns)
        task = state.task
        changed = state.changed_ns
        timeout = vfs.timeout(task)
        if not self.path:
            # ``outputs`` itself needs no archive: ``ls`` of a task never opens one, and a
            # broken or unreachable archive shows only inside. Its link count is unknown (1)
            # until the archive is open.
            archive = vfs.open_archive(self.slot)
            subdirs = len(archive.tree.dirs) if archive is not None else -1
            return vfs.attr(DIR_MODE, 0, changed, timeout, nlink=2 + subdirs)
        node = await self.find(vfs)
        if isinstance(node, LiveDir | LiveFile):
            return live_attr(vfs, node, changed)
        if isinstance(node, DirNode):
            return vfs.attr(DIR_MODE, 0, int(node.mtime * NS), timeout, nlink=2 + len(node.dirs))
        attr = vfs.attr(node.mode, node.size, int(node.mtime * NS), timeout)
        return self._shown(vfs, attr)

    def _shown(self, vfs: Vfs, attr: Attr, name: str | None = None) -> Attr:
        """An archived file's attributes (``name``: of this directory's file of that name),
        while it is one that started again just before the task ended and its followers have
        yet to read it anew: size 0 for them, to see it shrink, the real size for everyone
        else (a fresh ``cat`` reads it whole), and uncached (``Spool.restarting_for``)."""
        live = vfs.live
        if live is None or self.inputs or not live.restarts:
            return attr
        path = "/".join(self.path if name is None else (*self.path, name))
        spool = live.restarting(self.task_id, path)
        if spool is None:
            return attr
        # Uncached for everyone (the kernel keeps one size per file, whoever asked);
        # size 0 only for those who are to read it anew.
        size = 0 if spool.restarting_for(vfs.requester) else attr.size
        return replace(attr, size=size, timeout=0.0)

    async def entries(self, vfs: Vfs) -> Entries:
        node = await self.find(vfs)
        entries: Entries = []
        if isinstance(node, LiveDir):
            changed = (await vfs.task_state(self.task_id)).changed_ns
            for name, is_dir in sorted(node.names.items()):
                path = f"{node.path}/{name}" if node.path else name
                shown: LiveDir | LiveFile = LiveFile(node.live, path)
                if is_dir:
                    shown = LiveDir(node.live, node.dirs, path)
                entries.append((name, self.child(name), live_attr(vfs, shown, changed)))
            return entries
        if not isinstance(node, DirNode):
            raise NotDirError(self.describe())
        timeout = vfs.timeout((await vfs.task_state(self.task_id)).task)
        archive = await vfs.archive(self.task_id, self.inputs)
        for name, item in node.children.items():
            if isinstance(item, DirNode):
                subdirs = len(item.dirs)
                attr = vfs.attr(DIR_MODE, 0, int(item.mtime * NS), timeout, 2 + subdirs)
            else:
                assert archive is not None
                index = archive.entries
                mtime = int(index.mtimes[item] * NS)
                attr = vfs.attr(index.modes[item], index.sizes[item], mtime, timeout)
                attr = self._shown(vfs, attr, name)
            entries.append((name, self.child(name), attr))
        return entries

    async def open(self, vfs: Vfs, writing: bool, again: bool = False) -> Handle:
        if writing:
            raise ReadOnlyError(f"{self.name} are read-only")
        node = await self.find(vfs)
        if isinstance(node, LiveFile):
            try:
                return Handle(self, spool=await _live_spool(vfs, node))  # held
            except LiveError:
                if again or not await vfs.stopped_computing(self.task_id):
                    raise
                return await self.open(vfs, writing, again=True)  # as the task is now
        archive = await vfs.archive(self.task_id, self.inputs)
        if archive is None or not isinstance(node, Entry):
            raise IsDirError(self.describe())
        # Without a strong ETag nothing tells a replaced archive from the one cached.
        keep = archive.strong_etag
        return Handle(self, reader=archive.open_member(node), direct_io=False, keep_cache=keep)

    async def xattrs(self, vfs: Vfs) -> dict[str, str]:
        if not self.path:
            return {}
        node = await self.find(vfs)
        archive = vfs.open_archive(self.slot)
        if not isinstance(node, Entry) or archive is None:
            return {}
        return {
            "crc32": f"{node.crc:08x}",
            "compressed_size": str(node.compressed_size),
            "method": METHOD_NAMES.get(node.method, str(node.method)),
            "etag": archive.etag,
        }

    async def _live(self, vfs: Vfs) -> LiveDir | LiveFile | None:
        """This node in a running task's outputs as its live channel shows them; None where
        there is no live view (inputs, no aiortc, a service without a live channel, a task
        that is neither computing nor was followed)."""
        if vfs.live is None or self.inputs:
            return None
        state = await vfs.task_state(self.task_id)
        computing = state.task.status == TaskStatusCode.COMPUTATION_STARTED
        live = vfs.live.get(self.task_id) if computing else vfs.live.find(self.task_id)
        if live is None:
            return None
        with vfs.live_deadline(self.task_id, "list its files"):
            try:
                dirs = await live.tree(connect=computing)
            except NoLiveChannelError:
                if computing and vfs.live.answered:
                    raise  # a service with live channels: the task has just stopped
                return None  # as before there was a live channel: empty until the task ends
            except LiveError:
                if not computing:
                    return None
                raise
        if not self.path:
            return LiveDir(live, dirs, "")
        path = "/".join(self.path)
        is_dir = dirs.get("/".join(self.path[:-1]), {}).get(self.path[-1])
        if is_dir is None:
            raise NotFoundError(path)
        return LiveDir(live, dirs, path) if is_dir else LiveFile(live, path)

    def followed(self, vfs: Vfs) -> LiveFile | None:
        """This node as a file of a running task that is being followed (a spool exists and
        the task's state was seen), else None."""
        if vfs.live is None or not self.path or self.inputs:
            return None
        live = vfs.live.find(self.task_id)
        path = "/".join(self.path)
        if live is None or path not in live.spools or vfs.known(self.task_id) is None:
            return None
        return LiveFile(live, path)


@dataclass(frozen=True)
class InputTree(OutputTree):
    """``inputs``: the task's input archive's ``sim_dir/`` once uploaded, browsed as
    ``outputs`` is (same reader, cache and checks); empty where the task has none."""

    name: ClassVar[str] = "inputs"
    inputs: ClassVar[bool] = True


# The directories of every task, in listing order (after the ``VIRTUAL`` files).
TASK_DIRS: dict[str, Callable[[str], Node]] = {"inputs": InputTree, "outputs": OutputTree}


def live_attr(vfs: Vfs, node: LiveDir | LiveFile, changed_ns: int) -> Attr:
    """A running task's file or directory: a file's size is what its spool holds (0 until
    someone opens it), asked for afresh at every ``stat`` so that ``tail -f`` sees it grow."""
    if isinstance(node, LiveDir):
        subdirs = sum(node.names.values())
        return vfs.attr(DIR_MODE, 0, changed_ns, vfs.settings.live_timeout, 2 + subdirs)
    spool = node.live.spools.get(node.path)
    size = 0 if spool is None else spool.shown_size(vfs.requester)
    mtime = changed_ns if spool is None or not spool.changed_ns else spool.changed_ns
    return vfs.attr(FILE_MODE, size, mtime, 0.0)


async def _live_spool(vfs: Vfs, node: LiveFile) -> Spool:
    """The followed file, its first answer in; and, within half the deadline, the rest of the
    text it had (so that ``tail`` finds the end where the file's end is; a larger file goes
    on arriving while it is read)."""
    with vfs.live_deadline(node.live.task_id, f"send {node.path}"):
        spool = await node.live.spool(node.path)
    spool.hold(vfs.requester)  # from here on it is read: kept while the rest arrives
    try:
        with trio.move_on_after(vfs.settings.deadline / 2):
            await spool.settled()
    except BaseException:
        spool.latest().release(vfs.requester)  # it may have started again meanwhile
        raise
    return spool


def archive_slot(task_id: str, inputs: bool) -> str:
    """The key of a task's archive among the open ones (a task id holds no ``/``)."""
    return f"{task_id}/inputs" if inputs else task_id


def _line(text: str) -> bytes:
    return f"{text}\n".encode() if text else b""


def now_ns() -> int:
    return int(datetime.now().timestamp() * NS)
