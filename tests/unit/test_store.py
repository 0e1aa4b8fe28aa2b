"""SQLite store: conditional transitions, history invariants, paging, queue order, schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from taskfs.api.models import TaskStatusCode as S
from taskfs.server.store import SCHEMA_VERSION, Store


def make(store: Store, project: str = "p") -> str:
    return store.create_task(
        project=project,
        simulator="sim",
        container_image=None,
        resource_pool=None,
        storage_prefix="",
        storage_region="local",
        ttl_seconds=None,
        request={"extra_params": {"commands": []}},
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "db.sqlite3")


def test_created_task_has_one_open_history_entry(store: Store) -> None:
    task_id = make(store)
    assert len(task_id) == 25 and task_id.isalnum() and task_id.islower()
    task = store.get_task(task_id)
    assert task is not None and task["status"] == "pending-input"
    assert task["metrics"] == {} and task["storage_path"] == task_id
    history = store.get_history(task_id)
    assert [(h["status"], h["end_timestamp"]) for h in history] == [("pending-input", None)]


def test_transition_is_conditional(store: Store) -> None:
    task_id = make(store)
    refused = store.transition(task_id, S.STARTED, "x", expect={S.SUBMITTED})
    assert not refused.done and refused.status == S.PENDING_INPUT
    assert store.get_task(task_id)["status"] == "pending-input"  # type: ignore[index]
    done = store.transition(
        task_id,
        S.SUBMITTED,
        "queued",
        expect={S.PENDING_INPUT},
        fields={"input_submit_time": "2026-01-01T00:00:00.000000+00:00"},
    )
    assert done.done and done.status == S.SUBMITTED
    history = store.get_history(task_id)
    assert [h["status"] for h in history] == ["pending-input", "submitted"]
    assert history[0]["end_timestamp"] == history[1]["timestamp"]
    assert history[1]["end_timestamp"] is None
    assert store.transition("missing", S.KILLED, "x", expect=set(S)).status is None


def test_transition_refuses_unknown_columns(store: Store) -> None:
    task_id = make(store)
    with pytest.raises(ValueError, match="cannot set"):
        store.transition(
            task_id,
            S.SUBMITTED,
            "x",
            expect={S.PENDING_INPUT},
            fields={"status; DROP TABLE tasks": 1},
        )
    assert store.get_task(task_id)["status"] == "pending-input"  # type: ignore[index]


def test_operations_attach_to_current_entry(store: Store) -> None:
    task_id = make(store)
    store.transition(task_id, S.COMPUTATION_STARTED, "run", expect={S.PENDING_INPUT})
    op = store.start_operation(task_id, "exec_command", {"command": "echo"})
    store.end_operation(op, True, {"exit_code": 0})
    running = store.start_operation(task_id, "exec_command", {"command": "sleep"})
    store.fail_running_operations(task_id)
    history = store.get_history(task_id)
    ops = history[-1]["operations"]
    assert [(o["status"], o["attributes"]) for o in ops] == [
        ("OK", {"command": "echo", "exit_code": 0}),
        ("FAILED", {"command": "sleep"}),
    ]
    assert all(o["end_timestamp"] for o in ops) and ops[1]["id"] == running
    assert history[0]["operations"] == []


def test_paging_filters_and_queue(store: Store) -> None:
    ids = [make(store, project="a" if i < 3 else "b") for i in range(5)]
    total, page = store.list_tasks(offset=0, limit=2)
    assert total == 5 and [t["task_id"] for t in page] == ids[::-1][:2]
    total, page = store.list_tasks(offset=4, limit=2)
    assert [t["task_id"] for t in page] == [ids[0]]
    assert store.list_tasks(offset=10, limit=2) == (5, [])
    total, page = store.list_tasks(offset=0, limit=10, project="a")
    assert total == 3 and {t["task_id"] for t in page} == set(ids[:3])
    for i, task_id in enumerate([ids[3], ids[1], ids[4]]):
        store.transition(
            task_id,
            S.SUBMITTED,
            "q",
            expect={S.PENDING_INPUT},
            fields={"input_submit_time": f"2026-01-01T00:00:0{i}.000000+00:00"},
        )
    assert store.queued(10) == [ids[3], ids[1], ids[4]]
    assert [store.tasks_ahead(t) for t in (ids[3], ids[1], ids[4])] == [0, 1, 2]
    assert store.tasks_ahead(ids[0]) is None
    total, page = store.list_tasks(offset=0, limit=10, status="submitted")
    assert total == 3


def test_output_paths_are_known(store: Store) -> None:
    task_id = make(store)
    assert "task output" in (store.upload_refusal(f"{task_id}/output.zip") or "")
    assert store.upload_refusal(f"{task_id}/input.zip") is None
    assert store.upload_refusal("other/output.zip") is None
    for inside in (task_id, f"{task_id}/output.zip/x", f"{task_id}/other", f"{task_id}/a/b"):
        assert store.upload_refusal(inside) is not None, inside
    assert store.upload_refusal(f"{task_id}x/input.zip") is None  # only a prefix in common


def test_reopen_keeps_data_and_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    first = Store(path)
    task_id = make(first)
    first.close()
    again = Store(path)
    assert again.get_task(task_id) is not None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="not supported"):
        Store(path)


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """A data dir from the previous release keeps its tasks and gains ``outcome``."""
    path = tmp_path / "db.sqlite3"
    first = Store(path)
    task_id = make(first)
    first.close()
    with sqlite3.connect(path) as db:  # make it look like version 1: no outcome column
        db.execute("ALTER TABLE tasks DROP COLUMN outcome")
        db.execute("PRAGMA user_version=1")
    again = Store(path)
    assert again.get_task(task_id) is not None
    done = again.transition(
        task_id,
        S.KILLED,
        "x",
        expect={S.PENDING_INPUT},
        fields={"outcome": "killed"},
    )
    assert done.done
    row = again.get_task(task_id)
    assert row is not None and row["outcome"] == "killed"
    again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_a_task_and_its_history_are_read_as_one(tmp_path: Path) -> None:
    """``GET /tasks/{id}``: its status and its history's last entry always agree, even while
    the task changes state in another thread."""
    import threading

    store = Store(tmp_path / "db.sqlite3")
    task_id = make(store)
    order = [S.SUBMITTED, S.STARTED, S.COMPUTATION_STARTED, S.COMPUTATION_ENDED, S.SUCCESS]
    done = threading.Event()

    def advance() -> None:
        previous = S.PENDING_INPUT
        for status in order:
            for _ in range(200):
                store.update_fields(task_id, {"metrics": {}})
            store.transition(task_id, status, "next", expect={previous})
            previous = status
        done.set()

    thread = threading.Thread(target=advance)
    thread.start()
    while not done.is_set():
        found = store.get_task_with_history(task_id)
        assert found is not None
        row, history = found
        assert row["status"] == history[-1]["status"]
    thread.join()
    store.close()
