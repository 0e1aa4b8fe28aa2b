"""Ranged GETs: validation of every answer, ETag pinning, URL refresh, retries, deadlines."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from taskfs.archive.rangeio import RangeSource
from taskfs.errors import ArchiveError, AuthError, ProtocolError, ServiceError, StaleError
from taskfs.retry import RetryPolicy
from tests.rangeserver import Answer, Objects, Seen

BODY = bytes(range(256)) * 64  # 16 KiB


def setup(objects: Objects, deadline: float = 5.0) -> tuple[RangeSource, list[bool]]:
    path = objects.put("a.zip", BODY)
    refreshes: list[bool] = []

    async def url(refresh: bool) -> str:
        refreshes.append(refresh)
        return f"http://storage{path}"

    http = httpx.AsyncClient(transport=objects.transport())
    return RangeSource(http, url, RetryPolicy(deadline=deadline), "a.zip"), refreshes


async def test_tail_and_ranges() -> None:
    objects = Objects()
    source, _ = setup(objects)
    tail = await source.open_tail(1000)
    assert tail == BODY[-1000:] and source.size == len(BODY)
    assert source.etag == objects.etags["a.zip"]
    assert await source.fetch(10, 20) == BODY[10:20]
    assert await source.fetch(0, len(BODY)) == BODY
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
async def test_bad_answers(fault: object, error: type[Exception], message: str) -> None:
    objects = Objects()
    source, _ = setup(objects)
    await source.open_tail(100)
    objects.fault = fault  # type: ignore[assignment]
    with pytest.raises(error, match=message):
        await source.fetch(10, 20)


async def test_changed_etag_is_stale() -> None:
    objects = Objects()
    source, _ = setup(objects)
    await source.open_tail(100)
    objects.put("a.zip", BODY[::-1])  # replaced: new ETag
    with pytest.raises(StaleError):
        await source.fetch(0, 10)


async def test_expired_url_is_refreshed_once() -> None:
    objects = Objects()
    source, refreshes = setup(objects)
    await source.open_tail(100)
    calls = 0

    def expired_once(seen: Seen, answer: Answer) -> Answer | None:
        nonlocal calls
        calls += 1
        return Answer(403, {}, b"expired") if calls == 1 else None

    objects.fault = expired_once
    assert await source.fetch(0, 10) == BODY[:10]
    assert refreshes == [False, True]
    objects.fault = lambda seen, answer: Answer(403, {}, b"no")
    with pytest.raises(AuthError, match="403"):
        await source.fetch(0, 10)


async def test_transient_failures_recover(autojump_clock: trio.testing.MockClock) -> None:
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
    assert await source.fetch(100, 200) == BODY[100:200]
    assert objects.gets() == 1 + 5
    assert trio.current_time() - start >= 1.0  # Retry-After was honoured


async def test_dead_server_fails_within_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    objects = Objects()
    source, _ = setup(objects, deadline=3.0)
    await source.open_tail(100)
    objects.fault = lambda seen, answer: Answer(503, {}, b"down")
    start = trio.current_time()
    with pytest.raises(ServiceError, match="gave up"):
        await source.fetch(0, 10)
    assert trio.current_time() - start <= 3.0


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
