"""The mount's lifecycle with readers blocked on ``wait``, and times in any time zone.

Requests in flight hold FUSE handlers: readers blocked on ``wait``, reads waiting on a stalled
storage. A signal (or ``taskfs unmount``) answers them with ENOTCONN and unmounts within a
second or two, instead of hanging every access to the mountpoint until their tasks end or a
deadline passes. A member's time shows the same whatever the mount's time zone.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import signal
import socket
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskfs.api.models import TaskStatusCode as S
from taskfs.fs.mount import mount_entry
from tests.fakeapi import KEY, FakeApi
from tests.fuse.conftest import mount_other, stop_mount
from tests.rangeserver import Answer, serve_answerer
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
                _, err = reader.communicate(timeout=5)
                assert reader.returncode != 0
                assert b"Transport endpoint is not connected" in err, err
            assert time.monotonic() - started < 5
            assert os.listdir(mount.path) == []  # the mountpoint answers again, empty
        finally:
            stop_mount(mount)


def test_unmount_answers_reads_waiting_on_a_stalled_storage(tmp_path: Path) -> None:
    fake = FakeApi()
    big = os.urandom(8 << 20)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("artifacts/big.bin", big)
    fake.add("done", S.SUCCESS, archive=(tmp_path / "a.zip").read_bytes())
    with serve_answerer(fake) as url:
        fake.base_url = url
        mount = mount_other(tmp_path, url, "--deadline", "60")
        try:
            outputs = mount.path / "done" / "outputs"
            assert os.listdir(outputs) == ["big.bin"]  # the archive is open
            fake.objects.fault = lambda seen, answer: Answer(200, {}, b"", delay=3600)
            readers = [
                subprocess.Popen(
                    ["cat", str(outputs / "big.bin")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for _ in range(2)
            ]
            time.sleep(1.5)
            assert all(r.poll() is None for r in readers)  # waiting on storage
            started = time.monotonic()
            mount.proc.send_signal(signal.SIGTERM)
            assert mount.proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 3, "unmounting waited for the deadline"
            assert mount_entry(mount.path) is None
            for reader in readers:
                _, err = reader.communicate(timeout=5)
                assert reader.returncode != 0
                assert b"Transport endpoint is not connected" in err, err
        finally:
            fake.objects.fault = None
            stop_mount(mount)


def _background_mount(
    tmp_path: Path, url: str, cache_dir: Path, **run: Any
) -> subprocess.CompletedProcess[str]:
    """``taskfs mount`` as a user runs it: in the background, its runtime dir under tmp."""
    (tmp_path / "mnt").mkdir(exist_ok=True)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    env = {**clean_env(), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    return subprocess.run(
        taskfs_cmd(
            "mount",
            str(tmp_path / "mnt"),
            "--cache-dir",
            str(cache_dir),
            "--api-url",
            url,
            "--api-key-file",
            str(key_file),
        ),
        text=True,
        timeout=60,
        env=env,
        check=False,
        **run,
    )


def test_a_background_mount_without_a_usable_cache_dir_runs_uncached(tmp_path: Path) -> None:
    """As in the foreground: no disk cache, the log in the runtime dir, reads work."""
    fake = FakeApi()
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("artifacts/x.txt", b"hello\n")
    fake.add("done", S.SUCCESS, archive=(tmp_path / "a.zip").read_bytes())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with serve_answerer(fake) as url:
        fake.base_url = url
        result = _background_mount(tmp_path, url, blocker / "cache", capture_output=True)
        try:
            assert result.returncode == 0, result.stderr
            assert str(tmp_path / "run" / "taskfs") in result.stdout  # where it logs
            assert (tmp_path / "mnt" / "done" / "outputs" / "x.txt").read_text() == "hello\n"
        finally:
            subprocess.run(taskfs_cmd("unmount", str(tmp_path / "mnt")), check=False)
    assert mount_entry(tmp_path / "mnt") is None


def test_a_mount_whose_message_cannot_be_written_is_taken_back(tmp_path: Path) -> None:
    """``taskfs mount ... > /dev/full``: one line on stderr, and no mount left behind."""
    fake = FakeApi()
    with serve_answerer(fake) as url, open("/dev/full", "w") as full:
        fake.base_url = url
        result = _background_mount(
            tmp_path, url, tmp_path / "cache", stdout=full, stderr=subprocess.PIPE
        )
        try:
            assert result.returncode == 1
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert "No space left on device; unmounted it again" in result.stderr
            assert mount_entry(tmp_path / "mnt") is None
        finally:
            if mount_entry(tmp_path / "mnt") is not None:
                subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)


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


def _mount_cmd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "mnt"
    path.mkdir(exist_ok=True)
    return subprocess.run(
        taskfs_cmd("mount", str(path), "--cache-dir", str(tmp_path / "cache"), *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )


def test_mount_checks_the_key_and_says_what_it_started(tmp_path: Path) -> None:
    """A key the API refuses fails ``taskfs mount`` at once, saying so; an API that does not
    answer still mounts, with a warning; a local service it starts is named."""
    fake = FakeApi()
    fake.add("known", S.SUCCESS)
    key_file = tmp_path / "key"
    key_file.write_text("not-the-key\n")
    with serve_answerer(fake) as url:
        refused = _mount_cmd(tmp_path, "--api-url", url, "--api-key-file", str(key_file))
    assert refused.returncode == 2, refused
    assert refused.stderr.startswith(f"taskfs: error: {url} refused the API key"), refused.stderr
    assert "not-the-key" not in refused.stderr + refused.stdout
    assert mount_entry(tmp_path / "mnt") is None

    with socket_without_server() as dead_url:
        key_file.write_text(KEY + "\n")
        started = _mount_cmd(
            tmp_path, "--api-url", dead_url, "--api-key-file", str(key_file), "--deadline", "1"
        )
    assert started.returncode == 0, started.stderr
    assert "taskfs: warning:" in started.stderr and "mounting anyway" in started.stderr
    assert mount_entry(tmp_path / "mnt") is not None
    subprocess.run(taskfs_cmd("unmount", str(tmp_path / "mnt")), check=True, timeout=60)

    data = tmp_path / "data"
    local = _mount_cmd(tmp_path, "--data-dir", str(data))
    try:
        assert local.returncode == 0, local.stderr
        assert "taskfs: started the local service at http://127.0.0.1:" in local.stderr
        assert f"taskfs serve --stop --data-dir {data}" in local.stderr
    finally:
        subprocess.run(taskfs_cmd("unmount", str(tmp_path / "mnt")), timeout=60, check=False)
        subprocess.run(
            taskfs_cmd("serve", "--stop", "--data-dir", str(data)), timeout=60, check=False
        )


@contextlib.contextmanager
def socket_without_server() -> Iterator[str]:
    """A loopback URL whose port is bound but never listened on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
