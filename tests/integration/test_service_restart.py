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
import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.api.submit import submit_task
from taskfs.config import ClientSettings
from tests.integration.conftest import start_service
from tests.support import wait_status

LONG = "echo partial; echo $$ > sh.pid; sleep 60"


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


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_restart_after_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = _serve(data)
    try:
        url = await _wait_url(data, proc)
        key = (data / "api_key").read_text().strip()
        settings = ClientSettings(api_url=url, api_key=key)
        async with ApiClient.open(settings) as api:
            running = await submit_task(api, [LONG])
            await wait_status(api, running, lambda s: s.status == S.COMPUTATION_STARTED)
            queued = await submit_task(api, ["echo after restart"])
            pid_file = data / "work" / running / "sh.pid"
            with trio.fail_after(10):
                while not pid_file.exists() or not pid_file.read_text().strip():
                    await trio.sleep(0.05)
            orphan = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _alive(orphan), "the task's process group should outlive a crashed service"

        # Nothing in the store is lost or corrupted.
        with sqlite3.connect(data / "tasks.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 2

        proc = _serve(data)
        url = await _wait_url(data, proc)
        async with ApiClient.open(ClientSettings(api_url=url, api_key=key)) as api:
            final = await wait_status(api, running)
            assert final.status == S.EXECUTER_TERMINATED
            assert not _alive(orphan), "restart recovery must kill the leftover process group"
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
