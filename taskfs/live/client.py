"""The caller's side of the live channel, for trio code (the CLI, ``Task``, the mount).

Owns: ``LiveConnection``, one WebRTC peer connection to one computing task, signalled through
``ApiClient.live_signal``, on which every request gets a data channel of its own
(``request()``), and ``LiveStream``, the answers of one request as a trio async iterator.

aiortc runs in an ``rtc.AsyncioThread``; its callbacks hand messages to trio through unbounded
memory channels (a stream's answers are read as they come; the answering side sends at most
``MESSAGE_BUDGET`` bytes per message and waits for its buffer to drain).

Must stay true:
* every wait has a deadline: connecting (``CONNECT_TIMEOUT``), a one-shot answer
  (``ANSWER_TIMEOUT``); a followed stream ends when the peer closes it (the task stopped
  computing) or the connection fails, never silently hangs on a dead peer;
* a task without a live channel (not computing, or a service that answers 204) is
  ``LiveError`` with that reason, a peer that breaks the protocol is ``LiveError`` naming what
  it sent; closing a stream closes its channel, closing the connection closes everything.
"""

from __future__ import annotations

import contextlib
import math
import uuid
import warnings
from collections.abc import Callable
from typing import Any, Final

import trio

from taskfs.api.client import ApiClient
from taskfs.errors import LiveError, NoLiveChannelError
from taskfs.live import protocol
from taskfs.live.rtc import (
    AsyncioThread,
    host_addresses_for,
    ice_servers_for,
    new_peer,
    set_local,
    trio_caller,
    trio_sender,
    url_host,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import aiortc

CONNECT_TIMEOUT: Final = 20.0
ANSWER_TIMEOUT: Final = 30.0

_shared: AsyncioThread | None = None


def shared_thread() -> AsyncioThread:
    """The process's asyncio thread for live connections (started on first use)."""
    global _shared  # noqa: PLW0603 - one loop per process, made lazily
    if _shared is None:
        _shared = AsyncioThread("taskfs-live-client")
    return _shared


class LiveStream:
    """The answers of one request: ``async for answer in stream`` yields each ``Answer``
    while the status is ``success``; an ``error``/``invalid`` answer raises ``LiveError``
    with the peer's text; the iteration ends when the channel closes."""

    def __init__(self, connection: LiveConnection, request: protocol.Request) -> None:
        self.connection = connection
        self.request = request
        self.send, self.receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self.channel: aiortc.RTCDataChannel | None = None
        self.opened = trio.Event()
        self._done = False
        # Made in trio, called from the asyncio thread.
        self.deliver = trio_sender(self.send)
        self.set_opened = trio_caller(self.opened.set)

    def __aiter__(self) -> LiveStream:
        return self

    async def __anext__(self) -> protocol.Answer:
        # A class rather than an async generator: a stream left half-read needs no finalizer.
        if self._done:
            raise StopAsyncIteration
        kind, value = await self.receive.receive()
        if kind == "close":
            self._done = True
            raise StopAsyncIteration
        try:
            answer = protocol.parse_answer(value)
        except protocol.LiveProtocolError as exc:
            self._done = True
            raise LiveError(str(exc)) from None
        if not answer.ok:
            self._done = True
            raise LiveError(str(answer.message))
        if not self.request.follow:
            self._done = True
        return answer

    async def first(self) -> Any:
        """The message of a one-shot request's one answer (``ANSWER_TIMEOUT``)."""
        with trio.move_on_after(ANSWER_TIMEOUT):
            async for answer in self:
                return answer.message
            raise LiveError("the task's live channel closed without answering")
        raise LiveError(f"the task's live channel did not answer within {ANSWER_TIMEOUT:g} s")

    async def aclose(self) -> None:
        self._done = True
        channel = self.channel
        if channel is not None:
            self.connection.thread.call_soon(channel.close)
        self.send.close()


class LiveConnection:
    """One peer connection to the live channel of task ``task_id``.

    ``await connect()`` once (``LiveError`` when the task has none), then ``request()`` as
    often as needed; ``aclose()`` at the end. ``closed`` is set when the peer connection ends
    (the task stopped computing, the peer went away).
    """

    def __init__(self, api: ApiClient, task_id: str, thread: AsyncioThread | None = None) -> None:
        self.api = api
        self.task_id = task_id
        self.thread = thread or shared_thread()
        host = url_host(str(api.http.base_url))
        self.hosts = host_addresses_for(host)
        self.ice_servers = ice_servers_for(host)
        self.pc: aiortc.RTCPeerConnection | None = None
        self.closed = trio.Event()
        self._streams: set[LiveStream] = set()

    async def connect(self, first: protocol.Request) -> LiveStream:
        """Open the connection with ``first`` as its first request (a connection needs one
        data channel in its offer)."""
        stream = LiveStream(self, first)
        sdp = await self.thread.run(self._offer(stream, trio_caller(self.closed.set)))
        sender = str(uuid.uuid4())
        try:
            answer = await self.api.live_signal(self.task_id, sender, sdp)
            if answer is None:
                raise NoLiveChannelError(
                    f"task {self.task_id} has no live channel (it is not computing, or the "
                    "service does not stream running tasks)"
                )
            await self.thread.run(self._answer(answer))
            await _opened(
                stream,
                f"could not connect to the live channel of task {self.task_id} "
                f"within {CONNECT_TIMEOUT:g} s",
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise
        return stream

    async def request(self, request: protocol.Request) -> LiveStream:
        """Another request on the open connection (a new data channel)."""
        if self.pc is None or self.closed.is_set():
            raise LiveError(f"the live channel of task {self.task_id} is closed")
        stream = LiveStream(self, request)
        await self.thread.run(self._channel(stream))
        await _opened(stream, f"the live channel of task {self.task_id} did not open a stream")
        return stream

    async def aclose(self) -> None:
        pc = self.pc
        self.pc = None
        if pc is not None:
            with contextlib.suppress(Exception):  # closing what may be broken already
                await self.thread.run(pc.close())
        self.closed.set()

    # -- the asyncio side ----------------------------------------------------------------------

    async def _offer(self, stream: LiveStream, closed: Callable[[], None]) -> str:
        pc = new_peer(self.ice_servers)
        self.pc = pc

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                for each in list(self._streams):
                    if each.channel is not None and each.channel.readyState != "closed":
                        each.channel.close()
                closed()

        self._hook(pc.createDataChannel(protocol.LABEL), stream)
        await set_local(pc, await pc.createOffer(), self.hosts)
        return str(pc.localDescription.sdp)

    async def _answer(self, sdp: str) -> None:
        assert self.pc is not None
        try:
            await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=sdp, type="answer"))
        except Exception as exc:
            raise LiveError(f"the service's answer is not valid SDP: {exc}") from None

    async def _channel(self, stream: LiveStream) -> None:
        assert self.pc is not None
        self._hook(self.pc.createDataChannel(protocol.LABEL), stream)

    def _hook(self, channel: aiortc.RTCDataChannel, stream: LiveStream) -> None:
        stream.channel = channel
        self._streams.add(stream)
        request = stream.request.encode()

        @channel.on("open")
        def on_open() -> None:
            channel.send(request)
            stream.set_opened()

        @channel.on("message")
        def on_message(raw: str | bytes) -> None:
            stream.deliver(("message", raw))

        @channel.on("close")
        def on_close() -> None:
            self._streams.discard(stream)
            stream.deliver(("close", None))


async def _opened(stream: LiveStream, failure: str) -> None:
    """Until ``stream``'s channel is open (``CONNECT_TIMEOUT``; else ``LiveError(failure)``)."""
    with trio.move_on_after(CONNECT_TIMEOUT):
        await stream.opened.wait()
    if not stream.opened.is_set():
        raise LiveError(failure)
