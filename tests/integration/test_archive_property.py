"""Property tests: random archives read through RemoteArchive equal what ``zipfile`` returns.

The archives go through a real HTTP range server on 127.0.0.1 (a background thread). The
small-member and block thresholds are lowered inside each example, so that the streaming
readers (stored ranges, deflate checkpoints, bzip2/lzma cursors) and multi-block fetches are
exercised with archives of a few hundred KiB.
"""

from __future__ import annotations

import io
import itertools
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskfs.archive import member as member_mod
from taskfs.archive.cache import DiskCache, MemoryCache, Tiered
from taskfs.archive.rangeio import RangeSource
from taskfs.archive.remote import RemoteArchive
from taskfs.archive.tuning import DEFAULT, Tuning
from taskfs.archive.zipindex import Entry, clean_path, walk
from tests.rangeserver import Server, serve_in_thread
from tests.support import read_all

METHODS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
names = st.lists(
    st.text(alphabet="abcxyz_-.é名0123", min_size=1, max_size=8).filter(
        lambda s: s not in (".", "..")
    ),
    min_size=1,
    max_size=4,
).map("/".join)
payloads = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda n, b: b * n, st.integers(0, 40_000), st.binary(min_size=1, max_size=12)),
    st.builds(
        lambda n: b"".join(f"{i} {i * 0.5:.3f} {i % 7}\n".encode() for i in range(n)),
        st.integers(0, 30_000),
    ),
)
member_specs = st.lists(
    st.tuples(names, payloads, st.sampled_from(METHODS), st.booleans()),
    min_size=1,
    max_size=25,
)
reads = st.lists(st.tuples(st.floats(0, 1), st.integers(1, 70_000)), max_size=8)

_counter = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve_in_thread() as running:
        yield running


def build(specs: list[tuple[str, bytes, int, bool]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are part of the test
        zf.mkdir("artifacts")
        for name, data, method, zip64 in specs:
            info = zipfile.ZipInfo(f"artifacts/{name}")
            info.compress_type = method
            with zf.open(info, "w", force_zip64=zip64) as out:
                out.write(data)
    return buf.getvalue()


# Small sizes, so that small archives reach every path: many blocks per member, cursors
# rather than whole reads, several steps and checkpoints per member, batches.
TINY = Tuning(
    block=16384,
    max_request=65536,
    batch_start=4096,
    small_compressed=2048,
    small_size=8192,
    step_out=16384,
    step_in=4096,
    checkpoint_spacing=8192,
)


async def check(
    server: Server,
    path: str,
    data: bytes,
    extra_reads: list[tuple[float, int]],
    cache_dir: Path,
    tuning: Tuning = DEFAULT,
) -> None:
    expected = expected_files(data)

    async def url(refresh: bool) -> str:
        return server.url + path

    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
        cache = Tiered(MemoryCache(1 << 20), DiskCache(cache_dir, 4 << 20))
        source = RangeSource(http, url)  # blocks over its own HttpTransport: real sockets
        nursery.start_soon(_closed_at_the_end, source)
        archive = await RemoteArchive.open(
            source,
            cache,
            path,
            nursery=nursery,
            budget=member_mod.ReadBudget(20_000, 20_000, 20_000),  # small windows
            tuning=tuning,
        )
        files = dict(walk(archive.tree, archive.entries))
        assert set(files) == set(expected)
        for parts, entry in files.items():
            body = expected[parts]
            assert entry.size == len(body)
            assert await read_all(archive, entry, 50_000) == body, parts
            fresh = archive.open_member(entry)
            for fraction, size in extra_reads:
                offset = int(fraction * len(body))
                assert await fresh.read(offset, size) == body[offset : offset + size]
        nursery.cancel_scope.cancel()


async def _closed_at_the_end(source: RangeSource) -> None:
    try:
        await trio.sleep_forever()
    finally:
        source.close()


def expected_files(data: bytes) -> dict[tuple[str, ...], bytes]:
    """What the tree must show, from ``zipfile``: every file under ``artifacts/``, later
    duplicates winning, minus files shadowed by a directory of the same name."""
    reference = zipfile.ZipFile(io.BytesIO(data))
    found: dict[tuple[str, ...], bytes] = {}
    for info in reference.infolist():
        parts = clean_path(info.filename.removeprefix("artifacts/"))
        if info.filename.startswith("artifacts/") and parts and not info.is_dir():
            found[parts] = reference.read(info)
    dirs = {parts[:i] for parts in found for i in range(1, len(parts))}
    return {parts: body for parts, body in found.items() if parts not in dirs}


def test_the_check_fails_when_a_member_is_missing(server: Server, tmp_path: Path) -> None:
    """The property check itself can fail: a tree that loses one member is caught."""
    specs = [(f"f{i}", b"x" * i, zipfile.ZIP_DEFLATED, False) for i in range(1, 4)]
    data = build(specs)
    path = server.objects.put("dropped.zip", data)

    real_walk = walk

    def losing(tree: Any, entries: Any) -> Iterator[tuple[tuple[str, ...], Entry]]:
        yield from list(real_walk(tree, entries))[:-1]

    with mock.patch(f"{__name__}.walk", losing), pytest.raises(ExceptionGroup) as caught:
        trio.run(check, server, path, data, [], tmp_path)
    assert caught.group_contains(AssertionError, match="f3")
    trio.run(check, server, path, data, [], tmp_path)  # and passes without the loss


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(specs=member_specs, extra_reads=reads)
def test_random_archives_read_like_zipfile(
    server: Server, specs: list[tuple[str, bytes, int, bool]], extra_reads: list[tuple[float, int]]
) -> None:
    data = build(specs)
    path = server.objects.put(f"prop-{next(_counter)}.zip", data)
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(check, server, path, data, extra_reads, Path(tmp), TINY)


def test_many_members(server: Server, tmp_path: Path) -> None:
    specs = [
        (f"d{i % 50}/f{i}.txt", f"{i}\n".encode() * (i % 5), zipfile.ZIP_DEFLATED, False)
        for i in range(2000)
    ]
    data = build(specs)
    path = server.objects.put("many.zip", data)
    trio.run(check, server, path, data, [], tmp_path)


def test_entry_type_is_plain() -> None:
    assert Entry.__slots__  # entries stay compact: no per-instance __dict__
