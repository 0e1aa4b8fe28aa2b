"""Small members of one archive: fetched whole, with their neighbours, as they are read.

Owns: the extents of small members (local header and data) and their fetching in batches:
a member read alone takes a few neighbours along in the same request; once members are read
in archive order (a streak), up to ``Tuning.batch_max`` bytes of the following ones are kept
fetched ahead, in parallel requests of at most ``Tuning.batch_part``; members fetched in a
batch are decompressed and verified ahead of their readers, in a worker thread. The archive
order of the members (a table only where the directory is not in it already).

Must stay true: an extent being fetched is fetched once (later readers wait for its
``Flight``: the bytes it landed, not the cache's); a small member costs exactly one GET the
first time and none after; background fetches never raise into a reader.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import trio

from taskfs.archive.cache import Buffer, CacheKey, Tiered
from taskfs.archive.member import decompress_all
from taskfs.archive.tuning import Tuning
from taskfs.archive.zipindex import Entry, Index, parse_local_header
from taskfs.errors import TaskfsError
from taskfs.flight import Abandoned, Flight

# Decoding ahead: members up to this size, and at most this much kept decoded.
PREDECODE_MAX = 1 << 20
DECODED_MAX = 8 << 20


class SmallMembers:
    """The small members of one archive (see the module docstring)."""

    def __init__(
        self,
        *,
        entries: Index,
        cache: Tiered,
        object_id: str,
        etag: str,
        fetch: Callable[[int, int], Awaitable[bytearray]],
        extent: Callable[[Entry], tuple[int, int]],
        nursery: trio.Nursery,
        tuning: Tuning,
    ) -> None:
        self.entries = entries
        self.cache = cache
        self.object_id = object_id
        self.etag = etag
        self._fetch = fetch
        self._extent = extent  # the archive bytes of a member's header and data
        self._nursery = nursery
        self.tuning = tuning
        self._pending: dict[CacheKey, Flight[Buffer]] = {}
        # Members in archive order, for batching neighbours (built on first use).
        self._order_cache: tuple[Sequence[int], Sequence[int]] | None = None
        self._last_rank = -2
        self._streak = 0
        self._frontier = -1  # highest rank fetched or being fetched by a batch
        # Small members decoded ahead of their readers (header offset -> verified bytes).
        self._decoded: OrderedDict[int, bytes] = OrderedDict()
        self._decoded_bytes = 0
        self._decode_slots = trio.CapacityLimiter(1)

    @property
    def _order(self) -> Sequence[int]:
        """Record numbers in archive order."""
        return self._orders()[0]

    @property
    def _rank(self) -> Sequence[int]:
        """The position of each record in archive order."""
        return self._orders()[1]

    def _orders(self) -> tuple[Sequence[int], Sequence[int]]:
        """Built on first use. A directory in archive order (what zip tools write) needs no
        table: the order is the records' own (no memory; a sort of a million records would
        cost about 70 MB of Python integers on the way, and 8 bytes a record kept)."""
        if self._order_cache is None:
            offsets = self.entries.offsets
            count = len(offsets)
            if all(offsets[i] <= offsets[i + 1] for i in range(count - 1)):
                identity = range(count)
                self._order_cache = (identity, identity)
            else:
                order = array("i", sorted(range(count), key=offsets.__getitem__))
                rank = array("i", bytes(order.itemsize * count))
                for position, index in enumerate(order):
                    rank[index] = position
                self._order_cache = (order, rank)
        return self._order_cache

    def _key(self, kind: str, number: int) -> CacheKey:
        return CacheKey(self.object_id, self.etag, kind, number)

    async def _land(
        self,
        start: int,
        end: int,
        parts: list[tuple[CacheKey, int, int]],
        flights: dict[CacheKey, Flight[Buffer]],
        members: tuple[Entry, ...] = (),
    ) -> None:
        """Fetch ``[start, end)``, put each part in memory and hand it to its waiters, then
        decode small ``members`` ahead of their readers (in a worker thread) and write to disk.

        Runs in the archive's nursery: it never raises; waiters get the error.
        """
        data = bytearray()
        error: Exception | None = None
        landed: list[tuple[CacheKey, Buffer, int | None]] = []
        try:
            data = await self._fetch(start, end)
            view = memoryview(data)
            for key, p_start, p_end in parts:
                # A copy of the member's extent: the batch's buffer can go.
                landed.append((key, bytes(view[p_start - start : p_end - start]), None))
            for key, part, _ in landed:
                self.cache.memory.put(key, part)
                if key in flights:
                    flights[key].land(part)
        except Exception as exc:  # handed to every waiter below
            error = exc
        finally:
            for key, flight in flights.items():
                self._pending.pop(key, None)
                if error is not None:
                    flight.fail(error)
                flight.abandon()  # cancelled: its waiters ask again
        if error is None:
            if members:
                await self._predecode(members, data, start)
            del data  # blocks keep their request's buffer alive; the rest goes now
            await self.cache.put_disk_many(list(landed))

    async def _predecode(
        self, members: tuple[Entry, ...], data: bytes | bytearray, start: int
    ) -> None:
        """Decompress and verify fetched small members before anyone asks (another core)."""

        def work() -> list[tuple[int, bytes]]:
            decoded = []
            view = memoryview(data)
            for entry in members:
                if entry.header_offset in self._decoded or entry.size > PREDECODE_MAX:
                    continue
                at = entry.header_offset - start
                try:
                    header = parse_local_header(view[at:], entry)
                    raw = bytes(view[at + header : at + header + entry.compressed_size])
                    if len(raw) == entry.compressed_size:
                        decoded.append((entry.header_offset, decompress_all(entry, raw)))
                except TaskfsError:
                    continue  # its reader will meet the same error and report it
            return decoded

        for offset, body in await trio.to_thread.run_sync(work, limiter=self._decode_slots):
            self._decoded[offset] = body
            self._decoded_bytes += len(body)
        while self._decoded_bytes > DECODED_MAX:
            _, old = self._decoded.popitem(last=False)
            self._decoded_bytes -= len(old)

    def decoded(self, entry: Entry) -> bytes | None:
        """A small member already decompressed and verified, if it was decoded ahead."""
        body = self._decoded.pop(entry.header_offset, None) if self._decoded else None
        if body is not None:
            self._decoded_bytes -= len(body)
            rank = self._rank[entry.index]
            self._note_rank(rank)  # a reader on a streak: keep fetching ahead of it
            self._maybe_prefetch_batch(rank)
        return body

    def _start(
        self,
        start: int,
        end: int,
        parts: list[tuple[CacheKey, int, int]],
        members: tuple[Entry, ...] = (),
    ) -> None:
        """Fetch ``[start, end)`` in the background for the parts not already in flight."""
        mine: dict[CacheKey, Flight[Buffer]] = {}
        for key, _, _ in parts:
            if key not in self._pending:
                mine[key] = self._pending[key] = Flight()
        if mine:
            self._nursery.start_soon(self._land, start, end, parts, mine, members)

    async def extent(self, entry: Entry) -> Buffer:
        """The member's local header and data (with a margin): from the caches, its fetch in
        flight, or a new batch of it and its neighbours."""
        key = self._key("m", entry.header_offset)
        rank = self._rank[entry.index]
        self._note_rank(rank)
        while True:
            data = await self.cache.get(key)
            if data is not None:
                self._maybe_prefetch_batch(rank)
                return data
            flight = self._pending.get(key)
            if flight is None:
                # Even a lone miss takes a few neighbours along (cheap: same request).
                self._start_batch(
                    rank, min(self.tuning.batch_start << self._streak, self.tuning.batch_max)
                )
                flight = self._pending[key]
            try:
                data = await flight.wait()
            except Abandoned:
                continue  # its fetch was cancelled: ask again
            self._maybe_prefetch_batch(rank)
            return data

    def expect_sequential(self) -> None:
        """A reader will go through members in archive order (a download): batches start at
        their largest instead of growing from ``tuning.batch_start``."""
        self._streak = 16

    def _note_rank(self, rank: int) -> None:
        if self._last_rank == -2 and self._streak:
            pass  # the first read of a reader announced by ``expect_sequential``
        elif 0 < rank - self._last_rank <= 2:
            self._streak = min(self._streak + 1, 16)
        elif rank != self._last_rank:
            self._streak = 0
        self._last_rank = rank

    def _batch(self, rank: int, budget: int) -> list[Entry]:
        """The member at ``rank`` plus following small members within ``budget`` extra bytes."""
        first = self.entries[self._order[rank]]
        members = [first]
        start, end = self._extent(first)
        limit = end + budget
        for next_rank in range(rank + 1, len(self._order)):
            entry = self.entries[self._order[next_rank]]
            e_start, e_end = self._extent(entry)
            if (
                e_end > limit
                or e_start < start
                or entry.compressed_size > self.tuning.batch_max // 4
                or self._key("m", entry.header_offset) in self._pending
            ):
                break
            members.append(entry)
            end = max(end, e_end)
        return members

    def _start_batch(self, rank: int, budget: int) -> None:
        """Fetch a batch of neighbours, split into requests of at most ``tuning.batch_part``
        that go in parallel (one connection is capped; several are not)."""
        members = self._batch(rank, budget)
        self._frontier = max(self._frontier, self._rank[members[-1].index])
        group: list[tuple[CacheKey, int, int]] = []
        entries: list[Entry] = []
        for member in members:
            e_start, e_end = self._extent(member)
            if group and e_end - group[0][1] > self.tuning.batch_part:
                self._start(group[0][1], max(e for _, _, e in group), group, tuple(entries))
                group, entries = [], []
            group.append((self._key("m", member.header_offset), e_start, e_end))
            entries.append(member)
        self._start(group[0][1], max(e for _, _, e in group), group, tuple(entries))

    def _maybe_prefetch_batch(self, rank: int) -> None:
        """Keep at least half of ``tuning.batch_max`` fetched ahead of a reader on a streak."""
        if self._streak < 2 or self._frontier + 1 >= len(self._order):
            return
        current = self._extent(self.entries[self._order[rank]])[1]
        frontier = self._extent(self.entries[self._order[self._frontier]])[1]
        if frontier - current >= self.tuning.batch_max // 2:
            return
        following = self._frontier + 1
        entry = self.entries[self._order[following]]
        if entry.compressed_size > self.tuning.batch_max // 4:
            return
        key = self._key("m", entry.header_offset)
        if key in self._pending or self.cache.contains(key):
            self._frontier = following
            return
        self._start_batch(following, self.tuning.batch_max - max(0, frontier - current))
