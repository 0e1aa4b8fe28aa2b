"""Ranged GETs of one remote object, pinned to the ETag seen when it was opened.

Owns: the HTTP conversation with object storage behind a signed URL: suffix and range requests,
their validation (206, ``Content-Range``, body length), ``If-Match`` on the ETag, refreshing
an expired signed URL, and the retry/deadline policy for each fetch.

Must stay true:
* a ``Range`` answered with anything but 206 and a matching ``Content-Range`` is never taken as
  data: a 200 means the server ignored the range (``ProtocolError``);
* every request after the first carries ``If-Match`` with the strong ETag seen at open; a 412,
  a different total size or a vanished object is ``StaleError`` (ESTALE);
* ``Accept-Encoding: identity`` always (a compressed body would not be the bytes asked for);
* a 403 refreshes the signed URL once per fetch (expired URLs) without losing cached data;
* every fetch ends by the policy's deadline; 429/5xx/resets/short bodies are retried.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import BinaryIO, cast

import httpx
import trio

from taskfs.archive.fetch import BodyLengthError, BulkTransport, HttpTransport, Stop
from taskfs.errors import ArchiveError, AuthError, NotFoundError, ProtocolError, StaleError
from taskfs.retry import (
    RETRY_STATUSES,
    Breaker,
    Retryable,
    RetryPolicy,
    retry_after_seconds,
    with_retries,
)
from taskfs.tls import tls_context

log = logging.getLogger(__name__)

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

UrlProvider = Callable[[bool], Awaitable[str]]
"""Returns the object's signed URL; ``True`` asks for a fresh one (the old one expired)."""


Transport = httpx.AsyncBaseTransport


def data_client(
    max_connections: int = 16, timeout: float = 10.0, transport: Transport | None = None
) -> httpx.AsyncClient:
    """The HTTP client for object storage: no API key, identity encoding, pooled."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout, connect=5.0),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        headers={"Accept-Encoding": "identity"},
        follow_redirects=True,
        verify=tls_context(),
    )


class RangeSource:
    """One object behind a signed URL. ``open_tail`` first, then ``fetch`` any range."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: UrlProvider,
        policy: RetryPolicy | None = None,
        name: str = "archive",
        *,
        breaker: Breaker | None = None,
        bulk: BulkTransport | None = None,
        on_bulk: Callable[[int], None] | None = None,
    ) -> None:
        self._http = http
        # Told of every bulk response (its promised length), as httpx's hooks are of the rest.
        self._on_bulk = on_bulk
        # Large bodies (``fetch_into``): received into the caller's buffer in a worker thread
        # (a transport of its own unless given one: ``close`` closes it).
        self._own_bulk = bulk is None
        self._bulk = bulk or HttpTransport(policy.deadline if policy else RetryPolicy().deadline)
        self.breaker = breaker
        self._url_provider = url
        self._url: str | None = None
        self.policy = policy or RetryPolicy()
        self.name = name
        self.size: int | None = None
        self.etag: str | None = None

    def close(self) -> None:
        """Close the bulk transport's connections, if it is this source's own."""
        if self._own_bulk:
            self._bulk.close()

    async def _current_url(self, refresh: bool) -> str:
        if self._url is None or refresh:
            self._url = await self._url_provider(refresh)
        return self._url

    async def open_tail(self, length: int) -> bytes:
        """The last ``length`` bytes (fewer if the object is smaller); learns size and ETag."""
        tail = await self._get(f"bytes=-{length}", None, first=True)
        return tail if isinstance(tail, bytes) else bytes(tail)

    async def fetch(self, start: int, end: int) -> bytes | bytearray:
        """Bytes ``[start, end)`` of the object, exactly (in one ``bytearray`` when large:
        callers slice what they keep)."""
        self._check_bounds(start, end)
        return await self._get(f"bytes={start}-{end - 1}", (start, end), first=False)

    async def fetch_into(self, start: int, views: Sequence[memoryview]) -> None:
        """The object's bytes from ``start`` into ``views``, one after another, received in a
        worker thread with no copy but the socket's (``taskfs.archive.fetch``). A cancelled
        fetch (deadline, unmount) stops its transfer at once; its buffers are then the
        caller's to drop, never to reuse (the thread may have written part of them)."""
        end = start + sum(len(view) for view in views)
        self._check_bounds(start, end)
        refreshed = False

        async def attempt() -> None:
            nonlocal refreshed
            url = await self._current_url(False)
            headers = self._headers(f"bytes={start}-{end - 1}")

            answered: list[int] = []  # the response's promised length, once it came

            def accept(status: int, answer: Mapping[str, str]) -> Sequence[memoryview]:
                length = answer.get("content-length", "")
                answered.append(int(length) if length.isdigit() else 0)
                self._check_status(status, answer, False, refreshed)
                self._check_range(answer, (start, end), False)
                return views

            stop = Stop()
            done = False
            try:
                if self._bulk.blocking:
                    await trio.to_thread.run_sync(
                        self._bulk.get, url, headers, accept, stop, abandon_on_cancel=True
                    )
                else:
                    self._bulk.get(url, headers, accept, stop)
                done = True
            except _UrlRefusedError:
                refreshed = True
                raise await self._refused() from None
            except BodyLengthError as exc:
                if exc.short:
                    raise Retryable(str(exc)) from exc
                raise ProtocolError(f"{self.name}: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
                    self._url = None  # ask for the URL again: the server may have moved
                raise Retryable(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc
            finally:
                if not done:
                    stop.press()  # a cancelled transfer ends now, not when the peer says
                if answered and self._on_bulk is not None:
                    self._on_bulk(answered[0])

        await with_retries(attempt, self.policy, f"reading {self.name}", self.breaker)

    async def fetch_to(self, start: int, end: int, file: BinaryIO) -> None:
        """Bytes ``[start, end)`` of the object written to ``file`` from where it stands (a
        large range that is read back piece by piece: it costs no memory while it arrives).
        A retry writes from the same place again."""
        self._check_bounds(start, end)
        await self._get(f"bytes={start}-{end - 1}", (start, end), first=False, file=file)

    async def _get(
        self,
        range_header: str,
        want: tuple[int, int] | None,
        first: bool,
        file: BinaryIO | None = None,
    ) -> bytes | bytearray:
        refreshed = False
        origin = None if file is None else file.tell()

        async def attempt() -> bytes | bytearray:
            nonlocal refreshed
            url = await self._current_url(False)
            headers = self._headers(range_header)
            try:
                async with self._http.stream("GET", url, headers=headers) as response:
                    self._check_status(response.status_code, response.headers, first, refreshed)
                    expected = self._check_range(response.headers, want, first)
                    if file is not None:
                        assert origin is not None
                        file.seek(origin)
                        file.truncate()
                        await _write_body(response, expected, self.name, file)
                        return b""
                    return await _read_body(response, expected, self.name, want is not None)
            except _UrlRefusedError:
                refreshed = True
                raise await self._refused() from None
            except httpx.TransportError as exc:
                if isinstance(exc, httpx.ConnectError):
                    self._url = None  # ask for the URL again: the server may have moved
                raise Retryable(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc
            except httpx.DecodingError as exc:
                raise ProtocolError(f"{self.name}: the server compressed a range response") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ProtocolError(f"{self.name}: {type(exc).__name__}: {exc}") from exc

        return await with_retries(attempt, self.policy, f"reading {self.name}", self.breaker)

    def _check_bounds(self, start: int, end: int) -> None:
        if self.size is None:
            raise RuntimeError("open_tail() must come first")
        if not 0 <= start < end <= self.size:
            raise ValueError(f"range {start}-{end} outside 0-{self.size}")

    def _headers(self, range_header: str) -> dict[str, str]:
        """A range request's headers: no compression, and this ETag's bytes only."""
        headers = {"Range": range_header, "Accept-Encoding": "identity"}
        if self.etag is not None:
            headers["If-Match"] = self.etag
        return headers

    async def _refused(self) -> Retryable:
        """Storage refused the signed URL on a first try (403): a fresh one is asked for, and
        the attempt is retried at once with it."""
        log.debug("%s: signed URL refused (403); asking for a fresh one", self.name)
        await self._current_url(True)
        return Retryable("signed URL expired", retry_after=0.0)

    def _check_status(
        self, status: int, headers: Mapping[str, str], first: bool, refreshed: bool
    ) -> None:
        """Raise for any answer but 206 (before a byte of the body is read)."""
        if status == 403 and not refreshed:
            raise _UrlRefusedError
        if status == 403:
            raise AuthError(f"{self.name}: storage refused the signed URL (403)")
        if status == 412:
            raise StaleError(f"{self.name} changed since it was opened (ETag mismatch)")
        if status == 404 and first:
            raise NotFoundError(f"{self.name} does not exist")
        if status == 404:
            raise StaleError(f"{self.name} no longer exists")
        if status == 416 and first:
            raise ArchiveError(f"{self.name} is empty: not a ZIP archive")
        if status in RETRY_STATUSES:
            raise Retryable(f"HTTP {status}", retry_after_seconds(headers.get("retry-after")))
        if status == 200:
            raise ProtocolError(f"{self.name}: the server ignored the Range header (200)")
        if status != 206:
            raise ProtocolError(f"{self.name}: unexpected HTTP {status} for a range request")

    def _check_range(
        self, headers: Mapping[str, str], want: tuple[int, int] | None, first: bool
    ) -> int:
        """Validate a 206's headers; returns the body length they promise."""
        if headers.get("content-encoding", "identity") != "identity":
            raise ProtocolError(f"{self.name}: the server compressed a range response")
        match = CONTENT_RANGE.fullmatch(headers.get("content-range", "").strip())
        if match is None or match.group(3) == "*":
            raise ProtocolError(f"{self.name}: 206 without a usable Content-Range")
        start, last, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
        if first:
            etag = headers.get("etag")
            self.etag = etag if etag and not etag.startswith("W/") else None
            self.size = total
            if last != total - 1 or start > last:
                raise ProtocolError(f"{self.name}: suffix range answered with {start}-{last}")
        else:
            if total != self.size:
                raise StaleError(f"{self.name} changed size since it was opened")
            assert want is not None
            if (start, last + 1) != want:
                raise ProtocolError(
                    f"{self.name}: asked for {want[0]}-{want[1] - 1}, got {start}-{last}"
                )
        return last - start + 1


def _body(response: httpx.Response) -> contextlib.aclosing[AsyncGenerator[bytes, None]]:
    """The body's chunks, closed on the way out even when a check ends the loop early (an
    unclosed one is finished by the garbage collector, with a warning)."""
    return contextlib.aclosing(cast("AsyncGenerator[bytes, None]", response.aiter_bytes()))


class _UrlRefusedError(Exception):
    """A 403 on the first try: the signed URL may have expired."""


async def _each_chunk(
    response: httpx.Response, expected: int, name: str, take: Callable[[bytes], object]
) -> None:
    """Hand each chunk of the body to ``take``: exactly ``expected`` bytes in all, or
    ``ProtocolError`` as soon as it is longer, ``Retryable`` when it ends short."""
    got = 0
    async with _body(response) as chunks:
        async for chunk in chunks:
            got += len(chunk)
            if got > expected:
                raise ProtocolError(
                    f"{name}: body longer than its Content-Range ({expected} bytes)"
                )
            take(chunk)
    if got != expected:
        raise Retryable(f"short body: {got} of {expected} bytes")


async def _write_body(response: httpx.Response, expected: int, name: str, file: BinaryIO) -> None:
    """Exactly ``expected`` bytes of body into ``file``, or ``Retryable`` for a short one."""
    await _each_chunk(response, expected, name, file.write)  # page cache: no thread needed


async def _read_body(
    response: httpx.Response, expected: int, name: str, exact: bool
) -> bytes | bytearray:
    """Exactly ``expected`` bytes of body, or ``Retryable`` for a short one.

    Read in chunks here rather than with ``response.aread()``: a ``Response`` sits in
    reference cycles, so a body stored on it would live until the cyclic GC ran (hundreds of MB
    while streaming, measured), and a longer-than-promised body is refused as it arrives. When
    ``expected`` is the length the caller asked for (``exact``), the chunks go straight into one
    buffer of that size: no list of chunks joined at the end, so a range costs its size once,
    not twice (a 74 MB central directory, measured).
    """
    if not exact:
        parts: list[bytes] = []
        await _each_chunk(response, expected, name, parts.append)
        return b"".join(parts)
    buffer = bytearray(expected)
    view = memoryview(buffer)
    at = 0

    def take(chunk: bytes) -> None:
        nonlocal at
        view[at : at + len(chunk)] = chunk
        at += len(chunk)

    try:
        await _each_chunk(response, expected, name, take)
    finally:
        view.release()
    return buffer
