"""Facts about local processes, shared by the CLI and the filesystem (whether a reader
wants out of a blocked request); the helper processes a service runs for itself.

Must stay true: a process that is gone counts as wanting out; a helper (``top`` for the
live channel) is known to ``helpers()`` from before it exists until it is reaped, so that the
service's sweep of the orphans it adopted (it is a child subreaper) leaves it alone.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

_helpers_lock = threading.Lock()
_helpers: set[int] = set()
_helpers_starting = 0


@contextlib.contextmanager
def helper(args: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A short-lived helper process of this one (any thread): killed if still running, and
    reaped, on the way out."""
    global _helpers_starting  # noqa: PLW0603 - one registry per process
    with _helpers_lock:
        _helpers_starting += 1
    try:
        child = subprocess.Popen(args, **popen)
        with _helpers_lock:
            _helpers.add(child.pid)
    finally:
        with _helpers_lock:
            _helpers_starting -= 1
    try:
        with child:
            yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        with _helpers_lock:
            _helpers.discard(child.pid)


def helpers() -> frozenset[int] | None:
    """The pids of this process's helpers now; None while one is being started (its pid is
    not known yet: a sweep must wait)."""
    with _helpers_lock:
        return None if _helpers_starting else frozenset(_helpers)


def _mask(status: dict[str, str], field: str) -> int:
    return int(status.get(field, "0"), 16)


def wants_out(pid: int) -> bool:
    """Whether the process (or thread) ``pid`` is gone or has a signal waiting to be handled.

    A reader blocked in a FUSE request cannot be interrupted once the request reached the
    filesystem: the kernel waits for the answer even with SIGKILL pending. The filesystem must
    notice and answer (EINTR) itself; this is how it notices: a pending signal that is neither
    blocked nor ignored (a fatal one shows as a pending SIGKILL).
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return True
    status = {k: v.strip() for k, v in status.items()}
    if status.get("State", "").startswith(("Z", "X")):
        return True
    pending = _mask(status, "SigPnd") | _mask(status, "ShdPnd")
    return bool(pending & ~_mask(status, "SigBlk") & ~_mask(status, "SigIgn"))
