"""``taskfs tasks ...`` as a user runs it, against the real local service in a process."""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskfs.api.models import TaskStatusCode as S
from taskfs.fs.mount import mount_entry
from tests.fakeapi import KEY, FakeApi
from tests.rangeserver import Answer, serve_answerer
from tests.support import Service, clean_env, start_service, stop, taskfs_cmd


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(tmp_path_factory.mktemp("data"), slots=4)
    yield running
    stop(running.proc)


def cli(
    service: Service, *args: str, stdin: int | None = subprocess.DEVNULL, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    return subprocess.run(
        taskfs_cmd(*args, "--data-dir", str(service.data_dir)),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=stdin,
        check=False,
    )


def with_terminal(service: Service, *args: str, answer: str) -> subprocess.CompletedProcess[str]:
    """Run with a pseudo-terminal on stdin and type ``answer`` at the prompt."""
    master, slave = pty.openpty()
    env = clean_env()
    proc = subprocess.Popen(
        taskfs_cmd(*args, "--data-dir", str(service.data_dir)),
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    os.close(slave)
    os.write(master, answer.encode() + b"\n")
    out, err = proc.communicate(timeout=60)
    os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def running(service: Service, command: str = "sleep 60") -> str:
    task_id = service.submit(command)
    service.wait_for(task_id, lambda s: s.status == S.COMPUTATION_STARTED)
    return task_id


def test_list_table_json_and_filters(service: Service) -> None:
    first = service.submit("true", project="alpha")
    second = service.submit("exit 1", project="beta")
    for task_id in (first, second):
        service.wait_for(task_id, lambda s: s.is_terminated)
    table = cli(service, "tasks", "list", "-n", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "SUBMITTED", "STARTED", "COMPUTATION", "MACHINE"]
    assert [ln.split()[0] for ln in lines[1:]] == [second, first]  # newest first
    assert lines[1].split()[1] == "failed" and lines[2].split()[1] == "success"
    parsed = json.loads(cli(service, "tasks", "list", "--all", "--json").stdout)
    ids = [t["task_id"] for t in parsed]
    assert ids.index(second) < ids.index(first)
    record = next(t for t in parsed if t["task_id"] == first)
    assert record["status"] == "success" and record["project"] == "alpha"
    assert record["is_terminated"] is True and record["machine_type"].startswith("local-")
    assert record["computation_time"].count(":") == 2
    beta = json.loads(cli(service, "tasks", "list", "--project", "beta", "--json").stdout)
    assert [t["task_id"] for t in beta] == [second]
    failed = json.loads(cli(service, "tasks", "list", "--status", "failed", "--json").stdout)
    assert second in [t["task_id"] for t in failed]
    assert first not in [t["task_id"] for t in failed]
    bad = cli(service, "tasks", "list", "--status", "finished")
    assert bad.returncode == 2 and "unknown status 'finished'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_info_text_and_json(service: Service) -> None:
    task_id = service.submit("echo hi")
    service.wait_for(task_id, lambda s: s.is_terminated)
    text = cli(service, "tasks", "info", task_id)
    assert text.returncode == 0, text.stderr
    assert f"Task {task_id}" in text.stdout and "success (Success)" in text.stdout
    assert "Timeline:" in text.stdout and "exec_command echo hi [OK]" in text.stdout
    for status in ("pending-input", "submitted", "started", "computation-started", "success"):
        assert status in text.stdout
    record = json.loads(cli(service, "tasks", "info", task_id, "--json").stdout)
    assert record["task_id"] == task_id and record["status_history"][-1]["status"] == "success"


def test_kill_prompt_yes_no_and_no_terminal(service: Service) -> None:
    victim = running(service)
    no_tty = cli(service, "tasks", "kill", victim)
    assert no_tty.returncode == 1
    assert no_tty.stdout == ""
    assert no_tty.stderr == (  # one message, not two
        f"taskfs: error: no terminal to confirm the kill of task {victim} on: nothing killed "
        "(use -y to kill without asking)\n"
    )
    said_no = with_terminal(service, "tasks", "kill", victim, answer="n")
    assert said_no.returncode == 1
    assert "Are you sure you want to proceed (y/[N])? " in said_no.stdout
    assert said_no.stderr == "Aborted: nothing killed.\n"
    assert service.status(victim).status == S.COMPUTATION_STARTED
    said_yes = with_terminal(service, "tasks", "kill", victim, answer="y")
    assert said_yes.returncode == 0, said_yes.stderr
    assert f"Successfully sent kill request for task {victim}." in said_yes.stdout
    assert service.wait_for(victim, lambda s: s.is_terminated).status == S.KILLED


def test_kill_many_ended_and_wait(service: Service) -> None:
    ended = service.submit("true")
    service.wait_for(ended, lambda s: s.is_terminated)
    victims = [running(service) for _ in range(3)]
    victims += [service.submit("sleep 60") for _ in range(3)]  # some may still be queued
    many = with_terminal(service, "tasks", "kill", *victims, ended, answer="yes")
    assert "You are about to kill 7 task(s)." in many.stdout
    assert many.returncode == 1  # the ended one failed...
    assert f"Task {ended}: task {ended} has already ended (success); not killed." in many.stderr
    for victim in victims:  # ...and did not stop the others
        assert f"Successfully sent kill request for task {victim}." in many.stdout
        assert service.wait_for(victim, lambda s: s.is_terminated).status == S.KILLED
    another = running(service)
    waited = cli(service, "tasks", "kill", another, "-y", "--wait", "20")
    assert waited.returncode == 0, waited.stderr
    assert f"Task {another} killed." in waited.stdout
    # --wait waits only for the tasks the kill reached: an unknown id is one failure, and
    # the others are still waited for.
    third = running(service)
    mixed = cli(service, "tasks", "kill", "nosuchtask0000000000000000", third, "-y", "--wait", "20")
    assert mixed.returncode == 1
    assert "nosuchtask0000000000000000" in mixed.stderr and "not killed" in mixed.stderr
    assert f"Task {third} killed." in mixed.stdout
    assert mixed.stderr.count("not killed") == 1, mixed.stderr
    assert cli(service, "tasks", "kill").returncode == 2
    assert cli(service, "tasks", "kill", "--all", another).returncode == 2


def test_kill_all(service: Service) -> None:
    victims = {running(service), running(service)}
    result = cli(service, "tasks", "kill", "--all", "-y")
    assert result.returncode == 0, result.stderr
    for victim in victims:
        assert victim in result.stdout
        assert service.wait_for(victim, lambda s: s.is_terminated).status == S.KILLED


def _archive(service: Service, task_id: str) -> zipfile.ZipFile:
    task = service.call(lambda api: api.get_task(task_id))
    url = service.call(lambda api: api.download_url(task.storage_output_path))
    return zipfile.ZipFile(io.BytesIO(httpx.get(url).content))


def test_outputs_and_download(service: Service, tmp_path: Path) -> None:
    task_id = service.submit(
        "mkdir -p vtk log && seq 1 50000 > vtk/ParticleData_Fluid_1.vtk && "
        "echo done > log/SPH_log.txt && head -c 300000 /dev/urandom > blob.bin && echo out"
    )
    service.wait_for(task_id, lambda s: s.is_terminated)
    archive = _archive(service, task_id)
    listing = cli(service, "tasks", "outputs", task_id)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith("Archive size: ")
    from taskfs.outputs import format_bytes

    for info in archive.infolist()[1:]:
        name = info.filename.removeprefix("artifacts/")
        row = f"  {format_bytes(info.file_size):<13}{format_bytes(info.compress_size):<13}{name}"
        assert row in listing.stdout.splitlines()
    whole = cli(service, "tasks", "download", task_id, "--dir", str(tmp_path / "all"))
    assert whole.returncode == 0, whole.stderr
    dest = tmp_path / "all" / task_id / "outputs"
    assert f"to {dest}" in whole.stdout
    assert "downloaded vtk/ParticleData_Fluid_1.vtk (" in whole.stdout  # plain lines: no tty
    for info in archive.infolist()[1:]:
        path = dest / info.filename.removeprefix("artifacts/")
        assert path.read_bytes() == archive.read(info)
    some = cli(
        service,
        "tasks",
        "download",
        task_id,
        "--dir",
        str(tmp_path / "some"),
        "--files",
        "log/SPH_log.txt",
        "stdout.txt",
    )
    assert some.returncode == 0, some.stderr
    got = sorted(
        p.relative_to(tmp_path / "some" / task_id / "outputs").as_posix()
        for p in (tmp_path / "some").rglob("*")
        if p.is_file()
    )
    assert got == ["log/SPH_log.txt", "stdout.txt"]
    wrong = cli(
        service,
        "tasks",
        "download",
        task_id,
        "--dir",
        str(tmp_path / "bad"),
        "--files",
        "stdout.txt",
        "missing.txt",
    )
    assert wrong.returncode == 1 and "missing.txt" in wrong.stderr
    assert not (tmp_path / "bad").exists()


def test_wait_prints_changes_and_exit_status(service: Service) -> None:
    task_id = service.submit("sleep 1; exit 3")
    result = cli(service, "tasks", "wait", task_id, "--poll", "0.1")
    assert result.returncode == 1
    statuses = [line.split()[-1] for line in result.stdout.splitlines()]
    assert statuses[-1] == "failed"
    assert "computation-started" in statuses
    assert len(statuses) == len(set(statuses))  # each change once
    ok = service.submit("true")
    assert cli(service, "tasks", "wait", ok, "--poll", "0.1").returncode == 0


def test_ctrl_c_during_wait_kills_the_task(service: Service) -> None:
    task_id = running(service)
    env = clean_env()
    proc = subprocess.Popen(
        taskfs_cmd(
            "tasks",
            "wait",
            task_id,
            "--kill-on-interrupt",
            "--poll",
            "0.1",
            "--data-dir",
            str(service.data_dir),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first status line: it is watching
    assert "computation-started" in first and time.monotonic() < deadline
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"Interrupted: killed task {task_id}." in err
    assert "Traceback" not in err
    assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.KILLED


def test_errors_are_one_line(service: Service, tmp_path: Path) -> None:
    unknown = cli(service, "tasks", "info", "nosuchtask")
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    assert unknown.stderr.count("\n") == 1 and "Traceback" not in unknown.stderr
    bad_key = tmp_path / "key"
    bad_key.write_text("wrong-key\n")
    denied = cli(service, "tasks", "list", "--api-key-file", str(bad_key))
    assert denied.returncode == 1 and "access denied" in denied.stderr
    assert "wrong-key" not in denied.stderr and denied.stderr.count("\n") == 1
    down = cli(
        service,
        "tasks",
        "list",
        "--api-url",
        "http://127.0.0.1:9",
        "--api-key-file",
        str(bad_key),
        "--deadline",
        "1",
    )
    assert down.returncode == 69 and "cannot connect" in down.stderr  # unreachable: 69
    assert down.stderr.count("\n") == 1
    usage = cli(service, "tasks", "list", "-n", "zero")
    assert usage.returncode == 2 and "not a whole number" in usage.stderr
    debug = cli(service, "tasks", "info", "nosuchtask", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# -- the cases of issue "one-line errors, checked ids, honest exits" -------------------------


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "bad",
    ["../version-check", "x/../../y", "{id}?x", "{id}#frag", "{id}#../../../escaped", "", "a" * 65],
)
def test_task_ids_are_checked_before_any_request(
    service: Service, tmp_path: Path, bad: str
) -> None:
    task_id = service.submit("true")
    service.wait_for(task_id, lambda s: s.is_terminated)
    bad = bad.format(id=task_id)
    for args in (
        ("tasks", "info", bad),
        ("tasks", "wait", bad),
        ("tasks", "kill", bad, "-y"),
        ("tasks", "outputs", bad),
        ("tasks", "download", bad, "--dir", str(tmp_path / "d" / "a")),
    ):
        result = cli(service, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "not a task id" in _one_line(result)
    assert not (tmp_path / "d").exists()  # nothing written anywhere, inside --dir or out


def test_local_failures_are_one_line(service: Service, tmp_path: Path) -> None:
    task_id = service.submit("echo out")
    service.wait_for(task_id, lambda s: s.is_terminated)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for target in (blocker / "sub", Path("/proc/self/taskfs-no-such-dir")):
        result = cli(service, "tasks", "download", task_id, "--dir", str(target))
        assert result.returncode == 1
        stderr = _one_line(result)
        assert "Not a directory" in stderr or "No such file" in stderr or "denied" in stderr


def test_output_into_a_closed_pipe_ends_quietly(service: Service) -> None:
    """``taskfs tasks outputs ID | head -1``: no traceback, as with cat or ls."""
    task_id = service.submit(
        "python3 -c \"[open(f'f{i:05d}.txt', 'w').write('x') for i in range(3000)]\""
    )
    service.wait_for(task_id, lambda s: s.is_terminated)
    for command in (
        f"tasks outputs {task_id}",
        "tasks list --all --json",
        f"tasks download {task_id} --dir {service.data_dir}/dl-pipe",
    ):
        env = clean_env()
        args = " ".join(taskfs_cmd(*command.split(), "--data-dir", str(service.data_dir)))
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {args} | head -1 > /dev/null"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert result.stderr == "", (command, result.stderr)


def test_download_keeps_long_names_deep_paths_and_times(service: Service, tmp_path: Path) -> None:
    long_name = "n" * 250
    deep = "/".join(["level-0123456789"] * 260)  # more than PATH_MAX below the directory
    script = (
        "import os\n"
        f"open('{long_name}', 'w').write('long')\n"
        f"os.utime('{long_name}', (1234567890, 1234567890))\n"
        "for _ in range(260):\n"
        "    os.mkdir('level-0123456789'); os.chdir('level-0123456789')\n"
        "open('leaf', 'w').write('deep')\n"
    )
    (tmp_path / "make.py").write_text(script)
    task_id = service.submit("python3 make.py", input_dir=tmp_path)
    assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.SUCCESS
    result = cli(service, "tasks", "download", task_id, "--dir", str(tmp_path / "dl"))
    assert result.returncode == 0, result.stderr
    dest = tmp_path / "dl" / task_id / "outputs"
    assert (dest / long_name).read_text() == "long"
    assert (dest / long_name).stat().st_mtime == 1234567890  # the archive's time, as unzip
    fd = os.open(dest, os.O_RDONLY)
    for part in deep.split("/"):
        child = os.open(part, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
    assert os.read(leaf, 100) == b"deep"
    os.close(leaf)
    os.close(fd)
    assert not [p for p in dest.iterdir() if p.name.startswith(".taskfs-part")]


def test_a_link_planted_in_the_destination_is_not_followed(
    service: Service, tmp_path: Path
) -> None:
    task_id = service.submit("mkdir -p sub && echo x > sub/f")
    service.wait_for(task_id, lambda s: s.is_terminated)
    dest = tmp_path / "dl" / task_id / "outputs"
    dest.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    result = cli(service, "tasks", "download", task_id, "--dir", str(tmp_path / "dl"))
    assert result.returncode == 1
    _one_line(result)
    assert f"cannot open the directory {dest / 'sub'}: a symbolic link" in result.stderr
    assert list(outside.iterdir()) == []


def test_serve_errors_are_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for args in (["--port", str(port)], ["--host", "999.1.1.1", "--port", "0"]):
            result = subprocess.run(
                taskfs_cmd("serve", "--data-dir", str(tmp_path / "data"), *args),
                capture_output=True,
                text=True,
                timeout=60,
                env=clean_env(),
                check=False,
            )
            assert result.returncode == 1, result.stderr
            errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
            assert errors == [errors[0]] and errors[0].startswith("taskfs: error: cannot serve")
            assert "Traceback" not in result.stderr


def _cloud(fake: FakeApi, url: str, key_file: Path, *args: str, **popen: Any) -> Any:
    return subprocess.Popen(
        taskfs_cmd(*args, "--api-url", url, "--api-key-file", str(key_file), "--deadline", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        **popen,
    )


def test_wait_rides_out_an_outage_and_tells_it_from_a_failure(tmp_path: Path) -> None:
    """``tasks wait`` keeps waiting through a service outage (saying so on stderr), exits by the
    task's end once the service is back, and 69 (not 1, a failed task) if it never comes."""
    fake = FakeApi()
    fake.add("longtask", S.COMPUTATION_STARTED)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with serve_answerer(fake) as url:
        fake.base_url = url
        waiting = _cloud(fake, url, key_file, "tasks", "wait", "longtask", "--poll", "0.2")
        time.sleep(1)
        fake.api_fault = lambda method, path: Answer(503, {}, b'{"detail": "down"}')
        time.sleep(4)
        fake.api_fault = None
        fake.set_status("longtask", S.SUCCESS)
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert "retrying in" in err and "Traceback" not in err
        assert out.splitlines()[-1].endswith("success")

        fake.add("failing", S.COMPUTATION_STARTED)
        fake.set_status("failing", S.FAILED)
        failed = _cloud(fake, url, key_file, "tasks", "wait", "failing")
        failed.communicate(timeout=60)
        assert failed.returncode == 1

        fake.add("stuck", S.COMPUTATION_STARTED)
        fake.api_fault = lambda method, path: Answer(503, {}, b'{"detail": "down"}')
        gone = _cloud(fake, url, key_file, "tasks", "wait", "stuck", "--max-outage", "3")
        _, err = gone.communicate(timeout=60)
        assert gone.returncode == 69, err
        assert "gave up" in err.splitlines()[-1] and "Traceback" not in err


# -- the cases of the hostile review of that issue --------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "99999"),
        ("serve", "--port", "-1"),
        ("serve", "--slots", "0"),
        ("serve", "--kill-grace", "nan"),
        ("tasks", "list", "--deadline", "nan"),
        ("tasks", "list", "--deadline", "inf"),
        ("tasks", "list", "--deadline", "-1"),
        ("submit", "--deadline", "nan", "-c", "true"),
        ("mount", "{tmp}/mnt", "--deadline", "nan", "--api-url", "http://127.0.0.1:9"),
        ("tasks", "wait", "abc", "--max-outage", "nan"),
        ("tasks", "kill", "abc", "--wait", "0"),
        ("tasks", "download", "abc", "--dir", ""),
    ],
)
def test_impossible_numbers_and_empty_values_are_usage_errors(
    service: Service, tmp_path: Path, args: tuple[str, ...]
) -> None:
    (tmp_path / "mnt").mkdir()
    args = tuple(arg.format(tmp=tmp_path) for arg in args)
    if args[0] == "serve":  # a data dir of its own: the shared one is busy with a service
        args = (*args, "--data-dir", str(tmp_path / "data"))
    try:
        result = subprocess.run(
            taskfs_cmd(
                *args, *([] if args[0] == "serve" else ["--data-dir", str(service.data_dir)])
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
            check=False,
        )
    finally:
        if mount_entry(tmp_path / "mnt") is not None:  # the bug this guards against
            subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    assert result.returncode == 2, result.stderr
    _one_line(result)


def test_a_failing_standard_output_is_one_line_and_loses_nothing(service: Service) -> None:
    env = clean_env()
    data = ["--data-dir", str(service.data_dir)]
    with open("/dev/full", "w") as full:
        for args in (["--version"], ["--help"], ["serve", "--print-key", *data]):
            result = subprocess.run(
                taskfs_cmd(*args), stdout=full, stderr=subprocess.PIPE, text=True, env=env
            )
            assert result.returncode == 1, (args, result.stderr)
            assert "No space left on device" in _one_line(result)
        submitted = subprocess.run(
            taskfs_cmd("submit", *data, "--", "true"),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    assert submitted.returncode == 1
    message = _one_line(submitted)
    task_id = message.split("task ")[1].split()[0]
    assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.SUCCESS
    closed = subprocess.run(
        ["bash", "-c", " ".join(taskfs_cmd("serve", "--print-key", *data)) + " | true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in closed.stderr and closed.stderr.count("\n") <= 1


def test_a_link_planted_at_the_task_or_outputs_directory_is_not_followed(
    service: Service, tmp_path: Path
) -> None:
    task_id = service.submit("echo x > f.txt")
    service.wait_for(task_id, lambda s: s.is_terminated)
    outside = tmp_path / "outside"
    outside.mkdir()
    for planted in (Path(task_id), Path(task_id) / "outputs"):
        root = tmp_path / f"dl-{len(planted.parts)}"
        (root / planted).parent.mkdir(parents=True, exist_ok=True)
        (root / planted).symlink_to(outside)
        result = cli(service, "tasks", "download", task_id, "--dir", str(root))
        assert result.returncode == 1, result.stdout
        _one_line(result)
        assert f"cannot open the directory {root / planted}: a symbolic link" in result.stderr
        assert list(outside.rglob("*")) == []
    # --dir itself is the user's choice: a link there is followed.
    (tmp_path / "via-link").symlink_to(outside)
    result = cli(service, "tasks", "download", task_id, "--dir", str(tmp_path / "via-link"))
    assert result.returncode == 0, result.stderr
    assert (outside / task_id / "outputs" / "f.txt").read_text() == "x\n"


def test_download_into_what_cannot_hold_it_says_why(service: Service, tmp_path: Path) -> None:
    """--dir a file, or a directory where nothing can be made (/proc/1): one line naming the
    path it is about, with the reason."""
    task_id = service.submit("echo x > f.txt")
    service.wait_for(task_id, lambda s: s.is_terminated)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    for where, said in (
        (a_file, f"taskfs: error: Not a directory: {a_file}\n"),
        (a_file / "below", f"taskfs: error: Not a directory: {a_file / 'below'}\n"),
        (
            Path("/proc/1"),
            f"taskfs: error: cannot make the directory /proc/1/{task_id}: No such file or "
            "directory\n",
        ),
    ):
        result = cli(service, "tasks", "download", task_id, "--dir", str(where))
        assert result.returncode == 1, result.stdout
        assert result.stderr == said
    assert a_file.read_text() == "mine\n"


def test_download_keeps_the_exec_bits(service: Service, tmp_path: Path) -> None:
    task_id = service.submit("printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod 755 run.sh")
    service.wait_for(task_id, lambda s: s.is_terminated)
    result = cli(service, "tasks", "download", task_id, "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    outputs = tmp_path / task_id / "outputs"
    assert os.access(outputs / "run.sh", os.X_OK)
    assert not os.access(outputs / "stdout.txt", os.X_OK)


def test_without_a_running_local_service_the_exit_status_is_69_and_wait_rides_it_out(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = start_service(data)
    task_id = first.submit("true")
    first.wait_for(task_id, lambda s: s.is_terminated)
    stop(first.proc)
    env = clean_env()
    listed = subprocess.run(
        taskfs_cmd("tasks", "list", "--data-dir", str(data)),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 69
    assert "no local service" in _one_line(listed)
    waiting = subprocess.Popen(
        taskfs_cmd("tasks", "wait", task_id, "--data-dir", str(data), "--max-outage", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        time.sleep(2)
        assert waiting.poll() is None  # riding it out
        again = start_service(data)
        try:
            out, err = waiting.communicate(timeout=60)
        finally:
            stop(again.proc)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert "retrying in" in err and "Traceback" not in err
    assert out.splitlines()[-1].endswith("success")


def test_download_makes_the_archives_directories_with_their_times(
    service: Service, tmp_path: Path
) -> None:
    """Empty directories are entries of the archive: made like unzip makes them (with their
    times, set after the files), whatever else the download writes."""
    task_id = service.submit(
        "mkdir -p emptyd/deeper full && echo x > full/f"
        " && touch -d @1234567890 emptyd/deeper && touch -d @1234500000 emptyd"
    )
    assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.SUCCESS
    archive = service.data_dir / "storage" / task_id / "output.zip"
    with zipfile.ZipFile(archive) as zf:
        entries = {i.filename.removeprefix("artifacts/") for i in zf.infolist()}
    assert "emptyd/deeper/" in entries  # what the oracle says the archive holds
    result = cli(service, "tasks", "download", task_id, "--dir", str(tmp_path / "dl"))
    assert result.returncode == 0, result.stderr
    dest = tmp_path / "dl" / task_id / "outputs"
    for name in entries:
        if name.endswith("/") and name != "":
            assert (dest / name).is_dir(), name
    assert (dest / "emptyd" / "deeper").stat().st_mtime == 1234567890
    assert (dest / "full" / "f").read_text() == "x\n"
    unzipped = tmp_path / "unzipped"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(unzipped)
    made = {p.relative_to(unzipped / "artifacts") for p in (unzipped / "artifacts").rglob("*")}
    assert {p.relative_to(dest) for p in dest.rglob("*")} == made
