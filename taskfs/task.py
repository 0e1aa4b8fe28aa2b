"""The Python ``Task`` class: a synchronous API for scripts and notebooks.

Owns: the user-facing methods that mirror the official client's ``Task`` (``get_status``,
``get_machine_type``, ``get_computation_time``, ``get_output_files_info``, ``kill``, ``wait``,
``sync_context``, ``download_outputs``, and the live ones: ``tail_files``, ``list_files``,
``top``/``_top``, ``last_modified_file``), each a blocking call over the async API client (one
``trio.run`` per call).

Must stay true: every method raises ``taskfs.errors`` exceptions only (never httpx or trio
ones), so ``except TaskfsError`` catches every failure (the live methods, as the official
ones, print a failure to stderr and return an exit status instead); the API key is taken from
the same places as the CLI's and is never part of ``repr``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO, TypeVar

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
from taskfs.errors import (
    LiveError,
    ServiceError,
    TaskEndedError,
    TaskfsError,
    UsageError,
    single_errors,
)
from taskfs.live import load_ops
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
        api_key_file: Path | str | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        if not is_task_id(task_id):
            raise UsageError(f"not a task id: {task_id!r}")
        self.id = task_id
        self.settings = settings or resolve_client(
            api_url, None if api_key_file is None else Path(api_key_file)
        )

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

    # -- live: a computing task's files (the official class's names and return values) ---------

    def tail_files(
        self,
        tail_files: Sequence[str],
        lines: int = 10,
        follow: bool = False,
        fout: TextIO = sys.stdout,
        wait: bool = False,
    ) -> int:
        """Print the last ``lines`` lines of each file (relative to the task's working
        directory) to ``fout``; ``follow``: then new lines, until the task stops computing.
        Returns 0, or 1 when a file failed (said on stderr)."""
        ops = load_ops()
        if isinstance(tail_files, str):  # one name, not its characters
            tail_files = [tail_files]
        several = len(tail_files) > 1
        current: list[str] = []

        def on_text(name: str, text: str) -> None:
            if several and text and current != [name]:
                fout.write(f"==> {name} <==\n")
                current[:] = [name]
            fout.write(text)
            fout.flush()

        def on_error(name: str, error: LiveError) -> None:
            print(f"{name}: {error}", file=sys.stderr)

        async def run(api: ApiClient) -> int:
            failed: int = await ops.tail(
                api,
                self.id,
                list(tail_files),
                lines=lines,
                follow=follow,
                on_text=on_text,
                on_error=on_error,
                wait=wait,
            )
            return failed

        return self._live(run, lambda failed: (None, 1 if failed else 0))[1]

    def list_files(self) -> tuple[str | None, int]:
        """The task's files now, one path per line (directories end in ``/``), and 0; or
        (None, 1) with the reason on stderr."""
        return self._live_once("ls", lambda ops, tree: ops.format_listing(tree))

    def top(self) -> tuple[str | None, int]:
        """``top -b -H -n 1`` on the task's machine, and 0; or (None, 1)."""
        return self._live_once("top", lambda ops, text: str(text))

    _top = top  # the official class's name for it

    def last_modified_file(self) -> tuple[str | None, int]:
        """The most recently modified file, when, and how long ago, and 0; or (None, 1)."""
        return self._live_once(
            "last_modified_file", lambda ops, answer: ops.format_last_modified(answer)
        )

    def _live_once(self, kind: str, show: Callable[[Any, Any], str]) -> tuple[str | None, int]:
        """The one answer of a live request, as ``show(ops, answer)`` gives it."""
        ops = load_ops()

        async def run(api: ApiClient) -> Any:
            return await ops.once(api, self.id, kind)

        return self._live(run, lambda answer: (show(ops, answer), 0))

    def _live(
        self,
        fn: Callable[[ApiClient], Awaitable[Any]],
        show: Callable[[Any], tuple[str | None, int]],
    ) -> tuple[str | None, int]:
        try:
            return show(self._call(fn))
        except TaskfsError as error:
            print(f"taskfs: {error}", file=sys.stderr)
            return None, 1
