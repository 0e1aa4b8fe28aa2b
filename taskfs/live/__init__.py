"""The live channel: a computing task's files, followed over a WebRTC data channel.

The REST API carries only the signalling (``register``, ``offer``, ``message``, TASK_API.md
"Live channel"); the files travel over a data channel labelled ``file_transfer``, one request
per channel, answered by a stream of JSON messages.

* ``protocol``: message shapes, request validation, line framing; no I/O (both sides).
* ``files``: the answering side's file operations on a task's working directory (``ls``,
  ``tail``, ``top``, ``last_modified_file``); plain blocking functions, no WebRTC.
* ``rtc``: the WebRTC plumbing both sides share: which host candidates ICE gathers, the ICE
  servers, and the asyncio thread aiortc runs in beside trio.
* ``answerer``: the service's side (``taskfs serve``).
* ``client``: the caller's side (``taskfs tasks tail``, ``Task.tail_files``, the mount).
* ``ops``: the live commands for people (CLI and ``Task``), loaded with ``load_ops()``.

``aiortc`` comes with the default install; where it is missing (a platform without its
wheels, an install without dependencies) the service answers the channel with 204 and the live
commands say what to install.
"""

from __future__ import annotations

from types import ModuleType

from taskfs.errors import LiveError


def load_ops() -> ModuleType:
    """``taskfs.live.ops``, or ``LiveError`` saying what to install when aiortc is missing."""
    try:
        from taskfs.live import ops  # noqa: PLC0415 - aiortc is an optional extra
    except ImportError:
        raise LiveError(
            "the live channel needs aiortc, which is not installed: pip install aiortc"
        ) from None
    return ops
