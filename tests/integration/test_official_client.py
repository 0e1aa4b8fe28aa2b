"""The official Python client of the API (``inductiva`` 0.18.x) works unmodified against us.

It runs in its own virtual environment (``inductiva`` is large: installed once and cached in
``$TASKFS_INDUCTIVA_VENV``, default ``~/.cache/taskfs-tests/inductiva-0.18.12``), pointed at
the embedded service with ``INDUCTIVA_API_URL``/``INDUCTIVA_API_KEY``, and exercises every
call of TASK_API.md section 6: the import (version check and ``/users/*``), the ``Task``
methods, ``tasks.get``/``get_all`` and the CLI's ``tasks list/info/kill/download``.

Set ``TASKFS_SKIP_OFFICIAL_CLIENT=1`` to skip it on a machine without PyPI access.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import httpx
import pytest
import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.api.submit import submit_task
from tests.integration.conftest import Service
from tests.support import wait_status


async def outputs_of(api: ApiClient, task_id: str) -> zipfile.ZipFile:
    task = await api.get_task(task_id)
    assert task.storage_output_path is not None
    url = await api.download_url(task.storage_output_path, task.storage_region)
    async with httpx.AsyncClient() as plain:
        return zipfile.ZipFile(io.BytesIO((await plain.get(url)).content))


# The first test to ask for the client's environment may install it (a minute or two).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

VERSION = "0.18.12"


@pytest.fixture(scope="session")
def inductiva_python() -> Path:
    if os.environ.get("TASKFS_SKIP_OFFICIAL_CLIENT") == "1":
        pytest.skip("TASKFS_SKIP_OFFICIAL_CLIENT=1")
    default = Path.home() / ".cache" / "taskfs-tests" / f"inductiva-{VERSION}"
    venv = Path(os.environ.get("TASKFS_INDUCTIVA_VENV", default))
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    check = [
        str(python),
        "-c",
        f"import importlib.metadata as m; assert m.version('inductiva') == '{VERSION}'",
    ]
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        install = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                f"inductiva=={VERSION}",
            ],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            pytest.fail(f"could not install inductiva=={VERSION}:\n{install.stderr[-2000:]}")
    return python


SCRIPT = textwrap.dedent(
    """
    import faulthandler, json, sys
    from pathlib import Path
    faulthandler.dump_traceback_later(100, exit=True)  # a hang prints where it is
    import inductiva
    from inductiva.tasks import Task

    done_id, running_id, slow_id, out_dir = sys.argv[1:5]
    out = {}
    task = Task(done_id)
    out["status"] = task.get_status().value
    out["machine_type"] = task.get_machine_type()
    out["computation_time"] = task.get_computation_time()
    info = task.get_info()
    out["info_status"] = str(getattr(info.status, "value", info.status))
    out["info_text"] = str(info)
    output_info = task.get_output_info()
    out["output_files"] = sorted(f.name for f in output_info.files)
    out["output_sizes"] = {f.name: f.size for f in output_info.files}
    out["output_total"] = output_info.total_size_bytes
    out["wait_done"] = task.wait(silent_mode=True).value
    whole = task.download_outputs(output_dir=str(Path(out_dir) / "whole"))
    out["whole"] = sorted(str(p.relative_to(whole)) for p in Path(whole).rglob("*") if p.is_file())
    part = task.download_outputs(filenames=["stdout.txt", "vtk/ParticleData_Fluid_2.vtk"],
                                 output_dir=str(Path(out_dir) / "part"))
    out["part"] = sorted(str(p.relative_to(part)) for p in Path(part).rglob("*") if p.is_file())
    out["wait_slow"] = Task(slow_id).wait(silent_mode=True).value
    out["kill"] = Task(running_id).kill(wait_timeout=15)
    out["killed_status"] = Task(running_id).get_status().value
    out["get"] = [t.id for t in inductiva.tasks.get(last_n=2)]
    out["get_all"] = sorted(t.id for t in inductiva.tasks.get_all())
    print("RESULT " + json.dumps(out))
    """
)


# Task.wait() tails stdout over the live channel when it sees a running task unless silent:
# the client offers every address but 127.0.0.1 to WebRTC, so outside the network namespace
# of test_official_client_live_channel it is told to stay silent and only poll.

# The client's own submission path (run_simulation -> methods.submit_task -> upload_input):
# it packs the input with shutil.make_archive under sim_dir/, asks for the upload URL of
# "/<task_id>/input.zip" (empty storage prefix), PUTs it and calls input_uploaded.
SUBMIT_SCRIPT = textwrap.dedent(
    """
    import faulthandler, json, sys
    faulthandler.dump_traceback_later(80, exit=True)  # a hang prints where it is
    import inductiva
    from inductiva.tasks.run_simulation import run_simulation

    class LocalMachines:  # the machine group the client would get from /compute
        id = "local"
        spot = False
        allow_auto_start = False
        started = True
        def __str__(self):
            return "local machines"

    task = run_simulation(
        "custom",
        sys.argv[1],
        machine_group=LocalMachines(),
        commands=[{"cmd": "cat params.txt data/numbers.txt > result.txt", "prompts": []}],
        container_image="docker://taskfs/local-shell",
        verbose=False,
    )
    print("RESULT " + json.dumps({"id": task.id, "status": task.wait(silent_mode=True).value}))
    """
)


def _client_env(inductiva_python: Path, service: Service, tmp_path: Path) -> dict[str, str]:
    """The official client's environment: the local service, a fresh home, no colours."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": f"{inductiva_python.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "INDUCTIVA_API_URL": service.url,
        "INDUCTIVA_API_KEY": service.key,
        "INDUCTIVA_DISABLE_ANSI": "true",
    }


async def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = await trio.run_process(
        cmd, env=env, cwd=cwd, capture_stdout=True, capture_stderr=True, check=False
    )
    return subprocess.CompletedProcess(
        cmd, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def test_official_client_against_local_service(
    inductiva_python: Path, service: Service, api: ApiClient, tmp_path: Path
) -> None:
    done = await submit_task(
        api,
        [
            "echo simulating; mkdir -p vtk log",
            "for i in 1 2 3; do seq 1 $((i*100)) > vtk/ParticleData_Fluid_$i.vtk; done",
            "echo converged > log/SPH_log.txt",
        ],
    )
    await wait_status(api, done)
    running = await submit_task(api, ["sleep 60"])
    await wait_status(api, running, lambda s: s.status == S.COMPUTATION_STARTED)
    slow = await submit_task(api, ["sleep 2; echo slow done"])

    env = _client_env(inductiva_python, service, tmp_path)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    with trio.fail_after(110):
        result = await _run(
            [str(inductiva_python), str(script), done, running, slow, str(tmp_path / "dl")],
            env,
            tmp_path,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    # wait() writes carriage returns and ANSI erases to stdout before our line.
    line = next(x for x in result.stdout.splitlines() if "RESULT " in x)
    out = json.loads(line[line.index("RESULT ") + len("RESULT ") :])

    task = await api.get_task(done)
    assert out["status"] == "success" and out["info_status"] == "success"
    assert out["machine_type"] == "LOCAL-test-vm"
    assert out["computation_time"] == pytest.approx(task.metrics.computation_seconds)
    assert done in out["info_text"]
    expected = {
        "stdout.txt",
        "stderr.txt",
        "log/SPH_log.txt",
        *(f"vtk/ParticleData_Fluid_{i}.vtk" for i in (1, 2, 3)),
    }
    # The listing is not recursive in the official client: top-level files only.
    assert set(out["output_files"]) == {n for n in expected if "/" not in n}
    assert out["output_total"] == task.metrics.output_zipped_size_bytes
    assert out["wait_done"] == "success"
    assert set(out["whole"]) == expected
    assert set(out["part"]) == {"stdout.txt", "vtk/ParticleData_Fluid_2.vtk"}
    whole_dir = tmp_path / "dl" / "whole"
    assert (whole_dir / "vtk" / "ParticleData_Fluid_3.vtk").read_text() == "".join(
        f"{i}\n" for i in range(1, 301)
    )
    assert (tmp_path / "dl" / "part" / "stdout.txt").read_text() == "simulating\n"
    assert out["wait_slow"] == "success"
    assert out["kill"] is True and out["killed_status"] == "killed"
    assert len(out["get"]) == 2
    assert set(out["get_all"]) == {done, running, slow}
    assert "Traceback" not in result.stderr

    # The CLI: list, info, kill, download.
    cli = str(inductiva_python.parent / "inductiva")
    listed = await _run([cli, "tasks", "list"], env, tmp_path)
    assert listed.returncode == 0, listed.stderr
    for task_id in (done, running, slow):
        assert task_id in listed.stdout
    info = await _run([cli, "tasks", "info", done], env, tmp_path)
    assert info.returncode == 0 and done in info.stdout, info.stderr
    victim = await submit_task(api, ["sleep 60"])
    await wait_status(api, victim, lambda s: s.status == S.COMPUTATION_STARTED)
    killed = await _run([cli, "tasks", "kill", victim, "-y"], env, tmp_path)
    assert killed.returncode == 0, killed.stderr
    assert (await wait_status(api, victim)).status == S.KILLED
    got = await _run(
        [cli, "tasks", "download", done, "--dir", str(tmp_path / "cli")], env, tmp_path
    )
    assert got.returncode == 0, got.stderr
    cli_out = tmp_path / "cli" / done / "outputs"
    assert {str(p.relative_to(cli_out)) for p in cli_out.rglob("*") if p.is_file()} == expected
    for run in (result, listed, info, killed, got):
        assert "Traceback" not in run.stderr


async def test_official_client_submits_with_its_own_upload_code(
    inductiva_python: Path, service: Service, api: ApiClient, tmp_path: Path
) -> None:
    sim = tmp_path / "sim"
    (sim / "data").mkdir(parents=True)
    (sim / "params.txt").write_text("steps=3\n")
    (sim / "data" / "numbers.txt").write_text("1\n2\n3\n")
    env = _client_env(inductiva_python, service, tmp_path)
    script = tmp_path / "submit.py"
    script.write_text(SUBMIT_SCRIPT)
    with trio.fail_after(90):
        result = await _run([str(inductiva_python), str(script), str(sim)], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = next(x for x in result.stdout.splitlines() if "RESULT " in x)
    out = json.loads(line[line.index("RESULT ") + len("RESULT ") :])
    assert out["status"] == "success"
    task = await api.get_task(out["id"])
    assert task.status == S.SUCCESS
    assert task.storage_input_path is not None
    archive = await outputs_of(api, out["id"])
    assert archive.read("artifacts/result.txt") == b"steps=3\n1\n2\n3\n"


def _lines(text: str) -> list[str]:
    return [line.removeprefix("│") for line in text.splitlines() if line.startswith("│")]


def test_official_client_live_channel(inductiva_python: Path, tmp_path: Path) -> None:
    """``inductiva tasks tail [-f]/list-files/top/last-modified-file``, ``inductiva logs`` and
    ``Task.wait()``'s streaming, unmodified, over real WebRTC against ``taskfs serve``.

    The official client gathers every address but 127.0.0.1 as its ICE candidates, so it runs
    in a network namespace whose only addresses are 127.0.0.1 and 127.0.0.2 on ``lo`` (with the
    service, which ``official_live_driver`` starts there): no packet can leave the machine."""
    if os.geteuid() != 0:
        pytest.skip("unshare -n needs root (CI runs as root)")
    root = Path(__file__).resolve().parents[2]
    inner = (
        "ip link set lo up && ip addr add 127.0.0.2/8 dev lo && exec "
        f"{sys.executable} -m tests.integration.official_live_driver "
        f"{inductiva_python.parent} {tmp_path / 'data'}"
    )
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", inner],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    for name, run in out.items():
        assert run["rc"] == 0, (name, run)
        assert "Traceback" not in run["stdout"] + run["stderr"], (name, run)
        assert "Failed to connect" not in run["stdout"] + run["stderr"], (name, run)

    assert "last 3 lines from stdout.txt" in out["tail"]["stdout"]
    assert _lines(out["tail"]["stdout"]) == ["48", "49", "50"]
    # Two files are tailed side by side: their boxes come in either order.
    two = _lines(out["tail_two"]["stdout"])
    assert sorted(two, key=lambda x: (x == "warn", x)) == [*map(str, range(41, 51)), "warn"]
    assert [x for x in two if x != "warn"] == [str(i) for i in range(41, 51)]
    assert "File not found: nope.txt" in out["missing"]["stdout"] + out["missing"]["stderr"]
    listing = out["list_files"]["stdout"]
    for name in ("out/", "out/deep/field.vtk", "stdout.txt", "stderr.txt"):
        assert name in listing
    assert "PID" in out["top"]["stdout"] and "COMMAND" in out["top"]["stdout"]
    assert "Most Recent File: std" in out["last_modified"]["stdout"]
    assert "Time Since Last Modification" in out["last_modified"]["stdout"]
    # Followed to the task's end: every line once, in order, then the command returned.
    assert _lines(out["follow"]["stdout"]) == [f"step {i}" for i in range(1, 21)]
    logged = _lines(out["logs"]["stdout"])
    assert [x for x in logged if x.startswith("step")] == [f"step {i}" for i in range(1, 21)]
    assert [x for x in logged if x.startswith("err")] == [f"err {i}" for i in range(1, 21)]
    assert _lines(out["wait"]["stdout"]) == ["wait-line-1", "wait-line-2", "wait-line-3"]
    assert "STATUS success" in out["wait"]["stdout"]
