"""Typed records of the task REST API (TASK_API.md section 4), shared by client and server.

Owns: the 17 status codes and their killable/terminal sets, the msgspec structs that API JSON is
decoded into, and the two derivations taskfs shows as files (``machine_type`` and
``computation_time``, TASK_API.md section 7).

Must stay true:
* decoding tolerates unknown extra fields (the cloud service adds fields) but is strict about
  every field taskfs uses: a missing required field or a wrong type is a ``msgspec``
  ``ValidationError`` that the client turns into a ``ProtocolError``;
* ``TERMINAL``, ``KILLABLE`` and ``NOT_TERMINAL`` partition ``TaskStatusCode`` exactly as
  TASK_API.md section 2 says; ``is_terminated`` from the API stays the authority on whether a
  task has ended, the sets are for the server and for choosing what a kill may do;
* timestamps on the wire carry an explicit offset; ``format_time`` writes them that way.
"""

from __future__ import annotations

import enum
import math
import re
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

# What a task id can be (the cloud's are 25 characters of [a-z0-9]): one path segment, no
# ``..``, ``?``, ``#`` or ``/``. Checked once, the same way, by the mount, the CLI, the Task class
# and the API client before an id goes into a URL or a path.
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_task_id(value: str) -> bool:
    return TASK_ID.fullmatch(value) is not None


class TaskStatusCode(enum.StrEnum):
    PENDING_INPUT = "pending-input"
    SUBMITTED = "submitted"
    STARTED = "started"
    COMPUTATION_STARTED = "computation-started"
    COMPUTATION_ENDED = "computation-ended"
    SUCCESS = "success"
    FAILED = "failed"
    PENDING_KILL = "pending-kill"
    KILLED = "killed"
    TTL_EXCEEDED = "ttl-exceeded"
    SPOT_INSTANCE_PREEMPTED = "spot-instance-preempted"
    EXECUTER_TERMINATED = "executer-terminated"
    EXECUTER_TERMINATED_BY_USER = "executer-terminated-by-user"
    EXECUTER_TERMINATED_TTL_EXCEEDED = "executer-terminated-ttl-exceeded"
    EXECUTER_TERMINATED_CREDITS_EXHAUSTED = "executer-terminated-credits-exhausted"
    EXECUTER_FAILED = "executer-failed"
    ZOMBIE = "zombie"


S = TaskStatusCode
T = TypeVar("T")

KILLABLE: frozenset[TaskStatusCode] = frozenset(
    {S.PENDING_INPUT, S.SUBMITTED, S.STARTED, S.COMPUTATION_STARTED, S.COMPUTATION_ENDED}
)
NOT_TERMINAL: frozenset[TaskStatusCode] = KILLABLE | {S.PENDING_KILL}
TERMINAL: frozenset[TaskStatusCode] = frozenset(TaskStatusCode) - NOT_TERMINAL

# The short human labels the server sends as ``status_alias`` and history ``alias``.
STATUS_ALIASES: dict[TaskStatusCode, str] = {
    S.PENDING_INPUT: "Waiting for Input",
    S.SUBMITTED: "In Queue",
    S.STARTED: "Preparing to Compute",
    S.COMPUTATION_STARTED: "Computing",
    S.COMPUTATION_ENDED: "Finalizing",
    S.SUCCESS: "Success",
    S.FAILED: "Failed",
    S.PENDING_KILL: "Pending Kill",
    S.KILLED: "Killed",
    S.TTL_EXCEEDED: "Time Limit Exceeded",
    S.SPOT_INSTANCE_PREEMPTED: "Spot Instance Preempted",
    S.EXECUTER_TERMINATED: "Machine Terminated",
    S.EXECUTER_TERMINATED_BY_USER: "Machine Terminated by User",
    S.EXECUTER_TERMINATED_TTL_EXCEEDED: "Machine Time Limit Exceeded",
    S.EXECUTER_TERMINATED_CREDITS_EXHAUSTED: "Credits Exhausted",
    S.EXECUTER_FAILED: "Machine Failed",
    S.ZOMBIE: "Zombie",
}


class _Record(msgspec.Struct, kw_only=True):
    """Base of API records: keyword construction, unknown fields ignored on decode."""


class QueuePosition(_Record):
    tasks_ahead: int


class TaskStatus(_Record):
    id: str
    status: TaskStatusCode
    is_terminated: bool
    position_in_queue: QueuePosition | None = None


class Executer(_Record):
    uuid: str
    cpu_count_logical: int
    cpu_count_physical: int
    memory: float
    n_mpi_hosts: int
    vm_type: str
    host_type: str
    vm_name: str | None = None
    error_detail: str | None = None


class Metrics(_Record):
    computation_seconds: float | None = None
    total_seconds: float | None = None
    queue_time_seconds: float | None = None
    output_size_bytes: float | None = None
    output_zipped_size_bytes: float | None = None
    output_total_files: float | None = None
    input_size_bytes: float | None = None


class Operation(_Record):
    name: str
    alias: str | None = None
    start_timestamp: datetime | None = None
    end_timestamp: datetime | None = None
    status: str | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class StatusHistoryEntry(_Record):
    status: TaskStatusCode
    timestamp: datetime
    end_timestamp: datetime | None = None
    description: str | None = None
    alias: str | None = None
    machine_id: str | None = None
    operations: list[Operation] = msgspec.field(default_factory=list)


class Task(_Record):
    """A task as ``GET /tasks`` lists it."""

    task_id: str
    status: TaskStatusCode
    status_alias: str
    simulator: str
    project: str | None
    is_terminated: bool
    num_retries: int = 0
    storage_path: str | None = None
    storage_input_path: str | None = None
    storage_output_path: str | None = None
    storage_region: str | None = None
    container_image: str | None = None
    create_time: datetime | None = None
    input_submit_time: datetime | None = None
    start_time: datetime | None = None
    computation_start_time: datetime | None = None
    computation_end_time: datetime | None = None
    end_time: datetime | None = None
    duration_seconds: float | None = None
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    executer: Executer | None = None
    error_detail: str | None = None
    extra_params: dict[str, Any] | None = None


class TaskWithStatusHistory(Task):
    """A task as ``GET /tasks/{id}`` returns it."""

    status_history: list[StatusHistoryEntry] = msgspec.field(default_factory=list)
    machine_operations: list[dict[str, Any]] = msgspec.field(default_factory=list)


class TaskPage(_Record):
    total_size: int
    tasks: list[Task]


class ZipMember(_Record):
    name: str
    size: int
    compressed_size: int
    range_start: int | None = None
    creation_time: str | None = None
    compress_type: int | None = None


class ZipArchiveInfo(_Record):
    size: int
    contents: list[ZipMember]


class SubmitResponse(_Record):
    id: str
    status: TaskStatusCode
    is_terminated: bool = False
    storage_region: str | None = None
    time_to_live_seconds: float | None = None


def decode(data: bytes, type_: type[T]) -> T:
    """Decode API JSON into ``type_``; raises ``msgspec.ValidationError``/``DecodeError``."""
    return msgspec.json.decode(data, type=type_)


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """The wire form of a timestamp: ISO-8601, microseconds, explicit ``+00:00`` offset."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime on the wire")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def machine_type(task: Task) -> str:
    """Last path segment of ``executer.vm_type``; empty until a machine is assigned."""
    if task.executer is None or not task.executer.vm_type:
        return ""
    return task.executer.vm_type.rstrip("/").rsplit("/", 1)[-1]


def format_duration(seconds: float) -> str:
    """``HH:MM:SS``; hours keep growing past 24 (``27:03:12``)."""
    total = max(0, math.floor(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def computation_seconds(task: Task, now: datetime | None = None) -> float | None:
    """Seconds of computation: the metric, else live time while computing, else ``None``."""
    if task.metrics.computation_seconds is not None:
        return task.metrics.computation_seconds
    start = task.computation_start_time
    if start is None:
        return None
    end = task.computation_end_time
    if end is None and task.is_terminated:
        end = task.end_time
    if end is None:
        end = now or now_utc()
    return (end - start).total_seconds()


def computation_time(task: Task, now: datetime | None = None) -> str:
    """What ``computation_time`` shows: ``HH:MM:SS`` or empty before computation starts."""
    seconds = computation_seconds(task, now)
    return "" if seconds is None else format_duration(seconds)
