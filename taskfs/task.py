"""The Python ``Task`` class: a synchronous API for scripts and notebooks.

Owns: the user-facing methods that mirror the official client's ``Task`` (``get_status``,
``get_machine_type``, ``get_computation_time``, ``get_output_files_info``, ``kill``, ``wait``,
``sync_context``, ``download_outputs``), each a blocking call over the async API client (one
``trio.run`` per call).

Must stay true: every method raises ``taskfs.errors`` exceptions only (never httpx or trio
ones), so ``except TaskfsError`` catches every failure; the API key is taken from the same
places as the CLI's and is never part of ``repr``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import (
    TaskStatusCode,
    TaskWithStatusHistory,
    computation_time,
    is_task_id,
    machine_type,
)
from taskfs.api.submit import submit_task
from taskfs.config import ClientSettings, resolve_client
from taskfs.errors import ServiceError, TaskEndedError, UsageError, single_errors
from taskfs.outputs import OutputInfo, download, output_info

T = TypeVar("T")
log = logging.getLogger(__name__)
OUTPUT_ROOT_ENV = "INDUCTIVA_OUTPUT_DIR"


def output_root() -> Path:
    """Where downloads go by default: ``$INDUCTIVA_OUTPUT_DIR``, else ``inductiva_output``."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or "inductiva_output")


def outputs_below(task_id: str) -> tuple[str, str]:
    """A task's outputs directory below the download root, as the official client lays it
    out: ``<task_id>/outputs``."""
    return (task_id, "outputs")


def run_api(settings: ClientSettings, fn: Callable[[ApiClient], Awaitable[T]]) -> T:
    """Run ``await fn(api)`` to completion from synchronous code."""

    async def main() -> T:
        async with ApiClient.open(settings) as api:
            return await fn(api)

    with single_errors():
        return trio.run(main)


class Task:
    """A task of the service, by id. Without arguments it talks to the same service as the
    ``taskfs`` command (``$INDUCTIVA_API_URL``, else the embedded local service)."""

    def __init__(
        self,
        task_id: str,
        *,
        api_url: str | None = None,
        api_key_file: Path | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        if not is_task_id(task_id):
            raise UsageError(f"not a task id: {task_id!r}")
        self.id = task_id
        self.settings = settings or resolve_client(api_url, api_key_file)

    def __repr__(self) -> str:
        return f"Task({self.id!r})"

    @classmethod
    def submit(
        cls,
        commands: Sequence[str],
        *,
        input_dir: Path | str | None = None,
        project: str | None = None,
        ttl_seconds: float | None = None,
        settings: ClientSettings | None = None,
    ) -> Task:
        """Submit shell ``commands`` (run in order) with the files of ``input_dir``."""
        settings = settings or resolve_client()
        task_id = run_api(
            settings,
            lambda api: submit_task(
                api,
                list(commands),
                input_dir=Path(input_dir) if input_dir is not None else None,
                project=project,
                ttl_seconds=ttl_seconds,
            ),
        )
        return cls(task_id, settings=settings)

    def _call(self, fn: Callable[[ApiClient], Awaitable[T]]) -> T:
        return run_api(self.settings, fn)

    def get_info(self) -> TaskWithStatusHistory:
        """The task's full record."""
        return self._call(lambda api: api.get_task(self.id))

    def get_status(self) -> TaskStatusCode:
        """The status, e.g. ``TaskStatusCode.SUCCESS`` (a str enum: ``== "success"``)."""
        return self._call(lambda api: api.get_status(self.id)).status

    def get_machine_type(self) -> str:
        """``"c2-standard-4"``; empty until a machine is assigned."""
        return machine_type(self.get_info())

    def get_computation_time(self) -> str:
        """``"00:03:12"``; live while computing; empty before computation starts."""
        return computation_time(self.get_info())

    def get_output_files_info(self) -> OutputInfo:
        """The outputs archive's contents, read from its central directory (no download).

        ``print()`` it for the official client's listing.
        """

        async def fetch(api: ApiClient) -> OutputInfo:
            return await output_info(api, await api.get_task(self.id))

        return self._call(fetch)

    def kill(self, wait_timeout: float | None = None, poll: float = 0.5) -> bool:
        """Kill the task. ``TaskEndedError`` if it has already ended.

        Without ``wait_timeout``: True once the service accepted the kill. With it: True once
        the task is ``killed``, False if it is not within ``wait_timeout`` seconds.
        """

        async def kill(api: ApiClient) -> bool:
            await api.kill_running(self.id)
            if wait_timeout is None:
                return True
            with trio.move_on_after(wait_timeout):
                return (await api.wait_ended(self.id, poll)).status == TaskStatusCode.KILLED
            return False

        return self._call(kill)

    def wait(
        self,
        poll: float = 1.0,
        on_change: Callable[[TaskStatusCode], None] | None = None,
        max_outage: float | None = 600.0,
    ) -> TaskStatusCode:
        """Block until the task has ended; returns its final status.

        Rides out an outage of the service (logging each retry at WARNING) for up to
        ``max_outage`` seconds (``None``: forever), then raises ``ServiceError``.
        """

        def outage(error: ServiceError, retry_in: float) -> None:
            log.warning("%s; retrying in %g s", error, retry_in)

        async def wait(api: ApiClient) -> TaskStatusCode:
            changed = None if on_change is None else (lambda s: on_change(s.status))
            status = await api.wait_ended(
                self.id, poll, changed, max_outage=max_outage, on_outage=outage
            )
            return status.status

        return self._call(wait)

    @contextmanager
    def sync_context(self) -> Iterator[Task]:
        """Ctrl-C inside the block kills the remote task (then the interrupt goes on)."""
        try:
            yield self
        except KeyboardInterrupt:
            with suppress(TaskEndedError):
                self.kill()
            raise

    def download_outputs(
        self,
        filenames: Sequence[str] | None = None,
        output_dir: Path | str | None = None,
        progress: Callable[[str, int], None] | None = None,
    ) -> Path:
        """Download all outputs, or ``filenames`` (relative to ``artifacts/``), with range
        requests. Default directory: ``$INDUCTIVA_OUTPUT_DIR`` (else ``inductiva_output``)
        ``/<task_id>/outputs``, as the official client does. Returns the directory."""
        below: tuple[str, ...] = ()
        if output_dir is not None:
            root = Path(output_dir)
        else:
            root, below = output_root(), outputs_below(self.id)

        async def fetch(api: ApiClient) -> Path:
            task = await api.get_task(self.id)
            await download(api, task, root, filenames, progress, below=below)
            return root.joinpath(*below)

        return self._call(fetch)
