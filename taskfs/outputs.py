"""Opening a task's outputs archive: signed URL from the API, range reads, shared caches.

Owns: the wiring between the API client and the remote-ZIP reader, used by the filesystem,
the ``Task`` class and the CLI: a task record in, a ``RemoteArchive`` out, with its signed URL
refreshed through the API whenever storage refuses it.

Must stay true: the API key goes only to the API; storage requests carry the signed URL alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import Task
from taskfs.archive.cache import DiskCache, MemoryCache, Tiered
from taskfs.archive.rangeio import RangeSource, Transport, data_client
from taskfs.archive.remote import RemoteArchive
from taskfs.errors import NotFoundError
from taskfs.retry import RetryPolicy

log = logging.getLogger(__name__)

MEMORY_CACHE = 64 << 20


def make_cache(cache_dir: Path | None, limit_bytes: int) -> Tiered:
    """Memory tier plus a disk cache in ``cache_dir`` (none if ``None`` or limit 0)."""
    disk = DiskCache(cache_dir, limit_bytes) if cache_dir is not None and limit_bytes else None
    return Tiered(MemoryCache(MEMORY_CACHE), disk)


class Outputs:
    """Opens the outputs archives of tasks. Use as ``async with Outputs(...)``."""

    def __init__(
        self,
        api: ApiClient,
        cache: Tiered,
        *,
        connections: int = 8,
        deadline: float = 10.0,
        transport: Transport | None = None,
    ) -> None:
        self.api = api
        self.cache = cache
        self.http = data_client(max_connections=connections * 2, transport=transport)
        self.limiter = trio.CapacityLimiter(connections)
        self.policy = RetryPolicy(deadline=deadline)

    async def __aenter__(self) -> Outputs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def open(self, task: Task, nursery: trio.Nursery) -> RemoteArchive | None:
        """The task's archive, or ``None`` when it has none (yet)."""
        path = task.storage_output_path
        if not path:
            return None
        region = task.storage_region

        async def url(refresh: bool) -> str:
            return await self.api.download_url(path, region)

        source = RangeSource(self.http, url, self.policy, name=f"outputs of {task.task_id}")
        try:
            return await RemoteArchive.open(
                source, self.cache, path, nursery=nursery, limiter=self.limiter
            )
        except NotFoundError:
            log.info("task %s has no outputs archive at %s", task.task_id, path)
            return None
