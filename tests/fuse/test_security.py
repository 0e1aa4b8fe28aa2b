"""Security promises (DESIGN.md section 5) through real processes and mounts.

* the API key appears in no log (debug level included), no process argument, no error message;
* the mount is private to the mounting user; with ``-o allow_other`` others may read, but the
  ``control`` file (0600) still refuses their writes.

Signed-URL tampering and expiry, and storage paths outside the root, are covered against the
service directly (tests/integration/test_service_protocol.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskfs.api.models import TaskStatusCode as S
from tests.fuse.conftest import start_mount, stop_mount
from tests.support import start_service, stop, taskfs_cmd

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="taskfs-security-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_key_is_never_shown(tmp_path: Path) -> None:
    service = start_service(tmp_path / "data", debug=True)
    mount = start_mount(service, tmp_path / "mnt", tmp_path / "cache", "--debug")
    try:
        done = service.submit("echo hello")
        service.wait_for(done, lambda s: s.is_terminated)
        running = service.submit("sleep 30")
        service.wait_for(running, lambda s: s.status == S.COMPUTATION_STARTED)
        for command in (
            f"ls -lR {mount.path}/{done}",
            f"cat {mount.path}/{done}/info.json {mount.path}/{done}/outputs/stdout.txt",
            f"echo kill > {mount.path}/{running}/control",
            f"echo kill > {mount.path}/{done}/control",
            f"cat {mount.path}/nosuchtask/status",
        ):
            mount.run(command)
        processes = subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, check=True
        ).stdout
        assert service.key not in processes
        wrong = tmp_path / "wrong-key"
        wrong.write_text("definitely-not-the-key\n")
        denied = subprocess.run(
            taskfs_cmd("tasks", "list", "--api-url", service.url, "--api-key-file", str(wrong)),
            capture_output=True,
            text=True,
            check=False,
        )
        assert denied.returncode == 1 and "definitely-not-the-key" not in denied.stderr
    finally:
        stop_mount(mount)
        stop(service.proc)
    debug_log = mount.log.read_text()
    assert "DEBUG" in debug_log and "HTTP Request" in debug_log  # it really logged at debug
    assert service.key not in debug_log
    service_log = (service.data_dir / "test-service.log").read_text()
    assert "GET /tasks" in service_log  # the access log was on
    assert service.key not in service_log
    for name in ("api_key", "url_secret"):
        assert (service.data_dir / name).stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_other_users(tmp_path: Path, shared_dir: Path) -> None:
    service = start_service(tmp_path / "data")
    running = service.submit("sleep 60")
    service.wait_for(running, lambda s: s.status == S.COMPUTATION_STARTED)
    private = start_mount(service, shared_dir / "private", tmp_path / "cache1")
    shared = start_mount(service, shared_dir / "shared", tmp_path / "cache2", "-o", "allow_other")
    try:

        def as_nobody(command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*NOBODY, "sh", "-c", command],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )

        assert private.run(f"cat {private.path}/{running}/status").returncode == 0  # the owner
        refused = as_nobody(f"ls {private.path}")
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        readable = as_nobody(f"cat {shared.path}/{running}/status")
        assert readable.returncode == 0, readable.stderr
        assert readable.stdout == "computation-started\n"
        kill = as_nobody(f"echo kill > {shared.path}/{running}/control")
        assert kill.returncode != 0 and "Permission denied" in kill.stderr
        assert service.status(running).status == S.COMPUTATION_STARTED
        assert shared.run(f"echo kill > {shared.path}/{running}/control").returncode == 0
    finally:
        stop_mount(private)
        stop_mount(shared)
        stop(service.proc)
