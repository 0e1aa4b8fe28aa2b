"""The Python ``Task`` class against the real local service (in a process; the API is sync)."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from taskfs import Task, TaskStatusCode
from taskfs.errors import NotFoundError, TaskEndedError, TaskfsError, UsageError
from taskfs.outputs import format_bytes
from tests.support import Service, start_service, stop


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(tmp_path_factory.mktemp("data"), slots=3)
    yield running
    stop(running.proc)


def test_status_machine_time_and_info(
    service: Service, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "steps").write_text("3\n")
    monkeypatch.setenv("TASKFS_DATA_DIR", str(service.data_dir))
    monkeypatch.delenv("INDUCTIVA_API_URL", raising=False)
    task = Task.submit(["cat steps", "sleep 1"], input_dir=sim, project="py")
    assert task.wait(poll=0.2) == TaskStatusCode.SUCCESS
    status = task.get_status()
    assert status == "success" and isinstance(status, TaskStatusCode)
    assert re.fullmatch(r"local-\d+vcpu", task.get_machine_type())
    assert re.fullmatch(r"00:00:0[1-3]", task.get_computation_time())
    info = task.get_info()
    assert info.project == "py" and info.status_history[-1].status == "success"
    assert repr(task) == f"Task({task.id!r})" and service.key not in repr(task.settings)


def test_output_files_info_text(service: Service) -> None:
    task_id = service.submit(
        "mkdir -p vtk && seq 1 3000 > vtk/ParticleData_Fluid_40.vtk && echo log; echo warn >&2"
    )
    service.wait_for(task_id, lambda s: s.is_terminated)
    task = Task(task_id, settings=service.settings)
    info = task.get_output_files_info()
    task_record = service.call(lambda api: api.get_task(task_id))
    url = service.call(lambda api: api.download_url(task_record.storage_output_path))
    archive = zipfile.ZipFile(io.BytesIO(httpx.get(url).content))
    expected = [
        f"Archive size: {format_bytes(task_record.metrics.output_zipped_size_bytes or 0)}",
        "Contents:",
        "  Size         Compressed   Name",
    ] + [
        f"  {format_bytes(i.file_size):<13}{format_bytes(i.compress_size):<13}"
        f"{i.filename.removeprefix('artifacts/')}"
        for i in archive.infolist()
        if not i.is_dir()
    ]
    assert str(info) == "\n".join(expected)
    assert {f.name for f in info.files} == {
        "stdout.txt",
        "stderr.txt",
        "vtk/ParticleData_Fluid_40.vtk",
    }


def test_kill_wait_and_ended(service: Service) -> None:
    task = Task(service.submit("sleep 60"), settings=service.settings)
    service.wait_for(task.id, lambda s: s.status == TaskStatusCode.COMPUTATION_STARTED)
    assert task.kill(wait_timeout=20) is True
    assert task.get_status() == TaskStatusCode.KILLED
    with pytest.raises(TaskEndedError, match="already ended"):
        task.kill()
    other = Task(service.submit("sleep 60"), settings=service.settings)
    assert other.kill() is True  # accepted, not waited for
    assert other.wait(poll=0.2) == TaskStatusCode.KILLED


def test_sync_context_kills_on_ctrl_c(service: Service) -> None:
    task = Task(service.submit("sleep 60"), settings=service.settings)
    with pytest.raises(KeyboardInterrupt), task.sync_context():
        service.wait_for(task.id, lambda s: s.status == TaskStatusCode.COMPUTATION_STARTED)
        raise KeyboardInterrupt  # what Ctrl-C raises
    assert service.wait_for(task.id, lambda s: s.is_terminated).status == TaskStatusCode.KILLED


def test_download_outputs(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = Task(
        service.submit("mkdir -p a/b && echo one > a/b/one.txt && echo two > two.txt"),
        settings=service.settings,
    )
    task.wait(poll=0.2)
    whole = task.download_outputs(output_dir=tmp_path / "whole")
    assert (whole / "a" / "b" / "one.txt").read_text() == "one\n"
    assert (whole / "two.txt").read_text() == "two\n"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INDUCTIVA_OUTPUT_DIR", raising=False)
    some = task.download_outputs(filenames=["two.txt"])
    assert some == Path("inductiva_output") / task.id / "outputs"
    assert sorted(p.name for p in (tmp_path / some).iterdir()) == ["two.txt"]
    with pytest.raises(NotFoundError):
        task.download_outputs(filenames=["nope.txt"], output_dir=tmp_path / "x")


def test_errors_are_taskfs_errors(service: Service) -> None:
    with pytest.raises(NotFoundError):
        Task("doesnotexist", settings=service.settings).get_status()
    with pytest.raises(TaskfsError):
        Task("doesnotexist", settings=service.settings).get_output_files_info()


def test_failures_are_one_taskfs_error_never_a_group(service: Service, tmp_path: Path) -> None:
    """A local failure (an unwritable destination) and a bad id are ``TaskfsError`` too."""
    task = Task(service.submit("echo out"), settings=service.settings)
    task.wait(poll=0.2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TaskfsError) as caught:
        task.download_outputs(output_dir=blocker / "sub")
    assert not isinstance(caught.value, BaseExceptionGroup)
    assert "Not a directory" in str(caught.value)
    for bad in ("../version-check", "id?x", "id#frag", ""):
        with pytest.raises(UsageError, match="not a task id"):
            Task(bad, settings=service.settings)
