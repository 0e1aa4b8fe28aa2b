"""The live commands for people: ``tail``, list files, ``top``, last modified file, as the CLI
(``taskfs tasks tail`` ..., ``taskfs logs``) and the ``Task`` class run them.

Owns: checking that the task is computing before connecting (so a user hears "has ended" or
"has not started" rather than a protocol detail), one connection per command with one stream
per file, and the text these commands print (plain lines, pipe-friendly; GNU ``tail``'s
``==> name <==`` headers when there are several files).

Must stay true: a file that fails (not found, not text) is reported through ``on_error`` and
the other files go on; the connection is closed when the command ends, however it ends.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode
from taskfs.errors import LiveError
from taskfs.live import protocol
from taskfs.live.client import ANSWER_TIMEOUT, LiveConnection, LiveStream


async def ensure_computing(api: ApiClient, task_id: str) -> None:
    """``LiveError`` saying why, unless the task is computing now."""
    status = await api.get_status(task_id)
    if status.status == TaskStatusCode.COMPUTATION_STARTED:
        return
    if status.is_terminated:
        raise LiveError(
            f"task {task_id} has ended ({status.status.value}): its files are in its outputs "
            f"(taskfs tasks outputs {task_id}; taskfs tasks download {task_id})"
        )
    raise LiveError(
        f"task {task_id} is not computing yet ({status.status.value}): live commands work "
        "while it computes"
    )


def tail_request(filename: str, lines: int, follow: bool, wait: bool) -> protocol.Request:
    return protocol.Request("tail", follow, {"filename": filename, "lines": lines, "wait": wait})


async def tail(
    api: ApiClient,
    task_id: str,
    filenames: Sequence[str],
    *,
    lines: int,
    follow: bool,
    on_text: Callable[[str, str], None],
    on_error: Callable[[str, LiveError], None],
    wait: bool = False,
) -> int:
    """Tail ``filenames`` of the task; the text of each answer goes to ``on_text(name,
    text)`` (its lines, each with its newline but the pieces of a cut line: see ``protocol``;
    empty for the answer that says the file's text so far is all sent). Returns how many
    files failed. Followed, returns when the task stops computing."""
    await ensure_computing(api, task_id)
    connection = LiveConnection(api, task_id)
    failed = 0

    async def pump(name: str, stream: LiveStream) -> None:
        nonlocal failed
        again = False  # the file started again and is followed anew
        try:
            while True:
                try:
                    async for answer in stream:
                        batch = answer.message
                        if not isinstance(batch, list) or not all(
                            isinstance(x, str) for x in batch
                        ):
                            raise LiveError(f"the task's live channel sent no lines for {name}")
                        on_text(name, protocol.text_of(batch, answer.continued))
                        again = False
                    return
                except LiveError as exc:
                    if not (follow and str(exc).startswith(protocol.STARTED_AGAIN)):
                        if again:  # asked anew just as the task stopped computing
                            raise _ended_as_restarted(name, task_id) from None
                        raise
                    # As GNU tail -F: say so, and follow the file from its start again.
                    on_error(name, LiveError(f"{exc}; following it from its start"))
                    await stream.aclose()
                    again = True
                    request = tail_request(name, protocol.MAX_LINES, True, wait)
                    try:
                        stream = await connection.request(request)
                    except LiveError:
                        raise _ended_as_restarted(name, task_id) from None
        except LiveError as exc:
            failed += 1
            on_error(name, exc)
        finally:
            await stream.aclose()

    try:
        requests = [tail_request(name, lines, follow, wait) for name in filenames]
        streams = [await connection.connect(requests[0])]
        for request in requests[1:]:
            streams.append(await connection.request(request))
        async with trio.open_nursery() as nursery:
            for name, stream in zip(filenames, streams, strict=True):
                if follow:
                    nursery.start_soon(pump, name, stream)
                else:
                    with trio.move_on_after(ANSWER_TIMEOUT) as waited:
                        await pump(name, stream)
                    if waited.cancelled_caught:
                        failed += 1
                        on_error(name, LiveError("the task's live channel did not answer"))
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()
    return failed


def _ended_as_restarted(name: str, task_id: str) -> LiveError:
    return LiveError(
        f"the task stopped computing as {name} started again: it is whole in the task's "
        f"outputs (taskfs tasks download {task_id})"
    )


async def once(api: ApiClient, task_id: str, kind: str) -> Any:
    """The one answer of ``ls``, ``top`` or ``last_modified_file``."""
    await ensure_computing(api, task_id)
    connection = LiveConnection(api, task_id)
    try:
        stream = await connection.connect(protocol.Request(kind, False, {}))
        return await stream.first()
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


def format_listing(tree: Any) -> str:
    """An ``ls`` answer as one path per line, sorted, directories ending in ``/``."""
    try:
        paths = protocol.listing_paths(tree)
    except protocol.LiveProtocolError as exc:
        raise LiveError(str(exc)) from None
    return "".join(f"{path}/\n" if is_dir else f"{path}\n" for path, is_dir in sorted(paths))


def format_last_modified(answer: Any) -> str:
    """A ``last_modified_file`` answer as the official CLI prints it."""
    try:
        name = str(answer["most_recent_file"])
        modified = float(answer["most_recent_timestamp"])
        now = float(answer["now_timestamp"])
        since = float(answer["time_since_last_mod"])
    except (TypeError, KeyError, ValueError):
        raise LiveError("the task's live channel sent a malformed last-modified answer") from None

    def moment(stamp: float) -> str:
        return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")

    return (
        f"Most Recent File: {name}\n"
        f"Modification Time: {moment(modified)}\n"
        f"Current Time on Machine: {moment(now)}\n"
        f"Time Since Last Modification: {datetime.timedelta(seconds=round(since))}\n"
    )
