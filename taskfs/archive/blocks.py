"""The blocks of one archive: found in the caches, waited for while in flight, or fetched,
and fetched ahead of sequential readers.

Owns: blocks of ``tuning.block`` bytes laid from an origin (the unit of caching for large
members: each large member has its own grid, from its data's first byte, so that a read
aligned in the member, as the kernel's are, is a view of one block and never a copy), the
fetches in flight (one ``Flight`` per block: a block is fetched once, whoever
asks), the CRC-32 of every block as it first arrived (a block read again, from storage or a
disk cache another mount filled, must be the same bytes), and ``Readahead``: one sequential
reader's window, which doubles while its reads follow on, remembers how far it has asked
for, and so asks each read only for what is new (mountpoint-s3's prefetcher is the model:
no rescan of the window per read).

Hot path, per read of a block in memory: a dict lookup, no thread hop, no copy (the block is
a view of the buffer its request was received into). A block in flight: its ``Flight``. Only
a block the disk cache holds costs a thread hop.

Must stay true: bytes come only from this archive's ETag (cache keys carry it); a block's
bytes, from wherever, match the CRC-32 it had when first seen, or ``StaleError``; background
fetches never raise into a reader (a failed prefetch is fetched again on demand).
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio
from zlib_ng import zlib_ng

from taskfs.archive.cache import Buffer, BufferPool, CacheKey, Tiered, map_offset, shared_map
from taskfs.errors import ArchiveError, StaleError
from taskfs.flight import Abandoned, Flight

FetchInto = Callable[[int, Sequence[memoryview]], Awaitable[None]]
"""Archive bytes from an offset received into buffers, one after another (``RangeSource``
through the archive's connection limit)."""


@dataclass(frozen=True, slots=True)
class Block:
    """Archive bytes from ``start``, as fetched, and their CRC-32."""

    start: int
    data: Buffer
    crc: int


def gather(parts: Sequence[memoryview], pool: BufferPool | None = None) -> Buffer:
    """``parts`` as one buffer: the part itself when there is one, one view when they lie
    in a row in one map (blocks a request received together), else a copy, into a pooled
    buffer when ``pool`` is given and its buffers are large enough (a fresh ``bytes`` of
    256 KiB is a fresh map from malloc, with a page fault and a zeroed page per 4 KiB:
    measured as a tenth of a cold read's CPU, though only one read in four crosses a block).
    The pool lends a buffer again only once no view of it is left."""
    if len(parts) == 1:
        return parts[0]
    joined = _in_a_row(parts)
    if joined is not None:
        return joined
    size = sum(len(part) for part in parts)
    if pool is None or size > pool.size:
        return b"".join(parts)
    out = memoryview(pool.take())[:size]
    pos = 0
    for part in parts:
        out[pos : pos + len(part)] = part
        pos += len(part)
    pool.give(out)  # back in line at once: it is lent again only when ``out`` is gone
    return out


def _in_a_row(parts: Sequence[memoryview]) -> memoryview | None:
    """One view of ``parts`` where they are consecutive bytes of one map, else ``None``.
    (A cold ``cat``'s reads start half a block into the member's grid, so nearly all of them
    cross two blocks: a 1 MiB copy per read was a fifth of a re-read's CPU from memory.)"""
    base = shared_map(parts[0])
    if base is None or base.closed:
        return None
    try:
        at = map_offset(parts[0])
        end = at + len(parts[0])
        for part in parts[1:]:
            if part.obj is not base or map_offset(part) != end:
                return None
            end += len(part)
    except (TypeError, ValueError):  # an empty or read-only part
        return None
    return memoryview(base)[at:end]


def block_views(blocks: Sequence[Block], start: int, end: int) -> list[memoryview]:
    """Views of archive bytes ``[start, end)`` in consecutive ``blocks``."""
    return [memoryview(b.data)[max(0, start - b.start) : max(0, end - b.start)] for b in blocks]


class BlockFetcher:
    """The blocks of one archive (see the module docstring)."""

    def __init__(
        self,
        *,
        fetch: FetchInto,
        cache: Tiered,
        object_id: str,
        etag: str,
        end: int,
        block: int,
        max_request: int,
        nursery: trio.Nursery,
        segment: int = 4,
        start: int = 0,
    ) -> None:
        self._fetch = fetch
        self.cache = cache
        self.counts = cache.counts  # memory hits, disk hits, misses (the mount's stats)
        self.object_id = object_id
        self.etag = etag
        # The grid: block n holds archive bytes [start + n * block, ...), up to ``end``.
        self.start = start
        self.end = end
        self._kinds = (f"b@{start}", f"s@{start}")
        self.block = block
        self.segment = segment  # blocks to a disk-cache file
        self.max_request = max_request
        self._nursery = nursery
        self._pending: dict[int, Flight[Block]] = {}
        self.count = -(-(end - start) // block)
        # The CRC-32 of every block seen so far (allocated on the first).
        self._seen: bytearray | None = None
        self._crcs = array("I")

    def key(self, number: int) -> CacheKey:
        return CacheKey(self.object_id, self.etag, self._kinds[0], number)

    def segment_key(self, number: int) -> CacheKey:
        """The disk cache's key of the segment holding block ``number``."""
        return CacheKey(self.object_id, self.etag, self._kinds[1], number // self.segment)

    def number(self, offset: int) -> int:
        """The block holding archive byte ``offset``."""
        return (offset - self.start) // self.block

    def offset(self, number: int) -> int:
        """The archive offset of block ``number``'s first byte."""
        return self.start + number * self.block

    def stop(self, offset: int) -> int:
        """The first block wholly at or after archive byte ``offset``."""
        return -(-(offset - self.start) // self.block)

    def _have(self, number: int) -> bool:
        """Whether block ``number`` is cached (memory, on its way to disk, or its segment on
        disk), without a look that changes the order of recency."""
        segment, index = self.segment_key(number), number % self.segment
        return self.cache.contains(self.key(number)) or self.cache.on_disk(segment, index)

    def _bounds(self, number: int) -> tuple[int, int]:
        start = self.offset(number)
        return start, min(self.end, start + self.block)

    # -- reading -------------------------------------------------------------------------------

    def cached(self, number: int) -> Block | None:
        """Block ``number`` if it is in memory (no wait, no thread hop)."""
        key = self.key(number)
        data = self.cache.memory.get(key)
        if data is None:
            data = self.cache.writing(key)
            if data is None:
                return None
        self.counts["memory_hits"] += 1
        return Block(self.offset(number), data, self._crc_of(number, data))

    async def get(self, number: int) -> Block:
        """Block ``number``: from memory, its fetch in flight, the disk cache, or storage."""
        looked_on_disk = False
        while True:
            found = self.cached(number)
            if found is not None:
                return found
            flight = self._pending.get(number)
            if flight is None:
                segment, index = self.segment_key(number), number % self.segment
                if not looked_on_disk and self.cache.on_disk(segment, index):
                    looked_on_disk = True
                    block = await self._load(number)
                    if block is not None:
                        self.cache.memory.used(self.key(number))
                        return block
                    continue  # not there after all: it may have come meanwhile, look again
                self._start(number, number + 1)  # (a segment on disk may lack it)
                flight = self._pending[number]
                self.counts["misses"] += 1
            with contextlib.suppress(Abandoned):  # its fetch was cancelled: ask again
                block = await flight.wait()
                self.cache.memory.used(self.key(number))
                return block

    async def _load(self, number: int) -> Block | None:
        """Block ``number`` from its segment on disk, as a flight: readers that want it
        meanwhile (the kernel sends a file's reads side by side) wait for this one read."""
        flight = Flight[Block]()
        self._pending[number] = flight
        self._nursery.start_soon(self._load_run, number, number + 1, {number: flight})
        with contextlib.suppress(Abandoned):
            return await flight.wait()
        return None

    async def _load_run(self, first: int, stop: int, flights: dict[int, Flight[Block]]) -> None:
        """Blocks ``[first, stop)`` (of one segment) from the disk cache in one go (one
        worker-thread call, one open of the file), each handed to its flight; a block the
        file does not hold after all is abandoned (its waiters ask again). Never raises."""
        segment = self.segment_key(first)
        numbers = range(first, stop)
        try:
            found = await self.cache.get_segment_blocks(
                segment,
                [n % self.segment for n in numbers],
                [self.key(n) for n in numbers],
                lambda i, crc: self._admit(first + i, crc),
            )
            for n, data in zip(numbers, found, strict=True):
                if data is not None:
                    flights[n].land(Block(self.offset(n), data, self._crc_of(n, data)))
        except Exception as exc:  # a block other than before (StaleError): to its waiters
            for flight in flights.values():
                if not flight.done:
                    flight.fail(exc)
        finally:
            for n, flight in flights.items():
                if self._pending.get(n) is flight:
                    del self._pending[n]
                flight.abandon()  # not landed (not on disk after all, or cancelled): ask again

    async def read(self, low: int, high: int, ahead: Readahead | None = None) -> list[Block]:
        """The blocks holding archive bytes ``[low, high)`` (within the grid), each with its
        CRC-32 (taken when it arrived); ``ahead`` (a sequential reader's) is told of the read
        and keeps its window fetched ahead."""
        if not self.start <= low < high <= self.end:
            raise ArchiveError(f"range {low}-{high} outside {self.start}-{self.end}")
        if ahead is not None:
            ahead.advise(low, high)
        return await self.get_range(self.number(low), self.number(high - 1))

    async def get_range(self, first: int, last: int) -> list[Block]:
        """Blocks ``first..last``; those missing are asked for together (one request), and
        taken from their flights, not the cache (which may have let them go meanwhile)."""
        if first == last:
            return [await self.get(first)]
        found = {n: block for n in range(first, last + 1) if (block := self.cached(n))}
        self.request(first, last + 1)  # the missing ones, in one request
        flights = {n: self._pending[n] for n in range(first, last + 1) if n in self._pending}
        for n in range(first, last + 1):
            if n not in found:
                flight = flights.get(n)
                try:
                    if flight is None:
                        found[n] = await self.get(n)
                        continue
                    found[n] = await flight.wait()
                except Abandoned:
                    found[n] = await self.get(n)
                self.cache.memory.used(self.key(n))
        return [found[n] for n in range(first, last + 1)]

    def request(self, first: int, stop: int, part: int | None = None) -> None:
        """Fetch the blocks of ``[first, stop)`` that are neither cached nor in flight, in
        runs of consecutive blocks, each split into requests of at most ``part`` blocks (the
        largest request by default) that never cross a segment's end (a request lands whole
        segments, written to the disk cache at once), side by side. Those on disk and not
        in memory are loaded from there, a segment's at a time."""
        most = max(1, min(part or self.max_request // self.block, self.max_request // self.block))
        self._load_from_disk(first, stop)
        run_start = -1
        last = min(stop, self.count) - 1
        for n in range(max(0, first), last + 1):
            wanted = n not in self._pending and not self._have(n)
            if wanted and run_start < 0:
                run_start = n
            if run_start < 0:
                continue
            ends = (n + 1) % self.segment == 0 or n == last or n - run_start + 1 >= most
            if not wanted:
                self._start(run_start, n)
                run_start = -1
            elif ends:
                self._start(run_start, n + 1)
                run_start = -1

    def _load_from_disk(self, first: int, stop: int) -> None:
        """Start loading the blocks of ``[first, stop)`` that only the disk cache holds, in
        runs within one segment (one worker-thread call each)."""
        if self.cache.disk is None:
            return
        run: list[int] = []
        for n in range(max(0, first), min(stop, self.count) + 1):
            on_disk = (
                n < min(stop, self.count)
                and n not in self._pending
                and not self.cache.contains(self.key(n))
                and self.cache.on_disk(self.segment_key(n), n % self.segment)
            )
            if run and (not on_disk or n % self.segment == 0):
                flights = {m: Flight[Block]() for m in run}
                self._pending.update(flights)
                self._nursery.start_soon(self._load_run, run[0], run[-1] + 1, flights)
                run = []
            if on_disk:
                run.append(n)

    # -- fetching ------------------------------------------------------------------------------

    def _start(self, first: int, stop: int) -> None:
        flights = {n: Flight[Block]() for n in range(first, stop)}
        self._pending.update(flights)
        self._nursery.start_soon(self._land, first, stop, flights)

    def _buffers(self, first: int, stop: int) -> list[memoryview]:
        """Buffers for blocks ``[first, stop)``: views of pooled page-aligned maps (direct
        I/O can write them to the disk cache), one map per segment the run fills whole (its
        blocks lie in a row: a read across two of them is a view, not a copy) and one per
        block of the rest; else new ones."""
        pool = self.cache.memory.pool
        if pool is None or pool.size != self.block:
            return [memoryview(bytearray(e - s)) for s, e in map(self._bounds, range(first, stop))]
        views: list[memoryview] = []
        n = first
        while n < stop:
            run = self.segment - n % self.segment
            if pool.runs == run == self.segment and n + run <= stop:
                shared = memoryview(pool.take(run))
                for i in range(n, n + run):
                    low, high = self._bounds(i)
                    at = (i - n) * self.block
                    views.append(shared[at : at + high - low])
                n += run
            else:
                low, high = self._bounds(n)
                views.append(memoryview(pool.take())[: high - low])
                n += 1
        return views

    async def _land(self, first: int, stop: int, flights: dict[int, Flight[Block]]) -> None:
        """Fetch blocks ``[first, stop)`` in one request, each received into a buffer of its
        own (a block in the memory tier holds its own memory, never its neighbours'), hand
        each to its waiters, then write the segments it completed to the disk cache (off the
        readers' path; a block fetched alone, a reader's at random, goes as soon as it came).
        Never raises."""
        error: Exception | None = None
        landed: dict[int, Buffer] = {}
        try:
            views = self._buffers(first, stop)
            await self._fetch(self.offset(first), views)
            for n, data in zip(range(first, stop), views, strict=True):
                crc = zlib_ng.crc32(data)
                self._admit(n, crc)
                self.cache.memory.put(self.key(n), data, ahead=True)  # until it is read
                flights[n].land(Block(self.offset(n), data, crc))
            landed = dict(zip(range(first, stop), views, strict=True))
        except Exception as exc:  # handed to every waiter below
            error = exc
        finally:
            for n, flight in flights.items():
                if self._pending.get(n) is flight:
                    del self._pending[n]
                if error is not None:
                    flight.fail(error)
                flight.abandon()  # cancelled: its waiters ask again
        if landed and self.cache.disk is not None:
            for segment in range(first // self.segment, (stop - 1) // self.segment + 1):
                await self._write_segment(segment, landed, alone=stop - first == 1)

    async def _write_segment(self, segment: int, landed: dict[int, Buffer], alone: bool) -> None:
        """Write segment ``segment`` to the disk cache, as one file, if all its blocks are at
        hand (just ``landed``, still in memory, or in the segment file already, which keeps
        them), or if ``alone`` (a block fetched by itself, a random reader's: whichever are)."""
        first = segment * self.segment
        count = min(self.segment, self.count - first)
        segment_key = self.segment_key(first)
        parts: list[tuple[int, CacheKey, Buffer, int]] = []
        for index in range(count):
            key = self.key(first + index)
            data = landed.get(first + index) or self.cache.memory.peek(key)
            data = data or self.cache.writing(key)
            if data is None:
                if not alone and not self.cache.on_disk(segment_key, index):
                    return  # not complete yet: written when its last block comes
                continue
            parts.append((index, key, data, self._crc_of(first + index, data)))
        await self.cache.put_segment(segment_key, self.block, count, parts)

    # -- integrity -----------------------------------------------------------------------------

    def _crc_of(self, number: int, data: Buffer) -> int:
        """Block ``number``'s CRC-32, as noted when it arrived (or now, for a block another
        instance of this archive left in the memory cache)."""
        if self._seen is not None and self._seen[number]:
            return self._crcs[number]
        crc = zlib_ng.crc32(data)
        self._admit(number, crc)
        return crc

    def _admit(self, number: int, crc: int) -> None:
        """Note block ``number``'s CRC-32; ``StaleError`` if the block was seen before with
        other bytes (storage changed the archive without changing its ETag): a block read
        again after it left the caches is never bytes other than those verified before."""
        if not 0 <= number < self.count:
            raise ArchiveError(f"block {number} outside the archive")
        if self._seen is None:
            self._seen = bytearray(self.count)
            self._crcs = array("I", bytes(4 * self.count))
        if self._seen[number]:
            if self._crcs[number] != crc:
                raise StaleError(
                    f"{self.object_id}: the archive's bytes changed without a new ETag"
                )
        else:
            self._seen[number] = 1
            self._crcs[number] = crc


class Readahead:
    """One sequential reader's window over ``[low, high)`` of the archive (a member's data):
    it starts at ``start`` bytes and doubles, up to ``most()`` (the reader's share of the
    read-ahead budget), while reads follow on (within ``slack`` of where the last one ended:
    the kernel's read-ahead reorders reads a little); a read elsewhere starts it over. It
    remembers how far it has asked for, and asks only for the blocks beyond, a part at a
    time (``part`` bytes: several in flight on a capped link)."""

    def __init__(
        self,
        blocks: BlockFetcher,
        low: int,
        high: int,
        *,
        start: int,
        most: Callable[[], int],
        part: int,
        slack: int,
    ) -> None:
        self.blocks = blocks
        self.low, self.high = low, high
        self.start_window, self.most, self.part, self.slack = start, most, part, slack
        self.window = 0
        self.next = -1  # where the last read ended (archive offset)
        self.until = 0  # archive bytes asked for up to here

    def advise(self, low: int, high: int) -> None:
        """A read of archive bytes ``[low, high)`` came: keep its window ahead asked for."""
        blocks = self.blocks
        if self.next >= 0 and self.next - self.slack <= low <= self.next + self.slack:
            self.window = min(self.most(), max(self.start_window, self.window * 2))
        else:
            self.release()  # what it fetched ahead for the old place
            self.window = 0
            self.until = high
        self.next = max(self.next, high) if self.window else high
        if not self.window:
            return
        target = min(self.high, high + self.window)
        span = blocks.segment * blocks.block
        if target < self.high and self.window >= 2 * span:
            # whole segments: a request fills one, not halves
            target = blocks.start + (target - blocks.start) // span * span
        begin = max(self.until, high)
        part = min(self.window, self.part)
        if target - begin < part and target < self.high:
            return  # less than a part is missing: ask when there is a whole one (fewer hops)
        blocks.request(blocks.number(begin), blocks.stop(target), max(1, part // blocks.block))
        self.until = max(self.until, target)

    def release(self) -> None:
        """The reader is gone, or reads elsewhere now: the blocks fetched ahead of it that it
        has not read are no longer kept for it (the memory tier lets them go first)."""
        blocks = self.blocks
        if self.next < 0 or self.until <= self.next:
            return
        memory = blocks.cache.memory
        for n in range(blocks.number(self.next), blocks.stop(self.until)):
            memory.unwanted(blocks.key(n))
