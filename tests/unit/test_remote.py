"""RemoteArchive over a mock object store: request accounting, caching, members, corruption."""

from __future__ import annotations

import io
import mmap
import os
import random
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from taskfs.archive import codecs
from taskfs.archive import member as member_mod
from taskfs.archive.cache import BufferPool, DiskCache, MemoryCache, Tiered
from taskfs.archive.rangeio import RangeSource
from taskfs.archive.remote import RemoteArchive
from taskfs.archive.tuning import DEFAULT, Tuning
from taskfs.archive.zipindex import Entry, walk
from taskfs.errors import ArchiveError, ChecksumError, StaleError, UnsupportedError
from tests.rangeserver import Objects
from tests.support import read_all

BLOCK = DEFAULT.block
# Members above 64 KiB compressed or 256 KiB inflated stream through a cursor, not read whole.
SMALL = Tuning(small_compressed=64 << 10, small_size=256 << 10)

Opener = Callable[..., Awaitable[RemoteArchive]]


def build(members: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", allowZip64=True) as zf:
        zf.mkdir("artifacts")
        for name, data, method in members:
            zf.writestr(f"artifacts/{name}", data, method)
    return buf.getvalue()


def text(size: int, seed: int = 0) -> bytes:
    """Compressible simulation-like text of about ``size`` bytes."""
    rng = random.Random(seed)
    lines = []
    total = 0
    while total < size:
        line = f"{rng.random():.6f} {rng.random():.6f} {rng.randint(0, 9999)}\n".encode()
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


@pytest.fixture
async def opener(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[Objects, Opener]]:
    objects = Objects()
    http = httpx.AsyncClient(transport=objects.transport())

    async def open_archive(
        data: bytes | None = None,
        *,
        disk_limit: int = 64 << 20,
        memory_limit: int = 8 << 20,
        tuning: Tuning = DEFAULT,
        pool: BufferPool | None = None,
    ) -> RemoteArchive:
        if data is not None:
            objects.put("out.zip", data)

        async def url(refresh: bool) -> str:
            return "http://store/o/out.zip"

        cache = Tiered(MemoryCache(memory_limit, pool), DiskCache(tmp_path / "cache", disk_limit))
        return await RemoteArchive.open(
            RangeSource(http, url, name="out.zip", bulk=objects.bulk()),
            cache,
            "t/out.zip",
            nursery=nursery,
            tuning=tuning,
        )

    yield objects, open_archive
    await http.aclose()


async def settled(archive: RemoteArchive) -> None:
    """Wait until background disk writes have landed (they follow the reads)."""
    disk = archive.cache.disk
    assert disk is not None
    with trio.fail_after(5):
        while archive.cache.memory.total > 0 and disk.total < archive.cache.memory.total:
            await trio.sleep(0.01)


def member(archive: RemoteArchive, name: str) -> Entry:
    node = archive.lookup(name)
    assert isinstance(node, Entry)
    return node


async def test_open_costs_one_get_for_a_small_directory(opener: tuple[Objects, Opener]) -> None:
    objects, open_archive = opener
    archive = await open_archive(build([(f"f{i}", b"x", zipfile.ZIP_STORED) for i in range(50)]))
    assert objects.gets() == 1
    assert len(list(walk(archive.tree, archive.entries))) == 50


async def test_open_costs_two_gets_for_a_large_directory(opener: tuple[Objects, Opener]) -> None:
    objects, open_archive = opener
    data = build([(f"dir{i % 37}/file_{i:05}.vtk", b"", zipfile.ZIP_STORED) for i in range(10_000)])
    archive = await open_archive(data)
    assert archive.data_end < len(data) - 200_000  # the directory is far larger than the tail
    assert objects.gets() == 2
    assert len(list(walk(archive.tree, archive.entries))) == 10_000


async def test_small_member_costs_one_get_and_rereads_none(
    opener: tuple[Objects, Opener],
) -> None:
    objects, open_archive = opener
    data = build([("log.txt", text(5000), zipfile.ZIP_DEFLATED), ("other", b"o", 0)])
    archive = await open_archive(data)
    objects.reset()
    entry = member(archive, "log.txt")
    reader = archive.open_member(entry)
    assert await reader.read(0, 100) == text(5000)[:100]
    assert objects.gets() == 1
    assert await reader.read(4000, 2000) == text(5000)[4000:]
    assert await read_all(archive, entry) == text(5000)
    assert objects.gets() == 1
    # A new archive object over the same disk cache (a remount): only the open costs.
    await settled(archive)
    again = await open_archive()
    objects.reset()
    assert await read_all(again, member(again, "log.txt")) == text(5000)
    assert objects.gets() == 0


async def test_a_small_member_after_the_open_goes_on_the_opens_connection(
    opener: tuple[Objects, Opener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open's GET came through the pooled API-style client; the first small member after
    it must too (the bulk transport would open a connection of its own: a TCP handshake, one
    round trip more, on every first read after an open)."""
    objects, open_archive = opener
    archive = await open_archive(build([("log.txt", text(5000), zipfile.ZIP_DEFLATED)]))
    bulk: list[int] = []
    real = archive.source.fetch_into

    async def spied(start: int, views: Any) -> None:
        bulk.append(start)
        await real(start, views)

    monkeypatch.setattr(archive.source, "fetch_into", spied)
    objects.reset()
    assert await read_all(archive, member(archive, "log.txt")) == text(5000)
    assert objects.gets() == 1 and bulk == []


async def test_members_read_in_a_row_are_fetched_together(
    opener: tuple[Objects, Opener],
) -> None:
    objects, open_archive = opener
    files = [(f"d/f{i:03}.txt", text(3000, seed=i), zipfile.ZIP_DEFLATED) for i in range(200)]
    archive = await open_archive(build(files))
    objects.reset()
    for name, body, _ in files:
        assert await read_all(archive, member(archive, name)) == body
    assert objects.gets() <= 15, objects.gets()


async def test_members_listed_out_of_archive_order_are_still_fetched_together(
    opener: tuple[Objects, Opener],
) -> None:
    """A central directory in another order than the data (most are in the same: those need
    no order table): read in the data's order, neighbours still come in shared requests."""
    objects, open_archive = opener
    files = [(f"d/f{i:03}.txt", text(3000, seed=i)) for i in range(200)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in files:
            zf.writestr(f"artifacts/{name}", body)
        zf.filelist.reverse()  # the directory lists the last member first
    archive = await open_archive(buf.getvalue())
    assert archive.entries[0].name == "artifacts/d/f199.txt"
    objects.reset()
    for name, body in files:
        assert await read_all(archive, member(archive, name)) == body
    assert objects.gets() <= 15, objects.gets()


async def test_large_stored_member_streams_and_is_cached(
    opener: tuple[Objects, Opener],
) -> None:
    objects, open_archive = opener
    body = os.urandom(12 << 20)
    archive = await open_archive(build([("big.bin", body, zipfile.ZIP_STORED)]))
    objects.reset()
    entry = member(archive, "big.bin")
    assert await read_all(archive, entry, chunk=128 << 10) == body
    with trio.fail_after(10):  # the read-ahead of the last reads lands, and goes to disk
        while (await archive.grid(entry))._pending or archive.cache.pending_writes:
            await trio.sleep(0.01)
    fetched = objects.gets()
    assert fetched <= 12  # aligned blocks coalesced into multi-MiB requests
    assert await read_all(archive, entry, chunk=1 << 20) == body
    reader = archive.open_member(entry)
    assert await reader.read(5_000_000, 10) == body[5_000_000:5_000_010]
    assert objects.gets() == fetched, [s.range for s in objects.seen][fetched:]  # refetched


async def test_a_reread_from_the_disk_cache_loads_a_segment_per_thread_call(
    opener: tuple[Objects, Opener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequential reader whose blocks are on disk (a fresh mount on a filled cache) gets
    them by read-ahead, several per worker-thread call, with no request and the same bytes."""
    objects, open_archive = opener
    body = os.urandom(32 << 20)
    data = build([("big.bin", body, zipfile.ZIP_STORED)])
    archive = await open_archive(data, memory_limit=32 << 20)  # the mount's
    entry = member(archive, "big.bin")
    assert await read_all(archive, entry, chunk=1 << 20) == body
    grid = await archive.grid(entry)
    with trio.fail_after(10):  # every segment reaches the disk
        while grid._pending or archive.cache.pending_writes:
            await trio.sleep(0.01)
    # A fresh archive and caches (as a new mount would open) over the same cache directory.
    again = await open_archive(memory_limit=32 << 20)
    disk = again.cache.disk
    assert disk is not None
    calls: list[int] = []
    real = disk.get_segment_blocks

    def counted(*args: Any) -> Any:
        calls.append(len(args[1]))
        return real(*args)

    monkeypatch.setattr(disk, "get_segment_blocks", counted)
    objects.reset()
    assert await read_all(again, member(again, "big.bin"), chunk=1 << 20) == body
    assert objects.gets() == 0
    assert sum(calls) == -(-len(body) // BLOCK)  # each block loaded once
    assert len(calls) <= sum(calls) // 2, calls  # mostly several blocks per call


async def test_reads_across_blocks_received_together_are_views_from_network_and_disk(
    opener: tuple[Objects, Opener],
) -> None:
    """With the mount's pool, a request's whole segments are received into one map each, and
    a disk load of a whole segment goes into one map: a read across two of its blocks (as
    the kernel's are, half a block off) is a view of that map, not a copy; bytes as zipfile's."""
    objects, open_archive = opener
    block = 64 << 10
    tuning = replace(
        SMALL,
        block=block,
        max_request=8 * block,
        readahead_start=block,
        readahead_part=4 * block,
        readahead_slack=4 * block,
        readahead_max=24 * block,
    )
    body = os.urandom(64 * block + 777)
    data = build([("big.bin", body, zipfile.ZIP_STORED)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("artifacts/big.bin") == body

    async def read_through(archive: RemoteArchive) -> list[bool]:
        reader = archive.open_member(member(archive, "big.bin"))
        views = []
        for offset in [0, *range(block // 2, len(body), block)]:
            size = block // 2 if offset == 0 else block
            got = await reader.read(offset, size)
            assert bytes(got) == body[offset : offset + size]
            whole = got.obj if isinstance(got, memoryview) else None
            views.append(isinstance(whole, mmap.mmap) and len(whole) == 4 * block)
        reader.close()
        return views

    cold = await open_archive(data, pool=BufferPool(block, runs=4), tuning=tuning)
    assert sum(await read_through(cold)) >= 32  # most: the window is whole segments soon
    await settled(cold)
    objects.reset()
    again = await open_archive(data, pool=BufferPool(block, runs=4), tuning=tuning)
    assert sum(await read_through(again)) >= 32
    assert [s.range for s in objects.seen if s.range] == [objects.seen[0].range]  # the open's


async def test_what_was_fetched_ahead_for_a_closed_reader_is_no_longer_kept(
    opener: tuple[Objects, Opener],
) -> None:
    """A reader that stops and closes leaves its read-ahead in the memory tier as the first to
    go, not kept (for good) for a reader that will not come."""
    _, open_archive = opener
    body = os.urandom(16 * BLOCK)
    archive = await open_archive(build([("big.bin", body, zipfile.ZIP_STORED)]))
    reader = archive.open_member(member(archive, "big.bin"))
    for offset in range(0, 4 * BLOCK, BLOCK // 2):
        assert await reader.read(offset, BLOCK // 2) == body[offset : offset + BLOCK // 2]
    with trio.fail_after(5):  # the read-ahead lands
        while archive.cache.memory._ahead == {} or any(
            grid._pending for grid in archive._grids.values()
        ):
            await trio.sleep(0.01)
    assert archive.cache.memory._ahead  # fetched ahead, not read: kept
    reader.close()
    assert not archive.cache.memory._ahead  # the reader has gone: first to go


async def test_a_stream_larger_than_the_memory_tier_fetches_each_byte_once(
    opener: tuple[Objects, Opener],
) -> None:
    """Blocks fetched ahead of a sequential reader stay until it reads them (those it has
    passed go first): no block is fetched twice, in requests of several blocks."""
    objects, open_archive = opener
    body = os.urandom(24 << 20)
    archive = await open_archive(
        build([("big.bin", body, zipfile.ZIP_STORED)]), disk_limit=0, memory_limit=6 << 20
    )
    objects.reset()
    assert await read_all(archive, member(archive, "big.bin"), chunk=128 << 10) == body
    await trio.sleep(0.1)
    fetched = [tuple(map(int, s.range[6:].split("-"))) for s in objects.seen if s.range]
    assert sum(end - start + 1 for start, end in fetched) <= len(body) + 2 * BLOCK
    assert len(fetched) <= len(body) // BLOCK * 2 // 3  # requests of several blocks


async def test_cache_stays_within_its_limit(opener: tuple[Objects, Opener]) -> None:
    _, open_archive = opener
    body = os.urandom(10 << 20)
    archive = await open_archive(
        build([("big.bin", body, zipfile.ZIP_STORED)]), disk_limit=3 << 20, memory_limit=2 << 20
    )
    assert await read_all(archive, member(archive, "big.bin")) == body
    await trio.sleep(0.1)  # background disk writes
    disk = archive.cache.disk
    assert disk is not None and disk.total <= 3 << 20
    assert sum(p.stat().st_size for p in disk.root.rglob("*") if p.is_file()) <= 3 << 20
    assert archive.cache.memory.total <= 2 << 20


async def test_fetched_bytes_reach_their_reader_even_if_the_cache_drops_them(
    opener: tuple[Objects, Opener],
) -> None:
    objects, open_archive = opener
    body = os.urandom(6 * BLOCK)
    archive = await open_archive(
        build([("big.bin", body, zipfile.ZIP_STORED)]), disk_limit=0, memory_limit=BLOCK + 1
    )
    entry = member(archive, "big.bin")
    grid = await archive.grid(entry)
    objects.reset()
    blocks = await grid.read(grid.start, grid.end)
    assert b"".join(bytes(block.data) for block in blocks) == body
    # Requests side by side, a segment (4 blocks) each at most; nothing fetched again after
    # the cache let go.
    assert objects.gets() == 2


async def test_concurrent_readers_fetch_each_block_once(opener: tuple[Objects, Opener]) -> None:
    objects, open_archive = opener
    body = os.urandom(6 << 20)
    archive = await open_archive(build([("big.bin", body, zipfile.ZIP_STORED)]))
    objects.reset()
    entry = member(archive, "big.bin")
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await read_all(archive, entry, chunk=512 << 10))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(reader)
    assert results == [body] * 8
    fetched = 0
    for seen in objects.seen:
        assert seen.range is not None
        first, last = (int(x) for x in seen.range.removeprefix("bytes=").split("-"))
        fetched += last - first + 1
    assert fetched <= len(body) + 2 * BLOCK, [s.range for s in objects.seen]


async def test_deflate_random_access(opener: tuple[Objects, Opener]) -> None:
    objects, open_archive = opener
    body = text(4 << 20, seed=7)
    archive = await open_archive(
        build([("sim.vtk", body, zipfile.ZIP_DEFLATED)]),
        tuning=replace(SMALL, checkpoint_spacing=256 << 10, step_out=64 << 10),
    )
    budget = archive.budget  # a small window behind the cursor
    budget.most = budget.least = budget.late = 128 << 10
    entry = member(archive, "sim.vtk")
    assert await read_all(archive, entry, chunk=1 << 20) == body
    index = archive.deflate_index(entry)
    assert index.points == []  # read in order from the start: the fast inflate, no copies
    reader = archive.open_member(entry)
    tail = len(body) - 4096
    assert await reader.read(tail, 4096) == body[tail:]  # inflates to there, leaving points
    assert len(index.points) >= 4
    # A checkpoint holds zlib's state, not the compressed input that was fed with it.
    assert all(len(p.state.unconsumed_tail) <= codecs.SMALL_PIECE for p in index.points)
    rng = random.Random(1)
    objects.reset()
    for _ in range(60):
        offset = rng.randrange(len(body))
        assert await reader.read(offset, 4096) == body[offset : offset + 4096]
    assert objects.gets() == 0  # everything came from the cache


async def test_sequential_deflate_reader_stays_inflated_ahead(
    opener: tuple[Objects, Opener],
) -> None:
    """Inflating ahead resumes after reads that the window already covered."""
    _, open_archive = opener
    body = text(12 << 20, seed=3)
    archive = await open_archive(build([("sim.vtk", body, zipfile.ZIP_DEFLATED)]))
    reader = archive.open_member(member(archive, "sim.vtk"))
    assert isinstance(reader, member_mod.CursorMember)
    chunk = 128 << 10
    for offset in range(0, 8 << 20, chunk):
        assert await reader.read(offset, chunk) == body[offset : offset + chunk]
        with trio.fail_after(5):
            while reader._ahead_running:  # let the background inflate finish
                await trio.sleep(0.001)
        if offset >= chunk:  # from the second sequential read on
            assert reader._out_pos >= offset + chunk + DEFAULT.inflate_ahead


async def test_a_deflate_reader_keeps_its_place_through_reads_the_kernel_sends_late(
    opener: tuple[Objects, Opener],
) -> None:
    """The kernel's order when its FUSE queue is congested (a cold ``cat``, traced): it drops
    the rest of an asynchronous read-ahead and asks for those 3 MiB after 4 MiB further on.
    The reader keeps its fast inflate and its place: no start over, no checkpoints made."""
    _, open_archive = opener
    body = text(24 << 20, seed=5)
    archive = await open_archive(build([("sim.vtk", body, zipfile.ZIP_DEFLATED)]))
    entry = member(archive, "sim.vtk")
    reader = archive.open_member(entry)
    assert isinstance(reader, member_mod.CursorMember)
    mib = 1 << 20
    order = [*range(0, 12), *range(15, 19), 12, 13, 14, *range(19, 24)]
    for n in order:
        assert await reader.read(n * mib, mib) == body[n * mib : (n + 1) * mib]
        with trio.fail_after(5):
            while reader._ahead_running:  # the inflate ahead goes as far as it can
                await trio.sleep(0.001)
    assert isinstance(reader._codec, codecs.FastDeflateCodec)
    assert archive.deflate_index(entry).points == []
    assert reader._out_pos == len(body)


async def test_bzip2_and_lzma_members(opener: tuple[Objects, Opener]) -> None:
    # Members above these limits stream through a cursor instead of being read whole.
    _, open_archive = opener
    small, large = text(20_000, 1), text(600 << 10, 2)
    archive = await open_archive(
        build(
            [
                ("a.bz2", small, zipfile.ZIP_BZIP2),
                ("b.xz", small, zipfile.ZIP_LZMA),
                ("c.bz2", large, zipfile.ZIP_BZIP2),
                ("d.xz", large, zipfile.ZIP_LZMA),
            ]
        ),
        tuning=replace(SMALL, step_in=16 << 10),
    )
    for name, body in (("a.bz2", small), ("b.xz", small), ("c.bz2", large), ("d.xz", large)):
        entry = member(archive, name)
        assert await read_all(archive, entry, chunk=1 << 20) == body
        reader = archive.open_member(entry)
        assert await reader.read(len(body) - 10, 100) == body[-10:]
        assert await reader.read(5, 5) == body[5:10]  # backward: starts over


def corrupt_crc(data: bytes, name: str) -> bytes:
    raw = bytearray(data)
    target = f"artifacts/{name}".encode()
    pos = 0
    while (pos := raw.find(b"PK\x01\x02", pos)) >= 0:
        name_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + name_len] == target:
            struct.pack_into("<I", raw, pos + 16, struct.unpack_from("<I", raw, pos + 16)[0] ^ 1)
        pos += 4
    return bytes(raw)


async def test_crc_mismatch_is_an_error_never_bytes(opener: tuple[Objects, Opener]) -> None:
    _, open_archive = opener
    big = os.urandom(5 << 20)
    data = build([("small.txt", b"hello" * 100, 8), ("big.bin", big, 0), ("ok", b"fine", 8)])
    data = corrupt_crc(corrupt_crc(data, "small.txt"), "big.bin")
    archive = await open_archive(data)
    with pytest.raises(ChecksumError, match="CRC"):
        await archive.open_member(member(archive, "small.txt")).read(0, 10)
    with pytest.raises(ChecksumError):
        await read_all(archive, member(archive, "big.bin"), chunk=1 << 20)
    assert await read_all(archive, member(archive, "ok")) == b"fine"


def patch_central(data: bytes, name: str, offset: int, fmt: str, value: int) -> bytes:
    raw = bytearray(data)
    pos = 0
    target = f"artifacts/{name}".encode()
    while (pos := raw.find(b"PK\x01\x02", pos)) >= 0:
        name_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + name_len] == target:
            struct.pack_into(fmt, raw, pos + offset, value)
        pos += 4
    return bytes(raw)


async def test_unsupported_and_encrypted_members(opener: tuple[Objects, Opener]) -> None:
    _, open_archive = opener
    data = build([("odd", b"data", 0), ("secret", b"data", 0), ("fine", b"data", 0)])
    data = patch_central(data, "odd", 10, "<H", 9)  # method: deflate64
    data = patch_central(data, "secret", 8, "<H", 1)  # flags: encrypted
    archive = await open_archive(data)
    assert member(archive, "odd").size == 4  # listed
    with pytest.raises(UnsupportedError, match="deflate64"):
        archive.open_member(member(archive, "odd"))
    with pytest.raises(UnsupportedError, match="encrypted"):
        archive.open_member(member(archive, "secret"))
    assert await read_all(archive, member(archive, "fine")) == b"data"


async def test_member_outside_the_data_area(opener: tuple[Objects, Opener]) -> None:
    _, open_archive = opener
    data = build([("a", b"x" * 100, 0)])
    data = patch_central(data, "a", 20, "<I", 10_000_000)  # compressed size
    archive = await open_archive(data)
    with pytest.raises(ArchiveError, match="outside"):
        await archive.open_member(member(archive, "a")).read(0, 10)


async def test_replaced_archive_is_stale(opener: tuple[Objects, Opener]) -> None:
    objects, open_archive = opener
    archive = await open_archive(build([("a", os.urandom(6 << 20), 0)]))
    reader = archive.open_member(member(archive, "a"))
    await reader.read(0, 1024)
    objects.put("out.zip", build([("a", os.urandom(6 << 20), 0)]))
    with pytest.raises(StaleError):
        await reader.read(3 << 20, 1024)


def flip_data_byte(data: bytes, name: str, at: int) -> bytes:
    """Flip one byte of a stored member's data (its CRC in the directory stays right)."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    info = archive.getinfo(f"artifacts/{name}")
    header = struct.unpack_from("<4sHHHHHIIIHH", data, info.header_offset)
    start = info.header_offset + 30 + header[9] + header[10]
    raw = bytearray(data)
    raw[start + at] ^= 0x55
    return bytes(raw)


ORDERS = ["sequential", "reverse", "swapped-neighbours", "random", "concurrent"]


def _chunks(size: int, chunk: int, order: str, seed: int) -> list[int]:
    offsets = list(range(0, size, chunk))
    if order == "reverse":
        offsets.reverse()
    elif order == "swapped-neighbours":  # as the kernel's parallel read-ahead may deliver them
        for i in range(0, len(offsets) - 1, 2):
            offsets[i], offsets[i + 1] = offsets[i + 1], offsets[i]
    elif order in ("random", "concurrent"):
        random.Random(seed).shuffle(offsets)
    return offsets


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["stored", "deflate", "bzip2"])
async def test_corruption_is_caught_in_any_read_order(
    opener: tuple[Objects, Opener], order: str, kind: str
) -> None:
    """Reading every byte of a corrupt member, in any order and over any handles, ends in
    ChecksumError: the read that completes the member fails, and every read after it."""
    _, open_archive = opener
    body = text(3 << 20, seed=11)
    method = {"stored": 0, "deflate": 8, "bzip2": 12}[kind]
    data = build([("big", body, method)])
    # Stored: a flipped byte. Compressed: the data decodes fine, but the directory's CRC says
    # it is not what was written.
    data = flip_data_byte(data, "big", 1_500_000) if kind == "stored" else corrupt_crc(data, "big")
    archive = await open_archive(data, tuning=replace(SMALL, checkpoint_spacing=256 << 10))
    entry = member(archive, "big")
    chunk = 128 << 10
    offsets = _chunks(len(body), chunk, order, seed=5)
    failed: list[int] = []
    returned: set[int] = set()

    async def read(reader: member_mod.MemberReader, offset: int) -> None:
        try:
            got = await reader.read(offset, chunk)
        except ChecksumError:
            failed.append(offset)
            return
        returned.add(offset)
        if kind != "stored":  # the bytes are right; only the CRC disagrees
            assert got == body[offset : offset + chunk]

    readers = [archive.open_member(entry) for _ in range(3)]
    if order == "concurrent":
        async with trio.open_nursery() as nursery:
            for i, offset in enumerate(offsets):
                nursery.start_soon(read, readers[i % 3], offset)
    else:
        for i, offset in enumerate(offsets):
            await read(readers[i % 2], offset)
    assert failed, "every byte of a corrupt member was returned without an error"
    assert len(returned) < len(offsets)
    for reader in readers:  # and it stays failed
        with pytest.raises(ChecksumError):
            await reader.read(0, 10)
        reader.close()
    fresh = archive.open_member(entry)
    with pytest.raises(ChecksumError):
        await fresh.read(len(body) // 2, 10)


async def test_an_unverified_member_asks_for_its_cached_pages_to_go(
    opener: tuple[Objects, Opener],
) -> None:
    _, open_archive = opener
    body = text(3 << 20, seed=2)  # larger than one piece and one decoding step
    archive = await open_archive(build([("a", body, 8), ("b", body, 0)]), tuning=SMALL)
    for name in ("a", "b"):
        entry = member(archive, name)
        partial = archive.open_member(entry)
        await partial.read(0, 4096)
        assert partial.close() is False  # part read, nothing vouches for it: drop the pages
        whole = archive.open_member(entry)
        assert await read_all(archive, entry) == body
        await whole.read(0, 10)
        assert whole.close() is True
        again = archive.open_member(entry)  # verified before: any part is fine now
        await again.read(100, 10)
        assert again.close() is True


async def test_what_a_partial_reader_of_a_corrupt_member_can_get(
    opener: tuple[Objects, Opener],
) -> None:
    """The README's statement, exactly: bytes of a corrupt member can reach a reader only
    while the member has not been read in full (its CRC covers all of it); the read that
    completes it fails, and so does every read after."""
    _, open_archive = opener
    body = text(3 << 20, seed=4)
    bad_at = 100_000
    archive = await open_archive(flip_data_byte(build([("m", body, 0)]), "m", bad_at), tuning=SMALL)
    reader = archive.open_member(member(archive, "m"))
    head = await reader.read(0, 1 << 20)  # part of the member: nothing to check it against yet
    assert head[bad_at] != body[bad_at] and head[:bad_at] == body[:bad_at]
    with pytest.raises(ChecksumError):
        offset = 1 << 20
        while offset < len(body):
            offset += len(await reader.read(offset, 1 << 20))
    with pytest.raises(ChecksumError):
        await reader.read(0, 10)
    assert reader.close() is False  # corrupt: whatever the kernel cached of it must go


@pytest.mark.parametrize("order", ["sequential", "reverse", "random"])
async def test_separate_opens_add_up_to_a_verdict(
    opener: tuple[Objects, Opener], order: str
) -> None:
    """A loop of ``dd`` runs, each opening the member, reading one piece and closing it,
    ends in EIO like one ``cat``: what separate handles read of a member adds up."""
    _, open_archive = opener
    body = text(3 << 20, seed=8)
    archive = await open_archive(
        flip_data_byte(build([("m", body, 0)]), "m", 2_000_000), tuning=SMALL
    )
    entry = member(archive, "m")
    failures = 0
    for offset in _chunks(len(body), 256 << 10, order, seed=1):
        reader = archive.open_member(entry)
        try:
            await reader.read(offset, 256 << 10)
        except ChecksumError:
            failures += 1
        finally:
            reader.close()
    assert failures >= 1  # the read that completed the member
    reader = archive.open_member(entry)
    with pytest.raises(ChecksumError):  # and every read after it
        await reader.read(0, 10)
    reader.close()


@pytest.mark.parametrize("source", ["storage", "a shared disk cache"])
async def test_a_block_read_again_is_never_other_bytes_than_before(
    opener: tuple[Objects, Opener], source: str
) -> None:
    """Storage that changes an archive in place without a new ETag (bit rot, a broken
    server), or another mount's disk cache filled from it: a member read in full (and
    verified) is read again after its blocks left the caches; the changed block is ESTALE,
    never returned."""
    objects, open_archive = opener
    body = text(3 << 20, seed=9)
    good = build([("m", body, 0)])
    shared = source != "storage"
    # No memory tier: a block read again comes from the disk cache or from storage.
    archive = await open_archive(
        good, disk_limit=(64 << 20) if shared else 0, memory_limit=0, tuning=SMALL
    )
    entry = member(archive, "m")
    assert await read_all(archive, entry) == body  # verified
    bad = flip_data_byte(good, "m", 2_000_000)
    etag = objects.etags["out.zip"]
    grid = await archive.grid(entry)  # the member's blocks, from its first byte
    blocks = grid.count
    segments = [grid.segment_key(n) for n in range(0, blocks, 4)]
    if shared:
        disk = archive.cache.disk
        assert disk is not None
        with trio.fail_after(5):
            while archive.cache.pending_writes or not all(map(disk.contains, segments)):
                await trio.sleep(0.01)  # the background writes land
        for key in segments:  # as another mount, reading the changed archive, would store them
            first = key.number * 4
            parts = [
                (n - first, data, zlib.crc32(data))
                for n in range(first, min(blocks, first + 4))
                if (
                    data := bad[
                        grid.start + n * BLOCK : min(grid.end, grid.start + (n + 1) * BLOCK)
                    ]
                )
            ]
            disk.put_segment(key, BLOCK, len(parts), parts)
    else:
        objects.data["out.zip"] = bad  # the same ETag, other bytes
    assert objects.etags["out.zip"] == etag
    reader = archive.open_member(entry)
    got = b""
    with pytest.raises(StaleError):
        while len(got) < len(body):
            got += await reader.read(len(got), 256 << 10)
    assert got == body[: len(got)]  # what was returned is what was verified
    reader.close()


async def test_many_deflate_handles_hold_a_bounded_number_of_decoders(
    opener: tuple[Objects, Opener],
) -> None:
    """Handles read in turn: only the most recent ``max_held`` keep a decoder and window; the
    others shed them (leaving checkpoints) and resume, every byte still right."""
    _, open_archive = opener
    body = text(3 << 20, seed=5)
    archive = await open_archive(
        build([("sim.vtk", body, zipfile.ZIP_DEFLATED)]),
        tuning=replace(SMALL, checkpoint_spacing=256 << 10),
    )
    archive.budget = member_mod.ReadBudget(max_held=3, fast_readers=2)
    entry = member(archive, "sim.vtk")
    rng = random.Random(3)
    readers = [archive.open_member(entry) for _ in range(12)]
    positions = [rng.randrange(0, len(body) - (256 << 10)) for _ in readers]
    for _ in range(6):
        for i, reader in enumerate(readers):
            at = positions[i]
            assert await reader.read(at, 40_000) == body[at : at + 40_000]
            positions[i] += 40_000
        cursors = [r for r in readers if isinstance(r, member_mod.CursorMember)]
        with trio.fail_after(10):  # the steps ahead end (a busy cursor is not shed)
            while any(c._ahead_running for c in cursors):
                await trio.sleep(0.01)
        await readers[0].read(0, 10)  # a use: the least recent beyond the bound shed
        assert len([c for c in cursors if c._codec]) <= 3
    for reader in readers:
        reader.close()
