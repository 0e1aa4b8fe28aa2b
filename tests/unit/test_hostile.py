"""Hostile archives through RemoteArchive: errors or safe trees, never crashes or wrong bytes."""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trio

from taskfs.archive.cache import MemoryCache, Tiered
from taskfs.archive.rangeio import RangeSource
from taskfs.archive.remote import RemoteArchive
from taskfs.archive.zipindex import DirNode, walk
from taskfs.errors import ArchiveError, TaskfsError, UnsupportedError
from tests.hostile import Case, corpus, many_entries
from tests.rangeserver import Objects
from tests.support import read_all

Opener = Callable[[bytes], Awaitable[RemoteArchive]]


@pytest.fixture
async def opener(nursery: trio.Nursery) -> AsyncIterator[Opener]:
    objects = Objects()
    async with httpx.AsyncClient(transport=objects.transport()) as http:
        count = 0

        async def open_archive(data: bytes) -> RemoteArchive:
            nonlocal count
            count += 1
            path = objects.put(f"a{count}.zip", data)

            async def url(refresh: bool) -> str:
                return f"http://store{path}"

            cache = Tiered(MemoryCache(8 << 20), None)
            return await RemoteArchive.open(
                RangeSource(http, url, bulk=objects.bulk()), cache, f"a{count}", nursery=nursery
            )

        yield open_archive


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.name)
async def test_hostile_archive(opener: Opener, case: Case) -> None:
    if not case.opens:
        with pytest.raises(ArchiveError):
            await opener(case.data)
        return
    archive = await opener(case.data)
    files = {"/".join(path): entry for path, entry in walk(archive.tree, archive.entries)}
    assert case.shown <= set(files), sorted(files)
    for path in files:
        parts = path.split("/")
        assert all(p not in ("", ".", "..") and "\x00" not in p for p in parts), path
        assert not path.startswith("/")
    for path, kind in case.unreadable.items():
        error = UnsupportedError if kind == "ENOTSUP" else ArchiveError
        with pytest.raises(error):
            await read_all(archive, files[path], 1 << 16)
    for path, body in case.contents.items():
        assert await read_all(archive, files[path], 1 << 16) == body


async def test_seventy_thousand_entries(opener: Opener) -> None:
    archive = await opener(many_entries())
    assert len(archive.entries) == 70_000
    top = archive.tree.children
    assert len(top) == 100 and all(isinstance(node, DirNode) for node in top.values())


async def test_errors_are_typed(opener: Opener) -> None:
    """Whatever goes wrong inside, callers see ``TaskfsError`` subclasses only, with an errno
    the mount answers for a broken archive (EIO, ENOTSUP): every archive of the corpus opened
    (refused exactly where the case says it is), every member it lists read; reads that give
    bytes give the case's bytes. Each outcome is seen at least once."""
    seen: Counter[str] = Counter()
    for case in corpus():
        try:
            archive = await opener(case.data)
        except TaskfsError as exc:
            assert not case.opens, (case.name, exc)
            assert exc.errno == errno.EIO, (case.name, exc)
            seen["refused"] += 1
            continue
        assert case.opens, case.name
        for path, entry in walk(archive.tree, archive.entries):
            name = "/".join(path)
            try:
                data = await read_all(archive, entry, 1 << 16)
            except TaskfsError as exc:
                assert exc.errno in (errno.EIO, errno.ENOTSUP), (case.name, name, exc)
                seen["unreadable"] += 1
            else:
                assert name not in case.unreadable, (case.name, name)
                assert data == case.contents.get(name, data), (case.name, name)
                seen["read"] += 1
    assert seen["refused"] and seen["unreadable"] and seen["read"], seen
