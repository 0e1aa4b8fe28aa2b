"""A traffic-shaping TCP proxy on loopback, like a cloud bucket far away (for scripts/bench).

Every connection to the proxy is forwarded to the upstream address with:

* round-trip latency: each chunk is delayed by half the RTT in each direction (a delay line,
  so latency does not cut bandwidth), and a new connection costs one RTT (the TCP handshake);
* a bandwidth cap per connection and direction (token bucket), like one stream from a bucket;
* counters: HTTP requests seen by method and path prefix (request lines parsed from the
  client's stream; bodies are not parsed, so counts assume clients that do not send request
  lines inside bodies, true for everything the benchmark runs), bytes in each direction, and
  connections.

Runs in a background thread with its own trio loop; no root needed.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

REQUEST_LINE = re.compile(
    rb"(GET|HEAD|POST|PUT|DELETE|PATCH) (/[^ ?\r\n]*)[^ \r\n]* HTTP/1\.[01]\r\n"
)
CHUNK = 64 << 10


@dataclass
class Counters:
    requests: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes_up = self.bytes_down = self.connections = 0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            storage = sum(
                n for k, n in self.requests.items() if k.startswith("GET /storage/objects")
            )
            api = sum(n for k, n in self.requests.items() if "/storage/objects" not in k)
            lists = self.requests.get("GET /tasks", 0)
            return {
                "storage_gets": storage,
                "api_requests": api,
                "list_requests": lists,
                "requests": sum(self.requests.values()),
                "bytes_down": self.bytes_down,
                "bytes_up": self.bytes_up,
                "connections": self.connections,
            }


def _route(path: bytes) -> str:
    text = path.decode("latin-1")
    if text.startswith("/storage/objects/"):
        return "/storage/objects"
    parts = text.strip("/").split("/")
    if parts[0] == "tasks" and len(parts) >= 2:
        return "/tasks/{id}" + ("/" + "/".join(parts[2:]) if len(parts) > 2 else "")
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class Shape:
    rtt: float = 0.020  # seconds
    bandwidth: float = 50e6  # bytes per second per connection and direction; 0 = unlimited


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.available = 0.0
        self.stamp = trio.current_time()

    async def take(self, size: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        self.available = min(self.rate * 0.05, self.available + (now - self.stamp) * self.rate)
        self.stamp = now
        self.available -= size
        if self.available < 0:
            await trio.sleep(-self.available / self.rate)


async def _pipe(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    shape: Shape,
    counters: Counters,
    upstream: bool,
) -> None:
    send, receive = trio.open_memory_channel[tuple[float, bytes]](256)
    bucket = _Bucket(shape.bandwidth)

    async def reader() -> None:
        tail = b""
        async with send:
            while True:
                try:
                    data = await source.receive_some(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                if upstream:
                    scan = tail + data
                    found = REQUEST_LINE.findall(scan)
                    with counters.lock:
                        for method, path in found:
                            counters.requests[f"{method.decode()} {_route(path)}"] += 1
                    tail = scan[-200:] if not found else scan[scan.rfind(b"\r\n") + 2 :][-200:]
                try:
                    await send.send((trio.current_time() + shape.rtt / 2, data))
                except trio.BrokenResourceError:
                    return  # the other side is gone

    async def writer() -> None:
        async with receive:
            async for due, data in receive:
                delay = due - trio.current_time()
                if delay > 0:
                    await trio.sleep(delay)
                await bucket.take(len(data))
                try:
                    await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                with counters.lock:
                    if upstream:
                        counters.bytes_up += len(data)
                    else:
                        counters.bytes_down += len(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _handle(
    client: trio.SocketStream, target: tuple[str, int], shape: Shape, counters: Counters
) -> None:
    """One client connection; whatever happens to it never takes the proxy down."""
    try:
        await _connect(client, target, shape, counters)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except BaseExceptionGroup as group:
        _, rest = group.split((OSError, trio.BrokenResourceError, trio.ClosedResourceError))
        if rest is not None:
            raise rest from None


async def _connect(
    client: trio.SocketStream, target: tuple[str, int], shape: Shape, counters: Counters
) -> None:
    with counters.lock:
        counters.connections += 1
    await trio.sleep(shape.rtt)  # the TCP handshake of a far-away server
    try:
        server = await trio.open_tcp_stream(*target)
    except OSError:
        await client.aclose()
        return
    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(_pipe, client, server, shape, counters, True)
        nursery.start_soon(_pipe, server, client, shape, counters, False)


@dataclass
class Proxy:
    url: str
    counters: Counters
    shape: Shape


@contextmanager
def shaping_proxy(upstream: str, shape: Shape | None = None) -> Iterator[Proxy]:
    """Run the proxy for ``upstream`` (``http://host:port``) in a thread; yields its URL."""
    shape = shape or Shape()
    host, port = upstream.removeprefix("http://").rstrip("/").rsplit(":", 1)
    counters = Counters()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        state["port"] = listeners[0].socket.getsockname()[1]
        state["token"] = trio.lowlevel.current_trio_token()
        stop = trio.Event()
        state["stop"] = stop
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    trio.serve_listeners,
                    partial(_handle, target=(host, int(port)), shape=shape, counters=counters),
                    listeners,
                )
            )
            ready.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True, name="shaping-proxy")
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the shaping proxy did not start")
    try:
        yield Proxy(f"http://127.0.0.1:{state['port']}", counters, shape)
    finally:
        token = state["token"]
        assert isinstance(token, trio.lowlevel.TrioToken)
        stop = state["stop"]
        assert isinstance(stop, trio.Event)
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(10)
