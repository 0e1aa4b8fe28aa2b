"""The supervisor each task command runs under: nothing a command starts outlives it.

Run as a script (``python -I -S reaper.py GRACE -- CMD...``, standard library only, so it
starts in a few milliseconds): it becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``), runs
``CMD`` in a process group of its own (so ``kill 0`` in a command does not reach the
supervisor) and waits. Processes that leave the group with ``setsid`` or
daemonize by double-forking are reparented to this supervisor instead of init, so it can always
find them: they are its descendants.

* When ``CMD`` exits, every remaining descendant is killed (SIGKILL) and reaped, and the
  supervisor exits as ``CMD`` did (the same code, or the same signal).
* SIGTERM (or SIGINT, SIGHUP) is forwarded to every descendant; whatever is still alive
  ``GRACE`` seconds later is killed. SIGUSR1 kills everything at once.
* When the service that started it dies (its parent changes), everything is killed at once:
  a task never runs on without the service that answers for it.

Must stay true: the supervisor never exits while a descendant it could signal is alive (except
after ``_GIVE_UP`` seconds of processes that cannot die, such as ones stuck in the kernel);
it imports nothing outside the standard library and never touches a process that is not its
descendant.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
_GIVE_UP = 10.0
_WATCH = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def become_subreaper() -> bool:
    """Make this process a child subreaper: orphaned descendants are reparented to it rather
    than to init. False where that is not possible (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Living (non-zombie) descendants of ``root``, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def signal_all(sig: int) -> None:
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


class Children:
    """Reaps ended children, keeping the wait status of the command's own process."""

    def __init__(self, command: int) -> None:
        self.command = command
        self.status: int | None = None

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.command:
                self.status = status

    def kill_everything(self) -> None:
        """SIGKILL every descendant until none is left (or ``_GIVE_UP`` seconds pass)."""
        give_up = time.monotonic() + _GIVE_UP
        while time.monotonic() < give_up:
            signal_all(signal.SIGKILL)
            self.reap()
            if not descendants(os.getpid()):
                self.reap()
                return
            time.sleep(0.01)


def start(command: list[str]) -> int:
    """Fork and exec ``command`` in a process group of its own; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        for sig in _WATCH:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setpgid(0, 0)  # its own group: ``kill 0`` in a command never reaches us
        try:
            os.execvp(command[0], command)  # noqa: S606 - argv from the runner, no shell
        except OSError as exc:
            os.write(2, f"taskfs: cannot run {command[0]}: {exc.strerror}\n".encode())
        os._exit(127)
    return pid


def main(argv: list[str]) -> int:
    grace = float(argv[1])
    command = argv[argv.index("--") + 1 :]
    become_subreaper()
    parent = os.getppid()
    try:
        parent_gone = os.pidfd_open(parent)
    except (OSError, AttributeError):
        parent_gone = -1  # then getppid() is watched once a second
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in _WATCH:
        signal.signal(sig, lambda *_: None)
    children = Children(start(command))
    watched = [wake_r] + ([parent_gone] if parent_gone >= 0 else [])
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if parent_gone < 0:
            timeout = 1.0 if timeout is None else min(timeout, 1.0)
        ready, _, _ = select.select(watched, [], [], timeout)
        received: set[int] = set()
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                received = set(os.read(wake_r, 256))
        children.reap()
        orphaned = parent_gone in ready or (parent_gone < 0 and os.getppid() != parent)
        if (
            children.status is not None
            or orphaned
            or signal.SIGUSR1 in received
            or (deadline is not None and time.monotonic() >= deadline)
        ):
            break
        if deadline is None and received & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace
    children.kill_everything()
    status = children.status
    if status is not None and os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    # Ended by a signal (or never reaped): end the same way, so the runner sees it.
    sig = signal.Signals(os.WTERMSIG(status)) if status is not None else signal.SIGKILL
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    return 128 + sig


if __name__ == "__main__":
    sys.exit(main(sys.argv))
