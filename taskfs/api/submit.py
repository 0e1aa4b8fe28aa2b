"""Submitting a task the way a remote client does: submit, signed upload URL, PUT, input_uploaded.

Owns: packing an input directory into ``input.zip`` (entries under ``sim_dir/``, by the same
rules as the service packs outputs: ``taskfs.packing``) and the four REST calls of a
submission. Works against any service speaking TASK_API.md, the embedded one included; used by
``taskfs submit`` and ``Task.submit``.

Must stay true: the input archive is built in a temporary file that is removed afterwards; a
failed upload leaves the task in ``pending-input`` (never ``submitted`` without its input);
everything packing skips or changes is told to ``on_issue`` before anything is sent (the
default logs it at WARNING), never silently dropped.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from taskfs.api.client import ApiClient
from taskfs.errors import UsageError
from taskfs.packing import Issue, pack_tree

log = logging.getLogger(__name__)

INPUT_PREFIX = "sim_dir/"


def pack_input(source: Path | None, archive: Path) -> list[Issue]:
    """Write ``archive`` with every file under ``source`` as ``sim_dir/<relative path>``;
    returns what could not be packed as it was (see ``taskfs.packing``)."""
    with open(archive, "w+b") as out:
        return pack_tree(source, out, INPUT_PREFIX).issues


def _check_input_dir(input_dir: Path) -> None:
    """``UsageError`` unless ``input_dir`` is a directory this process can list."""
    try:
        os.listdir(input_dir)
    except FileNotFoundError:
        raise UsageError(f"input directory {input_dir} does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"input {input_dir} is not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read input directory {input_dir}: {exc.strerror}") from None


def _log_issue(issue: Issue) -> None:
    log.warning("input %s", issue.line())


async def submit_task(
    client: ApiClient,
    commands: Sequence[str],
    *,
    input_dir: Path | None = None,
    project: str | None = None,
    ttl_seconds: float | None = None,
    simulator: str = "custom",
    container_image: str | None = None,
    resource_pool: str | None = None,
    storage_path_prefix: str | None = None,
    on_issue: Callable[[Issue], None] = _log_issue,
) -> str:
    """Submit ``commands`` with the files of ``input_dir``; returns the new task's id.

    ``on_issue`` hears of each input file packing skipped or changed (see ``taskfs.packing``).
    """
    if not commands:
        raise UsageError("nothing to run: give a command")
    if input_dir is not None:
        await trio.to_thread.run_sync(_check_input_dir, input_dir)
    request: dict[str, Any] = {
        "simulator": simulator,
        "resource_pool": resource_pool,
        "container_image": container_image,
        "project": project,
        "storage_path_prefix": storage_path_prefix,
        "time_to_live_seconds": ttl_seconds,
        "extra_params": {"commands": [{"cmd": c, "prompts": []} for c in commands]},
    }
    with tempfile.TemporaryDirectory(prefix="taskfs-input-") as tmp:
        archive = Path(tmp) / "input.zip"
        for issue in await trio.to_thread.run_sync(pack_input, input_dir, archive):
            on_issue(issue)
        response = await client.submit(request)
        prefix = (storage_path_prefix or "").strip("/")
        input_path = f"{prefix}/{response.id}/input.zip" if prefix else f"{response.id}/input.zip"
        url = (await client.signed_urls("upload", [input_path], response.storage_region))[0]
        await client.upload_file(url, archive)
    await client.input_uploaded(response.id)
    return response.id
