"""WebRTC plumbing shared by the answerer and the client: candidates, ICE servers, threads.

Owns: which local addresses ICE offers (``host_addresses_for``), the ICE servers a peer uses
(``ice_servers_for``), making a peer connection that gathers exactly those (``new_peer``,
``set_local``), and ``AsyncioThread``, the asyncio loop aiortc runs in beside trio.

Why the candidates are chosen here: aioice gathers every address of every adapter except
``127.0.0.1`` and ``::1``. A service bound to loopback and a client talking to a loopback API
must meet on loopback and send nothing to the machine's other addresses, so a peer made with
``hosts=[...]`` gathers those addresses only (aioice has no option for it: ``set_local``
swaps its address function for the one call that gathers, through a context variable, so
other peers in the process are untouched). ``hosts=None`` keeps aioice's choice.

The STUN/TURN servers are the official client's (``stun:``/``turn:`` +
``INDUCTIVA_TURN_SERVER_URL``, default ``webrtc.inductiva.ai:3478``) except towards a loopback
service, where a server on the internet can only cost waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import os
import threading
import warnings
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import trio

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import aioice.ice
    import aiortc

T = TypeVar("T")

DEFAULT_TURN: Final = "webrtc.inductiva.ai:3478"

_hosts: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "taskfs_ice_hosts", default=None
)
_aioice_hosts = aioice.ice.get_host_addresses


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _hosts.get()
    if chosen is None:
        return _aioice_hosts(use_ipv4, use_ipv6)
    return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


aioice.ice.get_host_addresses = _host_addresses


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_addresses_for(host: str) -> list[str] | None:
    """The addresses to gather for a peer of a service at ``host`` (a URL's host or a bind
    address): that loopback address for loopback, else aioice's choice (None)."""
    if not is_loopback(host):
        return None
    if host == "localhost":
        return ["127.0.0.1"]
    return [host.strip("[]")]


def hosts_for_bind(host: str) -> list[str] | None:
    """The addresses the service's answerer gathers when it listens on ``host``: that
    loopback address, or for a wildcard bind every address (loopback included)."""
    if is_loopback(host):
        return host_addresses_for(host)
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - naming the wildcard, not binding it
        return ["127.0.0.1", *_aioice_hosts(True, True)]
    return [host]


def ice_servers_for(host: str) -> list[aiortc.RTCIceServer]:
    if is_loopback(host):
        return []
    turn = os.environ.get("INDUCTIVA_TURN_SERVER_URL") or DEFAULT_TURN
    return [aiortc.RTCIceServer(f"stun:{turn}"), aiortc.RTCIceServer(f"turn:{turn}")]


def url_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def new_peer(ice_servers: list[aiortc.RTCIceServer]) -> aiortc.RTCPeerConnection:
    return aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=ice_servers))


async def set_local(
    pc: aiortc.RTCPeerConnection,
    description: aiortc.RTCSessionDescription,
    hosts: list[str] | None,
) -> None:
    """``pc.setLocalDescription`` gathering candidates on ``hosts`` only (None: aioice's)."""
    token = _hosts.set(hosts)
    try:
        await pc.setLocalDescription(description)
    finally:
        _hosts.reset(token)


class AsyncioThread:
    """One asyncio event loop in a daemon thread, for aiortc, driven from trio.

    ``await run(coro)`` runs a coroutine there and waits for it without blocking trio (and
    cancels it when the trio side is cancelled); ``to_trio(fn)`` wraps a callback so that
    calling it from the asyncio thread runs ``fn`` in trio.
    """

    def __init__(self, name: str = "taskfs-live") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self.submit(coro)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    def call_soon(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


def trio_caller(fn: Callable[[], object]) -> Callable[[], None]:
    """A function the asyncio thread calls to run ``fn`` in trio (dropped once trio ended)."""
    token = trio.lowlevel.current_trio_token()

    def call() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fn)

    return call


def trio_sender(
    send: trio.MemorySendChannel[T],
) -> Callable[[T], None]:
    """A function the asyncio thread calls to hand ``T`` to trio through ``send`` (unbounded
    channel), dropping it once trio's side is gone."""
    token = trio.lowlevel.current_trio_token()

    def deliver(item: T) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(_send_nowait, send, item)

    return deliver


def _send_nowait(send: trio.MemorySendChannel[T], item: T) -> None:
    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        send.send_nowait(item)
