"""Status sets, decoding tolerance/strictness, and the derivations shown as files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from taskfs.api import models
from taskfs.api.models import KILLABLE, NOT_TERMINAL, TERMINAL, Task, TaskStatusCode

BASE = {
    "task_id": "abc",
    "status": "computation-started",
    "status_alias": "Computing",
    "simulator": "custom",
    "project": "p",
    "is_terminated": False,
    "num_retries": 0,
}


def test_status_sets_partition_the_enum() -> None:
    assert len(TaskStatusCode) == 17
    assert KILLABLE < NOT_TERMINAL
    assert {TaskStatusCode.PENDING_KILL} == NOT_TERMINAL - KILLABLE
    assert set(TaskStatusCode) == TERMINAL | NOT_TERMINAL
    assert not TERMINAL & NOT_TERMINAL
    assert set(models.STATUS_ALIASES) == set(TaskStatusCode)


def test_decode_tolerates_extra_fields_but_not_missing_ones() -> None:
    task = models.decode(msgspec.json.encode({**BASE, "brand_new_field": [1, 2]}), Task)
    assert task.status == TaskStatusCode.COMPUTATION_STARTED
    assert task.metrics == models.Metrics()
    missing = {k: v for k, v in BASE.items() if k != "status"}
    with pytest.raises(msgspec.ValidationError, match="status"):
        models.decode(msgspec.json.encode(missing), Task)
    with pytest.raises(msgspec.ValidationError):
        models.decode(msgspec.json.encode({**BASE, "status": "finished"}), Task)
    with pytest.raises(msgspec.ValidationError):
        models.decode(msgspec.json.encode({**BASE, "is_terminated": "no"}), Task)


def test_timestamps_on_the_wire_carry_an_offset() -> None:
    moment = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    assert models.format_time(moment) == "2026-11-26T10:00:00.000000+00:00"
    with pytest.raises(ValueError, match="naive"):
        models.format_time(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("vm_type", "expected"),
    [
        ("projects/p/zones/z/machineTypes/c2-standard-4", "c2-standard-4"),
        ("c2-standard-4", "c2-standard-4"),
        ("local-2vcpu", "local-2vcpu"),
    ],
)
def test_machine_type(vm_type: str, expected: str) -> None:
    executer = {
        "uuid": "u",
        "cpu_count_logical": 4,
        "cpu_count_physical": 2,
        "memory": 1,
        "n_mpi_hosts": 1,
        "vm_type": vm_type,
        "host_type": "GCP",
    }
    task = msgspec.convert({**BASE, "executer": executer}, Task)
    assert models.machine_type(task) == expected
    assert models.machine_type(msgspec.convert(BASE, Task)) == ""


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "00:00:00"), (192.9, "00:03:12"), (3600 * 27 + 192, "27:03:12"), (-3, "00:00:00")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert models.format_duration(seconds) == text


def test_computation_time_rules() -> None:
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    queued = msgspec.convert({**BASE, "status": "submitted"}, Task)
    assert models.computation_time(queued, now) == ""
    live = msgspec.convert(
        {**BASE, "computation_start_time": (now - timedelta(seconds=75)).isoformat()}, Task
    )
    assert models.computation_time(live, now) == "00:01:15"
    measured = msgspec.convert(
        {
            **BASE,
            "computation_start_time": now.isoformat(),
            "metrics": {"computation_seconds": 192.0},
        },
        Task,
    )
    assert models.computation_time(measured, now) == "00:03:12"
    ended = msgspec.convert(
        {
            **BASE,
            "status": "killed",
            "is_terminated": True,
            "computation_start_time": (now - timedelta(seconds=100)).isoformat(),
            "end_time": (now - timedelta(seconds=40)).isoformat(),
        },
        Task,
    )
    assert models.computation_time(ended, now) == "00:01:00"
