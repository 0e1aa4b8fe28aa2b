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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio

from taskfs.api.models import KILLABLE, TaskStatusCode, format_time, now_utc
from taskfs.config import ServiceSettings
from taskfs.packing import REPORT_NAME, PackingCancelled
from taskfs.server.reaper import descendants
from taskfs.server.storage import OutputStats, Storage
from taskfs.server.store import Store

log = logging.getLogger(__name__)
S = TaskStatusCode

RUNNING = frozenset({S.STARTED, S.COMPUTATION_STARTED, S.COMPUTATION_ENDED})
StatusHook = Callable[[str, TaskStatusCode], Awaitable[None]]
# Environment variables never passed to task commands.
_SECRET_ENV = ("INDUCTIVA_API_KEY",)
# Packing issues logged one by one per task (all of them are in the archive's report).
_LOGGED_ISSUES = 100
# The supervisor every command runs under (a script: standard library only, quick to start).
REAPER = Path(__file__).with_name("reaper.py")
# How often a service that adopts orphans looks for them (also after every command).
_SWEEP_INTERVAL = 2.0
_OUTCOMES = frozenset({S.SUCCESS.value, S.FAILED.value, S.TTL_EXCEEDED.value})
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
                    _kill_leftover, leftover.get("pid"), leftover.get("pid_start")
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
        with running.scope:
            outcome = await self._execute(task, work_dir, running)
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
        cannot start (the working directory or its output files were tampered with)."""
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        grace = self.settings.kill_grace_seconds
        argv = [sys.executable, "-I", "-S", str(REAPER), f"{grace:g}", "--", "/bin/sh", "-c", cmd]
        out, err = await trio.to_thread.run_sync(_open_outputs, work_dir)
        proc: trio.Process | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._spawning += 1
                try:
                    proc = await nursery.start(
                        partial(
                            trio.run_process,
                            argv,
                            cwd=work_dir,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=err,
                            env=env,
                            start_new_session=True,
                            check=False,
                            deliver_cancel=partial(_terminate, grace=grace),
                        )
                    )
                    assert proc is not None
                    running.supervisor = proc.pid
                finally:
                    self._spawning -= 1
                os.close(out)
                os.close(err)
                out = err = -1
                nursery.start_soon(_keep_going, proc)
                await self.store.call(
                    self.store.update_fields,
                    running.task_id,
                    {"pid": proc.pid, "pid_start": _process_start(proc.pid)},
                )
        finally:
            for fd in (out, err):
                if fd >= 0:
                    os.close(fd)
            running.supervisor = None
            if proc is not None:
                _killpg(proc.pid, signal.SIGKILL)  # in case the supervisor itself was killed
                if self.settings.adopt_orphans:
                    self._sweep()
        assert proc is not None and proc.returncode is not None
        return proc.returncode

    # -- orphans -------------------------------------------------------------------------------

    async def _sweep_periodically(self) -> None:
        while True:
            await trio.sleep(_SWEEP_INTERVAL)
            self._sweep()

    def _sweep(self) -> None:
        """Kill and reap the processes this service adopted (it is a child subreaper): what
        is left of a command whose supervisor was killed. Nothing else is our child."""
        if self._spawning:
            return  # a supervisor whose pid we do not know yet may be among our children
        supervisors = {r.supervisor for r in self._running.values() if r.supervisor}
        for pid, zombie in _children(os.getpid()):
            if pid in supervisors:
                continue
            if not zombie:
                log.warning("killing process %d, left behind by a task's command", pid)
                for descendant in [*descendants(pid), pid]:
                    with contextlib.suppress(OSError):
                        os.kill(descendant, signal.SIGKILL)
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
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _CommandError(f"cannot write the output to {name}: not a regular file")
            os.set_blocking(fd, True)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], fds[1]


def _remove_work_dir(work_dir: Path) -> None:
    """Delete a task's working directory, whatever the task did to it (modes, a link)."""
    if work_dir.is_symlink():
        work_dir.unlink()
        return

    def allow(function: Any, path: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            function(path)

    with contextlib.suppress(OSError):
        os.chmod(work_dir, 0o700)
    shutil.rmtree(work_dir, onerror=allow)


def _children(parent: int) -> list[tuple[int, bool]]:
    """``(pid, is_zombie)`` of the children of ``parent``, from ``/proc``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            found.append((int(name), fields[0] == b"Z"))
    return found


async def _keep_going(proc: trio.Process) -> None:
    """Resume a supervisor that something stopped (SIGSTOP from its own task), once a second,
    until it exits: a stopped supervisor would hold the task forever."""
    async with trio.open_nursery() as nursery:

        async def ended() -> None:
            await proc.wait()
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
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.kill(proc.pid, signal.SIGCONT)  # a stopped supervisor must see the SIGTERM
    with trio.move_on_after(grace + 5):
        await proc.wait()
        return
    log.warning("the supervisor of process group %d did not end; killing the group", proc.pid)
    _killpg(proc.pid, signal.SIGKILL)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to recognise it after a restart), if known."""
    try:
        return str(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _kill_leftover(pid: int | None, started: str | None) -> None:
    """Kill what a command a crashed service left behind, if its supervisor is still that one.

    A supervisor kills its command's processes by itself when the service dies; this is the
    net under that. The group's id is the supervisor's pid. While the supervisor lives, its
    start time tells it from a new process that reused the pid (SIGUSR1 asks it to kill every
    descendant at once); once it is gone, the pid cannot be handed out again while members of
    its group remain, so signalling the group cannot hit a stranger.
    """
    if not pid:
        return
    try:
        process = psutil.Process(pid)
        same = str(process.create_time()) == started
    except psutil.NoSuchProcess:
        same, process = True, None
    except psutil.Error:
        same, process = False, None
    if not same:
        return
    log.info("killing the leftover processes of group %d", pid)
    if process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGUSR1)
        with contextlib.suppress(psutil.Error):
            process.wait(timeout=5)
    _killpg(pid, signal.SIGKILL)
