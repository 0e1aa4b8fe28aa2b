"""Reading one archive member: stored, deflate, bzip2 and lzma; verified in any read order.

Owns: turning ``read(offset, size)`` of a member into reads of the archive's bytes, one
bounded cursor per handle over pluggable decoders, the shared deflate checkpoints that make
random access cheap, the memory those take, and CRC-32 verification.

How each kind is read:

* small members (compressed and uncompressed size within ``Tuning.small_compressed`` and
  ``small_size``) are fetched whole in one request, decompressed and CRC-checked before a
  single byte is returned;
* stored members map reads onto the archive's blocks; each block of the member goes into its
  verifier the first time any read touches it, with the CRC-32 the archive took of the block
  when it arrived (one pass over the bytes, not two);
* deflate, bzip2 and lzma members stream through one ``CursorMember`` per handle: a decoder,
  the compressed bytes not yet decoded, and a window of decoded output that never holds more
  than ``ReadBudget.behind()`` behind the cursor (a read far ahead discards what it skips).
  Deflate keeps checkpoints (``decompressobj().copy()``) spread over the member, so a random
  read inflates from the nearest one; checkpoints of all members share one
  ``CheckpointBudget`` and are thinned when it is full. bzip2 and lzma start over for a
  backward seek.

Verification: every decoded (or, for stored members, fetched) byte is fed to the member's
``Verifier`` (shared by all its handles, and kept by the archive after they close) before it
is returned; the verifier checks the
CRC-32 the moment the bytes it has seen cover the member, whatever the order in which they
came. So no handle ever returns the last missing bytes of a corrupt member: the read that
completes it fails (``ChecksumError``, EIO), as does every read after. Bytes of a corrupt
member that a reader received before the member was complete cannot be taken back; the
filesystem drops the kernel's cached pages of a member that was not verified when its last
handle closed, so they are read (and checked) again.

Must stay true: no read returns bytes past the member's declared size; a member whose data
does not decompress to exactly its declared size is an ``ArchiveError``.
"""

from __future__ import annotations

import bisect
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import trio
from zlib_ng import zlib_ng

from taskfs.archive.blocks import BlockFetcher, Readahead, block_views
from taskfs.archive.cache import Buffer
from taskfs.archive.codecs import (
    DECODE_ERRORS,
    MAX_DUE,
    SMALL_PIECE,
    Codec,
    CopyableInflater,
    DeflateCodec,
    FastDeflateCodec,
    StreamCodec,
    check_supported,
    decoder,
)
from taskfs.archive.tuning import DEFAULT, Tuning
from taskfs.archive.verify import Verifier
from taskfs.archive.zipindex import DEFLATED, STORED, Entry
from taskfs.errors import ArchiveError, ChecksumError, TaskfsError

# What one checkpoint costs (zlib's state with its 32 KiB window), for the budget.
CHECKPOINT_BYTES = 40 << 10

# -- budgets -----------------------------------------------------------------------------------


class ReadBudget:
    """Memory of the open large-member readers, shared out among them.

    Each cursor decodes at most half its ``share()`` ahead of its last read, in steps of a
    quarter, and keeps ``behind()`` bytes behind it (at least half its share); each reader
    prefetches at most ``prefetch()`` bytes of archive. With many readers open each gets less,
    so their sums stay near ``total`` and ``total_prefetch``.

    Why a reader alone keeps up to ``late`` behind: when the FUSE connection's queue is
    congested (nine reads waiting, which a reader that inflates more slowly than the kernel
    asks reaches), the kernel drops the rest of its asynchronous read-ahead and asks for those
    pages when the reader gets there, after reads further on. Measured on a cold ``cat`` of a
    deflated member: holes of 3 MiB asked for up to 8 MiB behind the last read. A cursor that
    no longer holds such bytes starts over from a checkpoint, or from the member's first byte
    if it had none (the fast inflate leaves none), and carries on with zlib-ng: that doubled
    the CPU of the whole read.

    Each reader's share has a floor (``least``), so past ``total // least`` readers the sum
    would grow with their number: at most ``max_held`` cursors keep their decoder and window;
    the least recently used one beyond that sheds them (a deflate cursor leaves a checkpoint
    where it stood and resumes from it), and past ``fast_readers`` open readers new cursors
    inflate with zlib-ng, whose state can be left that way.
    """

    def __init__(
        self,
        total: int = 32 << 20,
        least: int = 256 << 10,
        most: int = 4 << 20,
        total_prefetch: int = 24 << 20,
        late: int = 12 << 20,
        *,
        max_held: int = 64,
        fast_readers: int = 8,
    ):
        self.total = total
        self.least = least
        self.most = most
        self.total_prefetch = total_prefetch
        self.late = late
        self.max_held = max_held
        self.fast_readers = fast_readers
        self.readers = 0
        self._held: OrderedDict[int, CursorMember] = OrderedDict()

    def used(self, cursor: CursorMember) -> None:
        """``cursor`` holds its decoder and window, and was just read: others may shed."""
        held = self._held
        held[id(cursor)] = cursor
        held.move_to_end(id(cursor))
        while len(held) > self.max_held:
            victim = next((key for key, c in held.items() if c is not cursor and c.shed()), None)
            if victim is None:
                return  # all busy, or not resumable (bzip2, lzma, ISA-L): they keep theirs
            del held[victim]

    def forget(self, cursor: CursorMember) -> None:
        self._held.pop(id(cursor), None)

    def share(self) -> int:
        return max(self.least, min(self.most, self.total // max(1, self.readers)))

    def behind(self) -> int:
        """What a cursor keeps behind its last read, for reads the kernel sends late: up to
        ``late`` while the readers' sum stays within half of ``total``, else half its share."""
        return max(self.share() // 2, min(self.late, self.total // (2 * max(1, self.readers))))

    def prefetch(self) -> int:
        return max(self.least, self.total_prefetch // max(1, self.readers))


class CheckpointBudget:
    """Deflate checkpoints of every member of every archive, at most ``total_bytes`` of them.

    When full, the least recently used member's checkpoints are thinned (every other one goes,
    and its spacing doubles), so random access degrades gracefully instead of memory growing.
    """

    def __init__(self, total_bytes: int = 24 << 20) -> None:
        self.limit = max(2, total_bytes // CHECKPOINT_BYTES)
        self.count = 0
        # Least recently used first; an index that is garbage collected leaves by itself.
        self._indexes: OrderedDict[int, weakref.ref[DeflateIndex]] = OrderedDict()
        self._counts: dict[int, int] = {}

    def used(self, index: DeflateIndex) -> None:
        key = id(index)
        if key not in self._indexes:
            self._indexes[key] = weakref.ref(index, partial(self._gone, key))
            self._counts[key] = 0
        self._indexes.move_to_end(key)

    def _gone(self, key: int, _ref: object = None) -> None:
        self._indexes.pop(key, None)
        self.count -= self._counts.pop(key, 0)

    def added(self, index: DeflateIndex) -> None:
        self.used(index)
        self._counts[id(index)] += 1
        self.count += 1
        while self.count > self.limit:
            victim = next(
                (
                    v
                    for ref in self._indexes.values()
                    if (v := ref()) is not None and v is not index and v.points
                ),
                index,
            )
            dropped = victim.thin()
            self._counts[id(victim)] -= dropped
            self.count -= dropped
            if dropped == 0:
                return


# -- what a reader needs from its archive ------------------------------------------------------


class ArchiveBytes(Protocol):
    """What a member reader needs from its archive (``RemoteArchive`` provides it)."""

    budget: ReadBudget
    tuning: Tuning

    async def grid(self, entry: Entry) -> BlockFetcher:
        """The blocks of a large member's data (archive offsets, its first byte at a block's
        start), with their CRC-32s."""
        ...

    def readahead(self, grid: BlockFetcher) -> Readahead:
        """A sequential reader's read-ahead over ``grid``."""
        ...

    def gather(self, parts: Sequence[memoryview]) -> Buffer:
        """``parts`` as one buffer (the part itself when there is one)."""
        ...

    async def member_data(self, entry: Entry) -> bytes:
        """The compressed data of a small member, fetched whole (one request at most)."""
        ...

    def deflate_index(self, entry: Entry) -> DeflateIndex:
        """The checkpoints of a deflate member, shared by all its readers."""
        ...

    def decoded(self, entry: Entry) -> bytes | None:
        """A small member already decompressed and verified ahead of time, if any."""
        ...

    def verifier(self, entry: Entry) -> Verifier:
        """The member's verifier, shared by its open readers (each must ``release`` it)."""
        ...

    def release(self, entry: Entry) -> bool:
        """A reader of ``entry`` closed; whether the member is known to be intact."""
        ...

    def spawn(self, fn: Callable[[int], Awaitable[None]], arg: int) -> None:
        """Run ``fn(arg)`` in the background (work ahead of a reader; it must not raise)."""
        ...


class MemberReader(Protocol):
    async def read(self, offset: int, size: int) -> Buffer:
        """Up to ``size`` bytes from ``offset`` (a view of a cached block where they lie in
        one: the FUSE reply is cut from it, no copy)."""
        ...

    def close(self) -> bool:
        """The handle is done; True when every byte it could have returned was verified."""
        ...


def open_member(archive: ArchiveBytes, entry: Entry) -> MemberReader:
    """A reader for ``entry``; ``UnsupportedError`` for methods taskfs cannot read."""
    check_supported(entry)
    if archive.tuning.is_small(entry.compressed_size, entry.size):
        return WholeMember(archive, entry)
    if entry.method == STORED:
        return StoredMember(archive, entry)
    return CursorMember(archive, entry)


def _clamp(entry: Entry, offset: int, size: int) -> int:
    return max(0, min(size, entry.size - offset))


# -- small members -----------------------------------------------------------------------------


def decompress_all(entry: Entry, data: bytes) -> bytes:
    """Decompress a whole member and check its size and CRC (blocking)."""
    if entry.method == STORED:
        out = data[: entry.size] if len(data) >= entry.size else data
    else:
        stream = decoder(entry)
        try:
            out = stream.decompress(data, entry.size + 1)
            if len(out) < entry.size + 1 and not stream.eof and not stream.needs_input:
                out += stream.decompress(b"", entry.size + 1 - len(out))
        except DECODE_ERRORS as exc:
            raise ArchiveError(f"{entry.name}: corrupt compressed data: {exc}") from exc
    if len(out) != entry.size:
        raise ArchiveError(
            f"{entry.name}: data holds {len(out)} bytes, the directory says {entry.size}"
        )
    if zlib_ng.crc32(out) != entry.crc:
        raise ChecksumError(f"{entry.name}: CRC-32 mismatch; the archive is corrupt")
    return out


async def read_whole(archive: ArchiveBytes, entry: Entry) -> bytes:
    """A small member's bytes, decompressed and verified (taken as decoded ahead when it
    was: then without a schedule point, which a loop over thousands of members feels)."""
    check_supported(entry)
    data = archive.decoded(entry)
    if data is None:
        raw = await archive.member_data(entry)
        if len(raw) >= archive.tuning.thread_input and entry.method != STORED:
            data = await trio.to_thread.run_sync(decompress_all, entry, raw)
        else:
            data = decompress_all(entry, raw)
    return data


class WholeMember:
    """A small member: one fetch, decompressed and verified before anything is returned."""

    def __init__(self, archive: ArchiveBytes, entry: Entry) -> None:
        self.archive = archive
        self.entry = entry
        self._data: bytes | None = None
        self._lock = trio.Lock()

    async def _load(self) -> bytes:
        async with self._lock:
            if self._data is None:
                self._data = await read_whole(self.archive, self.entry)
            return self._data

    async def read(self, offset: int, size: int) -> bytes:
        size = _clamp(self.entry, offset, size)
        if size == 0:
            return b""
        data = await self._load()
        return data[offset : offset + size]

    def close(self) -> bool:
        self._data = None
        return True  # nothing was returned before the whole member was checked


# -- large members -----------------------------------------------------------------------------


class StoredMember:
    """A large stored member: reads are archive ranges, verified piece by piece."""

    def __init__(self, archive: ArchiveBytes, entry: Entry) -> None:
        self.archive = archive
        self.entry = entry
        self.verifier = archive.verifier(entry)
        self.budget = archive.budget
        self.budget.readers += 1
        self._ahead: Readahead | None = None
        self._closed = False

    async def read(self, offset: int, size: int) -> Buffer:
        size = _clamp(self.entry, offset, size)
        if size == 0:
            return b""
        self.verifier.check()
        grid = await self.archive.grid(self.entry)
        if self._ahead is None:
            self._ahead = self.archive.readahead(grid)
        start = grid.start
        low, high = start + offset, start + offset + size
        blocks = await grid.read(low, high, self._ahead)
        verifier = self.verifier
        if verifier.good is None:
            end = start + self.entry.size
            for block in blocks:
                b_end = block.start + len(block.data)
                s, e = max(block.start, start), min(b_end, end)
                if verifier.covered(s - start, e - start):
                    continue
                if s == block.start and e == b_end:
                    verifier.feed_crc(s - start, e - s, block.crc, block.data)
                else:
                    verifier.feed(
                        s - start, memoryview(block.data)[s - block.start : e - block.start]
                    )
        verifier.check()
        return self.archive.gather(block_views(blocks, low, high))

    def close(self) -> bool:
        if self._closed:
            return True
        self._closed = True
        self.budget.readers -= 1
        if self._ahead is not None:
            self._ahead.release()
        return self.archive.release(self.entry)


@dataclass
class Checkpoint:
    out_pos: int
    in_pos: int
    state: CopyableInflater


def _out_pos(point: Checkpoint) -> int:
    return point.out_pos


@dataclass
class DeflateIndex:
    """Checkpoints of one deflate member, sorted by output position."""

    spacing: int
    budget: CheckpointBudget = field(default_factory=CheckpointBudget)
    points: list[Checkpoint] = field(default_factory=list)

    @classmethod
    def for_size(
        cls, size: int, budget: CheckpointBudget | None = None, tuning: Tuning = DEFAULT
    ) -> DeflateIndex:
        spacing = max(tuning.checkpoint_spacing, -(-size // tuning.max_checkpoints))
        return cls(spacing, budget or CheckpointBudget())

    def best(self, offset: int) -> Checkpoint | None:
        self.budget.used(self)
        i = bisect.bisect_right(self.points, offset, key=_out_pos)
        return self.points[i - 1] if i else None

    def add(self, out_pos: int, in_pos: int, state: CopyableInflater) -> None:
        """Keep ``state`` (a copy no one else uses) as the checkpoint at ``out_pos``."""
        i = bisect.bisect_left(self.points, out_pos, key=_out_pos)
        if i < len(self.points) and self.points[i].out_pos == out_pos:
            return
        self.points.insert(i, Checkpoint(out_pos, in_pos, state))
        self.budget.added(self)

    def thin(self) -> int:
        """Drop every other checkpoint and double the spacing; how many were dropped."""
        before = len(self.points)
        self.points = self.points[1::2]
        self.spacing *= 2
        return before - len(self.points)

    def due(self, out_pos: int) -> bool:
        """Whether a checkpoint at ``out_pos`` would fill a gap of at least ``spacing``."""
        return out_pos >= self.next_due(out_pos)

    def next_due(self, out_pos: int) -> int:
        """The first output position, from ``out_pos`` on, where a checkpoint would be due."""
        i = bisect.bisect_right(self.points, out_pos, key=_out_pos)
        before = self.points[i - 1].out_pos if i else 0
        return before + self.spacing


class _Window:
    """Decoded output ``[start, end)`` kept around the cursor, as the decoder's chunks:
    appending and dropping never move bytes (a contiguous buffer trimmed at the front and
    grown at the back copied the whole window on most steps: a fifth of a deflate read)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.end = start
        self._chunks: deque[bytes] = deque()

    def covers(self, offset: int, size: int) -> bool:
        return self.start <= offset and offset + size <= self.end

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.end += len(data)

    def keep_from(self, offset: int) -> None:
        """Drop the chunks that end at or before ``offset``."""
        chunks = self._chunks
        while chunks and self.start + len(chunks[0]) <= offset:
            self.start += len(chunks.popleft())

    def take(self, offset: int, size: int) -> list[memoryview]:
        parts: list[memoryview] = []
        pos, end = self.start, offset + size
        for chunk in self._chunks:
            chunk_end = pos + len(chunk)
            if chunk_end > offset:
                parts.append(memoryview(chunk)[max(0, offset - pos) : min(len(chunk), end - pos)])
                if chunk_end >= end:
                    break
            pos = chunk_end
        return parts


def _own(tail: Buffer) -> Buffer:
    """Input a cursor keeps until its next step: a copy when it is a small part of a larger
    buffer (a block's), which it would otherwise keep whole, beyond the caches' accounting:
    200 handles held 1 MiB each that way."""
    if isinstance(tail, memoryview) and len(tail) < memoryview(tail.obj).nbytes // 2:
        return bytes(tail)
    return tail


class CursorMember:
    """A large compressed member: one bounded cursor per handle over the member's decoder."""

    def __init__(self, archive: ArchiveBytes, entry: Entry) -> None:
        self.archive = archive
        self.entry = entry
        self.verifier = archive.verifier(entry)
        self.index = archive.deflate_index(entry) if entry.method == DEFLATED else None
        self.tuning = archive.tuning
        self.budget = archive.budget
        self.budget.readers += 1
        self._lock = trio.Lock()
        self._codec: Codec | None = None
        self._in_pos = 0
        self._out_pos = 0
        self._tail: Buffer = b""
        self._window = _Window(0)
        self._ahead: Readahead | None = None
        self._last_end = -1
        self._ahead_running = False
        self._closed = False

    def close(self) -> bool:
        if self._closed:
            return True
        self._closed = True
        self.budget.readers -= 1
        self.budget.forget(self)
        if self._ahead is not None:
            self._ahead.release()
        self._codec = None
        self._tail = b""
        self._window = _Window(0)
        return self.archive.release(self.entry)

    def shed(self) -> bool:
        """Let go of the decoder, its window and input, unless a read or a step ahead is
        under way or the decoder cannot be resumed (``False``); a zlib-ng decoder leaves a
        checkpoint where it stands (if it pins no more than a piece of input)."""
        codec = self._codec
        if self._lock.locked() or self._ahead_running:
            return False
        if codec is not None:
            if not isinstance(codec, DeflateCodec) or isinstance(codec, FastDeflateCodec):
                return False
            state = codec.state
            if (
                self.index is not None
                and not codec.eof
                and self._out_pos > 0
                and len(state.unconsumed_tail) <= SMALL_PIECE
            ):
                self.index.add(self._out_pos, self._in_pos, state.copy())
        self._codec = None
        self._tail = b""
        self._window = _Window(self._out_pos)
        return True

    def _restart(self, offset: int) -> None:
        point = self.index.best(offset) if self.index is not None else None
        if point is None:
            self._codec = self._from_start(offset)
            self._in_pos = self._out_pos = 0
        else:
            self._codec = DeflateCodec(point.state.copy())
            self._in_pos, self._out_pos = point.in_pos, point.out_pos
        self._tail = b""
        self._window = _Window(self._out_pos)

    def _from_start(self, offset: int) -> Codec:
        """A decoder from the member's first byte. A reader that starts there gets the fast
        inflate (no checkpoints: it reads on in order, or restarts from one when it jumps); one
        that wants bytes further in gets zlib-ng's, which leaves checkpoints on its way."""
        if self.entry.method != DEFLATED:
            return StreamCodec(self.entry)
        fast = offset == 0 and self.budget.readers <= self.budget.fast_readers
        return FastDeflateCodec() if fast else DeflateCodec()

    async def read(self, offset: int, size: int) -> Buffer:
        size = _clamp(self.entry, offset, size)
        if size == 0:
            return b""
        self.verifier.check()
        async with self._lock:
            self.verifier.check()  # found corrupt while this read waited for the lock
            if not self._window.covers(offset, size):
                await self._decode_to(offset, size)
            data = self.archive.gather(self._window.take(offset, size))
            self._window.keep_from(offset + size - self.budget.behind())
            sequential = offset == self._last_end
            self._last_end = offset + size
            self.budget.used(self)
        self.verifier.check()  # a step in the background may have found the member corrupt
        ahead = min(
            self.entry.size,
            offset + size + min(self.tuning.inflate_ahead, self.budget.share() // 2),
        )
        if sequential and not self._ahead_running and self._out_pos < ahead:
            self._ahead_running = True
            self.archive.spawn(self._decode_ahead, ahead)
        return data

    async def _decode_to(self, offset: int, size: int) -> None:
        """Make the window cover ``[offset, offset + size)`` (the lock is held).

        A reader near the cursor streams (kernel read-ahead may reorder its reads); one that
        needs a checkpoint reads at random and decodes only what it asked for. Output before
        ``offset`` less ``ReadBudget.behind()`` is dropped as it comes: a tail read of a huge member
        holds no more than that.
        """
        streaming = True
        if self._codec is None or offset < self._window.start:
            self._restart(offset)
            streaming = False
        elif offset > self._out_pos + self.tuning.far_ahead and self.index is not None:
            point = self.index.best(offset)
            if point is not None and point.out_pos > self._out_pos:
                self._restart(offset)
                streaming = False
        keep = self.budget.behind()
        while self._out_pos < offset + size:
            self._window.keep_from(min(offset, self._out_pos) - keep)
            await self._step(None if streaming else offset + size)

    async def _decode_ahead(self, until: int) -> None:
        """Decode the next bytes of a sequential reader while the kernel sends its next read,
        a step at a time so that any read that arrives goes first (a failure here is met, and
        reported, by a read)."""
        try:
            while True:
                async with self._lock:
                    if self._codec is None or self._out_pos >= until:
                        return
                    self._window.keep_from(self._last_end - self.budget.behind())
                    await self._step(None)
        except TaskfsError:
            self._codec = None  # start over on the next read, which reports the error
        finally:
            self._ahead_running = False

    async def _step(self, until: int | None) -> None:
        """Decode one step: ``tuning.step_out`` for a streaming reader; for a random read no more
        than needed to reach ``until`` (it may have just restarted from a checkpoint)."""
        codec = self._codec
        assert codec is not None
        entry = self.entry
        tuning = self.tuning
        step_size = max(tuning.min_step_out, min(tuning.step_out, self.budget.share() // 4))
        limit = step_size
        if until is not None:
            limit = max(tuning.min_step_out, min(step_size, until - self._out_pos))
        if not self._tail and codec.wants_input() and self._in_pos < entry.compressed_size:
            grid = await self.archive.grid(entry)
            end = min(entry.compressed_size, self._in_pos + min(tuning.step_in, step_size))
            if self._ahead is None:
                self._ahead = self.archive.readahead(grid)
            low, high = grid.start + self._in_pos, grid.start + end
            blocks = await grid.read(low, high, self._ahead)
            self._tail = self.archive.gather(block_views(blocks, low, high))
        data, self._tail = self._tail, b""
        due_at = MAX_DUE
        if self.index is not None:
            due_at = self.index.next_due(self._out_pos) - self._out_pos
        try:
            threaded = len(data) >= tuning.thread_input and limit >= tuning.thread_input
            if threaded or not codec.returns_input:
                step = await trio.to_thread.run_sync(codec.run, data, limit, due_at)
            else:
                step = codec.run(data, limit, due_at)
        except ArchiveError as exc:
            raise ArchiveError(f"{entry.name}: {exc}") from exc
        start_out, start_in = self._out_pos, self._in_pos
        if codec.returns_input:
            self._in_pos += step.consumed
            self._tail = _own(data[step.consumed :])
        else:
            self._in_pos += len(data)
        if step.chunks:
            produced = sum(len(out) for out in step.chunks)
            if self._out_pos + produced > entry.size:
                raise ArchiveError(f"{entry.name}: data is larger than the directory says")
            try:  # one stretch per step (not one per zlib piece: a CRC combine each)
                self.verifier.feed_chunks(self._out_pos, step.chunks)
            except ChecksumError:
                self._codec = None  # this cursor is mid-step: never continue from here
                raise
            for out in step.chunks:
                self._window.append(out)
            self._out_pos += produced
        if codec.eof and self._out_pos != entry.size:
            raise ArchiveError(
                f"{entry.name}: data holds {self._out_pos} bytes, the directory says {entry.size}"
            )
        if not step.chunks and not codec.eof and not self._tail and not data:
            # Given nothing (all input was fed), the decoder had nothing left to give.
            raise ArchiveError(f"{entry.name}: compressed data ends early")
        if step.point is not None and self.index is not None and not codec.eof:
            produced, consumed, copy = step.point
            if self.index.due(start_out + produced):
                self.index.add(start_out + produced, start_in + consumed, copy)
