"""``RemoteArchive``: a ZIP archive behind a signed URL, listed and read with range requests.

Owns: opening (the suffix GET, at most one more for the central directory), the parsed index
and tree, where each member's data starts, the verifiers, block grids and deflate
checkpoints of its large members, and the connection pool its fetches share. The fetching
itself is done by its parts: ``BlockFetcher`` (the blocks of one large member, with
read-ahead: ``blocks``) and ``SmallMembers`` (whole extents of small members, neighbours
fetched together: ``batches``), both through the memory/disk caches.

Fetch rules:

* a large member's data is read in blocks of ``tuning.block`` bytes laid from its first byte
  (its own grid: a read aligned in the member is one block, never a copy); its local header,
  read first, is a small extent of its own; missing consecutive blocks are fetched in one GET
  (at most ``tuning.max_request``); different runs go in parallel under the pool's limiter
  (sizes: ``taskfs.archive.tuning``);
* a block or member being fetched is fetched once: later readers wait for that fetch (its
  ``Flight``: the bytes it landed, not the cache's, which may have evicted them since);
* a small member costs exactly one GET the first time (its local header and data, with a small
  margin for the local extra field, and a few neighbours in the same request) and none after;
  once members are read in archive order, up to ``tuning.batch_max`` bytes of the following
  members are kept fetched ahead, in parallel requests of at most ``tuning.batch_part`` bytes;
* read-ahead (asked for by member readers) prefetches blocks in the background.

Must stay true: bytes come only from this archive's ETag (cache keys carry it); a block read
again (from storage or a disk cache another mount filled) is the block seen the first time,
by its CRC-32, or ``StaleError`` (storage that changes an archive without a new ETag cannot
hand out bytes other than those verified); no member's data is read outside the data area
(before the central directory); background fetches never raise into a reader (a failed
prefetch is simply fetched again on demand). A large member's verifier outlives its readers
(the most recent ``MAX_VERIFIERS``), so what separate opens read adds up to a verdict.
"""

from __future__ import annotations

import logging
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import BinaryIO

import trio

from taskfs.archive.batches import SmallMembers
from taskfs.archive.blocks import BlockFetcher, Readahead, gather
from taskfs.archive.cache import Buffer, CacheKey, Tiered
from taskfs.archive.member import (
    CheckpointBudget,
    DeflateIndex,
    MemberReader,
    ReadBudget,
    open_member,
)
from taskfs.archive.rangeio import RangeSource
from taskfs.archive.tuning import DEFAULT, Tuning
from taskfs.archive.verify import Verifier
from taskfs.archive.zipindex import (
    LOCAL,
    TAIL_SIZE,
    Directory,
    DirectoryParser,
    DirNode,
    Entry,
    Index,
    NeedBytes,
    build_tree,
    clean_path,
    locate_directory,
    parse_directory,
    parse_local_header,
)
from taskfs.errors import ArchiveError
from taskfs.flight import SingleFlight

log = logging.getLogger(__name__)

# Bytes allowed beyond the central directory's extra length for the local header's own.
LOCAL_MARGIN = 256
# Parse the central directory in a thread above this size.
THREAD_PARSE = 256 << 10
# Fetches up to this size go through the API-style client (see ``RemoteArchive._fetch``).
SMALL_GET = 256 << 10
# A central directory more than this beyond the tail goes through a file, read back in pieces
# of ``SPILL_PIECE`` (its bytes and its index are never in memory together).
SPILL = 4 << 20
SPILL_PIECE = 1 << 20
# Deflate members of one archive whose checkpoints are kept (their number is budgeted).
MAX_DEFLATE_INDEXES = 8
# Verifiers of large members kept per archive (what was read of a member not yet verified).
MAX_VERIFIERS = 1024


class RemoteArchive:
    """One archive: its index and tree, and the fetching of its bytes."""

    def __init__(
        self,
        *,
        source: RangeSource,
        cache: Tiered,
        object_id: str,
        entries: Index,
        data_end: int,
        tree: DirNode,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
        budget: ReadBudget | None = None,
        checkpoints: CheckpointBudget | None = None,
        tuning: Tuning = DEFAULT,
    ) -> None:
        assert source.size is not None
        self.tuning = tuning
        self.source = source
        self.cache = cache
        self.object_id = object_id
        self.etag = source.etag or f"size:{source.size}"
        self.strong_etag = source.etag is not None
        self.size = source.size
        self.entries = entries
        self.data_end = data_end  # where the central directory starts
        self.tree = tree
        self._nursery = nursery
        self._limiter = limiter
        self._starts: dict[int, int] = {}
        self._heads: SingleFlight[int, int] = SingleFlight()
        # The block grid of each large member read so far (its CRC-32s are kept with it).
        self._grids: dict[int, BlockFetcher] = {}
        self._indexes: OrderedDict[int, DeflateIndex] = OrderedDict()
        self.small = SmallMembers(
            entries=entries,
            cache=cache,
            object_id=object_id,
            etag=self.etag,
            fetch=self._fetch,
            extent=self._extent,
            nursery=nursery,
            tuning=tuning,
        )
        # Memory of the readers' windows and of deflate checkpoints, shared with the mount.
        self.budget = budget or ReadBudget()
        self._checkpoints = checkpoints or CheckpointBudget()
        # Verification of large members: one verifier per member with open readers, and the
        # verdicts of members no longer open.
        self._verifiers: OrderedDict[int, Verifier] = OrderedDict()
        self._readers: dict[int, int] = {}
        self._verified: set[int] = set()
        self._corrupt: set[int] = set()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        source: RangeSource,
        cache: Tiered,
        object_id: str,
        *,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter | None = None,
        prefix: str = "artifacts/",
        budget: ReadBudget | None = None,
        checkpoints: CheckpointBudget | None = None,
        tuning: Tuning = DEFAULT,
    ) -> RemoteArchive:
        """Open: one suffix GET, one more when the central directory is larger than the tail."""
        limiter = limiter or trio.CapacityLimiter(8)
        async with limiter:
            tail: bytes | bytearray = await source.open_tail(TAIL_SIZE)
        assert source.size is not None
        size = source.size
        tail_start = size - len(tail)
        location = locate_directory(tail, tail_start, size)
        while isinstance(location, NeedBytes):  # a zip64 end record before the tail (small)
            async with limiter:
                tail = await source.fetch(location.start, tail_start) + tail
            tail_start = location.start
            location = locate_directory(tail, tail_start, size)
        end = location.start + location.size
        head = memoryview(tail)[max(0, location.start - tail_start) : end - tail_start]
        if location.start < tail_start - SPILL:
            # A large directory (a million members: 80 MB): its bytes go to an unlinked file
            # as they arrive (one GET, as before) and are parsed from there a piece at a time
            # in a worker thread, so that they are never in memory at once beside the index
            # they become. The file's pages are the kernel's to drop, not the mount's RSS.
            with tempfile.TemporaryFile() as spill:
                async with limiter:
                    await source.fetch_to(location.start, tail_start, spill)
                entries = await trio.to_thread.run_sync(_parse_spilled, spill, head, location)
        else:
            data: bytes | bytearray | memoryview = head
            if location.start < tail_start:  # the rest of a directory larger than the tail
                async with limiter:
                    data = await source.fetch(location.start, tail_start) + head
            if location.size > THREAD_PARSE:
                entries = await trio.to_thread.run_sync(parse_directory, data, location)
            else:
                entries = parse_directory(data, location)
            del data
        head.release()
        del tail
        if location.size > THREAD_PARSE:
            tree = await trio.to_thread.run_sync(build_tree, entries, prefix)
        else:
            tree = build_tree(entries, prefix)
        log.debug("opened %s: %d entries, %d bytes", object_id, len(entries), size)
        return cls(
            source=source,
            cache=cache,
            object_id=object_id,
            entries=entries,
            data_end=location.start,
            tree=tree,
            nursery=nursery,
            limiter=limiter,
            budget=budget,
            checkpoints=checkpoints,
            tuning=tuning,
        )

    # -- listing -------------------------------------------------------------------------------

    def find(self, path: Sequence[str]) -> DirNode | Entry | None:
        """The node at ``path`` (components under the shown subtree), or ``None``."""
        node: DirNode | int = self.tree
        for part in path:
            if not isinstance(node, DirNode):
                return None
            child = node.get(part)
            if child is None:
                return None
            node = child
        return node if isinstance(node, DirNode) else self.entries[node]

    def lookup(self, relative: str) -> DirNode | Entry | None:
        parts = clean_path(relative)
        return (
            self.tree
            if parts is None and relative in ("", ".")
            else (self.find(parts) if parts is not None else None)
        )

    # -- reading -------------------------------------------------------------------------------

    def open_member(self, entry: Entry) -> MemberReader:
        return open_member(self, entry)

    def spawn(self, fn: Callable[[int], Awaitable[None]], arg: int) -> None:
        """Run ``fn(arg)`` in the archive's nursery (work ahead of a reader)."""
        self._nursery.start_soon(fn, arg)

    def verifier(self, entry: Entry) -> Verifier:
        """The verifier of a large member, shared by its open readers and kept after they
        close (the most recent ``MAX_VERIFIERS``): what separate opens read adds up, so a
        loop of ``dd`` runs over a corrupt member ends in EIO like one ``cat``."""
        verifier = self._verifiers.get(entry.index)
        if verifier is None:
            verifier = Verifier(entry.name, entry.size, entry.crc)
            if entry.index in self._verified:
                verifier.good = True
            elif entry.index in self._corrupt:
                verifier.good = False
            self._verifiers[entry.index] = verifier
            self._trim_verifiers()
        else:
            self._verifiers.move_to_end(entry.index)
        self._readers[entry.index] = self._readers.get(entry.index, 0) + 1
        return verifier

    def _trim_verifiers(self) -> None:
        """Let go of the least recently used verifiers nobody reads through."""
        for index in list(self._verifiers):
            if len(self._verifiers) <= MAX_VERIFIERS:
                return
            if index not in self._readers:
                del self._verifiers[index]

    def release(self, entry: Entry) -> bool:
        """A reader closed. True unless it was the last one and the member is unverified:
        then nothing vouches for the bytes handed out (the caller drops cached copies)."""
        verifier = self._verifiers.get(entry.index)
        readers = self._readers.get(entry.index, 0)
        if verifier is None or readers == 0:
            return True
        if readers > 1:
            self._readers[entry.index] = readers - 1
            return True
        del self._readers[entry.index]
        if verifier.good is not None:
            # A verdict is a number in a set; the verifier's stretches are not needed now.
            (self._verified if verifier.good else self._corrupt).add(entry.index)
            del self._verifiers[entry.index]
        return verifier.good is True

    def deflate_index(self, entry: Entry) -> DeflateIndex:
        index = self._indexes.get(entry.index)
        if index is None:
            index = DeflateIndex.for_size(entry.size, self._checkpoints, self.tuning)
            self._indexes[entry.index] = index
            while len(self._indexes) > MAX_DEFLATE_INDEXES:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(entry.index)
        return index

    def _check_bounds(self, entry: Entry) -> None:
        if entry.header_offset + LOCAL.size + entry.compressed_size > self.data_end:
            raise ArchiveError(f"{entry.name}: member data lies outside the archive's data area")

    def _head_end(self, entry: Entry) -> int:
        """Where the member's local header ends at most (the central directory's name and
        extra lengths, with a margin for a longer local extra field)."""
        return entry.header_offset + LOCAL.size + entry.name_len + entry.extra_len + LOCAL_MARGIN

    def _extent(self, entry: Entry) -> tuple[int, int]:
        """The archive bytes that hold the member's local header and data (with a margin)."""
        return entry.header_offset, min(
            self.data_end, self._head_end(entry) + entry.compressed_size
        )

    async def data_start(self, entry: Entry) -> int:
        """Where the member's data starts: after its local header, read once (one small GET,
        then from the caches)."""
        start = self._starts.get(entry.index)
        if start is None:
            start = await self._heads.run(entry.index, lambda: self._read_head(entry))
        return start

    async def _read_head(self, entry: Entry) -> int:
        self._check_bounds(entry)
        head_end = min(self.data_end, self._head_end(entry))
        key = CacheKey(self.object_id, self.etag, "h", entry.header_offset)
        head = await self.cache.get(key)
        if head is None or len(head) != head_end - entry.header_offset:
            head = await self._fetch(entry.header_offset, head_end)
            await self.cache.put(key, head)
        start = entry.header_offset + parse_local_header(head, entry)
        if start + entry.compressed_size > self.data_end:
            raise ArchiveError(f"{entry.name}: member data runs into the central directory")
        self._starts[entry.index] = start
        return start

    async def grid(self, entry: Entry) -> BlockFetcher:
        """The blocks of a large member's data, laid from its first byte: the kernel's reads,
        aligned in the file, are then each a view of one block (with the archive's blocks,
        nearly every read would straddle two and be copied). A grid, and the CRC-32s of its
        blocks, lasts as long as the archive."""
        grid = self._grids.get(entry.index)
        if grid is None:
            start = await self.data_start(entry)
            grid = self._grids.get(entry.index)
            if grid is None:
                grid = self._grids[entry.index] = BlockFetcher(
                    fetch=self._fetch_into,
                    cache=self.cache,
                    object_id=self.object_id,
                    etag=self.etag,
                    start=start,
                    end=start + entry.compressed_size,
                    block=self.tuning.block,
                    max_request=self.tuning.max_request,
                    nursery=self._nursery,
                    segment=self.tuning.segment,
                )
        return grid

    async def member_data(self, entry: Entry) -> bytes:
        """The compressed data of a (small) member; one GET on a miss, none on a hit."""
        self._check_bounds(entry)
        extent = await self.small.extent(entry)
        header = parse_local_header(extent, entry)
        data = bytes(extent[header : header + entry.compressed_size])
        if len(data) < entry.compressed_size:
            # The local extra field was longer than the margin: fetch the rest.
            start = entry.header_offset + header + len(data)
            end = entry.header_offset + header + entry.compressed_size
            if end > self.data_end:
                raise ArchiveError(f"{entry.name}: member data runs into the central directory")
            data += await self._fetch(start, end)
        self._starts.setdefault(entry.index, entry.header_offset + header)
        return data

    def decoded(self, entry: Entry) -> bytes | None:
        """A small member already decompressed and verified, if it was decoded ahead."""
        return self.small.decoded(entry)

    def expect_sequential(self) -> None:
        """A reader will go through the members in archive order (a download)."""
        self.small.expect_sequential()

    # -- blocks --------------------------------------------------------------------------------

    def gather(self, parts: Sequence[memoryview]) -> Buffer:
        """``parts`` as one buffer: the part itself, or a copy into a buffer of the memory
        tier's pool."""
        return gather(parts, self.cache.memory.pool)

    def readahead(self, grid: BlockFetcher) -> Readahead:
        """A sequential reader's window over ``grid`` (a member's data), its most the
        reader's share of the read-ahead budget (and ``tuning.readahead_max``), and never
        more than half the memory tier (blocks fetched further ahead would be let go before
        they are read)."""
        room = min(self.cache.memory.limit // 2, self.tuning.readahead_max)

        def most() -> int:
            return min(self.budget.prefetch(), room)

        return Readahead(
            grid,
            grid.start,
            grid.end,
            start=self.tuning.readahead_start,
            most=most,
            part=self.tuning.readahead_part,
            slack=self.tuning.readahead_slack,
        )

    async def _fetch_into(self, start: int, views: Sequence[memoryview]) -> None:
        async with self._limiter:
            await self.source.fetch_into(start, views)

    async def _fetch(self, start: int, end: int) -> bytearray:
        """Archive bytes ``[start, end)`` in a new buffer. Up to ``SMALL_GET`` bytes (a small
        member, a local header) go on the connection the open used (httpx's pool): the bulk
        transport's own connection would cost a TCP handshake, a round trip, on the first
        read after an open. Larger ones are received straight into the buffer."""
        if end - start <= SMALL_GET:
            async with self._limiter:
                return bytearray(await self.source.fetch(start, end))
        buffer = bytearray(end - start)
        async with self._limiter:
            await self.source.fetch_into(start, [memoryview(buffer)])
        return buffer


def _parse_spilled(spill: BinaryIO, head: memoryview, location: Directory) -> Index:
    """The central directory from ``spill`` (its start, fetched) and ``head`` (its end, from
    the tail already in memory), parsed ``SPILL_PIECE`` bytes at a time."""
    parser = DirectoryParser(location)
    spill.seek(0)
    while piece := spill.read(SPILL_PIECE):
        parser.feed(piece)
    parser.feed(head)
    return parser.finish()
