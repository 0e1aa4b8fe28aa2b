"""The embedded service runs tasks through their whole life, kills them, enforces TTLs."""

from __future__ import annotations

import io
import itertools
import re
import sqlite3
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.api.submit import submit_task
from taskfs.errors import TaskEndedError
from taskfs.server.storage import Storage
from taskfs.server.store import Store
from tests.integration.conftest import Service
from tests.support import alive, wait_status

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


async def output_zip(api: ApiClient, task_id: str) -> zipfile.ZipFile:
    task = await api.get_task(task_id)
    assert task.storage_output_path is not None
    url = await api.download_url(task.storage_output_path, task.storage_region)
    async with httpx.AsyncClient() as plain:
        response = await plain.get(url)
    assert response.status_code == 200
    return zipfile.ZipFile(io.BytesIO(response.content))


def all_timestamps(value: object) -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and (key.endswith(("_time", "timestamp")) or key == "ts"):
                found.append(item)
            else:
                found.extend(all_timestamps(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(all_timestamps(item))
    return found


async def test_whole_lifecycle(api: ApiClient, http: httpx.AsyncClient, tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    (sim / "cfg").mkdir(parents=True)
    (sim / "cfg" / "params.txt").write_text("steps=3\n")
    task_id = await submit_task(
        api,
        [
            "cat cfg/params.txt",
            "mkdir -p vtk log && for i in 1 2 3; do echo $i > vtk/ParticleData_Fluid_$i.vtk; done",
            "echo warming >&2; echo done > log/SPH_log.txt",
        ],
        input_dir=sim,
        project="proj-a",
    )
    status = await wait_status(api, task_id)
    assert status.status == S.SUCCESS and status.is_terminated

    task = await api.get_task(task_id)
    assert task.project == "proj-a"
    assert task.status_alias == "Success"
    assert [h.status for h in task.status_history] == [
        S.PENDING_INPUT,
        S.SUBMITTED,
        S.STARTED,
        S.COMPUTATION_STARTED,
        S.COMPUTATION_ENDED,
        S.SUCCESS,
    ]
    # Each entry but the last is closed exactly when the next one opens.
    history = task.status_history
    for before, after in itertools.pairwise(history):
        assert before.end_timestamp == after.timestamp
    assert history[-1].end_timestamp is None
    commands = [op for h in history for op in h.operations if op.name == "exec_command"]
    assert commands[0].attributes["command"] == "cat cfg/params.txt"
    assert [op.status for op in commands] == ["OK", "OK", "OK"]
    assert all(op.start_timestamp and op.end_timestamp for op in commands)

    assert task.executer is not None
    assert task.executer.host_type == "LOCAL" and task.executer.vm_type == "test-vm"
    assert task.executer.cpu_count_logical >= 1 and task.executer.memory > 0
    m = task.metrics
    assert m.computation_seconds is not None and m.computation_seconds >= 0
    assert m.total_seconds is not None and m.queue_time_seconds is not None
    assert m.output_total_files == 7  # params, 3 vtk, log, stdout, stderr

    raw = (await http.get(f"/tasks/{task_id}")).json()
    assert raw["metrics"]["output_size_bytes"] == sum(
        i.file_size for i in (await output_zip(api, task_id)).infolist()
    )
    stamps = all_timestamps(raw)
    assert len(stamps) > 10 and all(TIMESTAMP.match(s) for s in stamps if s), stamps

    archive = await output_zip(api, task_id)
    names = archive.namelist()
    assert names[0] == "artifacts/"
    assert set(names) == {
        "artifacts/",
        "artifacts/cfg/params.txt",
        "artifacts/vtk/ParticleData_Fluid_1.vtk",
        "artifacts/vtk/ParticleData_Fluid_2.vtk",
        "artifacts/vtk/ParticleData_Fluid_3.vtk",
        "artifacts/log/SPH_log.txt",
        "artifacts/stdout.txt",
        "artifacts/stderr.txt",
    }
    assert archive.read("artifacts/stdout.txt") == b"steps=3\n"
    assert archive.read("artifacts/stderr.txt") == b"warming\n"
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist()[1:])
    assert archive.testzip() is None


async def test_stops_at_first_failing_command(api: ApiClient) -> None:
    task_id = await submit_task(api, ["echo one", "echo two >&2; exit 3", "echo never"])
    status = await wait_status(api, task_id)
    assert status.status == S.FAILED
    task = await api.get_task(task_id)
    ops = [op for h in task.status_history for op in h.operations if op.name == "exec_command"]
    assert [op.status for op in ops] == ["OK", "FAILED"]
    assert ops[1].attributes["exit_code"] == 3
    assert task.error_detail is not None and "status 3" in task.error_detail
    archive = await output_zip(api, task_id)
    assert archive.read("artifacts/stdout.txt") == b"one\n"
    assert archive.read("artifacts/stderr.txt") == b"two\n"


async def test_queue_position_and_order(tmp_path: Path, nursery: trio.Nursery) -> None:
    from tests.integration.conftest import start_service

    svc = await start_service(nursery, tmp_path / "d", slots=1)
    async with ApiClient.open(svc.client_settings) as api:
        blocker = await submit_task(api, ["sleep 30"])
        await wait_status(api, blocker, lambda s: s.status == S.COMPUTATION_STARTED)
        first = await submit_task(api, ["echo first"])
        second = await submit_task(api, ["echo second"])
        s1, s2 = await api.get_status(first), await api.get_status(second)
        assert s1.status == s2.status == S.SUBMITTED
        assert s1.position_in_queue is not None and s1.position_in_queue.tasks_ahead == 0
        assert s2.position_in_queue is not None and s2.position_in_queue.tasks_ahead == 1
        await api.kill(blocker)
        done1 = await wait_status(api, first)
        done2 = await wait_status(api, second)
        assert done1.status == done2.status == S.SUCCESS
        t1, t2 = await api.get_task(first), await api.get_task(second)
        assert t1.start_time is not None and t2.start_time is not None
        assert t1.start_time < t2.start_time


# -- kill --------------------------------------------------------------------------------------


async def test_kill_pending_input(api: ApiClient) -> None:
    response = await api.submit({"simulator": "x", "resource_pool": None, "container_image": None})
    killed = await api.kill(response.id)
    assert killed.status == S.KILLED and killed.is_terminated
    assert (await output_zip(api, response.id)).namelist() == ["artifacts/"]


async def test_kill_submitted(tmp_path: Path, nursery: trio.Nursery) -> None:
    from tests.integration.conftest import start_service

    svc = await start_service(nursery, tmp_path / "d", slots=1)
    async with ApiClient.open(svc.client_settings) as api:
        blocker = await submit_task(api, ["sleep 30"])
        await wait_status(api, blocker, lambda s: s.status == S.COMPUTATION_STARTED)
        queued = await submit_task(api, ["echo never"])
        assert (await api.get_status(queued)).status == S.SUBMITTED
        killed = await api.kill(queued)
        assert killed.status == S.KILLED
        task = await api.get_task(queued)
        assert task.start_time is None
        assert [h.status for h in task.status_history][-2:] == [S.PENDING_KILL, S.KILLED]
        await api.kill(blocker)
        await wait_status(api, blocker)


async def test_kill_when_started(api: ApiClient, service: Service) -> None:
    service.gate.hold(S.STARTED)
    task_id = await submit_task(api, ["echo ran"])
    await service.gate.reached(task_id, S.STARTED)
    assert (await api.get_status(task_id)).status == S.STARTED
    answer = await api.kill(task_id)
    assert answer.status == S.PENDING_KILL and not answer.is_terminated
    service.gate.release(S.STARTED)
    final = await wait_status(api, task_id)
    assert final.status == S.KILLED
    assert (await output_zip(api, task_id)).namelist()[0] == "artifacts/"


@pytest.mark.parametrize("outcome", [S.SUCCESS, S.FAILED])
async def test_kill_while_packing_keeps_the_real_end(
    api: ApiClient, service: Service, outcome: S
) -> None:
    """The commands have ended and the outputs are being packed: nothing is left to kill."""
    service.gate.hold(S.COMPUTATION_ENDED)
    command = "echo ran" if outcome == S.SUCCESS else "echo ran; exit 4"
    task_id = await submit_task(api, [command])
    await service.gate.reached(task_id, S.COMPUTATION_ENDED)
    answer = await api.kill(task_id)
    assert answer.status == S.COMPUTATION_ENDED and not answer.is_terminated
    with pytest.raises(TaskEndedError, match="finished computing"):
        await api.kill_running(task_id)
    service.gate.release(S.COMPUTATION_ENDED)
    final = await wait_status(api, task_id)
    assert final.status == outcome
    history = [h.status for h in (await api.get_task(task_id)).status_history]
    assert S.PENDING_KILL not in history and history[-1] == outcome
    assert (await output_zip(api, task_id)).read("artifacts/stdout.txt") == b"ran\n"


async def test_kill_running_terminates_process_group(api: ApiClient, service: Service) -> None:
    # The command starts a background child too: the whole group must go.
    task_id = await submit_task(api, ["sleep 60 & echo $! > child.pid; echo $$ > sh.pid; wait"])
    await wait_status(api, task_id, lambda s: s.status == S.COMPUTATION_STARTED)
    work = service.settings.work_dir / task_id
    with trio.fail_after(10):
        while not (work / "child.pid").exists() or not (work / "sh.pid").exists():
            await trio.sleep(0.02)
    pids = [int((work / n).read_text()) for n in ("child.pid", "sh.pid")]
    answer = await api.kill(task_id)
    assert answer.status == S.PENDING_KILL
    final = await wait_status(api, task_id)
    assert final.status == S.KILLED
    for pid in pids:
        assert not alive(pid), f"process {pid} survived the kill"
    task = await api.get_task(task_id)
    assert [h.status for h in task.status_history][-2:] == [S.PENDING_KILL, S.KILLED]
    ops = [op for h in task.status_history for op in h.operations if op.name == "exec_command"]
    assert ops[-1].status == "FAILED" and ops[-1].end_timestamp is not None


# Processes that leave the command's process group: setsid, and a double fork into a new
# session (a daemon). Each prints its pid to stdout.
ESCAPE = "setsid sleep 300 & echo $!; (setsid sh -c 'sleep 301 & echo $!' &); sleep 0.3"


@pytest.mark.parametrize("how", ["ends", "fails", "killed", "ttl"])
async def test_no_process_outlives_its_task(api: ApiClient, how: str) -> None:
    last = {"ends": "true", "fails": "exit 3", "killed": "sleep 60", "ttl": "sleep 60"}[how]
    ttl = 2.0 if how == "ttl" else None
    task_id = await submit_task(api, [ESCAPE, last], ttl_seconds=ttl)
    if how == "killed":
        await wait_status(api, task_id, lambda s: s.status == S.COMPUTATION_STARTED)
        await trio.sleep(1)
        await api.kill(task_id)
    final = await wait_status(api, task_id)
    expected = {"ends": S.SUCCESS, "fails": S.FAILED, "killed": S.KILLED, "ttl": S.TTL_EXCEEDED}
    assert final.status == expected[how]
    pids = [
        int(line) for line in (await output_zip(api, task_id)).read("artifacts/stdout.txt").split()
    ]
    assert len(pids) == 2
    # The end is reported only once every process the task started is gone.
    assert [pid for pid in pids if alive(pid)] == []


async def test_kill_escalates_to_sigkill_after_grace(api: ApiClient) -> None:
    # Grace is 1 s in the test service; the shell ignores SIGTERM.
    task_id = await submit_task(api, ["trap '' TERM; echo ready; while :; do sleep 0.1; done"])
    await wait_status(api, task_id, lambda s: s.status == S.COMPUTATION_STARTED)
    await trio.sleep(0.3)
    start = trio.current_time()
    await api.kill(task_id)
    final = await wait_status(api, task_id, timeout=10)
    assert final.status == S.KILLED
    assert trio.current_time() - start >= 0.9  # it waited for the grace period


async def test_kill_ended_task_answers_current_status(api: ApiClient) -> None:
    task_id = await submit_task(api, ["true"])
    await wait_status(api, task_id)
    before = await api.get_task(task_id)
    answer = await api.kill(task_id)
    assert answer.status == S.SUCCESS and answer.is_terminated
    after = await api.get_task(task_id)
    assert len(after.status_history) == len(before.status_history)


async def test_concurrent_kills_resolve_once(api: ApiClient) -> None:
    task_id = await submit_task(api, ["sleep 30"])
    await wait_status(api, task_id, lambda s: s.status == S.COMPUTATION_STARTED)
    answers = []

    async def kill() -> None:
        answers.append((await api.kill(task_id)).status)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(kill)
    assert set(answers) <= {S.PENDING_KILL, S.KILLED}
    final = await wait_status(api, task_id)
    assert final.status == S.KILLED
    history = [h.status for h in (await api.get_task(task_id)).status_history]
    assert history.count(S.PENDING_KILL) == 1 and history.count(S.KILLED) == 1


async def test_ttl_exceeded(api: ApiClient) -> None:
    task_id = await submit_task(api, ["echo start; sleep 30"], ttl_seconds=1)
    final = await wait_status(api, task_id)
    assert final.status == S.TTL_EXCEEDED
    task = await api.get_task(task_id)
    assert task.computation_end_time is not None
    assert (await output_zip(api, task_id)).read("artifacts/stdout.txt") == b"start\n"


@pytest.mark.expected_warnings
async def test_a_failure_while_finishing_ends_only_that_task(
    api: ApiClient,
    service: Service,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Packing that fails anyway (a bug, a full disk) ends that task as executer-failed with
    the reason, keeps its working directory, and the service goes on with the others."""
    real_pack = Storage.pack_outputs

    def pack(self: Storage, work_dir: Path | None, path: str, *args: Any) -> Any:
        if work_dir is not None and (work_dir / "poison").exists():
            raise RuntimeError("injected packing failure")
        return real_pack(self, work_dir, path, *args)

    monkeypatch.setattr(Storage, "pack_outputs", pack)
    doomed = await submit_task(api, ["echo kept > poison"])
    healthy = await submit_task(api, ["sleep 0.5; echo fine"])
    assert (await wait_status(api, doomed)).status == S.EXECUTER_FAILED
    assert (await wait_status(api, healthy)).status == S.SUCCESS
    task = await api.get_task(doomed)
    assert task.error_detail is not None and "injected packing failure" in task.error_detail
    assert (service.settings.work_dir / doomed / "poison").read_text() == "kept\n"
    assert (await output_zip(api, doomed)).namelist() == ["artifacts/"]
    later = await submit_task(api, ["echo later"])
    assert (await wait_status(api, later)).status == S.SUCCESS
    assert any(f"packing outputs of {doomed} failed" in r.getMessage() for r in caplog.records)


@pytest.mark.expected_warnings
async def test_recovery_is_never_stopped_by_one_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart, leftover tasks whose finishing fails in every way (even the empty
    archive cannot be written) still end, one after the other; the service comes up and
    answers, and their working directories are kept."""
    from tests.integration.conftest import start_service

    data = tmp_path / "data"
    async with trio.open_nursery() as nursery:
        svc = await start_service(nursery, data, slots=2)
        async with ApiClient.open(svc.client_settings) as api:
            first = await submit_task(api, ["echo partial; sleep 60"])
            other = await submit_task(api, ["echo partial; sleep 60"])
            for task_id in (first, other):
                await wait_status(api, task_id, lambda s: s.status == S.COMPUTATION_STARTED)
            await trio.sleep(0.3)
        nursery.cancel_scope.cancel()

    def broken(self: Storage, work_dir: Path | None, path: str, *args: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Storage, "pack_outputs", broken)
    async with trio.open_nursery() as nursery:
        svc = await start_service(nursery, data, slots=2)
        async with ApiClient.open(svc.client_settings) as api:
            for task_id in (first, other):
                final = await wait_status(api, task_id)
                assert final.status == S.EXECUTER_FAILED
                task = await api.get_task(task_id)
                assert task.error_detail is not None
                assert "No space left on device" in task.error_detail
            for task_id in (first, other):
                assert (data / "work" / task_id / "stdout.txt").read_text() == "partial\n"
            monkeypatch.undo()
            fresh = await submit_task(api, ["echo ok"])
            assert (await wait_status(api, fresh)).status == S.SUCCESS
        nursery.cancel_scope.cancel()


@pytest.mark.expected_warnings
async def test_a_store_failure_for_one_task_leaves_the_runner_running(
    api: ApiClient, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when ending the task normally fails (here: recording its operations), the task is
    marked executer-failed with the reason and other tasks run on."""
    real = Store.start_operation
    doomed: set[str] = set()

    def start_operation(self: Store, task_id: str, *args: Any) -> Any:
        if task_id in doomed:
            raise sqlite3.OperationalError("injected: disk I/O error")
        return real(self, task_id, *args)

    monkeypatch.setattr(Store, "start_operation", start_operation)
    service.gate.hold(S.STARTED)
    victim = await submit_task(api, ["echo never"])
    doomed.add(victim)
    await service.gate.reached(victim, S.STARTED)
    service.gate.release(S.STARTED)
    assert (await wait_status(api, victim)).status == S.EXECUTER_FAILED
    task = await api.get_task(victim)
    assert task.error_detail is not None and "injected: disk I/O error" in task.error_detail
    fine = await submit_task(api, ["echo fine"])
    assert (await wait_status(api, fine)).status == S.SUCCESS


def _unreadable_input(kind: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("sim_dir/params.txt", b"steps=3\n")
    data = bytearray(buf.getvalue())
    if kind == "unknown-method":  # method 99 in the local and the central header
        for magic, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            start = data.index(magic)
            data[start + at : start + at + 2] = (99).to_bytes(2, "little")
    elif kind == "encrypted":  # the "encrypted" flag bit in both headers
        for magic, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            start = data.index(magic)
            data[start + at] |= 1
    else:  # "not-a-zip"
        data = bytearray(b"this is not a zip archive")
    return bytes(data)


@pytest.mark.parametrize("kind", ["unknown-method", "encrypted", "not-a-zip"])
async def test_an_input_archive_that_cannot_be_unpacked_fails_the_task(
    api: ApiClient, tmp_path: Path, kind: str
) -> None:
    """Whatever is wrong with an uploaded input, the task fails with the reason (not the
    runner), and the service goes on."""
    created = await api.submit(
        {
            "simulator": "x",
            "resource_pool": None,
            "container_image": None,
            "extra_params": {"commands": [{"cmd": "echo never", "prompts": []}]},
        }
    )
    archive = tmp_path / "input.zip"
    archive.write_bytes(_unreadable_input(kind))
    [url] = await api.signed_urls("upload", [f"/{created.id}/input.zip"])
    await api.upload_file(url, archive)
    await api.input_uploaded(created.id)
    assert (await wait_status(api, created.id)).status == S.FAILED
    task = await api.get_task(created.id)
    assert task.error_detail is not None and task.error_detail.startswith("bad input: ")
    ok = await submit_task(api, ["echo ok"])
    assert (await wait_status(api, ok)).status == S.SUCCESS
