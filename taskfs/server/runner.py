"""Runs tasks of the embedded service as local processes.

Owns: the queue (``submitted`` tasks, oldest input first), N slots, each task's life from
``started`` to its end, kills, time-to-live, and recovery after a restart.

A task's life (TASK_API.md section 2)::

    submitted -> started -> computation-started -> computation-ended -> success | failed
                        \\-> (kill) pending-kill -> killed      (TTL) -> ttl-exceeded

Must stay true:
* every status change goes through ``Store.transition`` with the statuses it expects, so a kill
  racing with the end of a task resolves to exactly one outcome; a kill that arrives once the
  commands have ended (``computation-ended``, outputs being packed) changes nothing, and the
  task keeps its real end state;
* the output archive is written before the final status: ``is_terminated`` implies the
  archive exists, for failed, killed and recovered tasks too; the working directory is deleted
  only after the archive is in place;
* nothing one task does stops the runner: an exception while running or ending a task ends
  that task as ``executer-failed`` with the reason in ``error_detail`` (``_end_safely``), and
  recovery after a restart ends every leftover task the same way, one failure or not;
* each command runs as ``sh -c`` under its own supervisor (``reaper.py``, a child subreaper in
  a new session) in the task's working directory, stdin from ``/dev/null``, stdout/stderr
  appended to ``stdout.txt``/``stderr.txt``. No process a command starts outlives it, even one
  that calls ``setsid`` or daemonizes: when the command ends, or is ended (kill, TTL,
  shutdown: SIGTERM, SIGKILL after the grace period), or the service dies, the supervisor
  kills every descendant before it exits;
* a service stopped or crashed under running tasks leaves them to ``recover()``: on the next
  start whatever is left of them is killed, their partial outputs packed, and they end as
  ``executer-terminated`` (``killed`` if a kill was pending); queued tasks stay queued.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio

from taskfs.api.models import KILLABLE, TaskStatusCode, format_time, now_utc
from taskfs.config import ServiceSettings
from taskfs.mounts import mount_points_under
from taskfs.packing import REPORT_NAME, PackingCancelled
from taskfs.proc import helpers
from taskfs.server.reaper import children, freeze
from taskfs.server.storage import OutputStats, Storage
from taskfs.server.store import Store

log = logging.getLogger(__name__)
S = TaskStatusCode

RUNNING = frozenset({S.STARTED, S.COMPUTATION_STARTED, S.COMPUTATION_ENDED})
StatusHook = Callable[[str, TaskStatusCode], Awaitable[None]]
# Environment variables never passed to task commands (nor any TASKFS_* of the service).
_SECRET_ENV = ("INDUCTIVA_API_KEY",)
# Every process of a task carries this variable (unless it clears its environment).
TASK_ENV = "TASKFS_TASK_ID"
# Packing issues logged one by one per task (all of them are in the archive's report).
_LOGGED_ISSUES = 100
# The supervisor every command runs under (a script: standard library only, quick to start).
REAPER = Path(__file__).with_name("reaper.py")
# How often a service that adopts orphans looks for them (also after every command).
_SWEEP_INTERVAL = 2.0
_OUTCOMES = frozenset({S.SUCCESS.value, S.FAILED.value, S.TTL_EXCEEDED.value})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OUTPUT_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
)


@dataclass
class _Running:
    """In-memory handle of a task that holds a slot."""

    task_id: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    kill_requested: bool = False
    supervisor: int | None = None  # pid of the running command's supervisor


class _Stopping(Exception):  # noqa: N818 - not an error: the service is stopping
    """Packing was abandoned because the service stops; recovery ends the task later."""


class _CommandError(Exception):
    """A command could not be started (its output files are unusable, its working directory
    gone): the task fails with this message."""


class Runner:
    """The queue and the slots. Start with ``await nursery.start(runner.run)``."""

    def __init__(
        self,
        settings: ServiceSettings,
        store: Store,
        storage: Storage,
        hook: StatusHook | None = None,
    ) -> None:
        self.settings = settings
        # Awaited after each status change the runner makes (tests hold tasks in a state).
        self._hook = hook
        self.store = store
        self.storage = storage
        self._running: dict[str, _Running] = {}
        # Working directories of the tasks whose commands run now (read by the live channel's
        # threads: only ever assigned and popped here, in trio).
        self.computing: dict[str, Path] = {}
        self._recovering: set[str] = set()
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._machine = _machine_facts(settings)
        # Set when the service stops: packing in progress is abandoned (read from threads).
        self._stopping = False
        # Commands being started right now (their supervisor's pid is not known yet).
        self._spawning = 0

    # -- public --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Schedule queued tasks until cancelled; tasks a previous run left running are ended
        in the background meanwhile (``recover``), so the service answers at once."""
        leftovers = await self.store.call(self.store.in_status, RUNNING | {S.PENDING_KILL})
        self._recovering = {task["task_id"] for task in leftovers}
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for task in leftovers:
                nursery.start_soon(self._recover_one, task)
            if self.settings.adopt_orphans:
                nursery.start_soon(self._sweep_periodically)
            task_status.started()
            try:
                while True:
                    wakeup = self._wakeup = trio.Event()
                    await self._fill_slots()
                    await wakeup.wait()
            finally:
                self._stopping = True  # before the nursery waits for packing in progress

    def wake(self) -> None:
        """Tell the scheduler that the queue may have changed."""
        self._wakeup.set()

    async def kill(self, task_id: str) -> TaskStatusCode | None:
        """Kill a task; returns its status afterwards (unchanged when it is not killable)."""
        for _ in range(100):  # each round is a conditional transition that lost a race
            task = await self.store.call(self.store.get_task, task_id)
            if task is None:
                return None
            status = S(task["status"])
            if status not in KILLABLE:
                return status
            running = self._running.get(task_id)
            if running is not None:
                if status == S.COMPUTATION_ENDED:
                    # The commands have ended and the outputs are being packed: there is
                    # nothing left to kill, and the task keeps its real end state.
                    return status
                result = await self.store.call(
                    self.store.transition,
                    task_id,
                    S.PENDING_KILL,
                    "Kill requested by the user",
                    expect={S.STARTED, S.COMPUTATION_STARTED},
                )
                if result.done:
                    running.kill_requested = True
                    running.scope.cancel()
                    return S.PENDING_KILL
                continue  # it moved on (ended, or a concurrent kill): look again
            if status in RUNNING:
                # Not ours: a task a previous run left running, being ended right now.
                return status
            # Not holding a slot: pending-input or submitted. Claim it for the kill.
            result = await self.store.call(
                self.store.transition,
                task_id,
                S.PENDING_KILL,
                "Kill requested by the user",
                expect={S.PENDING_INPUT, S.SUBMITTED},
            )
            if not result.done:
                continue
            await self._finish(task_id, S.KILLED, "Killed before it started", {S.PENDING_KILL})
            self.wake()
            return S.KILLED
        raise RuntimeError(f"kill of task {task_id} kept racing with its state changes")

    async def recover(self) -> None:
        """End every task a previous run of the service left running (``run`` does this in
        the background; see the module docstring)."""
        leftovers = await self.store.call(self.store.in_status, RUNNING | {S.PENDING_KILL})
        for task in leftovers:
            await self._recover_one(task)

    async def _recover_one(self, task: dict[str, Any]) -> None:
        task_id = task["task_id"]
        status = S(task["status"])
        outcome = task.get("outcome")
        if status == S.PENDING_KILL:
            final, why = S.KILLED, "Killed; the service restarted before the kill completed"
        elif status == S.COMPUTATION_ENDED and outcome in _OUTCOMES:
            final, why = S(outcome), "The commands had ended; outputs packed after a restart"
        else:
            final, why = S.EXECUTER_TERMINATED, "The service stopped while the task was running"
        log.info("recovering task %s as %s", task_id, final)
        try:
            await self._end_safely(task_id, final, why, {status}, leftover=task)
        finally:
            self._recovering.discard(task_id)

    # -- scheduling ----------------------------------------------------------------------------

    async def _fill_slots(self) -> None:
        assert self._nursery is not None
        free = self.settings.slots - len(self._running)
        if free <= 0:
            return
        for task_id in await self.store.call(self.store.queued, free):
            running = _Running(task_id)
            self._running[task_id] = running  # before the claim: kill() must find it
            result = await self.store.call(
                self.store.transition,
                task_id,
                S.STARTED,
                "A local machine took the task",
                expect={S.SUBMITTED},
                fields={
                    "start_time": format_time(now_utc()),
                    "executer": {**self._machine, "uuid": str(uuid.uuid4())},
                },
                machine_id=self._machine["vm_name"],
            )
            if not result.done:
                del self._running[task_id]
                continue
            self._nursery.start_soon(self._run_task, running)

    async def _run_task(self, running: _Running) -> None:
        task_id = running.task_id
        try:
            await self._run_task_steps(running)
        except Exception as exc:
            log.exception("task %s failed inside the runner", task_id)
            await self._end_safely(
                task_id,
                S.EXECUTER_FAILED,
                "Internal error of the local runner",
                set(RUNNING | {S.PENDING_KILL}),
                detail=f"internal error of the local runner: {exc!r}",
            )
        finally:
            del self._running[task_id]
            self.wake()

    async def _end_safely(
        self,
        task_id: str,
        status: TaskStatusCode,
        description: str,
        expect: set[TaskStatusCode],
        *,
        leftover: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        """End a task whatever goes wrong on the way; never raises (but Cancelled).

        ``leftover``: the stored record of a task a previous run left running, whose
        processes are killed first. ``detail``: why it ends so (``error_detail``).
        """
        try:
            if leftover is not None:
                await trio.to_thread.run_sync(
                    _kill_leftover, task_id, leftover.get("pid"), leftover.get("pid_start")
                )
                await self.store.call(self.store.fail_running_operations, task_id)
            await self._finish(task_id, status, description, expect, detail)
            return
        except _Stopping:
            return  # the service stops: recovery at the next start ends the task
        except Exception as exc:
            log.exception("ending task %s as %s failed", task_id, status)
            detail = f"the local runner could not end the task: {exc!r}"
        try:
            with trio.CancelScope(shield=True):
                await self.store.call(
                    self.store.transition,
                    task_id,
                    S.EXECUTER_FAILED,
                    "Internal error of the local runner",
                    expect=set(expect | RUNNING | {S.PENDING_KILL}),
                    fields={"end_time": format_time(now_utc()), "error_detail": detail},
                )
        except Exception:
            log.exception("task %s could not be marked %s", task_id, S.EXECUTER_FAILED)

    async def _run_task_steps(self, running: _Running) -> None:
        task_id = running.task_id
        task = await self.store.call(self.store.get_task, task_id)
        assert task is not None
        ttl = task.get("ttl_seconds")
        if ttl:
            running.scope.deadline = trio.current_time() + float(ttl)
        work_dir = self.settings.work_dir / task_id
        outcome = S.FAILED
        try:
            with running.scope:
                outcome = await self._execute(task, work_dir, running)
        finally:
            self.computing.pop(task_id, None)
        try:
            if running.kill_requested:
                await self._finish(task_id, S.KILLED, "Killed by the user", {S.PENDING_KILL})
                return
            if running.scope.cancelled_caught:
                outcome = S.TTL_EXCEEDED
            ended = await self.store.call(
                self.store.transition,
                task_id,
                S.COMPUTATION_ENDED,
                "Commands finished; packing outputs",
                expect={S.STARTED, S.COMPUTATION_STARTED},
                fields={
                    "computation_end_time": format_time(now_utc()),
                    "outcome": outcome.value,
                },
            )
            if not ended.done and ended.status == S.PENDING_KILL:
                await self._finish(task_id, S.KILLED, "Killed by the user", {S.PENDING_KILL})
                return
            await self._after(task_id, S.COMPUTATION_ENDED)
            reason = {
                S.SUCCESS: "All commands succeeded",
                S.FAILED: "A command failed",
                S.TTL_EXCEEDED: f"Time to live of {ttl} s exceeded",
            }[outcome]
            await self._finish(task_id, outcome, reason, {S.COMPUTATION_ENDED})
        except _Stopping:
            pass  # the service stops while packing: recovery at the next start ends the task

    async def _after(self, task_id: str, status: TaskStatusCode) -> None:
        if self._hook is not None:
            await self._hook(task_id, status)

    async def _execute(
        self, task: dict[str, Any], work_dir: Path, running: _Running
    ) -> TaskStatusCode:
        """Unpack the input and run the commands; SUCCESS or FAILED (cancellable)."""
        task_id = task["task_id"]
        await self._after(task_id, S.STARTED)
        await trio.to_thread.run_sync(work_dir.mkdir, 0o755, True, True)
        input_path = f"{task['storage_path']}/input.zip"
        op = await self.store.call(self.store.start_operation, task_id, "uncompress_input", {})
        try:
            await trio.to_thread.run_sync(_unpack_input, self.storage.resolve(input_path), work_dir)
        except Exception as exc:  # whatever is wrong with the user's archive: the task fails
            await self.store.call(self.store.end_operation, op, False, {"error": str(exc)})
            await self.store.call(
                self.store.update_fields, task_id, {"error_detail": f"bad input: {exc}"}
            )
            return S.FAILED
        await self.store.call(self.store.end_operation, op, True)
        started = await self.store.call(
            self.store.transition,
            task_id,
            S.COMPUTATION_STARTED,
            "Running commands",
            expect={S.STARTED},
            fields={"computation_start_time": format_time(now_utc())},
        )
        if not started.done:
            return S.FAILED
        self.computing[task_id] = work_dir
        await self._after(task_id, S.COMPUTATION_STARTED)
        commands = (task["request"].get("extra_params") or {}).get("commands") or []
        for command in commands:
            cmd = command["cmd"] if isinstance(command, dict) else str(command)
            op = await self.store.call(
                self.store.start_operation, task_id, "exec_command", {"command": cmd}
            )
            try:
                code = await self._run_command(running, cmd, work_dir)
            except _CommandError as exc:
                await self.store.call(self.store.end_operation, op, False, {"error": str(exc)})
                await self.store.call(self.store.update_fields, task_id, {"error_detail": str(exc)})
                return S.FAILED
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.store.call(self.store.end_operation, op, False)
                raise
            await self.store.call(self.store.end_operation, op, code == 0, {"exit_code": code})
            if code != 0:
                await self.store.call(
                    self.store.update_fields,
                    task_id,
                    {"error_detail": f"command exited with status {code}: {cmd}"},
                )
                return S.FAILED
        return S.SUCCESS

    async def _run_command(self, running: _Running, cmd: str, work_dir: Path) -> int:
        """Run one command under its supervisor; its exit status. ``_CommandError`` when it
        cannot start (the working directory or its output files were tampered with, or the
        system refuses the command)."""
        if "\0" in cmd:
            raise _CommandError("cannot run a command that contains a NUL character")
        env = {k: v for k, v in os.environ.items() if _passed_on(k)}
        env[TASK_ENV] = running.task_id  # lets recovery find what a crash left running
        grace = self.settings.kill_grace_seconds
        argv = [sys.executable, "-I", "-S", str(REAPER), f"{grace:g}", "--", "/bin/sh", "-c", cmd]
        out, err = await trio.to_thread.run_sync(_open_outputs, work_dir)
        self._spawning += 1
        try:
            proc = await trio.lowlevel.open_process(
                argv,
                cwd=work_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            raise _CommandError(f"cannot start the command: {exc}") from None
        finally:
            self._spawning -= 1
            os.close(out)
            os.close(err)
        running.supervisor = proc.pid
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_keep_going, proc)
                await self.store.call(
                    self.store.update_fields,
                    running.task_id,
                    {"pid": proc.pid, "pid_start": _process_start(proc.pid)},
                )
                try:
                    await _exited(proc)
                except BaseException:  # cancelled: kill, TTL or shutdown
                    with trio.CancelScope(shield=True):
                        await _terminate(proc, grace)
                    raise
                nursery.cancel_scope.cancel()
        finally:
            running.supervisor = None
            _killpg(proc.pid, signal.SIGKILL)  # in case the supervisor itself was killed
            if self.settings.adopt_orphans:
                self._sweep()
        assert proc.returncode is not None
        return proc.returncode

    # -- orphans -------------------------------------------------------------------------------

    async def _sweep_periodically(self) -> None:
        while True:
            await trio.sleep(_SWEEP_INTERVAL)
            self._sweep()

    def _sweep(self) -> None:
        """Kill and reap the processes this service adopted (it is a child subreaper): what
        is left of a command whose supervisor was killed. Our other children are the commands'
        supervisors and the live channel's helpers (``top``: ``proc.helpers``)."""
        own = helpers()
        if self._spawning or own is None:
            return  # a child whose pid we do not know yet may be among our children
        supervisors = {r.supervisor for r in self._running.values() if r.supervisor} | own
        for _ in range(100):
            adopted = [pid for pid in children(os.getpid()) if pid not in supervisors]
            if not adopted:
                return
            alive = [pid for pid in adopted if not _is_zombie(pid)]
            if alive:
                log.warning("killing processes left behind by a task's command: %s", alive)
                for pid in freeze(alive):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            for pid in adopted:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    # -- the end -------------------------------------------------------------------------------

    async def _finish(
        self,
        task_id: str,
        status: TaskStatusCode,
        description: str,
        expect: set[TaskStatusCode],
        detail: str | None = None,
    ) -> bool:
        """Pack outputs, then move to the terminal ``status``. Shielded: an end always ends,
        unless the service stops while the outputs are packed (``_Stopping``)."""
        with trio.CancelScope(shield=True):
            done = await self._finish_unshielded(task_id, status, description, expect, detail)
        return done

    async def _finish_unshielded(
        self,
        task_id: str,
        status: TaskStatusCode,
        description: str,
        expect: set[TaskStatusCode],
        detail: str | None,
    ) -> bool:
        task = await self.store.call(self.store.get_task, task_id)
        assert task is not None
        if S(task["status"]) not in expect:
            return False
        work_dir = self.settings.work_dir / task_id
        op = await self.store.call(self.store.start_operation, task_id, "compress_output", {})
        stats, failure = await self._pack(task_id, work_dir, f"{task['storage_path']}/output.zip")
        attributes: dict[str, Any] = {}
        if stats.issues:
            attributes["report"] = [issue.line() for issue in stats.issues[:_LOGGED_ISSUES]]
        if failure is not None:
            attributes["error"] = failure
        await self.store.call(self.store.end_operation, op, failure is None, attributes)
        end = now_utc()
        fields: dict[str, Any] = {
            "end_time": format_time(end),
            "pid": None,
            "pid_start": None,
            "metrics": _metrics(task, end, stats),
        }
        if detail is not None:
            fields["error_detail"] = detail
        if failure is not None:
            status, description = S.EXECUTER_FAILED, "Packing the outputs failed"
            fields["error_detail"] = failure
        if task.get("computation_start_time") and not task.get("computation_end_time"):
            fields["computation_end_time"] = format_time(end)
        result = await self.store.call(
            self.store.transition, task_id, status, description, expect=expect, fields=fields
        )
        if result.done and failure is None:
            await trio.to_thread.run_sync(_remove_work_dir, work_dir)
        return result.done

    async def _pack(
        self, task_id: str, work_dir: Path, output: str
    ) -> tuple[OutputStats, str | None]:
        """Pack the outputs: their stats, and ``None`` or why packing failed.

        Packing itself never fails for what a task leaves behind (see ``taskfs.packing``);
        if it fails anyway (disk full, a bug), the working directory is kept, an empty
        archive is written in its place if possible, and the reason is returned. When the
        service stops meanwhile, packing is abandoned and ``_Stopping`` raised.
        """
        try:
            stats = await trio.to_thread.run_sync(
                partial(self.storage.pack_outputs, work_dir, output, lambda: self._stopping)
            )
        except PackingCancelled:
            log.info("the service stops: packing %s abandoned until the next start", task_id)
            raise _Stopping from None
        except Exception as exc:
            log.exception("packing outputs of %s failed; keeping %s", task_id, work_dir)
            failure = f"packing the outputs failed ({exc}); the working directory is kept"
        else:
            for issue in stats.issues[:_LOGGED_ISSUES]:
                log.info("packing %s: %s", task_id, issue.line())
            if stats.issues:
                log.warning(
                    "packing %s: %d entries not archived as found (see %s in its outputs)",
                    task_id,
                    len(stats.issues),
                    REPORT_NAME,
                )
            return stats, None
        try:
            await trio.to_thread.run_sync(self.storage.pack_outputs, None, output)
        except Exception:
            log.exception("writing an empty output archive for %s failed", task_id)
        return OutputStats(0, 0, 0), failure


def _metrics(task: dict[str, Any], end: datetime, stats: OutputStats) -> dict[str, float]:
    def t(name: str) -> datetime | None:
        value = task.get(name)
        return datetime.fromisoformat(value) if value else None

    metrics: dict[str, float] = {
        "output_size_bytes": stats.size_bytes,
        "output_total_files": stats.total_files,
        "output_zipped_size_bytes": stats.zipped_size_bytes,
    }
    if (created := t("create_time")) is not None:
        metrics["total_seconds"] = (end - created).total_seconds()
    submitted, started = t("input_submit_time"), t("start_time")
    if submitted is not None and started is not None:
        metrics["queue_time_seconds"] = (started - submitted).total_seconds()
    computing = t("computation_start_time")
    if computing is not None:
        computed = t("computation_end_time") or end
        metrics["computation_seconds"] = (computed - computing).total_seconds()
    if "input_size_bytes" in task.get("metrics", {}):
        metrics["input_size_bytes"] = task["metrics"]["input_size_bytes"]
    return metrics


def _machine_facts(settings: ServiceSettings) -> dict[str, Any]:
    return {
        "cpu_count_logical": psutil.cpu_count(logical=True) or 1,
        "cpu_count_physical": psutil.cpu_count(logical=False) or 1,
        "memory": psutil.virtual_memory().total,
        "n_mpi_hosts": 1,
        "vm_type": settings.vm_type,
        "vm_name": platform.node() or "localhost",
        "host_type": "LOCAL",
        "error_detail": None,
    }


def _unpack_input(archive: Path, work_dir: Path) -> None:
    """Extract ``sim_dir/...`` of the input archive into ``work_dir`` (no archive: nothing)."""
    if not archive.exists():
        return
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not info.filename.startswith("sim_dir/") or info.filename == "sim_dir/":
                continue
            rel = info.filename[len("sim_dir/") :]
            target = (work_dir / rel).resolve()
            if work_dir.resolve() not in target.parents:
                raise ValueError(f"input member escapes the working directory: {info.filename}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode | 0o600)


def _open_outputs(work_dir: Path) -> tuple[int, int]:
    """``stdout.txt`` and ``stderr.txt`` of ``work_dir`` opened for appending (blocking).

    Never blocks and never writes through a link: a task may have left a FIFO, a directory or a
    symbolic link under those names, or replaced its working directory itself.
    """
    try:
        st = os.lstat(work_dir)
    except OSError as exc:
        raise _CommandError(f"the working directory is gone: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _CommandError("the working directory was replaced by something else")
    fds: list[int] = []
    try:
        for name in ("stdout.txt", "stderr.txt"):
            try:
                fd = os.open(work_dir / name, _OUTPUT_FLAGS, 0o644)
            except OSError as exc:
                raise _CommandError(f"cannot write the output to {name}: {exc.strerror}") from None
            fds.append(fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _CommandError(f"cannot write the output to {name}: not a regular file")
            if st.st_nlink != 1:  # a hard link to a file elsewhere: never append there
                raise _CommandError(f"cannot write the output to {name}: it has other links")
            os.set_blocking(fd, True)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], fds[1]


def _remove_work_dir(work_dir: Path) -> None:
    """Delete a task's working directory, whatever the task did to it: modes taken away, the
    directory swapped for a link, trees deeper than ``PATH_MAX``, and filesystems mounted in
    it (never entered: what is mounted there is not the task's to lose; left, and logged)."""
    if work_dir.is_symlink():
        work_dir.unlink()
        return
    with contextlib.suppress(OSError):
        os.chmod(work_dir, 0o700)
    try:
        fd = os.open(work_dir, _DIR_FLAGS | os.O_NOFOLLOW)
        names = iter(sorted(os.listdir(fd)))
    except OSError:
        return
    root = os.fstat(fd)
    real = os.path.realpath(work_dir)
    mounts = mount_points_under(real)
    # One directory descriptor at a time; per level entered: its name, stat, remaining names.
    levels: list[tuple[str, os.stat_result, Iterator[str]]] = []
    left: list[str] = []

    def where(name: str) -> str:
        return "/".join([*(level[0] for level in levels), name])

    while True:
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            mounted = st.st_dev != root.st_dev or f"{real}/{where(name)}" in mounts
            if mounted:
                left.append(where(name))
            elif not stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
            else:
                with contextlib.suppress(OSError):
                    os.chmod(name, 0o700, dir_fd=fd, follow_symlinks=False)
                try:
                    child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                    child_names = iter(sorted(os.listdir(child)))
                except OSError:
                    left.append(where(name))
                    continue
                levels.append((name, st, names))
                os.close(fd)
                fd, names = child, child_names
                break
        else:  # this directory is done: back up to its parent and remove it
            if not levels:
                break
            done, _, names = levels.pop()
            try:
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            finally:
                os.close(fd)
            fd = up
            expected = levels[-1][1] if levels else root
            found = os.fstat(fd)
            if (found.st_dev, found.st_ino) != (expected.st_dev, expected.st_ino):
                left.append("(the tree moved while it was removed)")
                break
            with contextlib.suppress(OSError):
                os.rmdir(done, dir_fd=fd)
    os.close(fd)
    if left:
        log.warning("left in %s: %s (mounted there, or not removable)", work_dir, left[:10])
        return
    with contextlib.suppress(OSError):
        os.rmdir(work_dir)


def _passed_on(variable: str) -> bool:
    """Whether a variable of the service's environment is passed on to task commands."""
    return variable not in _SECRET_ENV and not variable.startswith("TASKFS_")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def _tagged(task_id: str) -> list[int]:
    """Processes (of this user) whose environment carries the task's tag."""
    tag = f"{TASK_ENV}={task_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


async def _exited(proc: trio.Process) -> None:
    """Wait until ``proc`` has exited and been reaped, without blocking the loop.

    Not ``Process.wait``: that ends in a blocking ``waitpid`` in the event loop, and a process
    that has exited while a ptrace tracer holds it (a task attaching to its supervisor) cannot
    be reaped until the tracer lets go: the whole service would hang meanwhile.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
    while proc.poll() is None:  # noqa: ASYNC110 - waitpid(WNOHANG): no event says "reapable"
        await trio.sleep(0.05)


async def _keep_going(proc: trio.Process) -> None:
    """Resume a supervisor that something stopped (SIGSTOP from its own task), once a second,
    until it exits: a stopped supervisor would hold the task forever."""
    async with trio.open_nursery() as nursery:

        async def ended() -> None:
            await _exited(proc)
            nursery.cancel_scope.cancel()

        nursery.start_soon(ended)
        while True:
            await trio.sleep(1)
            try:
                with open(f"/proc/{proc.pid}/stat", "rb") as f:  # noqa: ASYNC230 - procfs
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state in (b"T", b"t"):
                log.info("supervisor %d was stopped; resuming it", proc.pid)
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGCONT)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _terminate(proc: trio.Process, grace: float) -> None:
    """``deliver_cancel`` for commands: SIGTERM to the supervisor, which passes it to every
    process of the command and kills what is left after ``grace``; SIGKILL to its group if
    it has not ended a few seconds after that."""
    with contextlib.suppress(OSError):
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)  # a stopped supervisor must see the SIGTERM
    with trio.move_on_after(grace + 5):
        await _exited(proc)
        return
    log.warning("the supervisor of process group %d did not end; killing the group", proc.pid)
    _killpg(proc.pid, signal.SIGKILL)
    with trio.move_on_after(5):  # its orphans go to the service, which kills them
        await _exited(proc)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to recognise it after a restart), if known."""
    try:
        return str(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _kill_leftover(task_id: str, pid: int | None, started: str | None) -> None:
    """Kill what a task's command left when the service crashed (blocking).

    A supervisor kills its command's processes by itself when the service dies; this is the
    net under that, for a supervisor that was stopped or killed at the time. The supervisor
    (its pid and start time recorded, so a reused pid is never signalled) and every process
    still carrying the task's ``TASKFS_TASK_ID`` are frozen, then killed.
    """
    targets = _tagged(task_id)
    if pid:
        try:
            same = str(psutil.Process(pid).create_time()) == started
        except psutil.Error:
            same = False
        if same:
            targets.append(pid)
    if not targets:
        return
    log.info("killing what task %s left running: %s", task_id, sorted(targets))
    for victim in freeze(targets):
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)
