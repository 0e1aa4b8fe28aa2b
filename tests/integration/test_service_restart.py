"""The service keeps every task across its own restart (TASK_API.md section 5, DESIGN.md 5).

Running tasks end as ``executer-terminated`` with their partial outputs archived; queued tasks
run after the restart; nothing in the store is lost. Both a clean stop and a SIGKILL of the
service process are covered.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.api.submit import submit_task
from taskfs.config import ClientSettings
from taskfs.server.storage import Storage
from tests.integration.conftest import start_service
from tests.support import alive, wait_status

LONG = "echo partial; echo $$ > sh.pid; sleep 60"
# A process that leaves the command's process group, and prints its pid.
ESCAPEE = "setsid sleep 300 & echo $! > escapee.pid; sleep 60"


async def _outputs(api: ApiClient, task_id: str) -> zipfile.ZipFile:
    task = await api.get_task(task_id)
    assert task.storage_output_path is not None
    url = await api.download_url(task.storage_output_path)
    async with httpx.AsyncClient() as plain:
        return zipfile.ZipFile(io.BytesIO((await plain.get(url)).content))


async def test_restart_in_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with trio.open_nursery() as nursery:
        svc = await start_service(nursery, data, slots=1)
        async with ApiClient.open(svc.client_settings) as api:
            running = await submit_task(api, [LONG])
            await wait_status(api, running, lambda s: s.status == S.COMPUTATION_STARTED)
            queued = await submit_task(api, ["echo later"])
            done = await submit_task(api, ["true"])  # queued behind; survives as submitted
            await trio.sleep(0.3)
        nursery.cancel_scope.cancel()  # stop the whole service

    async with trio.open_nursery() as nursery:
        svc = await start_service(nursery, data, slots=1)
        async with ApiClient.open(svc.client_settings) as api:
            first = await wait_status(api, running)
            assert first.status == S.EXECUTER_TERMINATED
            archive = await _outputs(api, running)
            assert archive.read("artifacts/stdout.txt") == b"partial\n"
            assert (await wait_status(api, queued)).status == S.SUCCESS
            assert (await wait_status(api, done)).status == S.SUCCESS
            assert (await _outputs(api, queued)).read("artifacts/stdout.txt") == b"later\n"
            task = await api.get_task(running)
            ops = [o for h in task.status_history for o in h.operations]
            assert all(o.status in ("OK", "FAILED") for o in ops)
        nursery.cancel_scope.cancel()


def _serve(data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "taskfs",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data),
            "--slots",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _wait_url(data: Path, proc: subprocess.Popen[bytes]) -> str:
    with trio.fail_after(20):
        while True:
            try:
                info = json.loads((data / "server.json").read_text())
                if info["pid"] == proc.pid:
                    return str(info["url"])
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, "service exited"
            await trio.sleep(0.05)


async def _pid_from(file: Path) -> int:
    with trio.fail_after(10):
        while not file.exists() or not file.read_text().strip():
            await trio.sleep(0.05)
    return int(file.read_text())


async def test_restart_after_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = _serve(data)
    try:
        url = await _wait_url(data, proc)
        key = (data / "api_key").read_text().strip()
        settings = ClientSettings(api_url=url, api_key=key)
        async with ApiClient.open(settings) as api:
            running = await submit_task(api, [f"{ESCAPEE} & {LONG}"])
            await wait_status(api, running, lambda s: s.status == S.COMPUTATION_STARTED)
            queued = await submit_task(api, ["echo after restart"])
            pids = [await _pid_from(data / "work" / running / n) for n in ("sh.pid", "escapee.pid")]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The task's processes, the one that left its group included, end with the service.
        with trio.fail_after(10):
            while [pid for pid in pids if alive(pid)]:
                await trio.sleep(0.05)

        # Nothing in the store is lost or corrupted.
        with sqlite3.connect(data / "tasks.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 2

        proc = _serve(data)
        url = await _wait_url(data, proc)
        async with ApiClient.open(ClientSettings(api_url=url, api_key=key)) as api:
            final = await wait_status(api, running)
            assert final.status == S.EXECUTER_TERMINATED
            assert (await _outputs(api, running)).read("artifacts/stdout.txt") == b"partial\n"
            assert (await wait_status(api, queued)).status == S.SUCCESS
            out = (await _outputs(api, queued)).read("artifacts/stdout.txt")
            assert out == b"after restart\n"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    assert proc.returncode == 0
    assert not (data / "server.json").exists()


async def test_sigterm_stops_cleanly_and_second_instance_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = _serve(data)
    try:
        await _wait_url(data, proc)
        second = subprocess.run(
            [sys.executable, "-m", "taskfs", "serve", "--port", "0", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert second.returncode == 2
        assert "already running" in second.stderr and "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    assert os.stat(data / "api_key").st_mode & 0o777 == 0o600


def _taskfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskfs", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("INDUCTIVA_")},
    )


async def test_serve_stop_ends_every_process_of_running_tasks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = _serve(data)
    try:
        url = await _wait_url(data, proc)
        key = (data / "api_key").read_text().strip()
        async with ApiClient.open(ClientSettings(api_url=url, api_key=key)) as api:
            running = await submit_task(api, [ESCAPEE])
            escapee = await _pid_from(data / "work" / running / "escapee.pid")
        stopped = _taskfs("serve", "--stop", "--data-dir", str(data))
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(timeout=20) == 0
        assert not alive(escapee)
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_a_stale_server_file_is_never_trusted(tmp_path: Path) -> None:
    """server.json of a service that died names a pid that another process may have now:
    ``serve --stop`` must not signal it, and clients must not use the dead URL."""
    data = tmp_path / "data"
    proc = _serve(data)
    url = await _wait_url(data, proc)
    server_json = (data / "server.json").read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        info = json.loads(server_json)
        (data / "server.json").write_text(json.dumps({**info, "pid": stranger.pid}))
        stopped = _taskfs("serve", "--stop", "--data-dir", str(data))
        assert stopped.returncode == 0 and "no taskfs service is running" in stopped.stderr
        assert stranger.poll() is None, "serve --stop signalled a process that is not ours"
        submitted = _taskfs("submit", "--data-dir", str(data), "--", "true")
        assert submitted.returncode == 69 and "no local service" in submitted.stderr
        assert url not in submitted.stderr
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("content", ["", "\n", "short", "\x00\x00\x00", "é" * 40])
async def test_unusable_url_secret_is_replaced(tmp_path: Path, content: str) -> None:
    """A secret left empty or half-written (a crash between creating and writing it) would make
    every signed URL forgeable: it is replaced, and the replacement logged."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "url_secret").write_bytes(content.encode()[:32])
    # An empty key locks every client out, a truncated one is guessable: replaced too.
    (data / "api_key").write_text(content.strip() if content.strip().isalnum() else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskfs", "serve", "--port", "0", "--data-dir", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = await _wait_url(data, proc)
        secret = (data / "url_secret").read_text().strip()
        key = (data / "api_key").read_text().strip()
        assert len(secret) >= 32 and secret != content.strip()
        assert len(key) >= 32
        for name in ("url_secret", "api_key"):
            assert os.stat(data / name).st_mode & 0o777 == 0o600
        weak = Storage(tmp_path / "unused", content.encode()[:32].strip())
        expires, forged = weak.sign("download", "x/output.zip", 60)
        async with httpx.AsyncClient(base_url=url) as plain:
            answer = await plain.get(
                "/storage/objects/x/output.zip",
                params={"op": "download", "expires": expires, "sig": forged},
            )
            assert answer.status_code == 403 and answer.json()["detail"] == "bad signature"
            odd = await plain.get(
                "/storage/objects/x/output.zip",
                params={"op": "download", "expires": expires, "sig": "ünïcode"},
            )
            assert odd.status_code == 403
            listed = await plain.get("/tasks", headers={"X-API-Key": key})
            assert listed.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert b"url_secret held no usable secret; replaced it" in err
    assert b"api_key held no usable secret; replaced it" in err
    assert secret.encode() not in err and key.encode() not in err


async def test_a_start_sweeps_what_a_crash_left_half_written(tmp_path: Path) -> None:
    data = tmp_path / "data"
    stale = [
        data / "storage" / "t1" / ".output-abc.zip",
        data / "storage" / "p" / "t2" / ".upload-0123",
    ]
    for file in stale:
        file.parent.mkdir(parents=True)
        file.write_bytes(b"half")
    (data / "storage" / "t1" / "output.zip").write_bytes(b"kept")
    proc = _serve(data)
    try:
        await _wait_url(data, proc)
        with trio.fail_after(10):
            while any(f.exists() for f in stale):
                await trio.sleep(0.05)
        assert (data / "storage" / "t1" / "output.zip").read_bytes() == b"kept"
        info = json.loads((data / "server.json").read_text())
        assert info["kill_grace_seconds"] == 5.0  # serve --stop waits this long more
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_print_key_never_prints_a_key_the_service_would_replace(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    for bad in ("short", "has spaces in it but is long enough to pass a length", ""):
        (data / "api_key").write_text(bad + "\n")
        printed = _taskfs("serve", "--print-key", "--data-dir", str(data))
        key = printed.stdout.strip()
        assert printed.returncode == 0 and key != bad and len(key) >= 32
        assert (data / "api_key").read_text().strip() == key
