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

import logging
import re
from collections.abc import Awaitable, Callable

import httpx

from taskfs.errors import ArchiveError, AuthError, NotFoundError, ProtocolError, StaleError
from taskfs.retry import Retryable, RetryPolicy, with_retries

log = logging.getLogger(__name__)

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

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
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None


class RangeSource:
    """One object behind a signed URL. ``open_tail`` first, then ``fetch`` any range."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: UrlProvider,
        policy: RetryPolicy | None = None,
        name: str = "archive",
    ) -> None:
        self._http = http
        self._url_provider = url
        self._url: str | None = None
        self.policy = policy or RetryPolicy()
        self.name = name
        self.size: int | None = None
        self.etag: str | None = None

    async def _current_url(self, refresh: bool) -> str:
        if self._url is None or refresh:
            self._url = await self._url_provider(refresh)
        return self._url

    async def open_tail(self, length: int) -> bytes:
        """The last ``length`` bytes (fewer if the object is smaller); learns size and ETag."""
        return await self._get(f"bytes=-{length}", None, first=True)

    async def fetch(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object, exactly."""
        if self.size is None:
            raise RuntimeError("open_tail() must come first")
        if not 0 <= start < end <= self.size:
            raise ValueError(f"range {start}-{end} outside 0-{self.size}")
        return await self._get(f"bytes={start}-{end - 1}", (start, end), first=False)

    async def _get(self, range_header: str, want: tuple[int, int] | None, first: bool) -> bytes:
        refreshed = False

        async def attempt() -> bytes:
            nonlocal refreshed
            url = await self._current_url(False)
            headers = {"Range": range_header, "Accept-Encoding": "identity"}
            if self.etag is not None:
                headers["If-Match"] = self.etag
            try:
                response = await self._http.get(url, headers=headers)
            except httpx.TransportError as exc:
                raise Retryable(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc
            except httpx.DecodingError as exc:
                raise ProtocolError(f"{self.name}: the server compressed a range response") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ProtocolError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
            status = response.status_code
            if status == 403 and not refreshed:
                refreshed = True
                log.debug("%s: signed URL refused (403); asking for a fresh one", self.name)
                await self._current_url(True)
                raise Retryable("signed URL expired", retry_after=0.0)
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
                raise Retryable(f"HTTP {status}", _retry_after(response))
            if status == 200:
                raise ProtocolError(f"{self.name}: the server ignored the Range header (200)")
            if status != 206:
                raise ProtocolError(f"{self.name}: unexpected HTTP {status} for a range request")
            return self._check(response, want, first)

        return await with_retries(attempt, self.policy, f"reading {self.name}")

    def _check(self, response: httpx.Response, want: tuple[int, int] | None, first: bool) -> bytes:
        if response.headers.get("content-encoding", "identity") != "identity":
            raise ProtocolError(f"{self.name}: compressed body for a range request")
        match = CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None or match.group(3) == "*":
            raise ProtocolError(f"{self.name}: 206 without a usable Content-Range")
        start, last, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
        body = response.content
        if first:
            etag = response.headers.get("etag")
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
        if len(body) != last - start + 1:
            raise Retryable(f"short body: {len(body)} of {last - start + 1} bytes")
        return body
