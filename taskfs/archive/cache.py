"""Caches of archive bytes: an on-disk block cache and a small memory tier.

Owns: where fetched bytes are kept so that nothing is fetched twice.

* ``DiskCache``: one file per extent under ``<dir>/blocks-v1/``, keyed by
  (object, ETag, kind, number). Each file carries a header with the key's digest, the length
  and a CRC-32 of the data; a file that fails any check is a miss and is deleted. A byte limit
  is kept with LRU eviction for every process sharing the directory together (see
  ``DiskCache``); the index is rebuilt from the directory on start, so the cache survives
  restarts. Writes go to a temporary file and are renamed into place; a temporary file is
  removed only once the process that wrote it is gone; any ``OSError`` (full disk, read-only,
  quota) disables nothing and fails nothing: that extent is simply not cached.
* ``MemoryCache``: a byte-bounded LRU of recent extents shared by all open archives.

Must stay true: a cache never returns bytes other than those stored under the exact key (ETag
included, so a replaced archive can never be served from old blocks), never grows past its
limit after a ``put`` returns, and never turns a cache failure into a failed read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import stat
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import trio
from zlib_ng import zlib_ng

T = TypeVar("T")
log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
"""Bytes as the caches hold them: a block is a view of the buffer its request was received
into (the socket's bytes, never copied), an extent read from disk its own ``bytes``."""


FORMAT_DIR = "blocks-v1"
MAGIC = b"TFSB"
VERSION = 1
HEADER = struct.Struct("<4sH32sQI")  # magic, version, key digest, length, crc32
# A segment file: several consecutive blocks of one archive in one file (``put_segment``),
# a header page, then block ``i`` at ``PAGE + i * block``; absent blocks are holes.
SEGMENT_MAGIC = b"TFSG"
SEGMENT_HEAD = struct.Struct("<4sH32sII")  # magic, version, key digest, block size, count
SEGMENT_PART = struct.Struct("<II")  # a block's length (0: absent) and CRC-32
PAGE = 4096
# Direct I/O (no copy into the page cache) needs lengths in multiples of this.
DIRECT_ALIGN = 4096
TOUCH_INTERVAL = 60.0
# Bytes of disk writes allowed to wait for the disk (beyond: not cached). Streaming a 2 GiB
# stored member peaked at 174-211 MB with 64 MiB here, 158-164 MB with 32, in the same time.
DISK_BACKLOG = 32 << 20
# How long a write waits for room in the backlog before its extent goes uncached.
BACKLOG_WAIT = 5.0


# Locks that put the writes of one segment in turn (a segment takes one by its digest).
SEGMENT_LOCKS = 64


class CacheKey(NamedTuple):
    """One cached extent. ``kind``: "b@S" = block ``number`` of the grid laid from archive
    offset S (a large member's data), "s@S" = a segment of those blocks, "m" = a small
    member's extent at offset ``number``, "h" = a local header."""

    object_id: str
    etag: str
    kind: str
    number: int

    def digest(self) -> bytes:
        return _digest(self)


@functools.lru_cache(maxsize=1 << 13)
def _digest(key: CacheKey) -> bytes:
    """The key's file name (memoised: read-ahead asks about the same blocks again and again)."""
    text = f"{key.object_id}\0{key.etag}\0{key.kind}\0{key.number}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class DiskCache:
    """Byte-limited, integrity-checked, restart-surviving extent cache (blocking methods).

    Several processes (mounts) may share one directory: the files are the truth, and the limit
    is kept for all of them together. Each process keeps an index of what it knows; once it
    has written a slice of the limit (``_slice``), it takes ``blocks-v1.lock`` next to it,
    rescans every file (its own and the others'), and evicts the least recently used (by
    mtime: reads touch it) until the total is under the limit. So the directory exceeds the
    limit by at most one slice per process between two accountings.
    """

    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.root = directory / FORMAT_DIR
        self.limit = limit_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # digest hex -> bytes on disk
        self._touched: dict[str, float] = {}
        self._dirs: set[str] = set()  # subdirectories known to exist
        self.total = 0
        self._pending = 0  # bytes written since the last accounting
        # Entries written while an accounting scans the directory (another thread's): the
        # scan may have passed their subdirectory, and must not forget them.
        self._scanning = False
        self._fresh: set[str] = set()
        # A sixteenth of the limit: a rescan stats every file, so a slice of a fixed 64 MiB
        # made a full 10 GiB cache's rescans (2,500 files, 16 per GiB written) cost more
        # than the writes; at most a sixteenth over the limit per process, then.
        self._slice = max(1 << 20, limit_bytes // 16)
        self.enabled = limit_bytes > 0
        self.direct = True  # segments are written with direct I/O until the disk refuses it
        self._local = threading.local()
        self._parts: dict[str, int] = {}  # which blocks a segment file holds, where known
        # Writes of one segment in turn (striped): each keeps the blocks the file holds, so
        # two side by side (a block fetched alone, the run beside it) would lose the other's.
        self._segment_locks = [threading.Lock() for _ in range(SEGMENT_LOCKS)]
        if self.enabled:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._account()
            except OSError as exc:
                log.warning("disk cache disabled: %s: %s", self.root, exc.strerror)
                self.enabled = False

    def _account(self) -> None:
        """Under the directory's lock: learn every file, evict down to the limit."""
        with open(self.root.with_name(FORMAT_DIR + ".lock"), "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            with self._lock:
                self._scanning = True
                self._fresh.clear()
            found: list[tuple[float, str, int]] = []
            with os.scandir(self.root) as subs:
                dirs = [sub.path for sub in subs if sub.is_dir()]
            for path in dirs:
                with os.scandir(path) as items:
                    for item in items:
                        try:
                            st = item.stat()
                        except OSError:
                            continue
                        if item.name.startswith("."):
                            if _abandoned(item.name, st.st_mtime):
                                _unlink(item.path)  # an interrupted write of a dead process
                            continue
                        found.append((st.st_mtime, item.name, st.st_size))
            found.sort()
            with self._lock:
                index = OrderedDict((name, size) for _, name, size in found)
                for name in self._fresh:  # written meanwhile: the newest
                    if name in self._index:
                        index.pop(name, None)
                        index[name] = self._index[name]
                self._index = index
                self.total = sum(index.values())
                self._pending = 0
                self._scanning = False
                self._fresh.clear()
                self._evict()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name[:2], name)

    def get(self, key: CacheKey) -> bytes | None:
        """The bytes stored under ``key``, or ``None`` (missing or failed its checks)."""
        found = self.get_checked(key)
        return None if found is None else found[0]

    def get_checked(self, key: CacheKey) -> tuple[bytes, int] | None:
        """``get``, with the CRC-32 of the bytes (checked against the file's header)."""
        known = self._known(key)
        if known is None:
            return None
        digest, name = known
        path = self._path(name)

        def read(fd: int) -> tuple[bytes, bytes]:
            head = os.pread(fd, HEADER.size, 0)
            # As long as the header says, and no longer than a file has its entry (what the
            # cache would hold beyond it is not read, whatever the file is).
            length = HEADER.unpack_from(head)[3] if len(head) == HEADER.size else 0
            return head, os.pread(fd, min(length, self.limit), HEADER.size)

        found = self._read_entry(name, path, read)
        if found is None:
            return None
        head, body = found
        crc = _unpack(head, body, digest)
        if crc is None:
            self._drop(name, path, "a corrupt entry")
            return None
        self._touch(name, path)
        return body, crc

    def _touch(self, name: str, path: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(name, 0.0) > TOUCH_INTERVAL:
            self._touched[name] = now
            with contextlib.suppress(OSError):
                os.utime(path)  # recency survives a restart, and other processes see it

    def contains(self, key: CacheKey, index: int | None = None) -> bool:
        """Whether ``key`` is stored (no I/O); for a segment, with ``index``: whether its
        block ``index`` is, as far as this process knows which blocks its file holds (a file
        another process wrote counts as holding them all)."""
        with self._lock:
            name = key.digest().hex()
            if not self.enabled or name not in self._index:
                return False
            parts = self._parts.get(name)
            return index is None or parts is None or bool(parts >> index & 1)

    def put(self, key: CacheKey, data: Buffer, crc: int | None = None) -> bool:
        """Store ``data`` (whose CRC-32 is ``crc``, if the caller has it); ``False`` if it
        could not be (the read goes on regardless)."""
        if not self.enabled or len(data) + HEADER.size > self.limit:
            return False
        digest = key.digest()
        name = digest.hex()
        path = self._path(name)
        crc = zlib_ng.crc32(data) if crc is None else crc
        header = HEADER.pack(MAGIC, VERSION, digest, len(data), crc)

        def write(tmp: str) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(header)
                out.write(data)

        if not self._publish(name, path, write):
            return False
        self._note(name, HEADER.size + len(data))
        return True

    def _publish(self, name: str, path: str, write: Callable[[str], None]) -> bool:
        """Write the file of ``name`` under a temporary name with ``write``, then rename it to
        ``path`` (readers see it whole or not at all); ``False`` if the disk refused."""
        directory = os.path.dirname(path)
        # A per-process, per-thread temporary name (dot-prefixed: swept once its process died).
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}")
        try:
            if directory not in self._dirs:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                self._dirs.add(directory)
            try:
                write(tmp)
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
        except OSError as exc:
            log.debug("disk cache: not caching %s: %s", name, exc.strerror)
            return False
        return True

    def _note(self, name: str, size: int) -> None:
        """A file of ``size`` bytes was written as ``name``: index it, keep the limit."""
        with self._lock:
            self.total += size - self._index.pop(name, 0)
            self._index[name] = size
            if self._scanning:
                self._fresh.add(name)
            self._pending += size
            due = self._pending >= self._slice
            self._evict()
        if due:
            try:
                self._account()
            except OSError as exc:
                log.debug("disk cache: accounting failed: %s", exc.strerror)

    def put_segment(
        self, key: CacheKey, block: int, count: int, parts: Sequence[tuple[int, Buffer, int]]
    ) -> bool:
        """Store blocks of one segment (``count`` blocks of ``block`` bytes) as one file:
        ``parts`` are ``(index, bytes, crc)``. Written with direct I/O where the buffers allow
        it (page-aligned memory, whole pages): the blocks go to the disk without a copy into
        the page cache, which costs more CPU here than the rest of a read (a file per MiB
        costs ~1 ms of CPU in creating and renaming it; one per segment, an eighth of that).
        ``False`` if it could not be stored (the read goes on regardless)."""
        if not self.enabled or not parts:
            return False
        digest = key.digest()
        with self._segment_locks[digest[0] % SEGMENT_LOCKS]:
            return self._put_segment(key, digest, block, count, parts)

    def _put_segment(
        self,
        key: CacheKey,
        digest: bytes,
        block: int,
        count: int,
        parts: Sequence[tuple[int, Buffer, int]],
    ) -> bool:
        name = digest.hex()
        path = self._path(name)
        parts = sorted([*parts, *self._kept(key, parts)], key=lambda part: part[0])
        size = PAGE + parts[-1][0] * block + len(parts[-1][1])
        if size > self.limit:
            return False
        head = _segment_head(digest, block, [(i, len(d), c) for i, d, c in parts], count)
        try:
            written = self._publish(
                name, path, functools.partial(self._write_segment, head, parts, block)
            )
        finally:
            head.close()
        if not written:
            return False
        self._note(name, size)
        with self._lock:
            self._parts[name] = sum(1 << index for index, _, _ in parts)
        return True

    def _kept(
        self, key: CacheKey, parts: Sequence[tuple[int, Buffer, int]]
    ) -> list[tuple[int, Buffer, int]]:
        """The blocks the segment file already holds that ``parts`` does not bring (a random
        reader's block joining a segment stored before): the new file keeps them."""
        digest = key.digest()
        name = digest.hex()
        with self._lock:
            if name not in self._index:
                return []
            held = self._parts.get(name)
        if held is None:  # written by another process, or before a restart: its header says
            held = self._read_entry(
                name, self._path(name), lambda fd: _segment_mask(os.pread(fd, PAGE, 0), digest)
            )
            if held is None:
                return []
        for index, _, _ in parts:
            held &= ~(1 << index)
        kept = []
        index = 0
        while held:
            if held & 1:
                found = self.get_segment_block(key, index)
                if found is not None:
                    data, crc = found
                    kept.append((index, data, crc))
            held >>= 1
            index += 1
        return kept

    def _write_segment(
        self, head: mmap.mmap, parts: Sequence[tuple[int, Buffer, int]], block: int, tmp: str
    ) -> None:
        direct = self.direct and all(_aligned(data, block) for _, data, _ in parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags | (os.O_DIRECT if direct else 0), 0o600)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            self.direct = False  # a file system without direct I/O (tmpfs): buffered
            direct = False
            fd = os.open(tmp, flags, 0o600)
        try:
            os.pwrite(fd, head, 0)
            for index, data, _ in parts:
                os.pwrite(fd, _padded(data) if direct else data, PAGE + index * block)
            if direct:  # padded to whole pages: the file ends where its last block does
                os.ftruncate(fd, PAGE + parts[-1][0] * block + len(parts[-1][1]))
        finally:
            os.close(fd)

    def get_segment_block(
        self, key: CacheKey, index: int, into: mmap.mmap | memoryview | None = None
    ) -> tuple[Buffer, int] | None:
        """Block ``index`` of the segment stored under ``key``, with its CRC-32 (checked),
        or ``None`` (no such segment, the block is not in it, or it failed its checks).

        With ``into`` (a page-aligned buffer large enough for the block in whole pages) and
        direct I/O, the block is read straight into it: no page cache filled and copied
        from, no new buffer (a third of a re-read's CPU, measured)."""
        return self.get_segment_blocks(key, [index], [into])[0]

    def get_segment_blocks(
        self,
        key: CacheKey,
        indexes: Sequence[int],
        intos: Sequence[mmap.mmap | memoryview | None],
    ) -> list[tuple[Buffer, int] | None]:
        """Blocks ``indexes`` of the segment under ``key`` (each as ``get_segment_block``,
        ``intos`` its buffers), read with one open and one read of the header: a sequential
        reader's read-ahead loads a segment's blocks in one go."""
        missing: list[tuple[Buffer, int] | None] = [None] * len(indexes)
        known = self._known(key)
        if known is None:
            return missing
        digest, name = known
        path = self._path(name)
        direct = self.direct and all(into is not None for into in intos)

        def read(fd: int) -> list[tuple[Buffer, int, int] | None]:
            if direct:
                page = self._head_buffer()
                head = page[: os.preadv(fd, [page], 0)]
            else:
                head = os.pread(fd, PAGE, 0)
            out: list[tuple[Buffer, int, int] | None] = []
            for index, into in zip(indexes, intos, strict=True):
                where = _segment_part(head, digest, index)
                if where is None:
                    out.append(None)
                    continue
                block, length, crc = where
                whole = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
                if direct and into is not None and whole <= len(into):
                    view = memoryview(into)
                    got = os.preadv(fd, [view[:whole]], PAGE + index * block)
                    out.append((view[: min(got, length)], length, crc))
                else:
                    out.append((os.pread(fd, length, PAGE + index * block), length, crc))
            return out

        found = self._read_entry(name, path, read, os.O_DIRECT if direct else 0)
        if found is None:
            return missing
        result = missing
        for i, part in enumerate(found):
            if part is None:
                continue
            data, length, crc = part
            if len(data) != length or zlib_ng.crc32(data) != crc:
                self._drop(name, path, "a corrupt segment")
                return missing
            result[i] = (data, crc)
        self._touch(name, path)
        return result

    def _read_entry(
        self, name: str, path: str, read: Callable[[int], T | None], flags: int = 0
    ) -> T | None:
        """``read`` of the cache file of ``name`` (opened by ``_open_entry``), or ``None``:
        not there (evicted by another process sharing the directory), or not a cache file
        (it goes)."""
        try:
            fd = _open_entry(path, flags)
            try:
                return read(fd)
            finally:
                os.close(fd)
        except _NotAnEntryError:
            self._drop(name, path, "what is not a regular file:")
        except OSError:
            self._forget(name)
        return None

    def _drop(self, name: str, path: str, what: str) -> None:
        """The file of ``name`` failed its checks, or is not a cache file at all (a link, a
        FIFO, a device): it goes, and its bytes are fetched anew."""
        log.info("disk cache: dropping %s %s", what, name)
        self._forget(name)
        _unlink(path)

    def _known(self, key: CacheKey) -> tuple[bytes, str] | None:
        """The digest and file name of ``key`` if the cache holds it (a use: it moves to the
        back of the eviction order), else ``None``."""
        if not self.enabled:
            return None
        digest = key.digest()
        name = digest.hex()
        with self._lock:
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        return digest, name

    def _head_buffer(self) -> mmap.mmap:
        """A page-aligned page for reading a segment's header with direct I/O (one per
        thread)."""
        local = self._local
        page = getattr(local, "page", None)
        if page is None:
            page = local.page = mmap.mmap(-1, PAGE)
        return page

    def _forget(self, name: str) -> None:
        with self._lock:
            self.total -= self._index.pop(name, 0)
            self._parts.pop(name, None)

    def _evict(self) -> None:
        while self.total > self.limit and self._index:
            name, size = self._index.popitem(last=False)
            self.total -= size
            self._parts.pop(name, None)
            self._touched.pop(name, None)
            _unlink(self._path(name))


def _abandoned(name: str, mtime: float) -> bool:
    """Whether a temporary file ``.<digest>.<pid>.<thread>`` was left by a process that is
    gone (or is over an hour old: its pid may have been reused)."""
    if time.time() - mtime > 3600:
        return True
    parts = name.split(".")
    try:
        os.kill(int(parts[2]), 0)
    except (IndexError, ValueError, ProcessLookupError):
        return True
    except PermissionError:
        return False
    return False


def _segment_head(
    digest: bytes, block: int, parts: list[tuple[int, int, int]], count: int
) -> mmap.mmap:
    """A segment file's header page (page-aligned memory, for direct I/O): ``parts`` are
    ``(index, length, crc)`` of the blocks present, of ``count``."""
    page = mmap.mmap(-1, PAGE)
    SEGMENT_HEAD.pack_into(page, 0, SEGMENT_MAGIC, VERSION, digest, block, count)
    for index, length, crc in parts:
        SEGMENT_PART.pack_into(page, SEGMENT_HEAD.size + index * SEGMENT_PART.size, length, crc)
    return page


def _segment_mask(head: bytes, digest: bytes) -> int:
    """Which blocks a segment file holds, as a bit mask, from its header page."""
    if len(head) < SEGMENT_HEAD.size:
        return 0
    count = SEGMENT_HEAD.unpack_from(head)[4]
    return sum(1 << index for index in range(count) if _segment_part(head, digest, index))


def _segment_part(head: bytes, digest: bytes, index: int) -> tuple[int, int, int] | None:
    """``(block size, length, crc)`` of block ``index`` from a segment file's header page
    (``None``: not a segment of ``digest``, or the block is not in it)."""
    if len(head) < SEGMENT_HEAD.size:
        return None
    magic, version, stored, block, count = SEGMENT_HEAD.unpack_from(head)
    if magic != SEGMENT_MAGIC or version != VERSION or stored != digest or not 0 <= index < count:
        return None
    at = SEGMENT_HEAD.size + index * SEGMENT_PART.size
    if at + SEGMENT_PART.size > len(head):
        return None
    length, crc = SEGMENT_PART.unpack_from(head, at)
    return (block, length, crc) if length else None


def _aligned(data: Buffer, block: int) -> bool:
    """Whether ``data`` can be written with direct I/O: a view of an anonymous map (page
    aligned), from a page boundary in it, with whole pages of the map past its end."""
    base = shared_map(data)
    if base is None or not 0 < len(data) <= block:
        return False
    assert isinstance(data, memoryview)
    at = map_offset(data)
    return at % DIRECT_ALIGN == 0 and len(base) - at >= _whole_pages(data.nbytes)


def _padded(data: Buffer) -> memoryview:
    """``data`` (a view of an anonymous map, from a page boundary) to whole pages."""
    base = shared_map(data)
    assert base is not None and isinstance(data, memoryview)
    at = map_offset(data)
    return memoryview(base)[at : at + _whole_pages(data.nbytes)]


def _whole_pages(size: int) -> int:
    return -(-size // DIRECT_ALIGN) * DIRECT_ALIGN


def _unpack(head: bytes, data: bytes, digest: bytes) -> int | None:
    """The CRC-32 of ``data`` if the header vouches for it, else ``None``."""
    if len(head) < HEADER.size:
        return None
    magic, version, stored, length, crc = HEADER.unpack_from(head)
    if magic != MAGIC or version != VERSION or stored != digest or length != len(data):
        return None
    if zlib_ng.crc32(data) != crc:
        return None
    return int(crc)


class _NotAnEntryError(OSError):
    """A cache entry's path holds something other than a regular file."""


def _open_entry(path: str, flags: int = 0) -> int:
    """A descriptor of the cache file at ``path``, never of what a link there points to nor of
    anything but a regular file (opening a FIFO would block, reading a device never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _NotAnEntryError(exc.errno, "a link", path) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotAnEntryError(errno.EINVAL, "not a regular file", path)
    return fd


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class BufferPool:
    """Buffers for blocks: page-aligned anonymous maps of ``size`` bytes, or of ``runs``
    blocks in a row (``take(n)``: a request's run of a segment, received into one buffer so
    that a read across two of its blocks is one view, not a copy), reused instead of mapped
    anew (each new one costs a page fault and a zeroed page per 4 KiB: a fifth of a cold
    read's CPU, measured). Direct I/O can write them. A buffer comes back when the memory
    tier lets go of its last block (``give``); it is reused only once nothing views it any
    more (a reader, a disk write, a FUSE reply): ``mmap.resize`` refuses while a view of it
    is alive, which makes the check exact and cheap. At most ``keep`` blocks' worth wait to
    be reused, half in each size."""

    def __init__(self, size: int, keep: int = 16, runs: int = 1) -> None:
        self.size = size
        self.keep = keep
        self.runs = runs
        self._back: dict[int, deque[mmap.mmap]] = {size * n: deque() for n in {1, runs}}
        # Half the room each (a map of a run counts its blocks), whatever was kept before
        # maps of runs came: what waits here counts in the mount's memory.
        self._keep = {
            size: keep if runs == 1 else keep // 2,
            size * runs: max(1, keep // (2 * runs)),
        }

    def take(self, blocks: int = 1) -> mmap.mmap:
        """A buffer of ``blocks`` blocks (1, or ``runs``)."""
        size = self.size * blocks
        back = self._back[size]
        for _ in range(min(len(back), 4)):  # a few looks: the oldest are freest
            buffer = back.popleft()
            try:
                buffer.resize(size)  # refused while a view of it is alive
            except BufferError:
                back.append(buffer)
                continue
            return buffer
        return mmap.mmap(-1, size)

    def give(self, data: Buffer) -> None:
        """``data`` left the memory tier: its buffer (if it is one of these) may come back."""
        base = data.obj if isinstance(data, memoryview) else None
        del data
        if isinstance(base, mmap.mmap):
            back = self._back.get(len(base))
            if back is not None and len(back) < self._keep[len(base)]:
                back.append(base)


def shared_map(data: Buffer) -> mmap.mmap | None:
    """The pooled map ``data`` is a view of, if it is one (its blocks share it)."""
    base = data.obj if isinstance(data, memoryview) else None
    return base if isinstance(base, mmap.mmap) else None


def map_offset(view: memoryview) -> int:
    """Where ``view`` (a non-empty, writable view of a map) starts in that map: its address
    less the map's, read by ctypes without a copy."""
    return _address(view) - _address(memoryview(view.obj))


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class MemoryCache:
    """A byte-bounded cache of extents (the hot tier above the disk): blocks fetched ahead of
    a reader and not read yet (``put(..., ahead=True)``) are kept apart and go last; the rest
    go least recently used first. By recency alone, the blocks fetched ahead of a reader
    would go before those it has just read and will not read again; and if blocks a reader
    has passed went first of all (as here before), blocks of earlier random reads, never
    passed, would stay for good while a file read again and again, which would fit, was let
    go each round."""

    def __init__(self, limit_bytes: int, pool: BufferPool | None = None) -> None:
        self.limit = limit_bytes
        self.total = 0
        self._items: OrderedDict[CacheKey, Buffer] = OrderedDict()  # read: by recency
        self._ahead: OrderedDict[CacheKey, Buffer] = OrderedDict()  # fetched ahead, unread
        self.pool = pool  # where the buffers of the blocks it lets go return
        # Pooled maps that blocks here view: how many blocks each, charged whole (a block
        # keeps its run's map, all of it, alive) once, when the first comes, and let go
        # when the last goes.
        self._maps: dict[int, list[int]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._items or key in self._ahead  # a look, not a use

    def used(self, key: CacheKey) -> None:
        """A reader has just had ``key`` (from its fetch, not from here): it counts as read."""
        data = self._ahead.pop(key, None)
        if data is not None:
            self._items[key] = data

    def unwanted(self, key: CacheKey) -> None:
        """``key`` was fetched ahead for a reader that has gone (closed, or jumped away): it
        goes first."""
        data = self._ahead.pop(key, None)
        if data is not None:
            self._items[key] = data
            self._items.move_to_end(key, last=False)

    def peek(self, key: CacheKey) -> Buffer | None:
        """The bytes of ``key``, if held, without counting as a use."""
        data = self._items.get(key)
        return data if data is not None else self._ahead.get(key)

    def get(self, key: CacheKey) -> Buffer | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
            return data
        data = self._ahead.pop(key, None)
        if data is not None:  # read now
            self._items[key] = data
        return data

    def put(self, key: CacheKey, data: Buffer, ahead: bool = False) -> None:
        if len(data) > self.limit:
            return
        old = self._items.pop(key, None) or self._ahead.pop(key, None)
        (self._ahead if ahead else self._items)[key] = data
        self._charge(data)
        if old is not None:
            self._release(old)
        while self.total > self.limit:
            _, gone = (self._items or self._ahead).popitem(last=False)
            self._release(gone)

    def _charge(self, data: Buffer) -> None:
        base = shared_map(data)
        if base is None:
            self.total += len(data)
            return
        held = self._maps.get(id(base))
        if held is None:
            self._maps[id(base)] = [1, len(base)]
            self.total += len(base)
        else:
            held[0] += 1

    def _release(self, data: Buffer) -> None:
        base = shared_map(data)
        if base is None:
            self.total -= len(data)
            return
        held = self._maps[id(base)]
        held[0] -= 1
        if held[0] == 0:
            del self._maps[id(base)]
            self.total -= held[1]
            if self.pool is not None:
                self.pool.give(data)


class Tiered:
    """Memory, then disk (in a worker thread). ``disk`` may be ``None`` (no disk cache)."""

    def __init__(self, memory: MemoryCache, disk: DiskCache | None) -> None:
        self.memory = memory
        self.disk = disk
        self._limiter = trio.CapacityLimiter(4)
        self._backlog = 0  # bytes handed to disk writes that have not finished
        self._waiting = 0  # bytes of writes waiting for room in the backlog
        self._drained = trio.Event()  # set (and replaced) whenever the backlog shrinks
        # Extents on their way to disk: found here while the memory tier may have let them go
        # (a read in between would otherwise fetch them again).
        self._writing: dict[CacheKey, Buffer] = {}
        # Lookups answered by each tier, and missed (the mount's ``.taskfs/stats``).
        self.counts = {"memory_hits": 0, "disk_hits": 0, "misses": 0}

    async def get(
        self, key: CacheKey, admit: Callable[[bytes, int], None] | None = None
    ) -> Buffer | None:
        """The bytes under ``key`` from memory, else from disk; ``admit(data, crc)`` sees
        what comes from disk first (and may refuse it by raising)."""
        data = self.memory.get(key)
        if data is None and (writing := self._writing.get(key)) is not None:
            data = writing
            self.memory.put(key, data)
        if data is not None:
            self.counts["memory_hits"] += 1
            return data
        if self.disk is None or not self.disk.enabled:
            self.counts["misses"] += 1
            return None
        found = await trio.to_thread.run_sync(self.disk.get_checked, key, limiter=self._limiter)
        if found is None:
            # It may have landed in memory while the disk was asked.
            data = self.memory.get(key)
            self.counts["memory_hits" if data is not None else "misses"] += 1
            return data
        data, crc = found
        if admit is not None:
            admit(data, crc)
        self.memory.put(key, data)
        self.counts["disk_hits"] += 1
        return data

    @property
    def pending_writes(self) -> int:
        """Extents handed to the disk writer and not written yet."""
        return len(self._writing)

    def contains(self, key: CacheKey) -> bool:
        """Whether ``key`` is cached (memory or disk index; no I/O, no change of recency)."""
        return key in self.memory or key in self._writing or self.on_disk(key)

    def writing(self, key: CacheKey) -> Buffer | None:
        """The bytes of ``key`` while they are on their way to disk (the memory tier may have
        let them go already)."""
        return self._writing.get(key)

    def on_disk(self, key: CacheKey, index: int | None = None) -> bool:
        """Whether ``key`` (of a segment, with ``index``: its block) is in the disk cache."""
        return self.disk is not None and self.disk.contains(key, index)

    async def put(self, key: CacheKey, data: Buffer) -> None:
        self.memory.put(key, data)
        await self.put_disk_many([(key, data, None)])

    async def put_disk_many(self, items: list[tuple[CacheKey, Buffer, int | None]]) -> None:
        """Write several extents in one worker-thread call (one handoff, not one each)."""
        disk = self.disk
        if disk is None or not disk.enabled or not items:
            return

        def work() -> None:
            for key, data, crc in items:
                disk.put(key, data, crc)

        await self._write_behind([(key, data) for key, data, _ in items], work)

    async def put_segment(
        self,
        key: CacheKey,
        block: int,
        count: int,
        parts: list[tuple[int, CacheKey, Buffer, int]],
    ) -> None:
        """Write blocks of one segment (``(index, block key, bytes, crc)``) as one file
        (``DiskCache.put_segment``), behind the reader as ``put_disk_many``."""
        disk = self.disk
        if disk is None or not disk.enabled or not parts:
            return

        def work() -> None:
            disk.put_segment(key, block, count, [(i, data, crc) for i, _, data, crc in parts])

        await self._write_behind([(k, data) for _, k, data, _ in parts], work)

    async def get_segment_blocks(
        self,
        segment: CacheKey,
        indexes: Sequence[int],
        keys: Sequence[CacheKey],
        admit: Callable[[int, int], None],
    ) -> list[Buffer | None]:
        """Blocks ``indexes`` of ``segment`` from disk, in one worker-thread call (``keys``:
        theirs, for the memory tier), ``admit(i, crc)`` seeing the i-th first (and refusing
        it by raising); ``None`` for those it does not hold."""
        if self.disk is None or not self.disk.enabled:
            return [None] * len(indexes)
        pool = self.memory.pool
        intos: list[mmap.mmap | memoryview | None]
        shared: memoryview | None = None
        if pool is not None and pool.runs > 1 and list(indexes) == list(range(pool.runs)):
            # A whole segment: into one map, its blocks in a row (a read across two is a view)
            shared = memoryview(pool.take(pool.runs))
            intos = [shared[i * pool.size : (i + 1) * pool.size] for i in indexes]
        else:
            intos = [pool.take() if pool is not None else None for _ in indexes]
        found = await trio.to_thread.run_sync(
            self.disk.get_segment_blocks, segment, indexes, intos, limiter=self._limiter
        )
        if pool is not None and shared is not None and all(part is None for part in found):
            pool.give(shared)  # once: with any block held, the memory tier gives it back
        out: list[Buffer | None] = []
        for i, (part, into) in enumerate(zip(found, intos, strict=True)):
            if part is None:
                if pool is not None and shared is None and into is not None:
                    pool.give(into if isinstance(into, memoryview) else memoryview(into))
                self.counts["misses"] += 1
                out.append(None)
                continue
            data, crc = part
            admit(i, crc)
            self.memory.put(keys[i], data, ahead=True)  # until a reader has it
            self.counts["disk_hits"] += 1
            out.append(data)
        return out

    async def _write_behind(
        self, items: list[tuple[CacheKey, Buffer]], work: Callable[[], None]
    ) -> None:
        """Run ``work`` (disk writes of ``items``) in a worker thread, off the reader's path.

        Writes waiting for the disk hold their bytes, found by readers meanwhile. Past
        ``DISK_BACKLOG`` of them, a write waits for room (up to ``BACKLOG_WAIT``; a burst of
        large fetches must not cost a re-read its cache); past twice that, or after the wait,
        the extents are simply not cached (a slow disk must not turn into memory).
        """
        size = sum(len(data) for _, data in items)
        if self._backlog + self._waiting + size > 2 * DISK_BACKLOG:
            return
        for key, data in items:
            self._writing[key] = data
        try:
            if self._backlog + size > DISK_BACKLOG:
                self._waiting += size
                try:
                    with trio.move_on_after(BACKLOG_WAIT):
                        while self._backlog and self._backlog + size > DISK_BACKLOG:
                            await self._drained.wait()
                finally:
                    self._waiting -= size
                if self._backlog and self._backlog + size > DISK_BACKLOG:
                    return  # the disk did not catch up: not cached
            self._backlog += size
            try:
                await trio.to_thread.run_sync(work, limiter=self._limiter)
            finally:
                self._backlog -= size
                self._drained.set()  # writers waiting for room look again
                self._drained = trio.Event()
        finally:
            for key, data in items:
                if self._writing.get(key) is data:
                    del self._writing[key]
