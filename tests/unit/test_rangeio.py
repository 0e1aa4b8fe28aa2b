"""Ranged GETs: validation of every answer, ETag pinning, URL refresh, retries, deadlines,
on both ways a body is received: over httpx (``fetch``: the tail, the directory) and into the
caller's buffer in a worker thread (``fetch_into``: blocks), the two sharing one set of
rules."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from taskfs.archive.rangeio import RangeSource
from taskfs.errors import ArchiveError, AuthError, ProtocolError, ServiceError, StaleError
from taskfs.retry import RetryPolicy
from tests.rangeserver import Answer, AnswerTransport, Objects, Seen

BODY = bytes(range(256)) * 64  # 16 KiB


def setup(objects: Objects, deadline: float = 5.0) -> tuple[RangeSource, list[bool]]:
    path = objects.put("a.zip", BODY)
    refreshes: list[bool] = []

    async def url(refresh: bool) -> str:
        refreshes.append(refresh)
        return f"http://storage{path}"

    http = httpx.AsyncClient(transport=objects.transport())
    source = RangeSource(http, url, RetryPolicy(deadline=deadline), "a.zip", bulk=objects.bulk())
    return source, refreshes


async def fetch(source: RangeSource, start: int, end: int, path: str) -> bytes:
    """``[start, end)`` over httpx (``path`` "httpx") or into a buffer ("bulk")."""
    if path == "httpx":
        return bytes(await source.fetch(start, end))
    # Into several buffers: the body fills them one after another.
    half = (end - start) // 2
    first, second = bytearray(half), bytearray(end - start - half)
    await source.fetch_into(start, [memoryview(first), memoryview(second)])
    return bytes(first + second)


PATHS = pytest.mark.parametrize("path", ["httpx", "bulk"])


@PATHS
async def test_tail_and_ranges(path: str) -> None:
    objects = Objects()
    source, _ = setup(objects)
    tail = await source.open_tail(1000)
    assert tail == BODY[-1000:] and source.size == len(BODY)
    assert source.etag == objects.etags["a.zip"]
    assert await fetch(source, 10, 20, path) == BODY[10:20]
    assert await fetch(source, 0, len(BODY), path) == BODY
    assert objects.seen[0].if_match is None
    assert all(s.if_match == source.etag for s in objects.seen[1:])
    small = Objects()
    tiny, _ = setup(small)
    small.put("a.zip", b"PK")
    assert await tiny.open_tail(1000) == b"PK"


async def test_requests_are_identity_encoded() -> None:
    seen_headers: list[httpx.Headers] = []
    objects = Objects()
    inner = objects.transport()

    async def handler(request: httpx.Request) -> httpx.Response:
        seen_headers.append(request.headers)
        return await inner.handle_async_request(request)

    path = objects.put("a.zip", BODY)

    async def url(refresh: bool) -> str:
        return f"http://storage{path}"

    source = RangeSource(httpx.AsyncClient(transport=httpx.MockTransport(handler)), url)
    await source.open_tail(10)
    await source.fetch(0, 10)
    assert all(h["accept-encoding"] == "identity" for h in seen_headers)
    assert "x-api-key" not in {k.lower() for k in seen_headers[0]}


def _fault(status: int | None = None, **changes: object) -> object:
    def fault(seen: Seen, answer: Answer) -> Answer | None:
        if seen.if_match is None:  # leave open_tail alone
            return None
        new = Answer(status or answer.status, dict(answer.headers), answer.body)
        for name, value in changes.items():
            if name == "body":
                new.body = value  # type: ignore[assignment]
            else:
                new.headers[name.replace("_", "-")] = value  # type: ignore[assignment]
        return new

    return fault


@pytest.mark.parametrize(
    ("fault", "error", "message"),
    [
        (_fault(200), ProtocolError, "ignored the Range"),
        (_fault(content_range="bytes 0-9/16384"), ProtocolError, "asked for"),
        (_fault(content_range="bytes 10-19/99999"), StaleError, "changed size"),
        (_fault(content_range="junk"), ProtocolError, "Content-Range"),
        (_fault(content_encoding="gzip"), ProtocolError, "compressed"),
        (_fault(content_encoding="br"), ProtocolError, "compressed"),
        (_fault(412), StaleError, "ETag"),
        (_fault(404), StaleError, "no longer exists"),
        (_fault(416), ProtocolError, "416"),
    ],
)
@PATHS
async def test_bad_answers(fault: object, error: type[Exception], message: str, path: str) -> None:
    objects = Objects()
    source, _ = setup(objects)
    await source.open_tail(100)
    objects.fault = fault  # type: ignore[assignment]
    with pytest.raises(error, match=message):
        await fetch(source, 10, 20, path)


@PATHS
async def test_changed_etag_is_stale(path: str) -> None:
    objects = Objects()
    source, _ = setup(objects)
    await source.open_tail(100)
    objects.put("a.zip", BODY[::-1])  # replaced: new ETag
    with pytest.raises(StaleError):
        await fetch(source, 0, 10, path)


@PATHS
async def test_a_body_longer_than_promised_is_refused(path: str) -> None:
    objects = Objects()
    source, _ = setup(objects)
    await source.open_tail(100)
    objects.fault = _fault(body=BODY[10:30])  # type: ignore[assignment] # 20 where 10 promised
    with pytest.raises(ProtocolError, match="longer"):
        await fetch(source, 10, 20, path)


@PATHS
async def test_expired_url_is_refreshed_once(path: str) -> None:
    objects = Objects()
    source, refreshes = setup(objects)
    await source.open_tail(100)
    calls = 0

    def expired_once(seen: Seen, answer: Answer) -> Answer | None:
        nonlocal calls
        calls += 1
        return Answer(403, {}, b"expired") if calls == 1 else None

    objects.fault = expired_once
    assert await fetch(source, 0, 10, path) == BODY[:10]
    assert refreshes == [False, True]
    objects.fault = lambda seen, answer: Answer(403, {}, b"no")
    with pytest.raises(AuthError, match="403"):
        await fetch(source, 0, 10, path)


@PATHS
async def test_transient_failures_recover(path: str) -> None:
    """(On trio's real clock: a worker thread's wait is real time.)"""
    objects = Objects()
    source, _ = setup(objects)
    await source.open_tail(100)
    script = iter(["503", "reset", "short", "429"])

    def flaky(seen: Seen, answer: Answer) -> Answer | None:
        step = next(script, None)
        if step == "503":
            return Answer(503, {"retry-after": "1"}, b"busy")
        if step == "reset":
            return Answer(206, answer.headers, answer.body, cut_after=3)
        if step == "short":
            return Answer(206, answer.headers, answer.body[:3])
        if step == "429":
            return Answer(429, {}, b"slow down")
        return None

    objects.fault = flaky
    start = trio.current_time()
    assert await fetch(source, 100, 200, path) == BODY[100:200]
    assert objects.gets() == 1 + 5
    assert trio.current_time() - start >= 1.0  # Retry-After was honoured


@PATHS
async def test_dead_server_fails_within_the_deadline(path: str) -> None:
    objects = Objects()
    source, _ = setup(objects, deadline=1.0)
    await source.open_tail(100)
    objects.fault = lambda seen, answer: Answer(503, {}, b"down")
    start = trio.current_time()
    with pytest.raises(ServiceError, match="gave up"):
        await fetch(source, 0, 10, path)
    assert trio.current_time() - start <= 1.0


async def test_a_stalled_transfer_in_a_thread_is_stopped_at_the_deadline() -> None:
    """The body stalls half way: the read fails at its deadline, and the worker thread's
    transfer is stopped then (its ``Stop``), not when the peer wakes up."""
    objects = Objects()
    source, _ = setup(objects, deadline=1.0)
    await source.open_tail(100)
    stopped: list[float] = []

    class Watched(AnswerTransport):
        def get(self, *args: Any) -> None:
            try:
                super().get(*args)
            finally:
                stopped.append(time.monotonic())

    source._bulk = Watched(objects, threaded=True)
    objects.fault = lambda seen, answer: replace(answer, stall_after=5, stall=3600)
    start = time.monotonic()
    with pytest.raises(ServiceError, match="no answer within 1 s"):
        await fetch(source, 0, 10, "bulk")
    assert time.monotonic() - start == pytest.approx(1.0, abs=0.3)
    with trio.fail_after(2):
        while not stopped:
            await trio.sleep(0.01)
    assert stopped[0] - start < 1.5


async def test_stalled_server_fails_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stall(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)
        raise AssertionError("unreachable")

    async def url(refresh: bool) -> str:
        return "http://storage/o/a.zip"

    source = RangeSource(
        httpx.AsyncClient(transport=httpx.MockTransport(stall)), url, RetryPolicy(deadline=2.0)
    )
    start = trio.current_time()
    with pytest.raises(ServiceError, match="no answer within 2 s"):
        await source.open_tail(10)
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_empty_object_is_not_a_zip() -> None:
    objects = Objects()
    source, _ = setup(objects)
    objects.put("a.zip", b"")
    with pytest.raises(ArchiveError, match="empty"):
        await source.open_tail(100)
