"""Helpers shared by the test layers: a gate on the runner, waiting for statuses, zips."""

from __future__ import annotations

import io
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatus, TaskStatusCode


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


def make_zip(members: Iterable[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()
