"""The mount's counters since it started, shown as ``tasks/.taskfs/stats`` (one JSON document).

Owns: counting what a mount does without touching the code that does it: API requests by
endpoint and storage GETs with their bytes are counted by httpx event hooks on the two HTTP
clients, errors by errno at the FUSE boundary (``error``); the rest (cache tiers, open
archives, blocked ``wait`` readers, live connections, peak RSS) is read when the document is
made.

Must stay true: FUSE-free and request-free (reading ``stats`` asks the service nothing); a
task id or a signed URL never appears in it (endpoints are counted as templates,
``GET tasks/{id}``).
"""

from __future__ import annotations

import errno
import json
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the hooks only use what every request and response has
    import httpx


def endpoint(request: httpx.Request) -> str:
    """``METHOD route`` with the task id as ``{id}`` (``GET tasks/{id}/status``)."""
    parts = request.url.path.strip("/").split("/")
    if parts and parts[0] == "tasks" and len(parts) >= 2 and parts[1] != "submit":
        parts[1] = "{id}"
    return f"{request.method} {'/'.join(parts)}"


class MountStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.api: Counter[str] = Counter()
        self.storage_gets = 0
        self.storage_bytes = 0
        self.errors: Counter[str] = Counter()

    def hook_api(self, client: httpx.AsyncClient) -> None:
        async def count(request: httpx.Request) -> None:
            self.api[endpoint(request)] += 1

        client.event_hooks["request"].append(count)

    def hook_storage(
        self, client: httpx.AsyncClient, bulk: list[Callable[[int], None]] | None = None
    ) -> None:
        """Count storage GETs and their bytes: httpx's responses, and those of the bulk
        transport (``bulk``: where it reports each response's length)."""

        def counted(length: int) -> None:
            self.storage_gets += 1
            self.storage_bytes += length

        async def count(response: httpx.Response) -> None:
            length = response.headers.get("content-length", "")
            counted(int(length) if length.isdigit() else 0)

        client.event_hooks["response"].append(count)
        if bulk is not None:
            bulk.append(counted)

    def error(self, code: int) -> None:
        self.errors[errno.errorcode.get(code, str(code))] += 1

    def document(self, **now: Any) -> bytes:
        """The JSON of the counters, with ``now`` (what the caller reads at this moment)."""
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        doc = {
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 3),
            "api_requests": dict(sorted(self.api.items())),
            "api_requests_total": sum(self.api.values()),
            "storage_gets": self.storage_gets,
            "storage_bytes": self.storage_bytes,
            "errors": dict(sorted(self.errors.items())),
            **now,
            "peak_rss_bytes": peak_kib * 1024,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()
