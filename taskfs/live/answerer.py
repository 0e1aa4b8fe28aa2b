"""The service's side of the live channel: answers offers and serves computing tasks' files.

Owns: the signalling state behind ``POST /tasks/{id}/offer`` and ``GET /tasks/{id}/message``
(answers waiting to be picked up), the peer connections (``aiortc``, in the asyncio thread of
``rtc.AsyncioThread``), and one stream per data channel: the request it carries, answered by
``files`` in worker threads, followed until the channel closes or the task stops computing.

Must stay true:
* only a task that is computing gets a channel (``offer`` returns False otherwise and the
  signalling answers 204); when it stops computing (ends, is killed), every followed stream
  sends what was written up to then, and its channels and peers are closed, so a follower
  (the official ``Task.wait()``) always ends;
* everything is bounded: peers per task and in all, one request per channel, a peer that does
  not connect within ``CONNECT_TIMEOUT`` is closed, an answer nobody picks up is dropped after
  ``ANSWER_TTL``, and a stream waits for the channel's buffer to drain (``HIGH_WATER``) before
  it reads more of a file;
* a malformed offer is refused at ``offer`` (``OfferError``, HTTP 400), a malformed request on
  a channel gets ``invalid``, a failing operation gets ``error``; neither stops anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from taskfs.live import files, protocol
from taskfs.live.protocol import LiveBusyError, OfferError
from taskfs.live.rtc import AsyncioThread, new_peer, set_local

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import aiortc

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL: Final = 0.2  # a followed file is looked at this often
LIST_POLL: Final = 1.0  # a followed listing, top or last-modified file
CONNECT_TIMEOUT: Final = 30.0
ANSWER_TTL: Final = 60.0
MAX_PEERS: Final = 256
MAX_PEERS_PER_TASK: Final = 32
MAX_CHANNELS_PER_PEER: Final = 64
HIGH_WATER: Final = 1 << 20
DEFAULT_MAX_MESSAGE: Final = 65_536
_MAX_MESSAGE = re.compile(r"^a=max-message-size:(\d{1,12})\s*$", re.MULTILINE)


class _ChannelGone(Exception):  # noqa: N818 - control flow, not an error
    pass


@dataclass(eq=False)
class _Peer:
    task_id: str
    sender: str
    pc: aiortc.RTCPeerConnection
    max_message: int
    streams: set[asyncio.Task[None]] = field(default_factory=set)
    channels: int = 0
    connected: bool = False


class LiveHub:
    """The answering side. ``computing(task_id)`` gives the working directory of a task that
    is computing, None otherwise (called from the hub's threads: it must only read)."""

    def __init__(
        self, computing: Callable[[str], Path | None], hosts: list[str] | None = None
    ) -> None:
        self.computing = computing
        self.hosts = hosts
        self.thread = AsyncioThread("taskfs-live-answerer")
        self._answers: dict[tuple[str, str], tuple[float, str]] = {}
        self._peers: set[_Peer] = set()
        self._pending: dict[str, int] = {}  # offers being answered, by task
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    # -- called from trio ----------------------------------------------------------------------

    async def offer(self, task_id: str, sender: str, sdp: str) -> bool:
        """Answer ``sdp`` for ``sender``; False when ``task_id`` is not computing."""
        if self.computing(task_id) is None or self._closed:
            return False
        return await self.thread.run(self._offer(task_id, sender, sdp))

    def take_answer(self, task_id: str, client: str) -> str | None:
        """The answer for ``client``'s offer, once; None when there is none."""
        found = self._answers.pop((task_id, client), None)
        return None if found is None else found[1]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.thread.run(self._close_all())
        self.thread.stop()

    # -- the asyncio side ----------------------------------------------------------------------

    async def _offer(self, task_id: str, sender: str, sdp: str) -> bool:
        self._expire()
        # Offers being answered count too: answering awaits, and many arrive at once.
        if len(self._peers) + sum(self._pending.values()) >= MAX_PEERS:
            raise LiveBusyError(f"the service has {MAX_PEERS} live connections open; try later")
        open_here = sum(p.task_id == task_id for p in self._peers)
        if open_here + self._pending.get(task_id, 0) >= MAX_PEERS_PER_TASK:
            raise LiveBusyError(
                f"task {task_id} has {MAX_PEERS_PER_TASK} live connections open; try later"
            )
        self._pending[task_id] = self._pending.get(task_id, 0) + 1
        try:
            return await self._answer_offer(task_id, sender, sdp)
        finally:
            self._pending[task_id] -= 1
            if not self._pending[task_id]:
                del self._pending[task_id]

    async def _answer_offer(self, task_id: str, sender: str, sdp: str) -> bool:
        found = _MAX_MESSAGE.search(sdp)
        max_message = int(found.group(1)) if found else DEFAULT_MAX_MESSAGE
        pc = new_peer([])
        peer = _Peer(task_id, sender, pc, max(1024, min(max_message or (1 << 20), 1 << 20)))
        try:
            await pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=sdp, type="offer"))
            await set_local(pc, await pc.createAnswer(), self.hosts)
        except Exception as exc:
            await pc.close()
            raise OfferError(f"malformed offer: {exc or type(exc).__name__}") from None
        if pc.sctp is None:
            await pc.close()
            raise OfferError("the offer has no data channel")
        self._peers.add(peer)
        self._watch(peer)
        self._answers[(task_id, sender)] = (time.monotonic(), pc.localDescription.sdp)
        return True

    def _watch(self, peer: _Peer) -> None:
        pc = peer.pc
        loop = asyncio.get_running_loop()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                peer.connected = True
            elif pc.connectionState in ("failed", "closed"):
                await self._drop(peer)

        @pc.on("datachannel")
        def on_channel(channel: aiortc.RTCDataChannel) -> None:
            peer.channels += 1
            if peer.channels > MAX_CHANNELS_PER_PEER:
                channel.close()
                return
            started = False

            @channel.on("message")
            def on_message(raw: str | bytes) -> None:
                nonlocal started
                if started:
                    with contextlib.suppress(Exception):
                        channel.send(protocol.invalid("one request per channel"))
                    return
                started = True
                stream = asyncio.ensure_future(self._stream(peer, channel, raw))
                peer.streams.add(stream)
                stream.add_done_callback(peer.streams.discard)

        def check_connected() -> None:
            if not peer.connected and peer in self._peers:
                log.info("live peer of task %s did not connect; closing it", peer.task_id)
                self._spawn(self._drop(peer))

        loop.call_later(CONNECT_TIMEOUT, check_connected)
        loop.call_later(1.0, self._ensure_reaper)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ensure_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        """Close the peers of tasks that stopped computing once their streams are done."""
        try:
            while self._peers:
                await asyncio.sleep(LIST_POLL)
                self._expire()
                for peer in list(self._peers):
                    if not peer.streams and self.computing(peer.task_id) is None:
                        await self._drop(peer)
        finally:
            self._reaper = None

    def _expire(self) -> None:
        now = time.monotonic()
        for key, (made, _) in list(self._answers.items()):
            if now - made > ANSWER_TTL:
                self._answers.pop(key, None)

    async def _drop(self, peer: _Peer) -> None:
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        self._answers.pop((peer.task_id, peer.sender), None)
        for stream in list(peer.streams):
            stream.cancel()
        with contextlib.suppress(Exception):
            await peer.pc.close()

    async def _close_all(self) -> None:
        for peer in list(self._peers):
            await self._drop(peer)
        for task in [self._reaper, *self._background]:
            if task is not None:
                task.cancel()

    # -- one request ---------------------------------------------------------------------------

    async def _stream(self, peer: _Peer, channel: aiortc.RTCDataChannel, raw: str | bytes) -> None:
        try:
            try:
                request = protocol.parse_request(raw)
                if request.type == "tail":
                    protocol.tail_args(request.args)  # refuse bad arguments as invalid
            except protocol.LiveProtocolError as exc:
                await self._send(channel, protocol.invalid(str(exc)))
                return
            root = self.computing(peer.task_id)
            if root is None:
                await self._send(channel, protocol.error(f"Task {peer.task_id} is not computing"))
                return
            try:
                if request.type == "tail":
                    await self._tail(peer, channel, root, request)
                elif request.type == "ls":
                    await self._repeat(
                        peer,
                        channel,
                        request,
                        lambda: protocol.fit_listing(files.list_tree(root), peer.max_message),
                    )
                elif request.type == "top":
                    budget = min(peer.max_message, protocol.MESSAGE_BUDGET)
                    await self._repeat(
                        peer, channel, request, lambda: protocol.fit_text(files.top(), budget)
                    )
                else:
                    await self._repeat(peer, channel, request, lambda: files.last_modified(root))
            except files.OperationError as exc:
                await self._send(channel, protocol.error(str(exc)))
        except _ChannelGone:
            pass
        except Exception:
            log.exception("live stream of task %s failed", peer.task_id)
            with contextlib.suppress(Exception):
                await self._send(channel, protocol.error("internal error of the live channel"))
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    async def _repeat(
        self,
        peer: _Peer,
        channel: aiortc.RTCDataChannel,
        request: protocol.Request,
        op: Callable[[], Any],
    ) -> None:
        """One answer, or (``follow``) a new one whenever the result changes."""
        last: str | None = None
        while True:
            text = protocol.success(await _in_thread(op))
            if len(text.encode()) > peer.max_message:
                raise files.OperationError(
                    f"the answer ({len(text.encode())} bytes) is larger than the peer's "
                    f"largest message ({peer.max_message} bytes)"
                )
            if text != last:
                await self._send(channel, text)
                last = text
            if not request.follow:
                return
            await asyncio.sleep(LIST_POLL)
            if self.computing(peer.task_id) is None:
                return

    async def _tail(
        self, peer: _Peer, channel: aiortc.RTCDataChannel, root: Path, request: protocol.Request
    ) -> None:
        args = protocol.tail_args(request.args)
        tail = files.Tail(root, args, request.follow)
        try:
            while not await _in_thread(tail.open):
                await asyncio.sleep(POLL)
                if self.computing(peer.task_id) is None:
                    raise files.OperationError(
                        f"The task stopped before {args.filename} was created"
                    )
            budget = _budget(peer)
            if not request.follow:
                lines = await _in_thread(lambda: list(tail.initial()))
                last = protocol.last_fitting(lines, budget)
                await self._send(channel, protocol.lines_answer(last))
                return
            batches = protocol.batches(tail.initial(), budget)
            while (batch := await _in_thread(_next, batches)) is not None:
                await self._send(channel, protocol.lines_answer(batch))
            # An empty answer: what the file had is all sent (a follower that rebuilds the
            # file knows where "now" is; the official client prints nothing for it).
            await self._send(channel, protocol.success([]))
            while True:
                await asyncio.sleep(POLL)
                ended = self.computing(peer.task_id) is None
                while True:  # a burst is read and sent a CHUNK at a time (bounded memory)
                    lines = await _in_thread(tail.appended)
                    for batch in protocol.batches(lines, budget):
                        await self._send(channel, protocol.lines_answer(batch))
                    if not await _in_thread(tail.behind):
                        break
                if ended:
                    if args.last_partial:  # the task is over: its unterminated last line too
                        for batch in protocol.batches(tail.rest(), budget):
                            await self._send(channel, protocol.lines_answer(batch))
                    return
        finally:
            tail.close()

    async def _send(self, channel: aiortc.RTCDataChannel, text: str) -> None:
        if channel.readyState != "open":
            raise _ChannelGone
        channel.send(text)
        if channel.bufferedAmount > HIGH_WATER:
            drained = asyncio.Event()
            channel.bufferedAmountLowThreshold = HIGH_WATER // 4
            channel.once("bufferedamountlow", drained.set)
            channel.once("close", drained.set)
            await drained.wait()
            if channel.readyState != "open":
                raise _ChannelGone


def _budget(peer: _Peer) -> int:
    """Bytes of one message to ``peer``: what it accepts, less room for the framing."""
    return max(4096, peer.max_message - 1024)


def _next(it: Iterator[T]) -> T | None:
    return next(it, None)


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
