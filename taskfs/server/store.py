"""SQLite persistence of the embedded service: tasks, status history, operations.

Owns: the schema (versioned in ``PRAGMA user_version``), every read and write of task state, and
the rules that keep it consistent:

* WAL mode, ``synchronous=NORMAL``, one transaction per state change (``BEGIN IMMEDIATE``);
* a status change is conditional: ``transition`` names the statuses it expects to find and does
  nothing (returning the status it found) when the task has moved on, so the runner, kills and
  restarts never overwrite each other;
* every status change closes the open history entry and opens a new one, so ``status_history``
  is never empty and its last entry always matches ``tasks.status``;
* the store never formats API JSON (``server.app`` does) and never runs processes.

The methods are synchronous; ``call`` runs one in a worker thread, serialised by a limiter of
one, so the trio loop never blocks on disk.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import trio

from taskfs.api.models import TaskStatusCode, format_time, now_utc

P = ParamSpec("P")
R = TypeVar("R")

SCHEMA_VERSION = 2
_ID_ALPHABET = string.ascii_lowercase + string.digits

_SCHEMA = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    project TEXT NOT NULL,
    simulator TEXT NOT NULL,
    container_image TEXT,
    resource_pool TEXT,
    storage_path TEXT NOT NULL,
    storage_region TEXT NOT NULL,
    ttl_seconds REAL,
    request TEXT NOT NULL,
    create_time TEXT NOT NULL,
    input_submit_time TEXT,
    start_time TEXT,
    computation_start_time TEXT,
    computation_end_time TEXT,
    end_time TEXT,
    executer TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    error_detail TEXT,
    pid INTEGER,
    pid_start TEXT,
    outcome TEXT
);
CREATE INDEX tasks_status ON tasks (status, input_submit_time, seq);
CREATE INDEX tasks_project ON tasks (project, seq);
CREATE TABLE status_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks (task_id),
    status TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    end_timestamp TEXT,
    description TEXT NOT NULL,
    machine_id TEXT
);
CREATE INDEX status_history_task ON status_history (task_id, id);
CREATE TABLE operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks (task_id),
    history_id INTEGER NOT NULL REFERENCES status_history (id),
    name TEXT NOT NULL,
    start_timestamp TEXT NOT NULL,
    end_timestamp TEXT,
    status TEXT NOT NULL,
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX operations_task ON operations (task_id, id);
"""

# From an older schema version to the current one.
_UPGRADES = {
    # 2: ``outcome``, the end the commands earned, recorded when they end (recovery after a
    # restart during packing ends the task with it).
    1: ["ALTER TABLE tasks ADD COLUMN outcome TEXT"],
}

# Columns a transition may set besides the status.
_SETTABLE = frozenset(
    {
        "input_submit_time",
        "start_time",
        "computation_start_time",
        "computation_end_time",
        "end_time",
        "executer",
        "metrics",
        "error_detail",
        "pid",
        "pid_start",
        "outcome",
    }
)
_JSON_COLUMNS = frozenset({"executer", "metrics", "request"})


def new_task_id() -> str:
    """25 characters of ``[a-z0-9]``, like the cloud service's ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(25))


@dataclass(frozen=True)
class Transition:
    """Result of a conditional status change: whether it happened and the status now."""

    done: bool
    status: TaskStatusCode | None


class Store:
    """One SQLite database file. Thread-safe: every method holds the connection lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._migrate()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version not in _UPGRADES and version != 0:
            raise RuntimeError(
                f"task database schema version {version} is not supported "
                f"(this taskfs knows version {SCHEMA_VERSION})"
            )
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            statements = _SCHEMA.split(";") if version == 0 else _UPGRADES[version]
            for statement in statements:
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    async def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run one store method in a worker thread (serialised; the loop never blocks)."""
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._limiter)

    # -- writes --------------------------------------------------------------------------------

    def create_task(
        self,
        *,
        project: str,
        simulator: str,
        container_image: str | None,
        resource_pool: str | None,
        storage_prefix: str,
        storage_region: str,
        ttl_seconds: float | None,
        request: Mapping[str, Any],
    ) -> str:
        """Insert a task in ``pending-input`` with its first history entry; return its id."""
        now = format_time(now_utc())
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                while True:
                    task_id = new_task_id()
                    exists = self._conn.execute(
                        "SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)
                    ).fetchone()
                    if not exists:
                        break
                storage_path = f"{storage_prefix}/{task_id}" if storage_prefix else task_id
                self._conn.execute(
                    "INSERT INTO tasks (task_id, status, project, simulator, container_image,"
                    " resource_pool, storage_path, storage_region, ttl_seconds, request,"
                    " create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        task_id,
                        TaskStatusCode.PENDING_INPUT.value,
                        project,
                        simulator,
                        container_image,
                        resource_pool,
                        storage_path,
                        storage_region,
                        ttl_seconds,
                        json.dumps(dict(request)),
                        now,
                    ),
                )
                self._add_history(task_id, TaskStatusCode.PENDING_INPUT, now, "Task created")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return task_id

    def transition(
        self,
        task_id: str,
        status: TaskStatusCode,
        description: str,
        *,
        expect: Iterable[TaskStatusCode],
        fields: Mapping[str, Any] | None = None,
        machine_id: str | None = None,
    ) -> Transition:
        """Move ``task_id`` to ``status`` if it is in one of ``expect``, in one transaction."""
        expected = {s.value for s in expect}
        fields = dict(fields or {})
        unknown = set(fields) - _SETTABLE
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)}")
        now = format_time(now_utc())
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT status FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                if row is None:
                    self._conn.execute("ROLLBACK")
                    return Transition(False, None)
                current = TaskStatusCode(row["status"])
                if current.value not in expected:
                    self._conn.execute("ROLLBACK")
                    return Transition(False, current)
                assignments = ["status = ?"]
                values: list[Any] = [status.value]
                for column, value in fields.items():
                    assignments.append(f"{column} = ?")
                    values.append(json.dumps(value) if column in _JSON_COLUMNS else value)
                self._conn.execute(
                    f"UPDATE tasks SET {', '.join(assignments)} WHERE task_id = ?",  # noqa: S608
                    (*values, task_id),
                )
                self._conn.execute(
                    "UPDATE status_history SET end_timestamp = ?"
                    " WHERE task_id = ? AND end_timestamp IS NULL",
                    (now, task_id),
                )
                self._add_history(task_id, status, now, description, machine_id)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return Transition(True, status)

    def _add_history(
        self,
        task_id: str,
        status: TaskStatusCode,
        timestamp: str,
        description: str,
        machine_id: str | None = None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO status_history (task_id, status, timestamp, description, machine_id)"
            " VALUES (?, ?, ?, ?, ?)",
            (task_id, status.value, timestamp, description, machine_id),
        )

    def update_fields(self, task_id: str, fields: Mapping[str, Any]) -> None:
        """Set columns without a status change (e.g. the pid of the running command)."""
        unknown = set(fields) - _SETTABLE
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)}")
        if not fields:
            return
        assignments = [f"{column} = ?" for column in fields]
        values = [json.dumps(v) if c in _JSON_COLUMNS else v for c, v in fields.items()]
        with self._lock:
            self._conn.execute(
                f"UPDATE tasks SET {', '.join(assignments)} WHERE task_id = ?",  # noqa: S608
                (*values, task_id),
            )

    def start_operation(self, task_id: str, name: str, attributes: Mapping[str, Any]) -> int:
        """Open a RUNNING operation under the task's current history entry; return its id."""
        now = format_time(now_utc())
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                history = self._conn.execute(
                    "SELECT id FROM status_history WHERE task_id = ? ORDER BY id DESC LIMIT 1",
                    (task_id,),
                ).fetchone()
                cursor = self._conn.execute(
                    "INSERT INTO operations (task_id, history_id, name, start_timestamp, status,"
                    " attributes) VALUES (?, ?, ?, ?, 'RUNNING', ?)",
                    (task_id, history["id"], name, now, json.dumps(dict(attributes))),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def end_operation(
        self, op_id: int, ok: bool, attributes: Mapping[str, Any] | None = None
    ) -> None:
        now = format_time(now_utc())
        with self._lock:
            if attributes:
                row = self._conn.execute(
                    "SELECT attributes FROM operations WHERE id = ?", (op_id,)
                ).fetchone()
                merged = {**json.loads(row["attributes"]), **attributes}
                self._conn.execute(
                    "UPDATE operations SET attributes = ? WHERE id = ?", (json.dumps(merged), op_id)
                )
            self._conn.execute(
                "UPDATE operations SET end_timestamp = ?, status = ? WHERE id = ?",
                (now, "OK" if ok else "FAILED", op_id),
            )

    def fail_running_operations(self, task_id: str) -> None:
        """Close operations a crash left RUNNING (restart recovery)."""
        now = format_time(now_utc())
        with self._lock:
            self._conn.execute(
                "UPDATE operations SET end_timestamp = ?, status = 'FAILED'"
                " WHERE task_id = ? AND status = 'RUNNING'",
                (now, task_id),
            )

    # -- reads ---------------------------------------------------------------------------------

    def get_task(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return _row(row) if row is not None else None

    def get_history(self, task_id: str) -> list[dict[str, Any]]:
        """History entries, oldest first, each with its ``operations`` list."""
        with self._lock:
            return self._history(task_id)

    def _history(self, task_id: str) -> list[dict[str, Any]]:
        entries = self._conn.execute(
            "SELECT * FROM status_history WHERE task_id = ? ORDER BY id", (task_id,)
        ).fetchall()
        ops = self._conn.execute(
            "SELECT * FROM operations WHERE task_id = ? ORDER BY id", (task_id,)
        ).fetchall()
        by_entry: dict[int, list[dict[str, Any]]] = {}
        for op in ops:
            item = dict(op)
            item["attributes"] = json.loads(item["attributes"])
            by_entry.setdefault(item["history_id"], []).append(item)
        return [{**dict(e), "operations": by_entry.get(e["id"], [])} for e in entries]

    def list_tasks(
        self, *, offset: int, limit: int, status: str | None = None, project: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """``(total matching, one page newest first)``."""
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if project is not None:
            where.append("project = ?")
            params.append(project)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._conn.execute(
                f"SELECT COUNT(*) FROM tasks {clause}",  # noqa: S608
                params,
            ).fetchone()[0]
            rows = self._conn.execute(
                f"SELECT * FROM tasks {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",  # noqa: S608
                (*params, limit, offset),
            ).fetchall()
        return total, [_row(r) for r in rows]

    def queued(self, limit: int) -> list[str]:
        """Ids of ``submitted`` tasks in queue order (input submission time, then creation)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT task_id FROM tasks WHERE status = ?"
                " ORDER BY input_submit_time, seq LIMIT ?",
                (TaskStatusCode.SUBMITTED.value, limit),
            ).fetchall()
        return [r["task_id"] for r in rows]

    def tasks_ahead(self, task_id: str) -> int | None:
        """How many queued tasks will start before ``task_id``; ``None`` if it is not queued."""
        with self._lock:
            row = self._conn.execute(
                "SELECT status, input_submit_time, seq FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None or row["status"] != TaskStatusCode.SUBMITTED.value:
                return None
            ahead = self._conn.execute(
                "SELECT COUNT(*) FROM tasks WHERE status = ? AND"
                " (input_submit_time < ? OR (input_submit_time = ? AND seq < ?))",
                (
                    TaskStatusCode.SUBMITTED.value,
                    row["input_submit_time"],
                    row["input_submit_time"],
                    row["seq"],
                ),
            ).fetchone()[0]
        return int(ahead)

    def in_status(self, statuses: Iterable[TaskStatusCode]) -> list[dict[str, Any]]:
        values = [s.value for s in statuses]
        marks = ", ".join("?" for _ in values)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM tasks WHERE status IN ({marks}) ORDER BY seq",  # noqa: S608
                values,
            ).fetchall()
        return [_row(r) for r in rows]

    def upload_refusal(self, path: str) -> str | None:
        """Why an upload to storage ``path`` is refused, or ``None``. A task's storage holds
        its ``input.zip`` (uploaded by its submitter) and its ``output.zip`` (the service's):
        nothing else may be written inside it, over it, or in place of its directory."""
        with self._lock:
            row = self._conn.execute(
                "SELECT storage_path FROM tasks"
                " WHERE storage_path = ?1"
                " OR substr(?1, 1, length(storage_path) + 1) = storage_path || '/'"
                " OR substr(storage_path, 1, length(?1) + 1) = ?1 || '/'"
                " LIMIT 1",
                (path,),
            ).fetchone()
        if row is None:
            return None
        owner = row["storage_path"]
        if path == f"{owner}/input.zip":
            return None
        if path == f"{owner}/output.zip":
            return f"{path} is a task output and cannot be overwritten"
        return f"{path} would overwrite or enter the storage of a task ({owner})"

    def get_task_with_history(
        self, task_id: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The task and its history read together (one lock: no state change in between)."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            return _row(row), self._history(task_id)


def _row(row: sqlite3.Row) -> dict[str, Any]:
    item = dict(row)
    for column in _JSON_COLUMNS:
        if item.get(column) is not None:
            item[column] = json.loads(item[column])
    return item
