"""Caches of archive bytes: an on-disk block cache, a small memory tier, single-flight fetches.

Owns: where fetched bytes are kept so that nothing is fetched twice.

* ``DiskCache``: one file per extent under ``<dir>/blocks-v1/``, keyed by
  (object, ETag, kind, number). Each file carries a header with the key's digest, the length
  and a CRC-32 of the data; a file that fails any check is a miss and is deleted. A byte limit
  is kept with LRU eviction; the index is rebuilt from the directory on start, so the cache
  survives restarts. Writes go to a temporary file and are renamed into place; any ``OSError``
  (full disk, read-only, quota) disables nothing and fails nothing: that extent is simply not
  cached.
* ``MemoryCache``: a byte-bounded LRU of recent extents shared by all open archives.
* ``SingleFlight``: concurrent requests for one key run the fetch once; the others wait for it.

Must stay true: a cache never returns bytes other than those stored under the exact key (ETag
included, so a replaced archive can never be served from old blocks), never grows past its
limit after a ``put`` returns, and never turns a cache failure into a failed read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import trio

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

FORMAT_DIR = "blocks-v1"
MAGIC = b"TFSB"
VERSION = 1
HEADER = struct.Struct("<4sH32sQI")  # magic, version, key digest, length, crc32
TOUCH_INTERVAL = 60.0


class CacheKey(NamedTuple):
    """One cached extent: ``kind`` "b" = aligned block ``number``, "m" = member at offset."""

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
    """Byte-limited, integrity-checked, restart-surviving extent cache (blocking methods)."""

    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.root = directory / FORMAT_DIR
        self.limit = limit_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # digest hex -> bytes on disk
        self._touched: dict[str, float] = {}
        self._dirs: set[str] = set()  # subdirectories known to exist
        self.total = 0
        self.enabled = limit_bytes > 0
        if self.enabled:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._load()
            except OSError as exc:
                log.info("disk cache disabled: %s: %s", self.root, exc.strerror)
                self.enabled = False

    def _load(self) -> None:
        found: list[tuple[float, str, int]] = []
        with os.scandir(self.root) as subs:
            dirs = [sub.path for sub in subs if sub.is_dir()]
        for path in dirs:
            with os.scandir(path) as items:
                for item in items:
                    if item.name.startswith("."):
                        _unlink(item.path)  # a temp file of an interrupted write
                        continue
                    st = item.stat()
                    found.append((st.st_mtime, item.name, st.st_size))
        for _, name, size in sorted(found):
            self._index[name] = size
            self.total += size
        self._evict()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name[:2], name)

    def get(self, key: CacheKey) -> bytes | None:
        """The bytes stored under ``key``, or ``None`` (missing or failed its checks)."""
        if not self.enabled:
            return None
        digest = key.digest()
        name = digest.hex()
        with self._lock:
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            self._forget(name)
            return None
        data = _unpack(raw, digest)
        if data is None:
            log.info("disk cache: dropping a corrupt entry %s", name)
            self._forget(name)
            _unlink(path)
            return None
        now = time.monotonic()
        if now - self._touched.get(name, 0.0) > TOUCH_INTERVAL:
            self._touched[name] = now
            with contextlib.suppress(OSError):
                os.utime(path)  # recency survives a restart
        return data

    def contains(self, key: CacheKey) -> bool:
        with self._lock:
            return self.enabled and key.digest().hex() in self._index

    def put(self, key: CacheKey, data: bytes) -> bool:
        """Store ``data``; ``False`` if it could not be (the read goes on regardless)."""
        if not self.enabled or len(data) + HEADER.size > self.limit:
            return False
        digest = key.digest()
        name = digest.hex()
        path = self._path(name)
        header = HEADER.pack(MAGIC, VERSION, digest, len(data), zlib.crc32(data))
        directory = os.path.dirname(path)
        # A per-process, per-thread temporary name (dot-prefixed: swept at start after a crash).
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}")
        try:
            if directory not in self._dirs:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                self._dirs.add(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(header)
                    out.write(data)
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
        except OSError as exc:
            log.debug("disk cache: not caching %s: %s", name, exc.strerror)
            return False
        size = HEADER.size + len(data)
        with self._lock:
            self.total += size - self._index.pop(name, 0)
            self._index[name] = size
            self._evict()
        return True

    def _forget(self, name: str) -> None:
        with self._lock:
            self.total -= self._index.pop(name, 0)

    def _evict(self) -> None:
        while self.total > self.limit and self._index:
            name, size = self._index.popitem(last=False)
            self.total -= size
            self._touched.pop(name, None)
            _unlink(self._path(name))


def _unpack(raw: bytes, digest: bytes) -> bytes | None:
    if len(raw) < HEADER.size:
        return None
    magic, version, stored, length, crc = HEADER.unpack_from(raw)
    data = raw[HEADER.size :]
    if magic != MAGIC or version != VERSION or stored != digest or length != len(data):
        return None
    if zlib.crc32(data) != crc:
        return None
    return data


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class MemoryCache:
    """A byte-bounded LRU of extents (the hot tier above the disk)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.total = 0
        self._items: OrderedDict[CacheKey, bytes] = OrderedDict()

    def get(self, key: CacheKey) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: CacheKey, data: bytes) -> None:
        if len(data) > self.limit:
            return
        self.total += len(data) - len(self._items.pop(key, b""))
        self._items[key] = data
        while self.total > self.limit:
            _, old = self._items.popitem(last=False)
            self.total -= len(old)


class Tiered:
    """Memory, then disk (in a worker thread). ``disk`` may be ``None`` (no disk cache)."""

    def __init__(self, memory: MemoryCache, disk: DiskCache | None) -> None:
        self.memory = memory
        self.disk = disk
        self._limiter = trio.CapacityLimiter(4)

    async def get(self, key: CacheKey) -> bytes | None:
        data = self.memory.get(key)
        if data is not None or self.disk is None or not self.disk.enabled:
            return data
        data = await trio.to_thread.run_sync(self.disk.get, key, limiter=self._limiter)
        if data is None:
            # It may have landed in memory while the disk was asked.
            return self.memory.get(key)
        self.memory.put(key, data)
        return data

    def contains(self, key: CacheKey) -> bool:
        """Whether ``key`` is cached (memory or disk index; no I/O)."""
        return self.memory.get(key) is not None or (
            self.disk is not None and self.disk.contains(key)
        )

    async def put(self, key: CacheKey, data: bytes) -> None:
        self.memory.put(key, data)
        await self.put_disk_many([(key, data)])

    async def put_disk_many(self, items: list[tuple[CacheKey, bytes]]) -> None:
        """Write several extents in one worker-thread call (one handoff, not one each)."""
        disk = self.disk
        if disk is None or not disk.enabled or not items:
            return

        def work() -> None:
            for key, data in items:
                disk.put(key, data)

        await trio.to_thread.run_sync(work, limiter=self._limiter)


class _Flight(Generic[V]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: V | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[K, V]):
    """Run one fetch per key at a time; concurrent callers share its result or error."""

    def __init__(self) -> None:
        self._flights: dict[K, _Flight[V]] = {}

    async def run(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if isinstance(flight.error, Exception):
                raise flight.error
            if flight.error is None:
                assert flight.value is not None
                return flight.value
            # The leader was cancelled: its cancellation is not ours; try again.
        flight = _Flight[V]()
        self._flights[key] = flight
        try:
            flight.value = await fetch()
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
