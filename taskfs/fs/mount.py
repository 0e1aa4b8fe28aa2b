"""Mount lifecycle: options, checks, the one nursery, signals, clean unmount.

Owns: everything between "mount this API here" and "unmounted": checking the mountpoint, the
FUSE options (a pure function), laying out every lifetime in one function (API client, data
client and caches, the vfs, pyfuse3's main loop, the signal watcher), and unmounting, also of
a mountpoint whose process died.

Must stay true: SIGINT and SIGTERM end the main loop and unmount cleanly; a failure anywhere
unmounts before the process exits; a mountpoint that is in use, not empty or still mounted is
refused with a clear message before anything is mounted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3
import trio

from taskfs.api.client import ApiClient
from taskfs.config import ClientSettings, runtime_dir
from taskfs.errors import TaskfsError, UsageError
from taskfs.fs.fuse_ops import Operations
from taskfs.fs.vfs import Vfs, VfsSettings
from taskfs.mounts import mounted_at
from taskfs.outputs import Outputs, make_cache
from taskfs.retry import Breaker

if TYPE_CHECKING:
    from taskfs.live.mirror import LiveMirrors

log = logging.getLogger(__name__)

FSTYPE = "fuse.taskfs"
# pyfuse3 keeps this many idle request readers; with fewer, every request of a sequential
# reader (cp, ls -l) spawns a worker and the next one retires it.
MIN_WORKERS = 8


@dataclass(frozen=True)
class MountSettings:
    mountpoint: Path
    client: ClientSettings
    cache_dir: Path
    cache_size: int = 10 << 30
    allow_other: bool = False
    # Mount flags from fstab for the kernel to apply: ro, noexec, nosuid, nodev.
    kernel_options: frozenset[str] = frozenset()
    debug: bool = False
    connections: int = 8
    # Kernel read-ahead of the mount (KiB); the kernel's default of 128 KiB means one FUSE
    # request per 128 KiB of a sequential read. Needs root; left alone otherwise. Not more
    # than 3 MiB: a reader has up to two windows in flight, in 1 MiB requests, and at 9
    # requests waiting (the FUSE queue's congestion threshold, 3/4 of its 12) the kernel
    # drops the rest of its read-ahead and asks for those pages late, out of order. At 4 MiB a
    # cold deflated read cost 6.2-6.6 s of CPU per GiB instead of 3.4-4.1 (its cursor lost its
    # place), and a stored one 5-15% more.
    readahead_kb: int = 3072
    # A running task's live connection is closed after this long without readers.
    live_idle: float = 30.0
    vfs: VfsSettings = field(default_factory=VfsSettings)

    @property
    def max_tasks(self) -> int:
        """FUSE handlers at once: every blocked ``wait`` reader holds one, so leave room."""
        return self.vfs.max_waiters + 128


def tune_malloc() -> None:
    """Keep a long-running mount's memory flat (glibc only; elsewhere nothing happens).

    Buffers of 256 KiB and more get their own mappings, returned to the system when freed
    (glibc would otherwise raise that threshold after the first free and serve later MiB
    buffers from a heap that never shrinks), and threads share two malloc arenas.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        log.debug("mallopt not available; memory tuning skipped")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_ARENA_MAX = -8
# How often freed heap memory is handed back to the system (``release_memory``).
TRIM_INTERVAL = 1.0


async def release_memory(interval: float = TRIM_INTERVAL) -> None:
    """Hand freed heap memory back to the system, once per ``interval`` (glibc only).

    glibc returns only the top of a heap by itself. Inflated output comes in ~35 KiB pieces
    that readers free in another order than they were made, so a mount that had streamed 32
    deflated members at once kept about 290 MB of freed memory (measured in-process with
    32 readers; the live objects, by tracemalloc, were about 85 MB). ``malloc_trim`` once a
    second (1-9 ms, in a worker thread) kept the peak at about 165 MB in the same run.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    while True:
        await trio.sleep(interval)
        await trio.to_thread.run_sync(trim, 0)


def fuse_options(settings: MountSettings) -> set[str]:
    """The FUSE mount options for ``settings`` (pure)."""
    options = {"fsname=taskfs", "subtype=taskfs", "default_permissions", "noatime"}
    if settings.allow_other:
        options.add("allow_other")
    options |= settings.kernel_options
    if settings.debug:
        options.add("debug")
    return options


def tune_readahead(mountpoint: Path, kb: int) -> bool:
    """Raise the kernel read-ahead of the mount's backing device (root only).

    Reads the device number from /proc/self/mountinfo: the mount process must never stat its
    own mountpoint (the kernel would ask this very process, which is not serving yet).
    """
    found = mounted_at(mountpoint)
    if found is None or kb <= 0:
        return False
    try:
        Path(f"/sys/class/bdi/{found.device}/read_ahead_kb").write_text(f"{kb}\n")
    except OSError as exc:
        log.debug("kernel read-ahead left at its default: %s", exc.strerror)
        return False
    log.debug("kernel read-ahead set to %d KiB", kb)
    return True


def mount_entry(mountpoint: Path) -> tuple[str, str] | None:
    """``(fstype, source)`` of the mount at ``mountpoint`` from /proc/self/mountinfo."""
    found = mounted_at(mountpoint)
    return None if found is None else (found.fstype, found.source)


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse a mountpoint that is missing, not a directory, mounted, stale or not empty."""
    if mount_entry(mountpoint) is not None:
        raise UsageError(
            f"{mountpoint} is already mounted (run 'taskfs unmount {mountpoint}' first)"
        )
    try:
        st = mountpoint.stat()
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mountpoint} does not exist (create it with mkdir)") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(
                f"{mountpoint} is a dead mount (run 'taskfs unmount {mountpoint}')"
            ) from None
        raise UsageError(f"cannot use {mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if any(mountpoint.iterdir()):
        raise UsageError(f"mountpoint {mountpoint} is not empty")


async def run_mount(
    settings: MountSettings, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Mount and serve until unmounted or signalled; all lifetimes in one place."""
    check_mountpoint(settings.mountpoint)
    tune_malloc()
    cache = make_cache(settings.cache_dir, settings.cache_size)
    deadline = settings.client.deadline
    async with (
        ApiClient.open(
            settings.client, breaker=Breaker(f"the API at {settings.client.api_url}")
        ) as api,
        Outputs(
            api,
            cache,
            connections=settings.connections,
            deadline=deadline,
            breaker=Breaker("the outputs storage"),
        ) as outputs,
        trio.open_nursery() as nursery,
    ):
        live = start_live(api, nursery, settings.cache_dir / "live", settings.live_idle)
        vfs = Vfs(api, outputs, nursery, replace(settings.vfs, deadline=deadline), live)
        vfs.stats.hook_api(api.http)
        vfs.stats.hook_storage(outputs.http, outputs.bulk_observers)
        pyfuse3.init(Operations(vfs), str(settings.mountpoint), fuse_options(settings))
        pid_file = _pid_file(settings.mountpoint)
        try:
            _write_pid_file(pid_file, settings.mountpoint)
            nursery.start_soon(_tune_after_init, settings.mountpoint, settings.readahead_kb)
            nursery.start_soon(_watch_signals, vfs)
            nursery.start_soon(release_memory)
            log.info("mounted %s at %s", settings.client.api_url, settings.mountpoint)
            task_status.started()
            await pyfuse3.main(min_tasks=MIN_WORKERS, max_tasks=settings.max_tasks)
        finally:
            vfs.shutdown()
            nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=True)
            with contextlib.suppress(OSError):
                pid_file.unlink()
            log.info("unmounted %s", settings.mountpoint)


def start_live(
    api: ApiClient, nursery: trio.Nursery, spool_dir: Path, idle: float
) -> LiveMirrors | None:
    """Running tasks' files over the live channel, or None where aiortc is missing (their
    ``outputs`` then stay empty until they end)."""
    if importlib.util.find_spec("aiortc") is None:  # found, not loaded: see ``LiveTask``
        log.warning(
            "aiortc is not installed: running tasks' outputs show once they end "
            "(pip install aiortc)"
        )
        return None
    from taskfs.live.mirror import LiveMirrors  # noqa: PLC0415 - only where there is aiortc

    return LiveMirrors(api, nursery, spool_dir, idle=idle)


async def _tune_after_init(mountpoint: Path, kb: int) -> None:
    """Set the read-ahead once the kernel has processed FUSE's INIT reply (which would reset
    it to the 128 KiB the kernel offered at mount time)."""
    await trio.sleep(0.3)
    tune_readahead(mountpoint, kb)


async def _watch_signals(vfs: Vfs) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            # Requests in flight (blocked ``wait`` readers, reads waiting on the network) hold
            # handlers that pyfuse3's main loop waits for: answer them first.
            vfs.shutdown()
            with trio.move_on_after(1):
                await vfs.requests_answered()
            pyfuse3.terminate()
            return


def _pid_file(mountpoint: Path) -> Path:
    """Where the mount process of ``mountpoint`` leaves its pid (for ``taskfs unmount``)."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:16]
    return runtime_dir() / f"mount-{digest}.pid"


def _write_pid_file(path: Path, mountpoint: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.parent.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        log.warning("%s is not a private directory of this user: no pid file", path.parent)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n{os.path.abspath(mountpoint)}\n")
    tmp.replace(path)


def _mount_process(mountpoint: Path) -> int | None:
    """The pid of the live process serving ``mountpoint``, if it left its pid file (and the
    pid still belongs to a taskfs mount of that mountpoint, not to a process that reused it)."""
    try:
        pid_text, recorded = _pid_file(mountpoint).read_text().splitlines()[:2]
        pid = int(pid_text)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    if recorded != os.path.abspath(mountpoint) or b"mount" not in argv:
        return None
    return pid


def unmount(mountpoint: Path, timeout: float = 10.0) -> str | None:
    """Unmount a taskfs mount: ask its process (SIGTERM: it answers blocked ``wait`` readers
    and unmounts itself), else unmount it directly, also when its process died (lazily if it
    is busy). Returns a note for the user when the unmount was lazy (processes still had
    files or their working directory in it)."""
    found = mount_entry(mountpoint)
    named = printable(mountpoint)
    if found is None:
        raise UsageError(f"{named} is not mounted")
    if found[0] != FSTYPE:
        raise UsageError(f"{named} is a {found[0]} mount, not taskfs")
    users = mount_users(mountpoint)
    note = None
    if users:
        shown = ", ".join(f"{pid} ({name})" for pid, name in users[:5])
        more = f" and {len(users) - 5} more" if len(users) > 5 else ""
        note = (
            f"{named} was busy (in use by {shown}{more}): unmounted lazily; it is gone "
            "from the tree, and those processes get errors until they let go of it"
        )
    pid = _mount_process(mountpoint)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once resumed
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if mount_entry(mountpoint) is None:
                return note
            time.sleep(0.05)
        log.info("the mount process %d did not unmount within %g s", pid, timeout)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise TaskfsError("fusermount3 not found (install the fuse3 package)")
    first = subprocess.run(
        [tool, "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if first.returncode == 0:
        return None
    log.info("plain unmount failed (%s); unmounting lazily", first.stderr.strip())
    lazy = subprocess.run(
        [tool, "-u", "-z", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if lazy.returncode != 0:
        raise TaskfsError(f"cannot unmount {named}: {lazy.stderr.strip() or first.stderr}")
    return note or f"{named} was busy: unmounted lazily"


def printable(path: Path) -> str:
    """``path`` for a one-line message: control characters (a newline in a name) escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(path))


def mount_users(mountpoint: Path) -> list[tuple[int, str]]:
    """Processes whose working directory, root or an open file is in ``mountpoint`` (those
    this user may look at), as ``(pid, command name)``; reading the links touches no FUSE."""
    top = str(mountpoint)
    me = os.getpid()
    found: list[tuple[int, str]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        base = f"/proc/{entry.name}"
        try:
            links = [f"{base}/cwd", f"{base}/root"]
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == top or target.startswith(top + "/"):
                try:
                    with open(f"{base}/comm") as comm:
                        name = comm.read().strip()
                except OSError:
                    name = "?"
                found.append((int(entry.name), name))
                break
    return found
