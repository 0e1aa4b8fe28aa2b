"""The ``taskfs`` command: serve, submit, and (in later modules) mount, unmount and tasks.

Owns: argument parsing, logging configuration (the only place handlers are installed), turning
``TaskfsError`` into one clear line on stderr and an exit status, and starting/stopping the
embedded service in the background.

Exit statuses: 0 success, 1 an operation failed (a task that failed, for ``tasks wait``), 2 bad
usage, 69 the service could not be reached, 130 interrupted. Errors are one line on stderr:
failures of taskfs, of the service and of local files (an unwritable directory, a full disk)
alike; output into a closed pipe ends a command quietly. ``--debug`` shows tracebacks and debug
logs; without it no traceback reaches a user for a known error.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from taskfs import __version__
from taskfs.cli_live import add_logs_parser
from taskfs.cli_tasks import add_parsers as add_task_parsers
from taskfs.cli_tasks import (
    count_arg,
    grace_arg,
    path_arg,
    port_arg,
    seconds_arg,
    settings_of,
    task_id_arg,
    zero_or_more_arg,
)
from taskfs.config import (
    ENV_API_URL,
    ClientSettings,
    ServiceSettings,
    default_cache_dir,
    default_data_dir,
    local_service_pid,
    local_service_url,
    make_dirs,
    parse_duration,
    parse_size,
    runtime_dir,
)
from taskfs.errors import ServiceError, TaskfsError, UsageError, as_taskfs_error, unwrap

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from taskfs.api.client import ApiClient

log = logging.getLogger("taskfs.cli")

# The exit status when the service could not be reached (sysexits' EX_UNAVAILABLE): a script
# tells it from a failed task (1).
EXIT_UNAVAILABLE = 69
# What binding the service's address can fail with.
_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


class OutputError(TaskfsError):
    """Standard output failed (a closed pipe, a full disk)."""


def emit(text: str, *, done: str = "", undo: Callable[[], str] | None = None) -> None:
    """Print a command's result line. When standard output fails (a closed pipe, a full
    disk) the error is one line that says what the command did anyway (``done``: the id of
    a submitted task), or ``undo`` takes that back and says so."""
    try:
        print(text, flush=True)
    except OSError as exc:
        _drop_stdout()
        if undo is not None:
            done = undo()
        after = f"; {done}" if done else ""
        reason = exc.strerror or exc
        raise OutputError(f"cannot write to standard output: {reason}{after}") from None


def _drop_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush of what is
    still buffered cannot fail again (a second error, printed as a traceback)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _ClosedStream(io.TextIOBase):
    """Standard output that the caller closed (``>&-``): writing to it fails, as it would
    for a C program (EBADF), so a command's result is never lost without a word."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")


def _guard_closed_streams() -> None:
    """Standard streams the caller closed: their descriptors are held on /dev/null, so no file
    or socket opened later takes their number (and gets output meant for them); a closed
    standard output fails every write (``_ClosedStream``)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.open(os.devnull, os.O_RDWR)  # the lowest free number: ``fd``
            if fd == 1:
                sys.stdout = _ClosedStream()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of exiting, so errors print one way."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "taskfs: error: mount: argument ...", not "taskfs: error: taskfs mount: ...".
        command = self.prog.removeprefix("taskfs").strip()
        raise UsageError(f"{command}: {message}" if command else message)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        # argparse ignores a failing standard output; --help > /dev/full must not succeed.
        if file is None:
            emit(self.format_help().rstrip("\n"))
        else:
            super().print_help(file)


class _VersionAction(argparse.Action):
    """``--version``, printed with ``emit`` (argparse's own ignores a failing output)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, *args: object, **kwargs: object) -> None:
        emit(f"taskfs {__version__}")
        raise SystemExit(0)


def setup_logging(debug: bool, quiet_default: bool = True) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet_default else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        for noisy in ("httpx", "httpcore", "hypercorn.error", "hypercorn.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


# -- serve ---------------------------------------------------------------------------------------


def _service_settings(args: argparse.Namespace) -> ServiceSettings:
    defaults = ServiceSettings(data_dir=args.data_dir)
    return ServiceSettings(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        slots=args.slots or defaults.slots,
        vm_type=args.vm_type or defaults.vm_type,
        kill_grace_seconds=args.kill_grace,
        adopt_orphans=True,  # this process is the service: it may adopt its tasks' orphans
    )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _service_settings(args)
    if args.print_key:
        from taskfs.server.app import ensure_secret_file, valid_api_key

        make_dirs(settings.data_dir, 0o700)
        emit(ensure_secret_file(settings.key_file, valid_api_key))
        return 0
    if args.stop:
        return 0 if stop_service(settings.data_dir) else 1
    if args.background:
        url = start_service_background(settings.data_dir, _serve_argv(args))
        emit(url, done=f"the service runs at {url}")
        return 0
    setup_logging(args.debug, quiet_default=False)
    os.chdir("/")  # its paths are absolute; a service pins no directory (it may be detached)
    try:
        return trio.run(_serve_main, settings, args.debug)
    except BaseException as exc:
        leaf = unwrap(exc)
        binding = isinstance(leaf, socket.gaierror) or (
            isinstance(leaf, OSError) and leaf.errno in _BIND_ERRORS and leaf.filename is None
        )
        if binding and isinstance(leaf, OSError):
            where = f"{settings.host}:{settings.port}"
            raise TaskfsError(f"cannot serve on {where}: {leaf.strerror or leaf}") from exc
        raise


def _serve_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--host", args.host, "--port", str(args.port), "--kill-grace", str(args.kill_grace)]
    if args.slots:
        argv += ["--slots", str(args.slots)]
    if args.vm_type:
        argv += ["--vm-type", args.vm_type]
    if args.debug:
        argv.append("--debug")
    return argv


async def _serve_main(settings: ServiceSettings, debug: bool) -> int:
    from taskfs.server.app import serve

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    shutdown.set()
                    return

        nursery.start_soon(watch_signals)
        url = await nursery.start(
            lambda task_status: serve(
                settings, shutdown=shutdown, debug=debug, task_status=task_status
            )
        )
        print(f"taskfs service listening on {url} (data in {settings.data_dir})", flush=True)
        await shutdown.wait()
    return 0


def start_service_background(
    data_dir: Path, extra: Sequence[str] = (), timeout: float = 20.0
) -> str:
    """Start ``taskfs serve`` detached (logging to ``service.log``); return its URL.

    Reuses a service that is already running for ``data_dir``.
    """
    url = running_service_url(data_dir)
    if url is not None:
        return url
    make_dirs(data_dir, 0o700)
    started, _ = _spawn_detached(
        ["serve", "--data-dir", str(data_dir), *extra],
        data_dir / "service.log",
        lambda: running_service_url(data_dir),
        timeout,
        "the local service did not start",
    )
    return started


T = TypeVar("T")


def _spawn_detached(
    args: Sequence[str], log_path: Path, ready: Callable[[], T | None], timeout: float, what: str
) -> tuple[T, int]:
    """Run ``taskfs <args>`` in its own session, logging to ``log_path``, until ``ready()``
    answers; returns that answer and the pid. If the process exits first, or ``timeout``
    passes (it is then terminated), ``TaskfsError`` says ``what`` with the log's last lines.
    """
    with open(log_path, "ab") as log_file:
        written = log_file.tell()  # what earlier runs wrote there
        proc = subprocess.Popen(
            # -P: the import path is not where the user stands (a folder there named taskfs,
            # a clone of it, say, would be imported instead of the installed package).
            [sys.executable, "-P", "-m", "taskfs", *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = ready()
        if answer is not None:
            return answer, proc.pid
        if proc.poll() is not None:
            raise TaskfsError(f"{what}: {_last_words(log_path, written, proc.returncode)}")
        time.sleep(0.05)
    proc.terminate()
    raise TaskfsError(f"{what} within {timeout:g} s (see {log_path})")


def _last_words(log_path: Path, start: int, status: int) -> str:
    """Why a detached process exited, from what it logged (from ``start`` on): its own error
    line (``taskfs: error: ...``), else its last line (of a traceback: the exception), with
    the log's name."""
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(start)
            lines = log_file.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("taskfs: error: "):
            return line.removeprefix("taskfs: error: ")
    last = lines[-1].strip() if lines else f"exit status {status}"
    return f"{last} (see {log_path})"


def running_service_url(data_dir: Path) -> str | None:
    """The URL of the service running for ``data_dir`` (the holder of its lock), if any."""
    return local_service_url(data_dir)


def stop_service(data_dir: Path, timeout: float = 15.0) -> bool:
    """SIGTERM the service running for ``data_dir`` and wait until it has let go of the data
    dir. The pid comes from the data dir's lock, so a stale ``server.json`` whose pid now
    belongs to another process is never signalled. Running tasks get their kill grace period
    (as the service announced it) on top of ``timeout``."""
    pid = local_service_pid(data_dir)
    if pid is None:
        print(f"no taskfs service is running for {data_dir}", file=sys.stderr)
        return True
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        info = json.loads((data_dir / "server.json").read_text())
        timeout += float(info.get("kill_grace_seconds", 0))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if local_service_pid(data_dir) is None:
            return True
        time.sleep(0.02)
    print(f"the service (pid {pid}) did not stop within {timeout:g} s", file=sys.stderr)
    return False


# -- submit --------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    setup_logging(args.debug)
    commands = list(args.command or [])
    trailing = [a for a in args.argv if a != "--"] if args.argv else []
    if trailing:
        commands.append(shlex.join(trailing) if len(trailing) > 1 else trailing[0])
    if not commands:
        raise UsageError("nothing to run: give a command after '--' or with --command")
    ttl = parse_duration(args.ttl) if args.ttl else None
    settings = settings_of(args)

    async def main() -> str:
        from taskfs.api.client import ApiClient
        from taskfs.api.submit import submit_task

        async with ApiClient.open(settings) as client:
            return await submit_task(
                client,
                commands,
                input_dir=args.input,
                project=args.project,
                ttl_seconds=ttl,
                simulator=args.simulator,
                on_issue=lambda issue: print(
                    f"taskfs: warning: input {issue.line()}", file=sys.stderr
                ),
            )

    task_id = trio.run(main)
    emit(task_id, done=f"task {task_id} was submitted")
    return 0


# -- mount / unmount -----------------------------------------------------------------------------


# What ``mount`` and ``unmount`` say where pyfuse3 is not installed (it is a Linux-only
# dependency: ``pip install taskfs`` on macOS leaves it out).
NO_FUSE = (
    "mounting needs pyfuse3 (FUSE for Linux), which is not installed here; on Linux: the "
    "Debian packages fuse3, libfuse3-dev and pkg-config, then pip install pyfuse3. Without "
    "FUSE, outputs are read with 'taskfs tasks download' or the Task class"
)


def _fuse_available() -> None:
    """Raise a one-line error where the FUSE side cannot be imported (no pyfuse3)."""
    try:
        import taskfs.fs.mount  # noqa: F401 - the FUSE side, only for these commands
    except ImportError as exc:
        if exc.name != "pyfuse3":
            raise
        raise TaskfsError(NO_FUSE) from None


def cmd_mount(args: argparse.Namespace) -> int:
    _fuse_available()
    from taskfs.fs.mount import (
        FSTYPE,
        MountSettings,
        check_mountpoint,
        mount_entry,
        run_mount,
    )
    from taskfs.fs.vfs import VfsSettings

    mountpoint = mountpoint_arg(args.mountpoint)
    fuse_options = _mount_options(args)
    cache_size = parse_size(args.cache_size)
    check_mountpoint(mountpoint)
    local = not (args.api_url or os.environ.get(ENV_API_URL))
    if local and not args.foreground_child and running_service_url(args.data_dir) is None:
        url = start_service_background(args.data_dir, ["--port", "0"])
        print(
            f"taskfs: started the local service at {url} (data: {args.data_dir}; "
            f"stop it with: taskfs serve --stop --data-dir {args.data_dir})",
            file=sys.stderr,
        )
    client = settings_of(args)
    if not args.foreground_child:
        _check_service(client)
    settings = MountSettings(
        mountpoint=mountpoint,
        client=client,
        cache_dir=args.cache_dir,
        cache_size=cache_size,
        allow_other="allow_other" in fuse_options,
        kernel_options=fuse_options - {"allow_other"},
        debug=args.debug,
        live_idle=args.live_idle,
        vfs=VfsSettings(
            uid=os.getuid() if args.uid is None else args.uid,
            gid=os.getgid() if args.gid is None else args.gid,
            umask=args.umask,
            xattr=args.xattr,
        ),
    )
    if args.foreground:
        setup_logging(args.debug, quiet_default=False)
        if args.foreground_child:
            os.chdir("/")  # a daemon: its paths are absolute; it pins no directory
        trio.run(run_mount, settings)
        return 0
    log_path = _mount_log(args.cache_dir, mountpoint)

    def mounted() -> bool | None:
        found = mount_entry(mountpoint)
        return True if found is not None and found[0] == FSTYPE else None

    _, pid = _spawn_detached(
        ["mount", *args.raw_argv, "--foreground", "--foreground-child"],
        log_path,
        mounted,
        30,
        "the mount did not come up",
    )

    def take_back() -> str:
        from taskfs.fs.mount import unmount

        try:
            unmount(mountpoint)
        except TaskfsError as exc:
            return f"{mountpoint} stays mounted ({exc})"
        return "unmounted it again"

    emit(f"mounted {client.api_url} at {mountpoint} (pid {pid}, log {log_path})", undo=take_back)
    return 0


def mountpoint_arg(text: str) -> Path:
    """A mountpoint as the kernel's table names it: absolute, links resolved (as mount(8)
    and umount(8) take it; a mount through a link would otherwise never be found). Only the
    CLI resolves it: the mount process must never touch its own mountpoint."""
    return Path(os.path.realpath(text))


def umask_arg(text: str) -> int:
    """An argparse type: an octal permission mask, 000-777."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mask: {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"not a mask between 000 and 777: {text!r}")
    return value


# ``-o name=value`` options as sshfs and rclone take them (an fstab line's options): each sets
# the argument of the same name, read by its type.
MOUNT_OPTIONS: dict[str, Callable[[str], object]] = {
    "api_url": str,
    "api_key_file": path_arg,
    "cache_dir": path_arg,
    "data_dir": path_arg,
    "uid": zero_or_more_arg,
    "gid": zero_or_more_arg,
    "umask": umask_arg,
}
# Options mount(8) takes from fstab that restrict the mount: the kernel applies them (ro:
# control refuses commands too; noexec: nothing runs from the mount).
KERNEL_OPTIONS = frozenset({"ro", "noexec", "nosuid", "nodev"})
# Options mount(8) passes to every filesystem that mean nothing more here (FUSE mounts are
# nosuid and nodev already, and their opposites are not given to a remote filesystem).
IGNORED_OPTIONS = frozenset(
    {
        "rw",
        "dev",
        "suid",
        "exec",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "defaults",
        "_netdev",
        "async",
        "atime",
        "noatime",
        "relatime",
    }
)


def _mount_options(args: argparse.Namespace) -> frozenset[str]:
    """Apply ``-o`` options to ``args``; the FUSE mount options among them (``allow_other``
    and ``KERNEL_OPTIONS``)."""
    fuse: set[str] = set()
    for option in ",".join(args.options or []).split(","):
        name, eq, value = option.partition("=")
        if not option or (name in IGNORED_OPTIONS and not eq):
            continue
        if option == "allow_other" or option in KERNEL_OPTIONS:
            fuse.add(option)
        elif option == "xattr":
            args.xattr = True
        elif name in MOUNT_OPTIONS and eq and not value:
            raise UsageError(f"mount option {option!r} needs a value ({name}=...)")
        elif name in MOUNT_OPTIONS and eq and value:
            try:
                setattr(args, name, MOUNT_OPTIONS[name](value))
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"mount option {option!r}: {exc}") from None
        else:
            known = ", ".join(
                ["allow_other", "xattr", *sorted(KERNEL_OPTIONS), *(f"{k}=" for k in MOUNT_OPTIONS)]
            )
            raise UsageError(f"unsupported mount option {option!r} (supported: {known})")
    return frozenset(fuse)


def _check_service(client: ClientSettings) -> None:
    """One cheap request before mounting: a rejected key fails the mount with the API's
    reason; a service that does not answer is a warning (the mount rides out outages)."""
    from taskfs.errors import AuthError
    from taskfs.task import run_api

    async def probe(api: ApiClient) -> None:
        await api.list_page(1, 1)

    try:
        run_api(replace(client, deadline=min(client.deadline, 3.0)), probe)
    except AuthError as exc:
        raise UsageError(f"{client.api_url} refused the API key: {exc}") from None
    except ServiceError as exc:
        print(
            f"taskfs: warning: {exc}; mounting anyway (it is asked again on use)", file=sys.stderr
        )


def _mount_log(cache_dir: Path, mountpoint: Path) -> Path:
    """The background mount's log: in the cache dir, else (unwritable: the mount then runs
    without a disk cache) in the runtime dir."""
    import hashlib

    name = f"mount-{hashlib.sha256(str(mountpoint).encode()).hexdigest()[:12]}.log"
    for folder in (cache_dir, runtime_dir()):
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(folder / name, "ab"):
                return folder / name
        except OSError:
            continue
    raise UsageError(f"no writable directory for the mount's log ({cache_dir}, {runtime_dir()})")


def cmd_unmount(args: argparse.Namespace) -> int:
    _fuse_available()
    from taskfs.fs.mount import unmount

    note = unmount(mountpoint_arg(args.mountpoint))
    if note:
        print(f"taskfs: {note}", file=sys.stderr)
    return 0


# -- parser --------------------------------------------------------------------------------------


def _add_api_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("service")
    group.add_argument(
        "--api-url",
        help="API base URL (default: $INDUCTIVA_API_URL, else the embedded local service)",
    )
    group.add_argument(
        "--api-key-file",
        type=path_arg,
        help="file holding the API key (default: "
        "$INDUCTIVA_API_KEY, ~/.inductiva/api_key, or the local service's key)",
    )
    group.add_argument(
        "--data-dir",
        type=path_arg,
        default=default_data_dir(),
        help="data directory of the embedded local service (default: %(default)s)",
    )
    group.add_argument(
        "--deadline",
        type=seconds_arg,
        metavar="SECONDS",
        help="time limit of one remote operation, retries included (default: 10)",
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="taskfs",
        description="Watch and steer remote compute tasks from a Unix shell.",
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(
        dest="command_name", metavar="COMMAND", required=True, parser_class=ArgumentParser
    )

    serve = sub.add_parser(
        "serve",
        help="run the embedded local task service",
        description="Run the embedded task service: the REST API of TASK_API.md, running "
        "tasks as local processes, with state in SQLite under --data-dir.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port",
        type=port_arg,
        default=8000,
        help="port to bind, 0 for any free one (default: %(default)s)",
    )
    serve.add_argument(
        "--data-dir",
        type=path_arg,
        default=default_data_dir(),
        help="state, storage and key files (default: %(default)s)",
    )
    serve.add_argument("--slots", type=count_arg, help="tasks run at once (default: CPU count)")
    serve.add_argument("--vm-type", help="machine type reported for tasks (default: local-<N>vcpu)")
    serve.add_argument(
        "--kill-grace",
        type=grace_arg,
        default=5.0,
        metavar="SECONDS",
        help="SIGTERM to SIGKILL delay when killing a task (default: %(default)s)",
    )
    mode = serve.add_mutually_exclusive_group()
    mode.add_argument(
        "--background",
        action="store_true",
        help="start detached (or reuse the running service) and print its URL",
    )
    mode.add_argument("--stop", action="store_true", help="stop the service running for --data-dir")
    mode.add_argument(
        "--print-key",
        action="store_true",
        help="print the service's API key (creating it) and exit",
    )
    serve.add_argument("--debug", action="store_true", help="debug logs, access log")
    serve.set_defaults(func=cmd_serve)

    submit = sub.add_parser(
        "submit",
        help="submit a task",
        description="Submit a task through the REST API (submit, upload input, mark uploaded) "
        "and print its id. Example: taskfs submit --input ./sim -- python run.py --steps 100",
    )
    submit.add_argument("--input", type=path_arg, help="directory whose files the task runs in")
    submit.add_argument("--project", help="project name (default: the service's default)")
    submit.add_argument("--ttl", help="time to live, e.g. 90s, 10m, 2h (default: none)")
    submit.add_argument(
        "--simulator", default="custom", help="simulator label (default: %(default)s)"
    )
    submit.add_argument(
        "-c",
        "--command",
        action="append",
        help="a shell command to run; repeat for several, run in order",
    )
    submit.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    _add_api_options(submit)
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]: one command")
    submit.set_defaults(func=cmd_submit)

    mount = sub.add_parser(
        "mount",
        help="mount the tasks of a service as a filesystem",
        description="Mount every task of the service as a directory: status, machine_type, "
        "computation_time, control, wait, info.json, top and the outputs archive as a tree "
        "(while a task computes: its current files, over the service's live channel). "
        "Without --api-url (or $INDUCTIVA_API_URL) the embedded local service is used, "
        "started in the background when it is not running.",
    )
    mount.add_argument("mountpoint", help="an empty directory")
    mount.add_argument(
        "--foreground",
        action="store_true",
        help="stay in the foreground (systemd, tests); default: background",
    )
    mount.add_argument(
        "--cache-dir",
        type=path_arg,
        default=default_cache_dir(),
        help="disk cache of archive data (default: %(default)s)",
    )
    mount.add_argument(
        "--cache-size",
        default="10G",
        help="disk cache limit, e.g. 500M, 10G; 0 disables it (default: %(default)s)",
    )
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTIONS",
        help="mount options, comma-separated, as in fstab: allow_other (let other users in), "
        "xattr, ro (control refuses commands too), noexec, "
        + ", ".join(f"{name}=" for name in MOUNT_OPTIONS),
    )
    mount.add_argument(
        "--xattr",
        action="store_true",
        help="answer extended attributes (user.taskfs.*: CRC, method, sizes, ETag, project, "
        "status); off by default: ls -l then asks two per file",
    )
    mount.add_argument("--uid", type=zero_or_more_arg, help="owner of every node (default: you)")
    mount.add_argument("--gid", type=zero_or_more_arg, help="group of every node (default: yours)")
    mount.add_argument(
        "--umask",
        type=umask_arg,
        default=0,
        help="octal permission bits taken away from every node (default: 000)",
    )
    # Set by the background mount for the process it starts (checks are done already).
    mount.add_argument("--foreground-child", action="store_true", help=argparse.SUPPRESS)
    mount.add_argument(
        "--live-idle",
        type=seconds_arg,
        default=30.0,
        metavar="SECONDS",
        help="close a running task's live connection after SECONDS without readers "
        "(default: %(default)g)",
    )
    mount.add_argument("--debug", action="store_true", help="debug logs and FUSE debugging")
    _add_api_options(mount)
    mount.set_defaults(func=cmd_mount)

    unmount = sub.add_parser(
        "unmount",
        aliases=["umount"],
        help="unmount a taskfs mount",
        description="Unmount a taskfs mount; also recovers a mountpoint whose mount process "
        "died ('Transport endpoint is not connected').",
    )
    unmount.add_argument("mountpoint")
    unmount.set_defaults(func=cmd_unmount)

    add_task_parsers(sub, _add_api_options, ArgumentParser)
    add_logs_parser(sub, _add_api_options, task_id_arg)
    return parser


COMMANDS = ("serve", "submit", "mount", "unmount", "umount", "tasks", "logs")


def main(argv: Sequence[str] | None = None) -> int:
    _guard_closed_streams()
    status = _main(argv)
    try:
        sys.stdout.flush()  # what is still buffered fails here, not silently at exit
    except OSError as exc:
        _drop_stdout()
        print(f"taskfs: error: cannot write to standard output: {exc.strerror}", file=sys.stderr)
        return status or 1
    return status


def helper_form(raw: list[str], commands: Sequence[str]) -> list[str]:
    """mount(8)'s call through mount.fuse3 (``mount -t fuse.taskfs SOURCE DIR -o OPTS``, an
    fstab line): ``taskfs SOURCE DIR -o OPTS``, as ``taskfs mount DIR -o OPTS`` (a SOURCE that
    is a URL is the API's; any other names nothing)."""
    if len(raw) < 2 or raw[0] in commands or raw[0].startswith("-") or not os.path.isdir(raw[1]):
        return raw
    api = ["--api-url", raw[0]] if raw[0].startswith(("http://", "https://")) else []
    return ["mount", raw[1], *api, *raw[2:]]


def _main(argv: Sequence[str] | None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    raw = helper_form(raw, COMMANDS)
    options = raw[: raw.index("--")] if "--" in raw else raw  # not a command's own
    debug = "--debug" in options
    try:
        if raw[:1] in (["tasks"], ["logs"]) or {"-h", "--help"} & set(options):
            # Like cat or ls: output into a closed pipe (| head) ends the process quietly.
            # (Not ``submit``: its one line is the id of a task it created; see ``emit``.)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        args = build_parser().parse_args(raw)
        args.raw_argv = raw[raw.index("mount") + 1 :] if "mount" in raw else []
        if args.command_name in ("tasks", "logs"):
            setup_logging(args.debug)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # sorted below; anything unknown is re-raised
        if debug:
            raise
        if isinstance(unwrap(exc), KeyboardInterrupt):
            print("taskfs: interrupted", file=sys.stderr)
            return 130
        error = as_taskfs_error(exc)
        if error is None:
            raise
        notes = "".join(f" {note}" for note in getattr(error, "__notes__", ()))
        print(f"taskfs: error: {error}{notes}", file=sys.stderr)
        return exit_status(error)


def exit_status(error: TaskfsError) -> int:
    """2 bad usage, 69 the service could not be reached (EX_UNAVAILABLE), 1 anything else."""
    if isinstance(error, UsageError):
        return 2
    if isinstance(error, ServiceError):
        return EXIT_UNAVAILABLE
    return 1


if __name__ == "__main__":
    sys.exit(main())
