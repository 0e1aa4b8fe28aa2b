"""Real mounts: ``taskfs mount --foreground`` in a subprocess over a real local service.

The tests use plain ``os`` calls and real tools (ls, cat, sh, cp, find, grep). They skip with a
clear reason only where ``/dev/fuse`` or ``fusermount3`` is missing; CI has both.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from taskfs.fs.mount import mount_entry
from tests.fakeapi import KEY, FakeApi
from tests.rangeserver import serve_answerer
from tests.support import Service, start_service, stop, taskfs_cmd

T = TypeVar("T")
__all__ = ["Service", "start_service", "stop", "taskfs_cmd"]

FUSE_MISSING = (
    "no /dev/fuse"
    if not os.path.exists("/dev/fuse")
    else "no fusermount3"
    if shutil.which("fusermount3") is None
    else None
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fuse/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.fuse)
            if FUSE_MISSING:
                item.add_marker(pytest.mark.skip(reason=f"FUSE tests need FUSE: {FUSE_MISSING}"))


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]
    owner: Service | None  # the local service mounted, if it is one
    log: Path

    @property
    def service(self) -> Service:
        assert self.owner is not None, "this mount is of another service"
        return self.owner

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A shell command, run the way a user would."""
        return subprocess.run(
            ["sh", "-c", command],
            capture_output=True,
            text=True,
            errors="surrogateescape",  # names may be any bytes
            timeout=timeout,
            check=False,
        )


def start_mount(
    service: Service | None,
    path: Path,
    cache_dir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Mount:
    path.mkdir(parents=True, exist_ok=True)
    log = cache_dir.parent / f"{path.name}.log"
    args = ["mount", str(path), "--foreground", "--cache-dir", str(cache_dir), *extra]
    if service is not None:
        args += ["--data-dir", str(service.data_dir)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(taskfs_cmd(*args), stdout=out, stderr=out, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = mount_entry(path)
        if found is not None and found[0] == "fuse.taskfs":
            return Mount(path, proc, service, log)
        if proc.poll() is not None:
            raise RuntimeError(f"mount failed: {log.read_text()}")
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"mount did not come up: {log.read_text()}")


def stop_mount(mount: Mount) -> None:
    stop(mount.proc)
    if mount_entry(mount.path) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(tmp_path_factory.mktemp("data"))
    yield running
    stop(running.proc)


@pytest.fixture(scope="module")
def mounted(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("mnt")
    mount = start_mount(service, base / "tasks", base / "cache")
    yield mount
    stop_mount(mount)
    assert mount.proc.returncode == 0, mount.log.read_text()
    log = mount.log.read_text()
    assert " WARNING " not in log and " ERROR " not in log, log


def wait_until(check: Callable[[], T], timeout: float = 20, step: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


DEADLINE = 2.0  # --deadline of the mounts of another service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mount_other(
    tmp_path: Path,
    url: str,
    *extra: str,
    name: str = "mnt",
    key: str = KEY,
    env: dict[str, str] | None = None,
) -> Mount:
    """Mount the service at ``url`` (``key`` in a 0600 file) at ``tmp_path/name``."""
    key_file = tmp_path / f"{name}.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return start_mount(
        None,
        tmp_path / name,
        tmp_path / f"{name}-cache",
        "--api-url",
        url,
        "--api-key-file",
        str(key_file),
        *extra,
        env=env,
    )


@contextmanager
def cloud_mount(tmp_path: Path, fake: FakeApi, *extra: str, key: str = KEY) -> Iterator[Mount]:
    """``fake`` served over real HTTP and mounted (``--deadline DEADLINE``) until the end."""
    with serve_answerer(fake) as url:
        fake.base_url = url
        mount = mount_other(tmp_path, url, "--deadline", str(DEADLINE), *extra, key=key)
        try:
            yield mount
        finally:
            stop_mount(mount)
