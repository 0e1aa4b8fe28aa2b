"""Range bodies received straight into buffers the caller owns, in worker threads.

Owns: the transport of the archive reader's large transfers (blocks of members being read):
one GET, its status and headers handed to the caller's ``accept`` before a byte of the body is
read, and the body received with ``http.client``'s ``readinto`` into the buffer ``accept``
returned (the socket's bytes land there, one copy; the GIL is released while the socket is
read), or into several buffers one after another (a block each). Keep-alive connections
pooled per host, taken by whichever worker thread runs a transfer; proxies from the environment,
as httpx takes them (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``); TLS verified against
certifi's bundle (httpx's), or ``SSL_CERT_FILE``/``SSL_CERT_DIR`` where set.

Why not httpx here: one httpx stream costs 2.0-2.6 s of CPU per GiB on this machine (the body
passes through h11 64 KiB at a time, each piece a new ``bytes``); ``readinto`` of a
``http.client`` response into a preallocated buffer costs 0.13-0.15 s. httpx stays for the API,
the signalling and the small requests, where its per-request comfort costs nothing that counts.

Must stay true: a transfer in a worker thread ends when its ``Stop`` is pressed (the trio side
does that when the read is cancelled: a deadline, an unmount), at once, whatever the peer does:
the socket is shut down under the blocked receive; a buffer is never written after ``get``
returned or raised; a connection is reused only after a body was read whole (anything else
closes it); nothing here decides what a status means: ``accept`` does (``rangeio``).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol
from urllib.parse import urlsplit

from taskfs.tls import tls_context

Accept = Callable[[int, Mapping[str, str]], Sequence[memoryview]]
"""Called in the worker thread with the status and the headers (lower-case names) before the
body is read: returns the buffers the body must fill exactly, one after another, or raises
(the body is not read)."""


class BodyLengthError(Exception):
    """The body was shorter (``short``) or longer than the buffer it had to fill."""

    def __init__(self, got: int, expected: int, short: bool) -> None:
        what = "short body" if short else "body longer than promised"
        super().__init__(f"{what}: {got} of {expected} bytes")
        self.short = short


class Stop:
    """A stop button for one transfer in a worker thread: ``press`` (from any thread) shuts
    down the socket the transfer uses, so a blocked receive returns at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.pressed = False

    def attach(self, sock: socket.socket | None) -> None:
        """The transfer uses ``sock`` from now on (``ConnectionAbortedError`` if stopped)."""
        with self._lock:
            if self.pressed:
                raise ConnectionAbortedError("the transfer was stopped")
            self._socket = sock

    def detach(self) -> None:
        with self._lock:
            self._socket = None

    def press(self) -> None:
        with self._lock:
            self.pressed = True
            sock, self._socket = self._socket, None
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


class BulkTransport(Protocol):
    """Sends one GET and fills the buffer ``accept`` gives with its body. Transport failures
    are ``OSError`` or ``http.client.HTTPException``; a body of the wrong length is
    ``BodyLengthError``; what ``accept`` raises comes out as is. ``blocking``: it waits on the
    network, so it runs in a worker thread (a transport that answers at once, the tests'
    stand-in for storage, is called in place: on trio's clock, as the rest of a test)."""

    blocking: bool

    def get(self, url: str, headers: Mapping[str, str], accept: Accept, stop: Stop) -> None: ...

    def close(self) -> None:
        """Let go of connections (once no transfer runs)."""
        ...


_Key = tuple[str, str, int | None]


class HttpTransport:
    """``BulkTransport`` over ``http.client``: keep-alive connections pooled per host (at
    most ``keep`` idle ones each), whichever worker thread takes one (trio hands a transfer
    to any of its threads: connections kept per thread were mostly new ones, a round trip
    each)."""

    blocking = True

    def __init__(self, timeout: float = 10.0, keep: int = 16) -> None:
        self.timeout = timeout
        self.keep = keep
        self._lock = threading.Lock()
        self._idle: dict[_Key, list[tuple[http.client.HTTPConnection, bool]]] = {}
        self._busy: set[http.client.HTTPConnection] = set()

    def close(self) -> None:
        """Close every connection (once no transfer runs)."""
        with self._lock:
            idle, self._idle = self._idle, {}
            busy, self._busy = self._busy, set()
        for conn in busy | {conn for pooled in idle.values() for conn, _ in pooled}:
            conn.close()

    def get(self, url: str, headers: Mapping[str, str], accept: Accept, stop: Stop) -> None:
        parts = urlsplit(url)
        key: _Key = (parts.scheme, parts.hostname or "", parts.port)
        conn, absolute = self._take(key)
        target = (
            url if absolute else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        )
        reusable = False
        try:
            if conn.sock is None:
                conn.connect()
            stop.attach(conn.sock)
            conn.request("GET", target, headers=dict(headers))
            response = conn.getresponse()
            answer = {name.lower(): value for name, value in response.getheaders()}
            _fill(response, accept(response.status, answer))
            reusable = not response.will_close
        finally:
            stop.detach()
            self._give_back(key, conn, absolute, reusable and not stop.pressed)

    def _take(self, key: _Key) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            pooled = self._idle.get(key)
            if pooled:
                conn, absolute = pooled.pop()
                self._busy.add(conn)
                return conn, absolute
        conn, absolute = self._connect(*key)
        with self._lock:
            self._busy.add(conn)
        return conn, absolute

    def _give_back(
        self, key: _Key, conn: http.client.HTTPConnection, absolute: bool, reusable: bool
    ) -> None:
        with self._lock:
            self._busy.discard(conn)
            pooled = self._idle.setdefault(key, [])
            if reusable and len(pooled) < self.keep:
                pooled.append((conn, absolute))
                return
        conn.close()

    def _connect(
        self, scheme: str, host: str, port: int | None
    ) -> tuple[http.client.HTTPConnection, bool]:
        """A new connection to ``host`` (through the environment's proxy, if any), and whether
        requests through it name the whole URL (a plain HTTP proxy)."""
        proxy = _proxy_for(scheme, host)
        if scheme == "https":
            tls = tls_context()
            if proxy is None:
                return http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=tls
                ), False
            via = urlsplit(proxy)
            conn = http.client.HTTPSConnection(
                via.hostname or "", via.port, timeout=self.timeout, context=tls
            )
            conn.set_tunnel(host, port)
            return conn, False
        if proxy is None:
            return http.client.HTTPConnection(host, port, timeout=self.timeout), False
        via = urlsplit(proxy)
        return http.client.HTTPConnection(via.hostname or "", via.port, timeout=self.timeout), True


def _proxy_for(scheme: str, host: str) -> str | None:
    """The environment's proxy for ``scheme://host``, None where there is none or ``NO_PROXY``
    names the host (loopback is never proxied)."""
    if host in ("127.0.0.1", "::1", "localhost"):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme) or proxies.get("all")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not proxy or bypass(host, proxies):
        return None
    return proxy


def _fill(response: http.client.HTTPResponse, views: Sequence[memoryview]) -> None:
    """Read the body into ``views`` exactly, one after another; ``BodyLengthError`` if it is
    shorter or longer."""
    expected = sum(len(view) for view in views)
    got = 0
    for view in views:
        filled = 0
        while filled < len(view):
            n = response.readinto(view[filled:])
            if not n:
                raise BodyLengthError(got + filled, expected, short=True)
            filled += n
        got += filled
    if response.length:  # the headers promised more than the buffer holds
        raise BodyLengthError(got + response.length, expected, short=False)
    if response.length is None and response.read(1):  # chunked, or to the end: one more?
        raise BodyLengthError(got + 1, expected, short=False)
