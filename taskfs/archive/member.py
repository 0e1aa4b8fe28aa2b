"""Reading one archive member: stored, deflate (random access), bzip2 and lzma; CRC checks.

Owns: turning ``read(offset, size)`` of a member into reads of the archive's bytes, the
decompressors and their per-handle cursors, the shared deflate checkpoints that make random
access cheap, and CRC-32 verification.

How each kind is read:

* small members (compressed and uncompressed size under the limits below) are fetched whole in
  one request, decompressed and CRC-checked before a single byte is returned;
* stored members map reads straight onto archive ranges, with read-ahead for sequential
  readers;
* deflate members stream through ``zlib`` with a cursor per handle; every few MiB of output a
  checkpoint (``decompressobj().copy()``) is kept per member, so a random read inflates from
  the nearest checkpoint instead of from the start; recently produced output is kept so that
  slightly out-of-order reads (kernel read-ahead) do not rewind;
* bzip2 and lzma stream with a cursor per handle and restart from the start for a backward
  seek; other methods and encrypted members raise ``UnsupportedError`` when opened.

Must stay true: no read returns bytes past the member's declared size; a member whose data
does not decompress to exactly its declared size is an ``ArchiveError``; a handle that reads a
member end to end checks its CRC-32 and raises ``ChecksumError`` on mismatch (small members
before any byte is returned, streamed ones on the read that reaches the end).
"""

from __future__ import annotations

import bisect
import bz2
import lzma
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from taskfs.archive.zipindex import BZIP2, DEFLATED, LZMA, STORED, Entry
from taskfs.errors import ArchiveError, ChecksumError, TaskfsError, UnsupportedError

# Members at most this large (compressed and uncompressed) are fetched and checked whole.
SMALL_COMPRESSED = 4 << 20
SMALL_SIZE = 16 << 20
# Output produced per decompression step, and input fed per step.
STEP_OUT = 1 << 20
MIN_STEP_OUT = 64 << 10
# A streaming deflate reader has this much inflated ahead of its last read, in the background.
INFLATE_AHEAD = 2 << 20
STEP_IN = 1 << 20
# Inflate in a worker thread when a step's input is at least this large.
THREAD_INPUT = 64 << 10
# Input handed to zlib per call. A state copy keeps a reference to its ``unconsumed_tail``: with
# whole steps as input each of 512 checkpoints pinned ~0.4 MiB of compressed bytes (88 MiB
# measured in the benchmark). Checkpoints are taken where zlib has consumed all it was given,
# or, failing that, pin at most one piece.
INFLATE_PIECE = 16 << 10
# Output kept behind the cursor for reads that arrive slightly out of order.
RETAIN = 4 << 20
# A read further ahead than this repositions from a checkpoint instead of inflating on.
FAR_AHEAD = 8 << 20
# Checkpoint spacing: at least this, and at most ``MAX_CHECKPOINTS`` per member.
CHECKPOINT_SPACING = 1 << 20
MAX_CHECKPOINTS = 256
# Sequential read-ahead window (bytes of archive data), doubling per sequential read.
READAHEAD_START = 1 << 20
READAHEAD_MAX = 16 << 20

SUPPORTED = frozenset({STORED, DEFLATED, BZIP2, LZMA})
# What the decompressors raise for corrupt input (bz2 raises OSError, lzma LZMAError).
DECODE_ERRORS = (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError)
METHOD_NAMES = {1: "shrink", 6: "implode", 9: "deflate64", 93: "zstandard", 95: "xz", 98: "ppmd"}


class ArchiveBytes(Protocol):
    """What a member reader needs from its archive (``RemoteArchive`` provides it)."""

    async def read_range(self, start: int, end: int, ahead: int = 0) -> bytes:
        """Archive bytes ``[start, end)``; ``ahead`` bytes after ``end`` may be prefetched."""
        ...

    async def member_data(self, entry: Entry) -> bytes:
        """The compressed data of a small member, fetched whole (one request at most)."""
        ...

    async def data_start(self, entry: Entry) -> int:
        """Archive offset of the member's data (after its local header)."""
        ...

    def deflate_index(self, entry: Entry) -> DeflateIndex:
        """The checkpoints of a deflate member, shared by all its readers."""
        ...

    def decoded(self, entry: Entry) -> bytes | None:
        """A small member already decompressed and verified ahead of time, if any."""
        ...

    def spawn(self, fn: Callable[[int], Awaitable[None]], arg: int) -> None:
        """Run ``fn(arg)`` in the background (work ahead of a reader; it must not raise)."""
        ...


@dataclass
class Checkpoint:
    out_pos: int
    in_pos: int
    state: zlib._Decompress


def _out_pos(point: Checkpoint) -> int:
    return point.out_pos


@dataclass
class DeflateIndex:
    """Checkpoints of one deflate member, sorted by output position."""

    spacing: int
    points: list[Checkpoint] = field(default_factory=list)

    @classmethod
    def for_size(cls, size: int) -> DeflateIndex:
        return cls(max(CHECKPOINT_SPACING, -(-size // MAX_CHECKPOINTS)))

    def best(self, offset: int) -> Checkpoint | None:
        i = bisect.bisect_right(self.points, offset, key=_out_pos)
        return self.points[i - 1] if i else None

    def add(self, out_pos: int, in_pos: int, state: zlib._Decompress) -> None:
        """Keep ``state`` (a copy no one else uses) as the checkpoint at ``out_pos``."""
        i = bisect.bisect_left(self.points, out_pos, key=_out_pos)
        if i < len(self.points) and self.points[i].out_pos == out_pos:
            return
        self.points.insert(i, Checkpoint(out_pos, in_pos, state))

    def due(self, out_pos: int) -> bool:
        """Whether a checkpoint at ``out_pos`` would fill a gap of at least ``spacing``."""
        return out_pos >= self.next_due(out_pos)

    def next_due(self, out_pos: int) -> int:
        """The first output position, from ``out_pos`` on, where a checkpoint would be due."""
        before = self.best(out_pos)
        return (before.out_pos if before else 0) + self.spacing


@dataclass
class _Inflated:
    chunks: list[bytes]
    consumed: int  # input bytes zlib took
    # (output produced, input consumed, state copy) at the first clean point past ``due_at``
    point: tuple[int, int, zlib._Decompress] | None


def _inflate(state: zlib._Decompress, data: bytes, limit: int, due_at: int) -> _Inflated:
    """Inflate ``data`` until ``limit`` bytes come out, ``INFLATE_PIECE`` at a time; snapshot
    the state at the first piece boundary at least ``due_at`` bytes of output in where zlib has
    no input left over (so the snapshot holds nothing but zlib's own state), else at the end."""
    view = memoryview(data)
    chunks: list[bytes] = []
    pos = produced = 0
    point = None
    while pos < len(data) and produced < limit:
        piece = view[pos : pos + INFLATE_PIECE]
        out = state.decompress(piece, limit - produced)
        pos += len(piece) - len(state.unconsumed_tail)
        if out:
            chunks.append(out)
            produced += len(out)
        if state.eof:
            break
        if point is None and produced >= due_at and not state.unconsumed_tail:
            point = (produced, pos, state.copy())
    if point is None and produced >= due_at and not state.eof:
        point = (produced, pos, state.copy())
    return _Inflated(chunks, pos, point)


class MemberReader(Protocol):
    async def read(self, offset: int, size: int) -> bytes: ...


def open_member(archive: ArchiveBytes, entry: Entry) -> MemberReader:
    """A reader for ``entry``; ``UnsupportedError`` for methods taskfs cannot read."""
    if entry.encrypted:
        raise UnsupportedError(f"{entry.name}: encrypted members cannot be read")
    if entry.method not in SUPPORTED:
        name = METHOD_NAMES.get(entry.method, f"method {entry.method}")
        raise UnsupportedError(f"{entry.name}: compression {name} is not supported")
    if entry.compressed_size <= SMALL_COMPRESSED and entry.size <= SMALL_SIZE:
        return WholeMember(archive, entry)
    if entry.method == STORED:
        return StoredMember(archive, entry)
    if entry.method == DEFLATED:
        return DeflateMember(archive, entry)
    return StreamMember(archive, entry)


def _clamp(entry: Entry, offset: int, size: int) -> int:
    return max(0, min(size, entry.size - offset))


def decompress_all(entry: Entry, data: bytes) -> bytes:
    """Decompress a whole member and check its size and CRC (blocking)."""
    if entry.method == STORED:
        out = data[: entry.size] if len(data) >= entry.size else data
    else:
        decoder = _decoder(entry)
        try:
            out = decoder.decompress(data, entry.size + 1)
            if len(out) < entry.size + 1 and not decoder.eof and not decoder.needs_input:
                out += decoder.decompress(b"", entry.size + 1 - len(out))
        except DECODE_ERRORS as exc:
            raise ArchiveError(f"{entry.name}: corrupt compressed data: {exc}") from exc
    if len(out) != entry.size:
        raise ArchiveError(
            f"{entry.name}: data holds {len(out)} bytes, the directory says {entry.size}"
        )
    if zlib.crc32(out) != entry.crc:
        raise ChecksumError(f"{entry.name}: CRC-32 mismatch; the archive is corrupt")
    return out


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
                self._data = self.archive.decoded(self.entry)
            if self._data is None:
                raw = await self.archive.member_data(self.entry)
                if len(raw) >= THREAD_INPUT and self.entry.method != STORED:
                    self._data = await trio.to_thread.run_sync(decompress_all, self.entry, raw)
                else:
                    self._data = decompress_all(self.entry, raw)
            return self._data

    async def read(self, offset: int, size: int) -> bytes:
        size = _clamp(self.entry, offset, size)
        if size == 0:
            return b""
        data = await self._load()
        return data[offset : offset + size]


class _Crc:
    """CRC-32 of the output seen contiguously from offset 0."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.pos = 0
        self.value = 0

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        if offset <= self.pos < offset + len(data):
            self.value = zlib.crc32(data[self.pos - offset :], self.value)
            self.pos = offset + len(data)
        if self.pos == self.entry.size and self.value != self.entry.crc:
            raise ChecksumError(f"{self.entry.name}: CRC-32 mismatch; the archive is corrupt")


class _ReadAhead:
    """Sequential detection: the window doubles while reads follow each other."""

    def __init__(self) -> None:
        self.next = -1
        self.window = 0

    def advise(self, offset: int, size: int) -> int:
        if offset == self.next:
            self.window = min(READAHEAD_MAX, max(READAHEAD_START, self.window * 2))
        else:
            self.window = 0
        self.next = offset + size
        return self.window


class StoredMember:
    """A large stored member: reads are archive ranges."""

    def __init__(self, archive: ArchiveBytes, entry: Entry) -> None:
        self.archive = archive
        self.entry = entry
        self._crc = _Crc(entry)
        self._ahead = _ReadAhead()

    async def read(self, offset: int, size: int) -> bytes:
        size = _clamp(self.entry, offset, size)
        if size == 0:
            return b""
        start = await self.archive.data_start(self.entry)
        window = self._ahead.advise(offset, size)
        data = await self.archive.read_range(start + offset, start + offset + size, window)
        self._crc.feed(offset, data)
        return data


class _Decoder(Protocol):
    eof: bool
    needs_input: bool

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _LzmaZip:
    """The ZIP flavour of LZMA: a 4-byte header and 5 bytes of properties, then raw LZMA1."""

    def __init__(self) -> None:
        self._head = b""
        self._inner: lzma.LZMADecompressor | None = None
        self.eof = False
        self.needs_input = True

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        if self._inner is None:
            self._head += data
            if len(self._head) < 4:
                return b""
            props_len = int.from_bytes(self._head[2:4], "little")
            if len(self._head) < 4 + props_len:
                return b""
            props = self._head[4 : 4 + props_len]
            if props_len != 5:
                raise ArchiveError("unsupported LZMA properties in ZIP member")
            lc_lp_pb, dict_size = props[0], int.from_bytes(props[1:5], "little")
            lc, rest = lc_lp_pb % 9, lc_lp_pb // 9
            lp, pb = rest % 5, rest // 5
            filters = [
                {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
            ]
            self._inner = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)
            data, self._head = self._head[4 + props_len :], b""
        out = self._inner.decompress(data, max_length)
        self.eof = self._inner.eof
        self.needs_input = self._inner.needs_input
        return out


class _Bz2:
    def __init__(self) -> None:
        self._inner = bz2.BZ2Decompressor()
        self.eof = False
        self.needs_input = True

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._inner.decompress(data, max_length)
        self.eof = self._inner.eof
        self.needs_input = self._inner.needs_input
        return out


class _Zlib:
    """A raw-deflate decompressor with the bz2/lzma interface (for whole-member reads)."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj(-15)
        self.eof = False
        self.needs_input = True

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._inner.decompress(self._inner.unconsumed_tail + data, max(0, max_length))
        self.eof = self._inner.eof
        self.needs_input = not self._inner.unconsumed_tail
        return out


def _decoder(entry: Entry) -> _Decoder:
    try:
        if entry.method == DEFLATED:
            return _Zlib()
        if entry.method == BZIP2:
            return _Bz2()
        return _LzmaZip()
    except (lzma.LZMAError, ValueError) as exc:
        raise ArchiveError(f"{entry.name}: {exc}") from exc


class _Window:
    """Decompressed output ``[start, start + len(data))`` kept around the cursor."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.data = bytearray()

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def covers(self, offset: int, size: int) -> bool:
        return self.start <= offset and offset + size <= self.end

    def take(self, offset: int, size: int) -> bytes:
        i = offset - self.start
        out = bytes(self.data[i : i + size])
        # Keep RETAIN bytes before the end of this read, drop older output.
        drop = offset + size - RETAIN - self.start
        if drop > len(self.data) // 2 and drop > 0:
            del self.data[:drop]
            self.start += drop
        return out


class DeflateMember:
    """A large deflate member: a cursor per handle, shared checkpoints for random access."""

    def __init__(self, archive: ArchiveBytes, entry: Entry) -> None:
        self.archive = archive
        self.entry = entry
        self.index = archive.deflate_index(entry)
        self._lock = trio.Lock()
        self._state: zlib._Decompress | None = None
        self._in_pos = 0
        self._out_pos = 0
        self._tail = b""
        self._window = _Window(0)
        self._crc: _Crc | None = None
        self._ahead = _ReadAhead()
        self._last_end = -1
        self._ahead_running = False

    def _restart(self, offset: int) -> None:
        point = self.index.best(offset)
        if point is None:
            self._state = zlib.decompressobj(-15)
            self._in_pos = self._out_pos = 0
            self._crc = _Crc(self.entry)
        else:
            self._state = point.state.copy()
            self._in_pos, self._out_pos = point.in_pos, point.out_pos
            self._crc = None  # not contiguous from 0: this cursor cannot check the CRC
        self._tail = b""
        self._window = _Window(self._out_pos)

    async def read(self, offset: int, size: int) -> bytes:
        size = _clamp(self.entry, offset, size)
        if size == 0:
            return b""
        async with self._lock:
            if not self._window.covers(offset, size):
                await self._inflate_to(offset, size)
            data = self._window.take(offset, size)
            sequential = offset == self._last_end
            self._last_end = offset + size
        ahead = min(self.entry.size, offset + size + INFLATE_AHEAD)
        if sequential and not self._ahead_running and self._out_pos < ahead:
            self._ahead_running = True
            self.archive.spawn(self._inflate_ahead, ahead)
        return data

    async def _inflate_to(self, offset: int, size: int) -> None:
        """Make the window cover ``[offset, offset + size)`` (the lock is held).

        A reader near the cursor streams (kernel read-ahead may reorder its reads); one that
        needs a checkpoint reads at random and inflates only what it asked for.
        """
        streaming = True
        if self._state is None or offset < self._window.start:
            self._restart(offset)
            streaming = False
        elif offset > self._out_pos + FAR_AHEAD:
            point = self.index.best(offset)
            if point is not None and point.out_pos > self._out_pos:
                self._restart(offset)
                streaming = False
        while self._out_pos < offset + size:
            await self._step(None if streaming else offset + size)

    async def _inflate_ahead(self, until: int) -> None:
        """Inflate the next bytes of a sequential reader while the kernel sends its next read,
        a step at a time so that any read that arrives goes first (a failure here is met, and
        reported, by a read)."""
        try:
            while True:
                async with self._lock:
                    if self._state is None or self._out_pos >= until:
                        return
                    await self._step(None)
        except TaskfsError:
            self._state = None  # start over on the next read, which reports the error
        finally:
            self._ahead_running = False

    async def _step(self, until: int | None) -> None:
        """Inflate one step: ``STEP_OUT`` for a streaming reader; for a random read no more
        than needed to reach ``until`` (it may have just restarted from a checkpoint)."""
        assert self._state is not None
        state = self._state
        limit = STEP_OUT
        if until is not None:
            limit = max(MIN_STEP_OUT, min(STEP_OUT, until - self._out_pos))
        entry = self.entry
        if not self._tail:
            if self._in_pos >= entry.compressed_size:
                raise ArchiveError(f"{entry.name}: compressed data ends early")
            start = await self.archive.data_start(entry)
            end = min(entry.compressed_size, self._in_pos + STEP_IN)
            window = self._ahead.advise(self._in_pos, end - self._in_pos)
            self._tail = await self.archive.read_range(start + self._in_pos, start + end, window)
        data = self._tail
        due_at = self.index.next_due(self._out_pos) - self._out_pos
        try:
            if len(data) >= THREAD_INPUT and limit >= THREAD_INPUT:
                step = await trio.to_thread.run_sync(_inflate, state, data, limit, due_at)
            else:
                step = _inflate(state, data, limit, due_at)
        except zlib.error as exc:
            raise ArchiveError(f"{entry.name}: corrupt deflate data: {exc}") from exc
        start_out, start_in = self._out_pos, self._in_pos
        self._in_pos += step.consumed
        self._tail = data[step.consumed :]
        for out in step.chunks:
            if self._out_pos + len(out) > entry.size:
                raise ArchiveError(f"{entry.name}: data is larger than the directory says")
            if self._crc is not None:
                self._crc.feed(self._out_pos, out)
            self._window.data += out
            self._out_pos += len(out)
        if state.eof and self._out_pos != entry.size:
            raise ArchiveError(
                f"{entry.name}: data holds {self._out_pos} bytes, the directory says {entry.size}"
            )
        if (
            not step.chunks
            and not state.eof
            and not self._tail
            and self._in_pos >= entry.compressed_size
        ):
            raise ArchiveError(f"{entry.name}: compressed data ends early")
        if step.point is not None and not state.eof:
            produced, consumed, copy = step.point
            if self.index.due(start_out + produced):
                self.index.add(start_out + produced, start_in + consumed, copy)


class StreamMember:
    """A large bzip2 or lzma member: a cursor per handle; a backward seek starts over."""

    def __init__(self, archive: ArchiveBytes, entry: Entry) -> None:
        self.archive = archive
        self.entry = entry
        self._lock = trio.Lock()
        self._decoder: _Decoder | None = None
        self._in_pos = 0
        self._out_pos = 0
        self._window = _Window(0)
        self._crc = _Crc(entry)
        self._ahead = _ReadAhead()

    async def read(self, offset: int, size: int) -> bytes:
        size = _clamp(self.entry, offset, size)
        if size == 0:
            return b""
        async with self._lock:
            if self._window.covers(offset, size):
                return self._window.take(offset, size)
            if self._decoder is None or offset < self._window.start:
                self._decoder = _decoder(self.entry)
                self._in_pos = self._out_pos = 0
                self._window = _Window(0)
                self._crc = _Crc(self.entry)
            while self._out_pos < offset + size:
                await self._step()
            return self._window.take(offset, size)

    async def _step(self) -> None:
        assert self._decoder is not None
        decoder, entry = self._decoder, self.entry
        data = b""
        if decoder.needs_input:
            if self._in_pos >= entry.compressed_size:
                raise ArchiveError(f"{entry.name}: compressed data ends early")
            start = await self.archive.data_start(entry)
            end = min(entry.compressed_size, self._in_pos + STEP_IN)
            window = self._ahead.advise(self._in_pos, end - self._in_pos)
            data = await self.archive.read_range(start + self._in_pos, start + end, window)
            self._in_pos = end
        try:
            out = await trio.to_thread.run_sync(decoder.decompress, data, STEP_OUT)
        except DECODE_ERRORS as exc:
            raise ArchiveError(f"{entry.name}: corrupt compressed data: {exc}") from exc
        if self._out_pos + len(out) > entry.size:
            raise ArchiveError(f"{entry.name}: data is larger than the directory says")
        self._crc.feed(self._out_pos, out)
        self._window.data += out
        self._out_pos += len(out)
        if decoder.eof and self._out_pos != entry.size:
            raise ArchiveError(
                f"{entry.name}: data holds {self._out_pos} bytes, the directory says {entry.size}"
            )
