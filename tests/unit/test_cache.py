"""Disk and memory caches, and single-flight fetching."""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from taskfs.archive.blocks import gather
from taskfs.archive.cache import Buffer, BufferPool, CacheKey, DiskCache, MemoryCache, Tiered


def key(n: int, etag: str = '"e1"') -> CacheKey:
    return CacheKey("task/output.zip", etag, "b", n)


def files(cache: DiskCache) -> list[Path]:
    return [p for p in cache.root.rglob("*") if p.is_file()]


def test_put_get_and_etag_in_the_key(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    assert cache.put(key(1), b"block one")
    assert cache.get(key(1)) == b"block one"
    assert cache.get(key(1, etag='"e2"')) is None  # a replaced archive never hits old blocks
    assert cache.get(key(2)) is None
    assert cache.contains(key(1)) and not cache.contains(key(2))


def test_limit_and_lru_eviction(tmp_path: Path) -> None:
    block = b"x" * 1000
    cache = DiskCache(tmp_path, 3500)  # three blocks with their headers
    for n in range(3):
        cache.put(key(n), block)
    assert cache.get(key(0)) == block  # 0 is now the most recent
    cache.put(key(3), block)
    assert cache.total <= 3500
    assert cache.get(key(1)) is None  # the least recently used went
    assert {cache.get(key(n)) for n in (0, 2, 3)} == {block}
    assert sum(p.stat().st_size for p in files(cache)) == cache.total
    assert not cache.put(key(9), b"y" * 5000)  # larger than the whole cache: not stored


def test_survives_restart(tmp_path: Path) -> None:
    first = DiskCache(tmp_path, 1 << 20)
    first.put(key(1), b"persisted")
    second = DiskCache(tmp_path, 1 << 20)
    assert second.get(key(1)) == b"persisted"
    assert second.total == first.total
    small = DiskCache(tmp_path, 10)  # a smaller limit evicts on start
    assert small.total == 0 and files(small) == []


def test_corrupt_entries_are_misses_and_removed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    cache.put(key(1), b"good data")
    [path] = files(cache)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cache.get(key(1)) is None
    assert not path.exists() and cache.total == 0
    cache.put(key(2), b"other")
    [path] = files(cache)
    path.write_bytes(b"TFSB")  # truncated header
    assert cache.get(key(2)) is None


def test_interrupted_writes_are_cleaned(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    cache.put(key(1), b"data")
    leftover = files(cache)[0].parent / ".tmp-interrupted"
    leftover.write_bytes(b"partial")
    DiskCache(tmp_path, 1 << 20)
    assert not leftover.exists()


def test_full_disk_means_no_caching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DiskCache(tmp_path, 1 << 20)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert cache.put(key(1), b"data") is False
    assert cache.get(key(1)) is None and cache.total == 0
    assert [p for p in cache.root.rglob("*") if p.is_file()] == []


@pytest.mark.expected_warnings
def test_unwritable_directory_disables_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = DiskCache(blocker, 1 << 20)
    assert not cache.enabled
    assert "disk cache disabled" in caplog.text  # the user asked for a cache: say why not
    assert cache.put(key(1), b"x") is False and cache.get(key(1)) is None


def test_memory_cache_limit() -> None:
    memory = MemoryCache(10)
    memory.put(key(1), b"12345")
    memory.put(key(2), b"12345")
    memory.get(key(1))
    memory.put(key(3), b"123")
    assert memory.get(key(2)) is None and memory.get(key(1)) is not None
    assert memory.total <= 10
    memory.put(key(4), b"x" * 11)
    assert memory.get(key(4)) is None


async def test_tiered_reads_through(tmp_path: Path) -> None:
    disk = DiskCache(tmp_path, 1 << 20)
    disk.put(key(1), b"on disk")
    tiered = Tiered(MemoryCache(1 << 20), disk)
    assert await tiered.get(key(1)) == b"on disk"
    assert tiered.memory.get(key(1)) == b"on disk"
    await tiered.put(key(2), b"both")
    assert disk.get(key(2)) == b"both" and tiered.contains(key(2))


def test_the_limit_holds_for_every_process_sharing_the_directory(tmp_path: Path) -> None:
    """Two mounts with the default cache dir: together they stay within the limit (give or
    take one accounting slice each), and each sees what the other evicted as a miss."""
    limit = 64 << 20
    block = os.urandom(1 << 20)
    first, second = DiskCache(tmp_path, limit), DiskCache(tmp_path, limit)
    for n in range(60):
        assert first.put(key(n), block)
        assert second.put(key(1000 + n), block)
    on_disk = sum(p.stat().st_size for p in files(first))
    assert on_disk <= limit + 2 * first._slice
    # Each process still answers from what is there, and misses what is gone.
    hits = sum(first.get(key(n)) == block for n in range(60))
    hits += sum(first.get(key(1000 + n)) is not None for n in range(60))
    assert 0 < hits <= on_disk // (1 << 20) + 1


def test_a_starting_cache_leaves_a_live_writers_temporary_files(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 1 << 20)
    cache.put(key(1), b"data")
    directory = files(cache)[0].parent
    mine = directory / f".{'ab' * 32}.{os.getpid()}.1"  # a write in progress, here
    mine.write_bytes(b"partial")
    dead = directory / f".{'cd' * 32}.999999999.1"  # a writer that is gone
    dead.write_bytes(b"partial")
    DiskCache(tmp_path, 1 << 20)
    assert mine.exists() and not dead.exists()


def hold_disk_writes(disk: DiskCache, monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """Make ``disk``'s writes (in worker threads) wait until the returned event is set."""
    release = trio.Event()
    slow_put = disk.put

    def put(*args: object, **kwargs: object) -> bool:
        trio.from_thread.run(release.wait)
        return slow_put(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(disk, "put", put)
    return release


async def test_an_extent_waiting_for_the_disk_is_found_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory tier may let an extent go before its disk write finished: a read in
    between finds it on its way to disk instead of fetching it again."""
    disk = DiskCache(tmp_path / "c", 1 << 20)
    tiered = Tiered(MemoryCache(0), disk)  # nothing stays in memory
    release = hold_disk_writes(disk, monkeypatch)
    items: list[tuple[CacheKey, Buffer, int | None]] = [(key(1), b"block one", None)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tiered.put_disk_many, items)
        await trio.testing.wait_all_tasks_blocked()
        assert tiered.pending_writes == 1 and tiered.contains(key(1))
        assert await tiered.get(key(1)) == b"block one"
        release.set()
    assert tiered.pending_writes == 0
    assert disk.get(key(1)) == b"block one"


async def test_a_burst_past_the_backlog_waits_for_the_disk_instead_of_going_uncached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes past the disk backlog wait for room (briefly) rather than being dropped: a
    burst of large fetches must not cost the re-read its cache."""
    monkeypatch.setattr("taskfs.archive.cache.DISK_BACKLOG", 10)
    disk = DiskCache(tmp_path / "c", 1 << 20)
    tiered = Tiered(MemoryCache(0), disk)
    release = hold_disk_writes(disk, monkeypatch)
    first: list[tuple[CacheKey, Buffer, int | None]] = [(key(1), b"8 bytes!", None)]
    second: list[tuple[CacheKey, Buffer, int | None]] = [(key(2), b"8 more..", None)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tiered.put_disk_many, first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(tiered.put_disk_many, second)  # 16 > 10: waits for room
        await trio.testing.wait_all_tasks_blocked()
        assert tiered.pending_writes == 2 and await tiered.get(key(2)) == b"8 more.."
        release.set()
    assert disk.get(key(1)) == b"8 bytes!" and disk.get(key(2)) == b"8 more.."


def test_an_accounting_never_forgets_what_was_written_while_it_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread writes a block while the accounting lists the directory: the block
    stays known (it was forgotten, so read again from storage, though its file was there)."""
    cache = DiskCache(tmp_path, 1 << 30)
    assert cache.put(key(1), b"one")
    real = os.scandir
    calls = 0

    class Listed(list[os.DirEntry[str]]):
        def __enter__(self) -> Listed:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def scandir(path: str) -> Listed:
        nonlocal calls
        calls += 1
        with real(path) as items:
            listed = Listed(items)
        if calls == 2:  # the block's directory was listed: now the write lands
            assert cache.put(key(2), b"two")
        return listed

    monkeypatch.setattr("taskfs.archive.cache.os.scandir", scandir)
    cache._account()
    assert calls == 2
    assert cache.contains(key(2)) and cache.get(key(2)) == b"two"
    assert cache.contains(key(1))


def test_the_memory_tier_keeps_what_was_fetched_ahead_and_lets_the_rest_go_by_recency() -> None:
    """Extents fetched ahead of a reader and not read yet go last; the others go least
    recently used first, so a stale extent of an earlier random read goes before the blocks
    a reader has just read (a file read again and again that fits stays)."""
    tier = MemoryCache(4 * 10)
    tier.put(key(0), b"x" * 10)  # a random read's, long ago
    for n in (1, 2):
        tier.put(key(n), b"x" * 10, ahead=True)  # fetched ahead of a reader
    tier.used(key(1))  # the reader had it from its fetch
    tier.put(key(3), b"x" * 10, ahead=True)
    tier.put(key(4), b"x" * 10, ahead=True)  # room for four: the stale one goes
    assert key(0) not in tier and {key(1), key(2), key(3), key(4)} <= set(tier._items) | set(
        tier._ahead
    )
    tier.put(key(5), b"x" * 10)  # then the one read, though fetched after the stale one
    assert key(1) not in tier and key(2) in tier
    assert tier.get(key(2)) == b"x" * 10  # read: now by recency among the others
    tier.put(key(6), b"x" * 10)
    tier.put(key(7), b"x" * 10)  # 5 and 2 were read before 6: they go, 3 and 4 stay unread
    assert key(5) not in tier and key(2) not in tier
    assert {key(3), key(4)} <= set(tier._ahead) and tier.total == 40
    tier.unwanted(key(4))  # its reader has gone: it goes first, before those read
    tier.put(key(8), b"x" * 10)
    assert key(4) not in tier and {key(3), key(6), key(7), key(8)} <= set(tier._items) | set(
        tier._ahead
    )
    # Only when nothing read is left do unread ones go, oldest first.
    big = MemoryCache(2 * 10)
    for n in range(3):
        big.put(key(n), b"y" * 10, ahead=True)
    assert key(0) not in big and key(1) in big and key(2) in big


def test_a_pooled_buffer_is_lent_again_only_once_no_view_of_it_is_left() -> None:
    pool = BufferPool(1 << 16, keep=4)
    view = memoryview(pool.take())[:100]
    first = view.obj
    pool.give(view)  # back in line, but still viewed
    assert pool.take() is not first
    view[:3] = b"abc"  # still its own
    del view
    assert pool.take() is first  # no view left: lent again


def test_gather_copies_parts_into_a_pooled_buffer_that_stays_whole_while_viewed() -> None:
    pool = BufferPool(1 << 16, keep=4)
    one = memoryview(os.urandom(5000))
    assert gather([one], pool) is one  # one part: no copy
    parts = [memoryview(os.urandom(n)) for n in (3000, 1, 40000)]
    joined = gather(parts, pool)
    expected = b"".join(parts)
    assert bytes(joined) == expected
    for _ in range(8):  # the pool lends other buffers meanwhile: none is the one viewed
        other = gather([memoryview(b"x" * 20000), memoryview(b"y" * 20000)], pool)
        assert bytes(other) == b"x" * 20000 + b"y" * 20000
    assert bytes(joined) == expected
    too_big = [memoryview(b"z" * 40000), memoryview(b"w" * 40000)]
    assert bytes(gather(too_big, pool)) == b"z" * 40000 + b"w" * 40000  # past the pool: joined


def test_gather_of_blocks_in_a_row_in_one_map_is_a_view_not_a_copy() -> None:
    pool = BufferPool(1 << 16, keep=4, runs=4)
    shared = memoryview(pool.take(4))
    shared[:] = os.urandom(len(shared))
    blocks = [shared[i << 16 : (i + 1) << 16] for i in range(4)]
    joined = gather([blocks[1][1000:], blocks[2][:5000]], pool)
    assert bytes(joined) == bytes(shared[(1 << 16) + 1000 : (2 << 16) + 5000])
    assert isinstance(joined, memoryview) and joined.obj is shared.obj
    shared[(1 << 16) + 1000] ^= 0xFF  # the same memory: no copy was made
    assert joined[0] == shared[(1 << 16) + 1000]
    # Not in a row (a gap, or the wrong order): copied, and right.
    for parts in ([blocks[0], blocks[2]], [blocks[1], blocks[0]]):
        out = gather(parts, pool)
        assert bytes(out) == b"".join(bytes(p) for p in parts)
        assert not (isinstance(out, memoryview) and out.obj is shared.obj)


def test_the_memory_tier_charges_a_shared_map_once_and_lets_it_go_with_its_last_block() -> None:
    block = 1 << 16
    pool = BufferPool(block, keep=4, runs=4)
    tier = MemoryCache(5 * block + 100, pool)
    shared = memoryview(pool.take(4))
    for i in range(3):  # three blocks of one map: the whole map, once
        tier.put(key(i), shared[i * block : (i + 1) * block])
    assert tier.total == 4 * block
    tier.put(key(9), memoryview(pool.take())[:100])  # a block of its own: its whole map
    assert tier.total == 5 * block
    tier.put(key(10), b"z" * block)  # over the limit: the oldest go until it fits
    assert key(0) not in tier and key(1) not in tier and key(2) not in tier
    assert tier.total == 2 * block
    base = shared.obj
    del shared
    assert pool.take(4) is base  # the map came back once its last block went


@pytest.mark.parametrize("direct", [True, False], ids=["direct I/O", "buffered"])
def test_a_segment_received_into_one_map_is_stored_and_read_back_whole(
    tmp_path: Path, direct: bool
) -> None:
    """Blocks that are views into one map at their offsets (a request's run) go to disk as
    themselves, not as the map's first bytes, and come back into one map the same way."""
    block = 64 << 10
    pool = BufferPool(block, runs=4)
    cache = DiskCache(tmp_path, 10 << 20)
    cache.direct = direct
    shared = memoryview(pool.take(4))
    shared[:] = os.urandom(len(shared))
    lengths = [block, block, block, 5000]  # the last one short
    parts = [(i, shared[i * block : i * block + n], 0) for i, n in enumerate(lengths)]
    parts = [(i, data, zlib.crc32(data)) for i, data, _ in parts]
    segment = key(3)
    assert cache.put_segment(segment, block, 4, parts)
    into = memoryview(pool.take(4))
    found = cache.get_segment_blocks(
        segment, [0, 1, 2, 3], [into[i * block : (i + 1) * block] for i in range(4)]
    )
    for (_, data, crc), got in zip(parts, found, strict=True):
        assert got is not None and bytes(got[0]) == bytes(data) and got[1] == crc


@pytest.mark.parametrize("direct", [True, False], ids=["direct I/O", "buffered"])
def test_segment_blocks_read_back_checked_into_a_pooled_buffer(
    tmp_path: Path, direct: bool
) -> None:
    block = 64 << 10
    pool = BufferPool(block)
    cache = DiskCache(tmp_path, 10 << 20)
    cache.direct = direct
    blocks = [os.urandom(block), os.urandom(block), os.urandom(1000)]  # the last one short
    parts = []
    for index, data in enumerate(blocks):
        buffer = memoryview(pool.take())[: len(data)]
        buffer[:] = data
        parts.append((index, buffer, zlib.crc32(data)))
    segment = key(7)
    assert cache.put_segment(segment, block, 4, parts)
    for index, data in enumerate(blocks):
        into = pool.take()
        found = cache.get_segment_block(segment, index, into)
        assert found is not None
        got, crc = found
        assert bytes(got) == data and crc == zlib.crc32(data)
    assert cache.get_segment_block(segment, 3, pool.take()) is None  # never stored
    # A flipped byte on disk: a miss, and the segment is gone.
    (path,) = files(cache)
    raw = bytearray(path.read_bytes())
    raw[4096 + block + 10] ^= 1
    path.write_bytes(raw)
    assert cache.get_segment_block(segment, 1, pool.take()) is None
    assert not files(cache)


@pytest.mark.parametrize("direct", [True, False], ids=["direct I/O", "buffered"])
def test_a_run_of_segment_blocks_is_read_in_one_go_each_checked(
    tmp_path: Path, direct: bool
) -> None:
    """Read-ahead loads several blocks of a segment with one open: each comes back checked,
    one the file does not hold is ``None``, and one corrupt block fails the whole run (the
    file goes: nothing from it is trusted)."""
    block = 64 << 10
    pool = BufferPool(block)
    cache = DiskCache(tmp_path, 10 << 20)
    cache.direct = direct
    blocks = {0: os.urandom(block), 1: os.urandom(block), 3: os.urandom(500)}
    parts = [(i, data, zlib.crc32(data)) for i, data in blocks.items()]
    segment = key(5)
    assert cache.put_segment(segment, block, 4, parts)
    found = cache.get_segment_blocks(segment, [0, 1, 2, 3], [pool.take() for _ in range(4)])
    assert found[2] is None  # never stored
    for index, data in blocks.items():
        got = found[index]
        assert got is not None and bytes(got[0]) == data and got[1] == zlib.crc32(data)
    del found, got
    (path,) = files(cache)
    raw = bytearray(path.read_bytes())
    raw[4096 + 10] ^= 1  # block 0
    path.write_bytes(raw)
    assert cache.get_segment_blocks(segment, [0, 1], [pool.take(), pool.take()]) == [None, None]
    assert not files(cache)


def test_a_block_joining_a_stored_segment_keeps_the_blocks_already_there(tmp_path: Path) -> None:
    block = 4096
    blocks = [os.urandom(block) for _ in range(4)]

    def part(index: int) -> tuple[int, Buffer, int]:
        return index, blocks[index], zlib.crc32(blocks[index])

    cache = DiskCache(tmp_path, 10 << 20)
    segment = key(3)
    assert cache.put_segment(segment, block, 4, [part(0), part(1)])
    assert cache.put_segment(segment, block, 4, [part(3)])  # a random reader's block
    # Another process (or this one after a restart), which has not seen what the file holds:
    again = DiskCache(tmp_path, 10 << 20)
    assert again.put_segment(segment, block, 4, [part(2)])
    for index in range(4):
        found = again.get_segment_block(segment, index)
        assert found is not None and bytes(found[0]) == blocks[index], index
        assert again.contains(segment, index)


def test_two_writes_of_one_segment_side_by_side_keep_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block fetched alone and the run beside it reach the disk in two worker threads at
    once: the file keeps the blocks of both (each write keeps what the file holds, so they
    must not overlap)."""
    block = 4096
    blocks = [os.urandom(block) for _ in range(4)]
    cache = DiskCache(tmp_path, 10 << 20)
    publish = cache._publish

    def slow_publish(*args: Any) -> Any:
        time.sleep(0.1)  # widen the window between reading the file and replacing it
        return publish(*args)

    monkeypatch.setattr(cache, "_publish", slow_publish)
    segment = key(9)
    writes = [[0], [1, 2, 3]]
    threads = [
        threading.Thread(
            target=cache.put_segment,
            args=(segment, block, 4, [(i, blocks[i], zlib.crc32(blocks[i])) for i in indexes]),
        )
        for indexes in writes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    again = DiskCache(tmp_path, 10 << 20)  # what the file holds, as another process sees it
    for index in range(4):
        found = again.get_segment_block(segment, index)
        assert found is not None and bytes(found[0]) == blocks[index], index


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo", "directory"])
def test_what_is_not_a_cache_file_is_a_miss_and_goes(tmp_path: Path, kind: str) -> None:
    """Never read through a link, never block on a FIFO, never read a device to its end."""
    block = 4096
    data = os.urandom(block)
    cache = DiskCache(tmp_path, 10 << 20)
    assert cache.put(key(1), data)
    assert cache.put_segment(key(2), block, 4, [(0, data, zlib.crc32(data))])
    for path in files(cache):
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
        else:
            path.symlink_to("/dev/zero")
    assert cache.get_checked(key(1)) is None  # (a blocked open would hang: the test's timeout)
    assert cache.get_segment_block(key(2), 0) is None
    assert not files(cache)
    assert not [p for p in (tmp_path).rglob("*") if p.is_symlink() or p.is_fifo()]


async def test_a_segment_loaded_into_one_map_goes_back_to_the_pool_once(tmp_path: Path) -> None:
    """A disk load of a whole segment into one map, two of its blocks missing: the map is given
    back once, by the memory tier with its last block, never once per missing block (a map
    twice in line could be lent to two takers)."""
    block = 64 << 10
    pool = BufferPool(block, runs=4)
    disk = DiskCache(tmp_path, 10 << 20)
    blocks = {0: os.urandom(block), 1: os.urandom(block)}
    segment = key(9)
    assert disk.put_segment(segment, block, 4, [(i, d, zlib.crc32(d)) for i, d in blocks.items()])
    tier = Tiered(MemoryCache(16 * block, pool), disk)
    keys = [key(100 + i) for i in range(4)]
    found = await tier.get_segment_blocks(segment, [0, 1, 2, 3], keys, lambda i, crc: None)
    assert [bytes(f) if f is not None else None for f in found] == [
        blocks[0],
        blocks[1],
        None,
        None,
    ]
    runs = pool._back[4 * block]
    assert not runs  # held by the memory tier
    del found
    for k in keys[:2]:
        tier.memory.used(k)  # read: no longer kept as fetched ahead
    for n in range(16):  # the tier lets both blocks go
        tier.memory.put(key(200 + n), b"z" * block)
    assert len(runs) == 1
