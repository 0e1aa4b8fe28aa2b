"""The mount's lifecycle with readers blocked on ``wait``, and times in any time zone.

Blocked readers hold FUSE handlers: a signal (or ``taskfs unmount``) answers them with EINTR
and unmounts within a second or two, instead of hanging every access to the mountpoint until
their tasks end. A member's time shows the same whatever the mount's time zone.
"""

from __future__ import annotations

import calendar
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from taskfs.api.models import TaskStatusCode as S
from taskfs.fs.mount import mount_entry
from tests.fakeapi import FakeApi
from tests.fuse.conftest import mount_other, stop_mount
from tests.rangeserver import serve_answerer
from tests.support import clean_env, taskfs_cmd


def _blocked_readers(path: Path, count: int = 3) -> list[subprocess.Popen[bytes]]:
    readers = [
        subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(count)
    ]
    time.sleep(1.5)
    assert all(r.poll() is None for r in readers)  # blocked: the task runs on
    return readers


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "taskfs unmount"])
def test_unmount_answers_blocked_wait_readers(tmp_path: Path, how: str) -> None:
    fake = FakeApi()
    fake.add("running", S.COMPUTATION_STARTED)
    with serve_answerer(fake) as url:
        fake.base_url = url
        mount = mount_other(tmp_path, url)
        try:
            readers = _blocked_readers(mount.path / "running" / "wait")
            started = time.monotonic()
            if how == "taskfs unmount":
                result = subprocess.run(
                    taskfs_cmd("unmount", str(mount.path)),
                    capture_output=True,
                    text=True,
                    timeout=30,
                    env=clean_env(),
                    check=False,
                )
                assert result.returncode == 0, result.stderr
            else:
                mount.proc.send_signal(getattr(signal, how))
                assert mount.proc.wait(timeout=10) == 0
            while mount_entry(mount.path) is not None:
                assert time.monotonic() - started < 5, "still mounted"
                time.sleep(0.05)
            for reader in readers:
                # EINTR; cat retries an interrupted read and then finds the mount gone.
                _, err = reader.communicate(timeout=5)
                assert reader.returncode != 0
                assert b"Interrupted system call" in err or b"not connected" in err, err
            assert time.monotonic() - started < 5
            assert os.listdir(mount.path) == []  # the mountpoint answers again, empty
        finally:
            stop_mount(mount)


def test_member_times_do_not_depend_on_the_mounts_time_zone(tmp_path: Path) -> None:
    fake = FakeApi()
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:  # a DOS time, no extended timestamp
        zf.writestr(zipfile.ZipInfo("artifacts/"), b"")
        zf.writestr(zipfile.ZipInfo("artifacts/x.txt", date_time=(2026, 11, 30, 10, 7, 0)), b"x")
    data = (tmp_path / "a.zip").read_bytes()
    fake.add("done", S.SUCCESS, archive=data)
    seen = []
    with serve_answerer(fake) as url:
        fake.base_url = url
        for zone in ("UTC", "America/Los_Angeles"):
            env = {**clean_env(), "TZ": zone}
            mount = mount_other(tmp_path, url, name=f"m-{zone.replace('/', '-')}", env=env)
            try:
                seen.append((mount.path / "done" / "outputs" / "x.txt").stat().st_mtime)
            finally:
                stop_mount(mount)
    assert seen[0] == seen[1] == calendar.timegm((2026, 11, 30, 10, 7, 0))  # as UTC
