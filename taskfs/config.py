"""Frozen settings with documented defaults, and where they come from.

Owns: default locations (data dir of the embedded service, cache dir), how the API URL and key
are discovered (flags, ``INDUCTIVA_API_URL``/``INDUCTIVA_API_KEY``, ``~/.inductiva/api_key``,
the local service's own files), and parsing of human values such as ``10G`` and ``10m``.

Must stay true: settings objects are immutable; nothing here performs network I/O; the API key
is read from files or the environment only (never from process arguments) and never appears in
``repr`` of a settings object.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from taskfs.errors import AuthError, ServiceError, UsageError

DEFAULT_CLOUD_URL = "https://api.inductiva.ai"
ENV_API_URL = "INDUCTIVA_API_URL"
ENV_API_KEY = "INDUCTIVA_API_KEY"
ENV_DATA_DIR = "TASKFS_DATA_DIR"
KEY_FILE_NAME = "api_key"
SECRET_FILE_NAME = "url_secret"  # noqa: S105 - a file name, not a secret
SERVER_FILE_NAME = "server.json"
SERVICE_LOCK_NAME = "service.lock"
KEY_CHARSET = re.compile(r"[A-Za-z0-9._-]+")


def default_data_dir() -> Path:
    """``$TASKFS_DATA_DIR``, else ``$XDG_DATA_HOME/taskfs``, else ``~/.local/share/taskfs``."""
    if env := os.environ.get(ENV_DATA_DIR):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "taskfs"


def runtime_dir() -> Path:
    """Where running taskfs processes leave small files about themselves (mount pids):
    ``$XDG_RUNTIME_DIR/taskfs``, else ``/tmp/taskfs-<uid>``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "taskfs" if base else Path(f"/tmp/taskfs-{os.getuid()}")  # noqa: S108


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/taskfs``, else ``~/.cache/taskfs``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "taskfs"


@dataclass(frozen=True)
class ServiceSettings:
    """The embedded local service (``taskfs serve``)."""

    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8000
    # Task slots run at once; default: one per CPU.
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    # ``executer.vm_type`` reported for local runs; default ``local-<N>vcpu``.
    vm_type: str = field(default_factory=lambda: f"local-{os.cpu_count() or 1}vcpu")
    # SIGTERM to a killed task's process group, SIGKILL this long after.
    kill_grace_seconds: float = 5.0
    # Lifetime of signed download/upload URLs.
    signed_url_ttl_seconds: int = 3600
    storage_region: str = "local"
    # Make the service process a child subreaper and kill what it adopts: the processes of a
    # command whose supervisor was killed. A process-wide choice: ``taskfs serve`` makes it,
    # a service embedded in another program (tests) does not.
    adopt_orphans: bool = False

    @property
    def key_file(self) -> Path:
        return self.data_dir / KEY_FILE_NAME

    @property
    def secret_file(self) -> Path:
        return self.data_dir / SECRET_FILE_NAME

    @property
    def server_file(self) -> Path:
        return self.data_dir / SERVER_FILE_NAME

    @property
    def db_path(self) -> Path:
        return self.data_dir / "tasks.sqlite3"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the task API. ``api_key`` is hidden from ``repr``."""

    api_url: str
    api_key: str = field(repr=False)
    # Per-request timeouts (seconds) and the overall deadline of one operation with retries.
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 10.0
    # The embedded local service's data dir: its URL is looked up again there when it stops
    # answering (a restarted service may listen on another port).
    local_data_dir: Path | None = None


def read_key_file(path: Path) -> str:
    """Read an API key file; the key is the first line, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuthError(f"API key file {path} does not exist") from None
    except OSError as exc:
        raise AuthError(f"cannot read API key file {path}: {exc.strerror}") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not KEY_CHARSET.fullmatch(key):
        raise AuthError(f"API key file {path} does not hold a valid key")
    return key


def local_service_pid(data_dir: Path) -> int | None:
    """The pid of the service running for ``data_dir``, or ``None`` when none runs.

    A running service holds an exclusive ``flock`` on ``service.lock`` and has written its pid
    there; the lock dies with the process, so a service is running exactly when the lock is
    held. Nothing here trusts a pid from a file whose writer may be gone (a pid may be reused).
    """
    try:
        fd = os.open(data_dir / SERVICE_LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a service runs; its pid is in the file
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def local_service_url(data_dir: Path) -> str | None:
    """The URL of the service running for ``data_dir`` (from ``server.json``), or ``None``.

    ``None`` too when ``server.json`` was left by a service that is gone: its pid must be the
    one that holds the data dir's lock now.
    """
    try:
        info = json.loads((data_dir / SERVER_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("url"), str):
        return None
    pid = local_service_pid(data_dir)
    return info["url"] if pid is not None and pid == info.get("pid") else None


def make_dirs(path: Path, mode: int = 0o777) -> None:
    """``path`` and its parents, made where missing (``mkdir -p``); something else there
    than a directory is "Not a directory", naming it (``mkdir`` says "File exists")."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError:  # exist_ok covers directories only
        why = os.strerror(errno.ENOTDIR)
        if path.is_symlink():
            why += " (a symbolic link to nothing)"
        raise NotADirectoryError(errno.ENOTDIR, why, str(path)) from None


def api_url_arg(text: str) -> str:
    """An API base URL as given (``--api-url``, ``$INDUCTIVA_API_URL``, ``-o api_url=``),
    checked: http(s), a host, a port that can be one; ``UsageError`` saying what is wrong."""
    url = text.strip().rstrip("/")
    if not re.match(r"https?://", url):
        raise UsageError(f"API URL must start with http:// or https://: {text!r}")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that cannot be one
    except ValueError as exc:
        raise UsageError(f"not a valid API URL: {text!r} ({exc})") from None
    if not parts.hostname:
        raise UsageError(f"not a valid API URL: {text!r} (no host)")
    if port == 0:
        raise UsageError(f"not a valid API URL: {text!r} (port 0)")
    return url


def resolve_client(
    api_url: str | None = None,
    api_key_file: Path | None = None,
    data_dir: Path | None = None,
) -> ClientSettings:
    """Find the API to talk to and its key.

    URL: ``api_url``, else ``$INDUCTIVA_API_URL``, else the embedded local service (its
    ``server.json``). Key for a remote URL: ``api_key_file``, else ``$INDUCTIVA_API_KEY``, else
    ``~/.inductiva/api_key``; for the local service: ``api_key_file``, else its own key file.
    """
    data_dir = data_dir or default_data_dir()
    url = api_url or os.environ.get(ENV_API_URL)
    if url:
        url = api_url_arg(url)
        if api_key_file is not None:
            key = read_key_file(api_key_file)
        elif env_key := os.environ.get(ENV_API_KEY):
            key = env_key.strip()
            if not KEY_CHARSET.fullmatch(key):
                raise AuthError(f"${ENV_API_KEY} does not hold a valid key")
        else:
            key = read_key_file(Path.home() / ".inductiva" / KEY_FILE_NAME)
        return ClientSettings(api_url=url, api_key=key)
    local_url = local_service_url(data_dir)
    if local_url is None:
        # The service the user asked for (the local one) is not there: unavailable, not a
        # usage error (scripts tell it by the exit status 69; ``tasks wait`` rides it out).
        raise ServiceError(
            f"no API URL given and no local service running for {data_dir} "
            "(start one with 'taskfs serve', or set --api-url / $INDUCTIVA_API_URL)"
        )
    key = read_key_file(api_key_file or data_dir / KEY_FILE_NAME)
    return ClientSettings(api_url=local_url, api_key=key, local_data_dir=data_dir)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``10G`` -> bytes (binary units K, M, G, T; optional ``B``/``iB`` suffix)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"not a size: {text!r} (examples: 500M, 10G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h30m``, ``2d`` -> seconds."""
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        return float(cleaned)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise UsageError(f"not a duration: {text!r} (examples: 90s, 10m, 1h30m)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
