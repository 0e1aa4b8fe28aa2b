"""The supervisor each task command runs under: nothing a command starts outlives it.

Run as a script (``python -I -S reaper.py GRACE -- CMD...``, standard library only, so it
starts in a few milliseconds): it becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``), runs
``CMD`` in a process group of its own (so ``kill 0`` in a command does not reach the
supervisor) and waits. Processes that leave the group with ``setsid`` or
daemonize by double-forking are reparented to this supervisor instead of init, so it can always
find them: they are its descendants.

* When ``CMD`` exits, every remaining descendant is frozen (SIGSTOP, top down, so that even a
  process forking in a loop is caught), killed (SIGKILL) and reaped, and the supervisor
  exits as ``CMD`` did (the same code, or the same signal).
* SIGTERM (or SIGINT, SIGHUP) is forwarded to every descendant; whatever is still alive
  ``GRACE`` seconds later is killed. SIGUSR1 kills everything at once.
* When the service that started it dies (its parent changes), everything is killed at once:
  a task never runs on without the service that answers for it.

The supervisor cannot be ptraced by its task (it is not dumpable) and is not in its command's
process group (``kill 0`` does not reach it). A task that kills it anyway leaves its processes
to the service, which adopts and kills them (``Runner``).

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
PR_SET_DUMPABLE = 4
_GIVE_UP = 10.0
_WATCH = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def undebuggable() -> None:
    """Refuse ``ptrace`` from processes without CAP_SYS_PTRACE: a task must not be able to
    stop its own supervisor that way (and its commands become dumpable again at ``exec``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def become_subreaper() -> bool:
    """Make this process a child subreaper: orphaned descendants are reparented to it rather
    than to init. False where that is not possible (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), if any."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Living (non-zombie) descendants of ``root``, from a scan of ``/proc``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) is not None and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def children(pid: int) -> list[int]:
    """The children of ``pid`` right now: ``/proc/<pid>/task/*/children`` (one read per
    thread, no scan of ``/proc``), or a scan where the kernel does not offer that file."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue
            return [p for p in descendants(pid) if (st := _stat(p)) and int(st[1]) == pid]
        except OSError:
            continue
    return found


def freeze(roots: list[int], stop_roots: bool = True) -> set[int]:
    """SIGSTOP ``roots`` and every descendant, top down, until a pass finds no new process
    and all it stopped have stopped. A stopped process cannot fork, so even one that forks and
    exits in a tight loop (its live copy is always a child of one we look at: its parent, or
    this subreaper) is caught. Returns every pid it stopped or found."""
    stopped: set[int] = set()
    for _ in range(10_000):
        new = False
        todo = list(roots)
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            if pid not in stopped and (stop_roots or pid not in roots):
                try:
                    os.kill(pid, signal.SIGSTOP)
                except OSError:
                    continue
                stopped.add(pid)
                new = True
            todo.extend(children(pid))
        if not new and all(_stopped(pid) for pid in stopped):
            break
    return stopped


def _stopped(pid: int) -> bool:
    fields = _stat(pid)
    return fields is None or fields[0] in (b"T", b"t", b"Z", b"X")


def signal_all(sig: int) -> None:
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


class Children:
    """Reaps ended children, keeping the wait status of the command's own process."""

    def __init__(self, command: int) -> None:
        self.command = command
        self.status: int | None = None

    def reap(self) -> bool:
        """Collect every child that has ended; False once there are no children at all."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.command:
                self.status = status

    def kill_everything(self) -> None:
        """Freeze every descendant, SIGKILL them all, and reap until no child is left (or
        ``_GIVE_UP`` seconds pass: a process stuck in the kernel cannot die)."""
        give_up = time.monotonic() + _GIVE_UP
        while time.monotonic() < give_up:
            for pid in freeze([os.getpid()], stop_roots=False):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if not self.reap():
                return
            time.sleep(0.005)


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
    undebuggable()
    parent = os.getppid()
    try:
        parent_gone = os.pidfd_open(parent)
    except (OSError, AttributeError):
        parent_gone = -1  # then getppid() is watched once a second
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in _WATCH:
        signal.signal(sig, lambda *_: None)
    kids = Children(start(command))
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
        kids.reap()
        orphaned = parent_gone in ready or (parent_gone < 0 and os.getppid() != parent)
        if (
            kids.status is not None
            or orphaned
            or signal.SIGUSR1 in received
            or (deadline is not None and time.monotonic() >= deadline)
        ):
            break
        if deadline is None and received & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace
    kids.kill_everything()
    status = kids.status
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
