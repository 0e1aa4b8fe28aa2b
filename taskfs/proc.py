"""Facts about local processes (liveness), shared by the CLI and the filesystem.

Must stay true: a zombie (exited, not yet reaped) counts as gone.
"""

from __future__ import annotations

import psutil


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie waiting to be reaped counts as gone."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


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
