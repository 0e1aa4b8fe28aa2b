"""A range-serving object store for tests, as an httpx MockTransport or a real loopback server.

``Objects`` holds named byte strings with strong ETags and answers GET/HEAD with single and
suffix ranges, ``If-Match`` and ``If-Range``, like object storage behind a signed URL. Every
request is recorded. A ``fault`` hook may change an answer (status, headers, body, delay,
dropped connection) for fault-injection tests.

* ``objects.transport()``: an ``httpx.MockTransport`` (no sockets: unit tests);
* ``serve_in_thread(objects)``: a Hypercorn server on 127.0.0.1 in a background thread with its
  own trio loop (integration and property tests, usable from sync code and any trio run).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from taskfs.archive.fetch import Accept, BodyLengthError, Stop

RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    # Fault injection: close the connection after this many body bytes (None: send all).
    cut_after: int | None = None
    # Fault injection: sleep this long before answering.
    delay: float = 0.0
    # Fault injection: after this many body bytes, stall for ``stall`` seconds.
    stall_after: int | None = None
    stall: float = 0.0
    # Fault injection: send the body in pieces of this size with this pause between them.
    trickle: tuple[int, float] | None = None


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    if_match: str | None


Fault = Callable[[Seen, Answer], Answer | None]


class Answerer(Protocol):
    def answer(
        self, method: str, path: str, headers: dict[str, str], query: str = "", body: bytes = b""
    ) -> Answer: ...


@dataclass
class Objects:
    data: dict[str, bytes] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    fault: Fault | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, name: str, body: bytes) -> str:
        """Store ``body`` under ``/o/<name>``; returns its URL path."""
        with self.lock:
            self.data[name] = body
            self.etags[name] = '"' + hashlib.sha256(body).hexdigest()[:24] + '"'
        return f"/o/{name}"

    def gets(self, name: str | None = None) -> int:
        with self.lock:
            return sum(
                1
                for s in self.seen
                if s.method == "GET" and (name is None or s.path == f"/o/{name}")
            )

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()

    def answer(
        self, method: str, path: str, headers: dict[str, str], query: str = "", body: bytes = b""
    ) -> Answer:
        seen = Seen(method, path, headers.get("range"), headers.get("if-match"))
        with self.lock:
            self.seen.append(seen)
            name = path.removeprefix("/o/")
            stored = self.data.get(name) if path.startswith("/o/") else None
            etag = self.etags.get(name, "")
        answer = _answer(method, stored, etag, headers)
        if self.fault is not None:
            answer = self.fault(seen, answer) or answer
        return answer

    def transport(self) -> httpx.MockTransport:
        return mock_transport(self)

    def bulk(self, threaded: bool = False) -> AnswerTransport:
        return AnswerTransport(self, threaded)


def mock_transport(app: Answerer) -> httpx.MockTransport:
    """An httpx transport that answers with ``app`` (no sockets)."""

    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = app.answer(
            request.method, request.url.path, headers, request.url.query.decode(), request.content
        )
        if answer.delay or answer.stall:
            await trio.sleep(answer.delay + answer.stall)
        if answer.cut_after is not None:
            raise httpx.ReadError("connection reset (injected)", request=request)
        return httpx.Response(answer.status, headers=answer.headers, content=answer.body)

    return httpx.MockTransport(handler)


class AnswerTransport:
    """A ``BulkTransport`` (``taskfs.archive.fetch``) that answers with ``app`` (no sockets):
    the archive reader's large transfers in unit tests, called in place on trio's clock
    (``blocking`` False), or in a worker thread as the real one (``threaded``: for stalls,
    a real wait that the reader's ``Stop`` ends). Injected faults: ``delay``/``stall``
    (threaded only), ``cut_after`` writes that much and resets, ``stall_after`` stalls part
    way."""

    def __init__(self, app: Answerer, threaded: bool = False) -> None:
        self.app = app
        self.blocking = threaded

    def close(self) -> None:
        pass

    def get(self, url: str, headers: Mapping[str, str], accept: Accept, stop: Stop) -> None:
        parts = urlsplit(url)
        lower = {k.lower(): v for k, v in headers.items()}
        answer = self.app.answer("GET", parts.path, lower, parts.query)
        waited = answer.delay + (answer.stall if answer.stall_after is None else 0.0)
        if waited or answer.stall_after is not None:
            assert self.blocking, "a stalled answer needs AnswerTransport(app, threaded=True)"
        _wait(waited, stop)
        views = accept(answer.status, {k.lower(): v for k, v in answer.headers.items()})
        body = answer.body
        expected = sum(len(view) for view in views)
        cut = len(body) if answer.cut_after is None else min(len(body), answer.cut_after)
        pos = 0
        for view in views:  # one after another, as the socket's bytes would fill them
            piece = body[pos : min(cut, pos + len(view))]
            view[: len(piece)] = piece
            pos += len(piece)
        if answer.cut_after is not None:
            raise ConnectionResetError("connection reset (injected)")
        if answer.stall_after is not None:
            _wait(answer.stall, stop)
        if len(body) != expected:
            raise BodyLengthError(len(body), expected, short=len(body) < expected)


def _wait(seconds: float, stop: Stop) -> None:
    """Sleep ``seconds`` in a worker thread, or until ``stop`` is pressed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stop.pressed:
            raise ConnectionAbortedError("the transfer was stopped")
        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))


def _answer(method: str, body: bytes | None, etag: str, headers: dict[str, str]) -> Answer:
    if method not in ("GET", "HEAD"):
        return Answer(405, {}, b"")
    if body is None:
        return Answer(404, {"content-type": "application/json"}, b'{"detail": "no such object"}')
    base = {"etag": etag, "accept-ranges": "bytes", "content-type": "application/zip"}
    if_match = headers.get("if-match")
    if (
        if_match is not None
        and if_match != "*"
        and etag not in [t.strip() for t in if_match.split(",")]
    ):
        return Answer(
            412,
            {"etag": etag, "content-type": "application/json"},
            b'{"detail": "precondition failed"}',
        )
    wanted = headers.get("range")
    if_range = headers.get("if-range")
    size = len(body)
    if wanted is None or (if_range is not None and if_range != etag):
        return Answer(200, {**base, "content-length": str(size)}, b"" if method == "HEAD" else body)
    match = RANGE.fullmatch(wanted.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return Answer(400, {}, b"bad range")
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(size - 1, int(last)) if last else size - 1
    else:
        start = max(0, size - int(last))
        end = size - 1
    if start >= size or start > end:
        return Answer(416, {"content-range": f"bytes */{size}"}, b"")
    part = body[start : end + 1]
    return Answer(
        206,
        {**base, "content-range": f"bytes {start}-{end}/{size}", "content-length": str(len(part))},
        b"" if method == "HEAD" else part,
    )


class _App:
    def __init__(self, objects: Answerer) -> None:
        self.objects = objects

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode()
        answer = self.objects.answer(scope["method"], scope["path"], headers, query, body)
        if answer.delay:
            await trio.sleep(answer.delay)
        raw = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
        if "content-length" not in answer.headers:
            raw.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": raw})
        payload = answer.body
        if answer.cut_after is not None:
            await send(
                {
                    "type": "http.response.body",
                    "body": payload[: answer.cut_after],
                    "more_body": True,
                }
            )
            raise ConnectionResetError("injected: connection dropped mid-body")
        if answer.stall_after is not None:
            await send(
                {
                    "type": "http.response.body",
                    "body": payload[: answer.stall_after],
                    "more_body": True,
                }
            )
            await trio.sleep(answer.stall)
            payload = payload[answer.stall_after :]
        if answer.trickle is not None:
            piece, pause = answer.trickle
            while len(payload) > piece:
                await send(
                    {"type": "http.response.body", "body": payload[:piece], "more_body": True}
                )
                payload = payload[piece:]
                await trio.sleep(pause)
        await send({"type": "http.response.body", "body": payload})


@dataclass
class Server:
    url: str
    objects: Objects


@contextmanager
def serve_in_thread(objects: Objects | None = None) -> Iterator[Server]:
    """A real HTTP range server on 127.0.0.1 in a background thread."""
    objects = objects or Objects()
    with serve_answerer(objects) as url:
        yield Server(url, objects)


@contextmanager
def serve_answerer(app: Answerer, port: int = 0) -> Iterator[str]:
    """Serve any ``answer()``-er over real HTTP on 127.0.0.1 in a background thread."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        config.errorlog = None
        config.keep_alive_timeout = 30
        stop = trio.Event()
        state["stop"] = stop
        state["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(
                    _App(app),  # type: ignore[arg-type]
                    config,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            state["url"] = binds[0]
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("range server did not start")
    try:
        yield str(state["url"])
    finally:
        trio.from_thread.run_sync(state["stop"].set, trio_token=state["token"])
        thread.join(10)
