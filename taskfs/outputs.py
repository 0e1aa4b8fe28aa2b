"""A task's outputs archive: opening it, listing it, downloading from it.

Owns: the wiring between the API client and the remote-ZIP reader, used by the filesystem,
the ``Task`` class and the CLI: a task record in, a ``RemoteArchive`` out, with its signed URL
refreshed through the API whenever storage refuses it; the archive listing as the official
client prints it; downloads of all or selected members with range requests.

Must stay true: the API key goes only to the API; storage requests carry the signed URL alone.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import Task
from taskfs.archive.cache import BufferPool, DiskCache, MemoryCache, Tiered
from taskfs.archive.fetch import BulkTransport, HttpTransport
from taskfs.archive.member import CheckpointBudget, ReadBudget, read_whole
from taskfs.archive.rangeio import RangeSource, Transport, data_client
from taskfs.archive.remote import RemoteArchive
from taskfs.archive.tuning import DEFAULT
from taskfs.archive.zipindex import Entry, clean_path, walk, walk_dirs
from taskfs.config import make_dirs
from taskfs.errors import ArchiveError, NotFoundError, single_errors
from taskfs.retry import Breaker, RetryPolicy

log = logging.getLogger(__name__)

# The memory tier: blocks just fetched (until they are on disk) and hot small members.
MEMORY_CACHE = 32 << 20


def make_cache(cache_dir: Path | None, limit_bytes: int) -> Tiered:
    """Memory tier plus a disk cache in ``cache_dir`` (none if ``None`` or limit 0)."""
    disk = DiskCache(cache_dir, limit_bytes) if cache_dir is not None and limit_bytes else None
    return Tiered(MemoryCache(MEMORY_CACHE, BufferPool(DEFAULT.block, runs=DEFAULT.segment)), disk)


class Outputs:
    """Opens the outputs archives of tasks. Use as ``async with Outputs(...)``."""

    def __init__(
        self,
        api: ApiClient,
        cache: Tiered,
        *,
        connections: int = 8,
        deadline: float = 10.0,
        transport: Transport | None = None,
        bulk: BulkTransport | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.api = api
        self.cache = cache
        # Storage: small requests over httpx (``transport``: tests inject one), the bodies of
        # blocks received into their buffers in worker threads (``bulk``: likewise).
        self.http = data_client(max_connections=connections * 2, transport=transport)
        if transport is not None and bulk is None:
            raise ValueError("a storage transport for tests needs its bulk twin (no sockets)")
        self._own_bulk = bulk is None
        self.bulk = bulk or HttpTransport(timeout=deadline)
        # Told of every bulk response's length (the mount's stats count them).
        self.bulk_observers: list[Callable[[int], None]] = []
        self.limiter = trio.CapacityLimiter(connections)
        self.policy = RetryPolicy(deadline=deadline)
        self.breaker = breaker
        # Memory of member readers, shared by every archive this opens.
        self.read_budget = ReadBudget()
        self.checkpoints = CheckpointBudget()

    def _observed(self, length: int) -> None:
        for observer in self.bulk_observers:
            observer(length)

    async def __aenter__(self) -> Outputs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        if self._own_bulk:
            self.bulk.close()

    async def open(
        self, task: Task, nursery: trio.Nursery, inputs: bool = False
    ) -> RemoteArchive | None:
        """The task's outputs archive (``inputs``: its input archive, showing ``sim_dir/``),
        or ``None`` when it has none (yet)."""
        path = task.storage_input_path if inputs else task.storage_output_path
        if not path:
            return None
        what = "inputs" if inputs else "outputs"
        region = task.storage_region

        async def url(refresh: bool) -> str:
            return await self.api.download_url(path, region)

        source = RangeSource(
            self.http,
            url,
            self.policy,
            name=f"{what} of {task.task_id}",
            breaker=self.breaker,
            bulk=self.bulk,
            on_bulk=self._observed,
        )
        try:
            return await RemoteArchive.open(
                source,
                self.cache,
                path,
                nursery=nursery,
                limiter=self.limiter,
                budget=self.read_budget,
                checkpoints=self.checkpoints,
                prefix=INPUT_ROOT if inputs else ARTIFACTS,
            )
        except NotFoundError:
            log.info("task %s has no %s archive at %s", task.task_id, what, path)
            return None


# -- listing and downloading (the Task class and ``taskfs tasks``) ------------------------------

ARTIFACTS = "artifacts/"
INPUT_ROOT = "sim_dir/"  # where the official client (and ``taskfs submit``) puts input files
CHUNK = 1 << 20


def format_bytes(size: float) -> str:
    """Decimal units, like the official client: ``859 B``, ``3.12 KB``, ``262.00 KB``."""
    if size < 1000:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            break
    return f"{size:.2f} {unit}"


@dataclass(frozen=True)
class OutputFile:
    name: str  # relative to artifacts/, as the archive holds it
    size: int
    compressed_size: int


@dataclass(frozen=True)
class OutputInfo:
    """What an outputs archive holds; ``str()`` prints it like the official client."""

    archive_size: int
    files: tuple[OutputFile, ...]

    def __str__(self) -> str:
        lines = [
            f"Archive size: {format_bytes(self.archive_size)}",
            "Contents:",
            f"  {'Size':<13}{'Compressed':<13}Name",
        ]
        lines += [
            f"  {format_bytes(f.size):<13}{format_bytes(f.compressed_size):<13}{f.name}"
            for f in self.files
        ]
        return "\n".join(lines)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


async def output_info(api: ApiClient, task: Task) -> OutputInfo:
    """The archive's listing from its central directory (range requests, no download)."""
    with single_errors():
        async with Outputs(api, make_cache(None, 0)) as outputs, trio.open_nursery() as nursery:
            archive = await outputs.open(task, nursery)
            nursery.cancel_scope.cancel()
    if archive is None:
        raise NotFoundError(f"task {task.task_id} has no outputs archive")
    index = archive.entries
    files = tuple(
        OutputFile(name[len(ARTIFACTS) :], index.sizes[i], index.csizes[i])
        for i, name in enumerate(index.names)
        if name.startswith(ARTIFACTS) and not name.endswith("/")
    )
    return OutputInfo(archive.size, files)


ProgressFn = Callable[[str, int], None]


async def download(
    api: ApiClient,
    task: Task,
    dest: Path,
    filenames: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    *,
    parallel: int = 4,
    on_file: ProgressFn | None = None,
    on_start: Callable[[int], None] | None = None,
    below: Sequence[str] = (),
) -> list[str]:
    """Write the outputs (all, or ``filenames`` relative to ``artifacts/``) under ``dest``,
    in its subdirectory ``below`` (``<id>/outputs``, say) if given.

    ``dest`` is the caller's choice and may be a link; nothing under it is followed: a link
    planted at ``below`` or inside the tree is an error, never a way out of ``dest``.

    Members are read with range requests and checked (CRC); each file is written to a
    temporary name and renamed, so no half-written file is left behind. Names that are not in
    the archive are refused before anything is written. ``on_start(total_bytes)`` comes once
    the selection is known, ``progress(name, nbytes)`` after every chunk, ``on_file(name,
    size)`` after every finished file. Returns the names written (as in the archive, below
    ``artifacts/``), sorted.
    """
    with single_errors():
        async with Outputs(api, make_cache(None, 0)) as outputs, trio.open_nursery() as nursery:
            archive = await outputs.open(task, nursery)
            if archive is None:
                raise NotFoundError(f"task {task.task_id} has no outputs archive")
            files = {"/".join(parts): entry for parts, entry in walk(archive.tree, archive.entries)}
            if filenames:
                wanted = [_relative(name) for name in filenames]
                missing = [name for name in wanted if name not in files]
                if missing:
                    raise NotFoundError(
                        f"not in the outputs of {task.task_id}: {', '.join(missing)}"
                    )
                selected = {name: files[name] for name in dict.fromkeys(wanted)}
            else:
                selected = files
            if on_start is not None:
                on_start(sum(entry.size for entry in selected.values()))
            dest_fd = await trio.to_thread.run_sync(_open_destination, dest, below)
            target = dest.joinpath(*below)
            writer = _TreeWriter(dest_fd, target)
            written: list[str] = []

            def done(name: str, entry: Entry) -> None:
                written.append(name)
                if on_file is not None:
                    on_file(name, entry.size)

            # The archive's own directory entries, made (even when empty) and given their
            # times after the files, as unzip does; for a selection of files, none.
            dirs = (
                []
                if filenames
                else [(p, node.mtime) for p, node in walk_dirs(archive.tree) if node.explicit]
            )
            try:
                await _download_in_order(
                    archive, selected, writer, parallel=parallel, progress=progress, done=done
                )
                await trio.to_thread.run_sync(writer.make_dirs, dirs)
            finally:
                writer.close()
            nursery.cancel_scope.cancel()
    return sorted(written)


# Small members are written in batches of this many bytes or files: one worker-thread call each.
WRITE_BATCH_BYTES = 8 << 20
WRITE_BATCH_FILES = 512


async def _download_in_order(
    archive: RemoteArchive,
    selected: dict[str, Entry],
    writer: _TreeWriter,
    *,
    parallel: int,
    progress: ProgressFn | None,
    done: Callable[[str, Entry], None],
) -> None:
    """Every selected member in archive order. Small members are read one after another, so
    the archive fetches their neighbours together (a few requests for thousands of files) and
    decodes them ahead in a thread, and are written in batches by one worker thread; large
    members stream alongside, up to ``parallel`` at a time."""
    ordered = sorted(selected.items(), key=lambda item: item[1].header_offset)
    archive.expect_sequential()
    limiter = trio.CapacityLimiter(parallel)
    send, receive = trio.open_memory_channel[list[tuple[str, Entry, bytes]]](2)

    async def write_batches() -> None:
        async with receive:
            async for batch in receive:
                await trio.to_thread.run_sync(writer.write_all, batch)
                for name, entry, data in batch:
                    if progress is not None and data:
                        progress(name, len(data))
                    done(name, entry)

    async def large(name: str, entry: Entry) -> None:
        async with limiter:
            parts = name.split("/")
            await _write_member(archive, entry, writer, parts, name, progress=progress)
            done(name, entry)

    async with trio.open_nursery() as workers:
        workers.start_soon(write_batches)
        async with send:
            batch: list[tuple[str, Entry, bytes]] = []
            size = 0
            most = 32  # the first batch is small, so that writing starts early
            for name, entry in ordered:
                if not archive.tuning.is_small(entry.compressed_size, entry.size):
                    workers.start_soon(large, name, entry)
                    continue
                data = await read_whole(archive, entry)
                batch.append((name, entry, data))
                if len(batch) % 256 == 0:
                    await trio.lowlevel.checkpoint()  # read_whole may not yield for a while
                size += len(data)
                if size >= WRITE_BATCH_BYTES or len(batch) >= most:
                    await send.send(batch)
                    batch, size = [], 0
                    most = min(WRITE_BATCH_FILES, most * 2)
            if batch:
                await send.send(batch)


class _TreeWriter:
    """Files written below ``dest_fd`` from a worker thread: directories are made and opened
    one component at a time without following links (as ``_open_dirs``), and the most recent
    ``MAX_OPEN`` of them stay open for the files that follow. Used from several worker threads
    (the batch writer, large members): one at a time (a directory's descriptor is closed
    when it leaves the most recent, so never while another thread writes in it)."""

    MAX_OPEN = 64

    def __init__(self, dest_fd: int, where: Path | None = None) -> None:
        self.dest_fd = dest_fd
        self.where = where  # the path of ``dest_fd``, for messages
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._lock = threading.Lock()

    def _dir(self, parts: tuple[str, ...]) -> int:
        if not parts:
            return self.dest_fd
        fd = self._dirs.get(parts)
        if fd is not None:
            self._dirs.move_to_end(parts)
            return fd
        parent = self._dir(parts[:-1])
        fd = self._dirs[parts] = _subdir(parent, parts, self.where)
        while len(self._dirs) > self.MAX_OPEN:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def open_dir(self, parts: tuple[str, ...]) -> int:
        """The directory ``parts`` below the destination, made where missing (a new
        descriptor, the caller's to close)."""
        with self._lock:
            return os.dup(self._dir(parts))

    def write_all(self, batch: Sequence[tuple[str, Entry, bytes]]) -> None:
        for name, entry, data in batch:
            parts = tuple(name.split("/"))
            with self._lock:
                parent = self._dir(parts[:-1])
                try:
                    _write_file(parent, parts[-1], entry, data)
                except OSError as exc:  # named after the member, not a temporary file
                    raise OSError(exc.errno, exc.strerror, name) from None

    def make_dirs(self, dirs: Sequence[tuple[tuple[str, ...], float]]) -> None:
        """Make ``dirs`` (paths below the destination) and give them their times, deepest
        first (making a subdirectory changes its parent's time)."""
        with self._lock:
            for parts, _ in dirs:
                self._dir(parts)
            for parts, mtime in sorted(dirs, key=lambda item: -len(item[0])):
                with contextlib.suppress(OSError):
                    parent = self._dir(parts[:-1])
                    os.utime(parts[-1], (mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        os.close(self.dest_fd)


def _write_file(dir_fd: int, name: str, entry: Entry, data: bytes) -> None:
    """``data`` as ``name`` in ``dir_fd``: a temporary name renamed into place, with the
    archive's time and exec bits (as ``unzip`` keeps them)."""
    tmp = _temporary_name()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(tmp, flags, _mode(entry), dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            with contextlib.suppress(OSError):
                os.utime(fd, (entry.mtime, entry.mtime))
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


_TEMPORARY = itertools.count()


def _temporary_name() -> str:
    """A short name no other writer uses: a random prefix per process, then a counter (one
    system call for randomness per process, not per file; ``O_EXCL`` guards the rest)."""
    return f".taskfs-part-{_PREFIX}{next(_TEMPORARY):x}"


_PREFIX = secrets.token_hex(4)


def _mode(entry: Entry) -> int:
    return 0o755 if entry.mode & 0o111 else 0o644


def _relative(name: str) -> str:
    """A requested output name as the tree spells it (``./a//b`` is ``a/b``)."""
    parts = clean_path(name.strip().lstrip("/"))
    return "/".join(parts) if parts else name


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _open_destination(dest: Path, below: Sequence[str]) -> int:
    """``dest`` (made where missing) and ``below`` inside it, opened as ``_open_dirs`` opens
    them. An error names the whole path it is about: ``dest`` a file is "Not a directory"."""
    make_dirs(dest)
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        return _open_dirs(root_fd, below, dest)
    finally:
        os.close(root_fd)


def _open_dirs(dest_fd: int, parts: Sequence[str], where: Path | None = None) -> int:
    """The directory ``parts`` below ``dest_fd``, made where missing and opened one component
    at a time without following links (a link planted under the destination cannot send a
    file elsewhere; paths longer than ``PATH_MAX`` work). A new descriptor."""
    fd = os.dup(dest_fd)
    try:
        for i in range(len(parts)):
            child = _subdir(fd, tuple(parts[: i + 1]), where)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _subdir(parent_fd: int, parts: tuple[str, ...], where: Path | None) -> int:
    """The last of ``parts`` in ``parent_fd`` (the directory of the others), made where
    missing and opened without following a link (a new descriptor). An error says which
    directory (below ``where``, the destination's path) it could not make or open, and why:
    a symbolic link in the way is named as one."""
    name = parts[-1]
    doing = "make"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        doing = "open"
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        path = os.path.join(where or ".", *parts)
        why = exc.strerror or str(exc)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(name, parent_fd):
            why = "a symbolic link is in the way (links below it are not followed)"
        raise OSError(exc.errno, f"cannot {doing} the directory {path}: {why}") from exc


async def _write_member(
    archive: RemoteArchive,
    entry: Entry,
    writer: _TreeWriter,
    parts: Sequence[str],
    name: str,
    *,
    progress: ProgressFn | None,
) -> None:
    """Write one member below the destination under a short temporary name (any file name
    fits), rename it into place and give it the archive's time, as ``unzip`` does."""
    dir_fd = await trio.to_thread.run_sync(writer.open_dir, tuple(parts[:-1]))
    tmp = _temporary_name()
    reader = archive.open_member(entry)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(tmp, flags, _mode(entry), dir_fd=dir_fd)
        async with trio.wrap_file(os.fdopen(fd, "wb")) as out:
            offset = 0
            while offset < entry.size:
                data = await reader.read(offset, CHUNK)
                if not data:
                    raise ArchiveError(f"{name}: data ends at {offset} of {entry.size} bytes")
                await out.write(data)
                offset += len(data)
                if progress is not None:
                    progress(name, len(data))
        await trio.to_thread.run_sync(
            partial(os.replace, tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        )
        with contextlib.suppress(OSError):
            os.utime(parts[-1], (entry.mtime, entry.mtime), dir_fd=dir_fd, follow_symlinks=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        reader.close()
        os.close(dir_fd)
