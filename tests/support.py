"""Helpers shared by the test layers: a gate on the runner, statuses, zips, service processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatus, TaskStatusCode
from taskfs.api.submit import submit_task
from taskfs.config import ClientSettings

if TYPE_CHECKING:
    from taskfs.archive.remote import RemoteArchive
    from taskfs.archive.zipindex import Entry


class Gate:
    """A runner hook that can hold tasks when they reach chosen statuses.

    ``hold(status)`` makes every task that reaches ``status`` wait until ``release(status)``;
    ``reached(task_id, status)`` waits until a task got there.
    """

    def __init__(self) -> None:
        self._held: dict[TaskStatusCode, trio.Event] = {}
        self._reached: defaultdict[tuple[str, TaskStatusCode], trio.Event] = defaultdict(trio.Event)

    def hold(self, status: TaskStatusCode) -> None:
        self._held[status] = trio.Event()

    def release(self, status: TaskStatusCode) -> None:
        self._held.pop(status).set()

    async def reached(self, task_id: str, status: TaskStatusCode, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            await self._reached[(task_id, status)].wait()

    async def __call__(self, task_id: str, status: TaskStatusCode) -> None:
        self._reached[(task_id, status)].set()
        held = self._held.get(status)
        if held is not None:
            await held.wait()


async def wait_status(
    api: ApiClient,
    task_id: str,
    until: Callable[[TaskStatus], bool] = lambda s: s.is_terminated,
    timeout: float = 20,
) -> TaskStatus:
    """Poll the status until ``until`` holds (default: the task ended)."""
    with trio.fail_after(timeout):
        while True:
            status = await api.get_status(task_id)
            if until(status):
                return status
            await trio.sleep(0.05)


async def read_all(archive: RemoteArchive, entry: Entry, chunk: int = 128 << 10) -> bytes:
    """A member read from start to end through one reader, ``chunk`` bytes at a time."""
    reader = archive.open_member(entry)
    out = bytearray()
    while data := await reader.read(len(out), chunk):
        out += data
    return bytes(out)


def artifacts_zip(
    files: Mapping[str, bytes],
    method: int = zipfile.ZIP_DEFLATED,
    outside: Mapping[str, bytes] | None = None,
) -> bytes:
    """An outputs archive as the service writes one: ``artifacts/`` and ``artifacts/<name>``
    for each of ``files``, then ``outside`` names at the top (not part of the outputs)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr(zipfile.ZipInfo("artifacts/"), b"")
        for name, data in files.items():
            zf.writestr(f"artifacts/{name}", data)
        for name, data in (outside or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


# -- the local service as a process (sync tests: CLI, Task class, FUSE) --------------------


def clean_env() -> dict[str, str]:
    """This process's environment without ``INDUCTIVA_*`` (a developer's real API settings)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("INDUCTIVA_")}


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie is dead for our purposes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def taskfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskfs", *args]


@dataclass
class Service:
    url: str
    key: str
    data_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def settings(self) -> ClientSettings:
        return ClientSettings(api_url=self.url, api_key=self.key)

    def call(self, fn: Callable[[ApiClient], Any]) -> Any:
        """Run ``await fn(api)`` against the service (from sync test code)."""

        async def main() -> Any:
            async with ApiClient.open(self.settings) as api:
                return await fn(api)

        return trio.run(main)

    def submit(self, *commands: str, **kwargs: Any) -> str:
        return str(self.call(lambda api: submit_task(api, list(commands), **kwargs)))

    def status(self, task_id: str) -> TaskStatus:
        result: TaskStatus = self.call(lambda api: api.get_status(task_id))
        return result

    def wait_for(
        self, task_id: str, until: Callable[[TaskStatus], bool], timeout: float = 30
    ) -> TaskStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(task_id)
            if until(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} stayed {status.status}")
            time.sleep(0.1)


def start_service(data_dir: Path, slots: int = 2, debug: bool = False) -> Service:
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--slots",
        str(slots),
        "--kill-grace",
        "1",
        *(["--debug"] if debug else []),
    ]
    with open(data_dir / "test-service.log", "ab") as log:
        proc = subprocess.Popen(
            taskfs_cmd(*args),
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            info = json.loads((data_dir / "server.json").read_text())
            if info["pid"] == proc.pid:
                key = (data_dir / "api_key").read_text().strip()
                return Service(info["url"], key, data_dir, proc)
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"service died: {(data_dir / 'test-service.log').read_text()}")
        time.sleep(0.05)
    raise RuntimeError("service did not start")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
