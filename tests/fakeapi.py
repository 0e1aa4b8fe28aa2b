"""A task service built from TASK_API.md alone: fixture data, no runner, not our server.

It answers the calls taskfs makes (list with paging and filters, one task, status, kill,
signed URLs, version check) and serves output archives itself from ``/o/...`` with range
support (``tests.rangeserver.Objects``). Use it over ``mock_transport(fake)`` in unit tests or
over real HTTP with ``serve_answerer(fake)``. Its tasks look like the cloud's: GCP machine types
given as paths, statuses set by the test.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from taskfs.api.models import KILLABLE, STATUS_ALIASES, TERMINAL, TaskStatusCode
from tests.rangeserver import Answer, Objects

KEY = "fake-key_0123"
T0 = datetime(2026, 11, 20, 9, 0, 0, tzinfo=UTC)


def _ts(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="microseconds") if moment else None


@dataclass
class FakeApi:
    base_url: str = "http://fake.test"
    objects: Objects = field(default_factory=Objects)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    hidden: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Fault injection for API calls (storage has ``objects.fault``): an answer replaces the
    # real one, e.g. a stall or a 503.
    api_fault: Callable[[str, str], Answer | None] | None = None
    # The key it accepts (a test may rotate it after mounting).
    key: str = KEY

    def add(
        self,
        task_id: str,
        status: TaskStatusCode,
        *,
        archive: bytes | None = None,
        vm_type: str | None = "projects/p/zones/europe-west1-b/machineTypes/c2-standard-4",
        computation_seconds: float | None = None,
        computation_start: datetime | None = None,
        hidden: bool = False,
    ) -> dict[str, Any]:
        """Add a task; ``archive`` is stored as its outputs (terminal tasks)."""
        started = status not in (TaskStatusCode.PENDING_INPUT, TaskStatusCode.SUBMITTED)
        terminal = status in TERMINAL
        record: dict[str, Any] = {
            "task_id": task_id,
            "status": status.value,
            "status_alias": STATUS_ALIASES[status],
            "simulator": "splishsplash",
            "project": "fake-project",
            "is_terminated": terminal,
            "num_retries": 0,
            "storage_path": f"fake-bucket/{task_id}",
            "storage_output_path": f"fake-bucket/{task_id}/output.zip",
            "storage_region": "europe-west1",
            "create_time": _ts(T0),
            "input_submit_time": _ts(T0 + timedelta(seconds=1)),
            "start_time": _ts(T0 + timedelta(seconds=5)) if started else None,
            "computation_start_time": _ts(computation_start) if computation_start else None,
            "computation_end_time": None,
            "end_time": _ts(T0 + timedelta(minutes=10)) if terminal else None,
            "metrics": (
                {"computation_seconds": computation_seconds}
                if computation_seconds is not None
                else {}
            ),
            "executer": (
                {
                    "uuid": "0000-1111",
                    "cpu_count_logical": 4,
                    "cpu_count_physical": 2,
                    "memory": 16 << 30,
                    "n_mpi_hosts": 1,
                    "vm_type": vm_type,
                    "vm_name": "vm-1",
                    "host_type": "GCP",
                    "extra_field_from_the_future": True,
                }
                if started and vm_type
                else None
            ),
            "status_history": [
                {
                    "status": status.value,
                    "timestamp": _ts(T0 + timedelta(minutes=10 if terminal else 1)),
                    "end_timestamp": None,
                    "description": "fixture",
                    "alias": STATUS_ALIASES[status],
                    "operations": [],
                }
            ],
            "machine_operations": [],
        }
        with self.lock:
            self.tasks[task_id] = record
            self.order.insert(0, task_id)
            if hidden:
                self.hidden.add(task_id)
        if archive is not None:
            self.objects.put(f"fake-bucket/{task_id}/output.zip", archive)
        return record

    def set_status(self, task_id: str, status: TaskStatusCode) -> None:
        with self.lock:
            record = self.tasks[task_id]
            record["status"] = status.value
            record["status_alias"] = STATUS_ALIASES[status]
            record["is_terminated"] = status in TERMINAL
            record["status_history"].append(
                {
                    "status": status.value,
                    "timestamp": _ts(datetime.now(UTC)),
                    "end_timestamp": None,
                    "description": "changed",
                    "alias": "x",
                    "operations": [],
                }
            )

    # -- the HTTP side -------------------------------------------------------------------------

    def answer(
        self, method: str, path: str, headers: dict[str, str], query: str = "", body: bytes = b""
    ) -> Answer:
        if path.startswith("/o/"):
            return self.objects.answer(method, path, headers, query, body)
        with self.lock:
            self.calls[f"{method} {_route(path)}"] += 1
        if self.api_fault is not None and (faulty := self.api_fault(method, path)) is not None:
            return faulty
        if path == "/version-check":
            return _json({"is_valid": True, "client_version": "x", "server_version": "fake"})
        if headers.get("x-api-key") != self.key:
            return _json({"detail": "invalid API key"}, 401)
        params = {k: v for k, v in parse_qs(query).items()}
        parts = path.strip("/").split("/")
        with self.lock:
            if parts == ["tasks"] and method == "GET":
                return self._list(params)
            if len(parts) >= 2 and parts[0] == "tasks":
                record = self.tasks.get(parts[1])
                if record is None:
                    return _json({"detail": "task not found"}, 404)
                if len(parts) == 2 and method == "GET":
                    return _json(record)
                if parts[2:] == ["status"] and method == "GET":
                    return _json(_status(record))
                if parts[2:] == ["kill"] and method == "POST":
                    if TaskStatusCode(record["status"]) in KILLABLE:
                        record["status"] = TaskStatusCode.PENDING_KILL.value
                        record["status_alias"] = "Pending Kill"
                    return _json(_status(record))
            if parts == ["storage", "signed-urls"] and method == "GET":
                paths = params.get("paths", [])
                return _json([f"{self.base_url}/o/{p}" for p in paths])
        return _json({"detail": "not found"}, 404)

    def _list(self, params: dict[str, list[str]]) -> Answer:
        page = int(params.get("page", ["1"])[0])
        per_page = int(params.get("per_page", ["10"])[0])
        status = params.get("status", [None])[0]
        ids = [
            t
            for t in self.order
            if t not in self.hidden and (status is None or self.tasks[t]["status"] == status)
        ]
        chunk = ids[(page - 1) * per_page : page * per_page]
        items = []
        for task_id in chunk:
            item = dict(self.tasks[task_id])
            item.pop("status_history")
            item.pop("machine_operations")
            items.append(item)
        return _json({"total_size": len(ids), "tasks": items})


def _route(path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[0] == "tasks" and len(parts) >= 2:
        return "/".join(["tasks", "{id}", *parts[2:]])
    return "/".join(parts)


def _status(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record["task_id"],
        "status": record["status"],
        "is_terminated": record["is_terminated"],
    }


def _json(body: Any, status: int = 200) -> Answer:
    return Answer(status, {"content-type": "application/json"}, json.dumps(body).encode())
