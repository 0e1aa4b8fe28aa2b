"""Real mounts over the real local service, used with real tools."""

from __future__ import annotations

import filecmp
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from taskfs.api.models import TaskStatusCode as S
from taskfs.fs.mount import mount_entry
from taskfs.mounts import mounted_at
from tests.fuse.conftest import (
    Mount,
    Service,
    start_mount,
    start_service,
    stop,
    stop_mount,
    taskfs_cmd,
    wait_until,
)

TIME = re.compile(rb"^\d\d:\d\d:\d\d\n$")


def unmount_cmd(path: Path) -> subprocess.CompletedProcess[str]:
    """``taskfs unmount PATH`` as a user runs it."""
    return subprocess.run(
        taskfs_cmd("unmount", str(path)), capture_output=True, text=True, timeout=60, check=False
    )


def ended(service: Service, task_id: str) -> str:
    return service.wait_for(task_id, lambda s: s.is_terminated).status


def test_ls_of_root_and_task_dirs(mounted: Mount) -> None:
    service = mounted.service
    task_id = service.submit("echo hello")
    ended(service, task_id)

    def listed() -> str:
        out = mounted.run(f"ls -l {mounted.path}").stdout
        return out if task_id in out else ""

    line = next(x for x in wait_until(listed).splitlines() if task_id in x)
    assert line.startswith("dr-xr-xr-x")
    listing = mounted.run(f"ls -l {mounted / task_id}")
    assert listing.returncode == 0, listing.stderr
    modes = {ln.split()[-1]: ln.split()[0] for ln in listing.stdout.splitlines()[1:]}
    assert modes == {
        "computation_time": "-r--r--r--",
        "control": "-rw-------",
        "info.json": "-r--r--r--",
        "inputs": "dr-xr-xr-x",
        "machine_type": "-r--r--r--",
        "outputs": "dr-xr-xr-x",
        "status": "-r--r--r--",
        "top": "-r--r--r--",
    }
    assert (mounted / task_id / "status").stat().st_size == len("success\n")
    assert (mounted / task_id / "wait").read_text() == "success\n"  # not listed, but there
    assert mounted.run(f"ls -l {mounted / task_id / 'wait'}").returncode == 0


def test_ls_a_lists_dot_and_dot_dot_everywhere(mounted: Mount) -> None:
    """As on ext4 or sshfs: every directory lists ``.`` and ``..`` first, ``..`` with the
    parent's inode number; ``find`` and ``ls -R`` do not walk into them."""
    service = mounted.service
    task_id = service.submit("mkdir -p sub/deeper; echo x > sub/deeper/x.txt")
    ended(service, task_id)
    root = mounted.path
    task = root / task_id
    for directory in (
        root,
        root / ".taskfs",
        root / ".status",
        task,
        task / "outputs",
        task / "outputs" / "sub",
        task / "outputs" / "sub" / "deeper",
    ):
        lines = mounted.run(f"ls -a -i -1 -U {shlex.quote(str(directory))}").stdout.split("\n")
        dot, dotdot = (line.split() for line in lines[:2])
        assert (dot[1], dotdot[1]) == (".", ".."), (directory, lines)
        assert int(dot[0]) == directory.stat().st_ino, directory
        if directory != root:
            assert int(dotdot[0]) == directory.parent.stat().st_ino, directory
    found = mounted.run(f"find {task}/outputs").stdout.split()
    assert sorted(found) == sorted(
        str(task / "outputs" / p)
        for p in ("", "sub", "sub/deeper", "sub/deeper/x.txt", "stdout.txt", "stderr.txt")
    )


def test_virtual_files_through_the_lifecycle(tmp_path: Path) -> None:
    service = start_service(tmp_path / "data", slots=1)
    mount = start_mount(service, tmp_path / "mnt", tmp_path / "cache")
    try:
        blocker = service.submit("sleep 60")
        service.wait_for(blocker, lambda s: s.status == S.COMPUTATION_STARTED)
        task_id = service.submit("echo start; sleep 3; echo end")
        task = mount / task_id
        # queued
        assert mount.run(f"cat {task}/status").stdout == "submitted\n"
        assert mount.run(f"cat {task}/machine_type").stdout == ""
        assert mount.run(f"cat {task}/computation_time").stdout == ""
        assert mount.run(f"ls {task}/outputs").stdout == ""
        waiter = subprocess.Popen(["cat", str(task / "wait")], stdout=subprocess.PIPE)
        # running
        assert mount.run(f"sh -c 'echo kill > {mount / blocker}/control'").returncode == 0
        wait_until(lambda: mount.run(f"cat {task}/status").stdout == "computation-started\n")
        assert re.fullmatch(r"local-\d+vcpu\n", mount.run(f"cat {task}/machine_type").stdout)
        assert TIME.match(mount.run(f"cat {task}/computation_time").stdout.encode())
        assert waiter.poll() is None, "wait must block while the task runs"
        # ended
        assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.SUCCESS
        out, _ = waiter.communicate(timeout=30)
        assert out == b"success\n" and waiter.returncode == 0
        wait_until(lambda: mount.run(f"cat {task}/status").stdout == "success\n")
        assert TIME.match(mount.run(f"cat {task}/computation_time").stdout.encode())
        assert mount.run(f"cat {task}/wait").stdout == "success\n"
        assert sorted(mount.run(f"ls {task}/outputs").stdout.split()) == [
            "stderr.txt",
            "stdout.txt",
        ]
        assert (task / "outputs" / "stdout.txt").read_text() == "start\nend\n"
        assert '"task_id": "' + task_id in (task / "info.json").read_text()
    finally:
        stop_mount(mount)
        stop(service.proc)
    assert mount.proc.returncode == 0


def test_kill_through_control(mounted: Mount) -> None:
    service = mounted.service
    running = service.submit("sleep 60")
    service.wait_for(running, lambda s: s.status == S.COMPUTATION_STARTED)
    result = mounted.run(f"echo kill > {mounted / running}/control")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: mounted.run(f"cat {mounted / running}/status").stdout == "killed\n")
    # On an ended task: "No such process". dash's echo prints its own "I/O error" for any
    # failed write, so the message is checked with bash and /bin/echo as well.
    again = mounted.run(f"echo kill > {mounted / running}/control")
    assert again.returncode != 0
    for shell in (
        f"bash -c 'echo kill > {mounted / running}/control'",
        f"/bin/echo kill > {mounted / running}/control",
    ):
        failed = mounted.run(shell)
        assert failed.returncode != 0 and "No such process" in failed.stderr, failed.stderr
    other = service.submit("sleep 60")
    service.wait_for(other, lambda s: s.status == S.COMPUTATION_STARTED)
    unknown = mounted.run(f"bash -c 'echo explode > {mounted / other}/control'")
    assert unknown.returncode != 0 and "Invalid argument" in unknown.stderr, unknown.stderr
    assert mounted.run(f"sh -c 'echo explode > {mounted / other}/control'").returncode != 0
    assert service.status(other).status == S.COMPUTATION_STARTED  # nothing was sent
    assert mounted.run(f"printf '  kill  ' > {mounted / other}/control").returncode == 0
    assert mounted.run(f"cat {mounted / other}/control").stdout == "kill\n"
    service.wait_for(other, lambda s: s.status == S.KILLED)


def test_wait_answers_at_once_for_ended_tasks_and_obeys_timeout(mounted: Mount) -> None:
    service = mounted.service
    done = service.submit("exit 4")
    ended(service, done)
    assert mounted.run(f"cat {mounted / done}/wait").stdout == "failed\n"
    long = service.submit("sleep 60")
    blocked = mounted.run(f"timeout 2 cat {mounted / long}/wait")
    assert blocked.returncode == 124
    # The mount keeps answering.
    assert mounted.run(f"cat {mounted / long}/status").stdout in (
        "started\n",
        "computation-started\n",
    )
    mounted.run(f"echo kill > {mounted / long}/control")


def test_copy_of_outputs_equals_the_archive(mounted: Mount, tmp_path: Path) -> None:
    service = mounted.service
    task_id = service.submit(
        "mkdir -p vtk log 'ünï cöde' && "
        "for i in 1 2 3 4 5; do seq 1 $((i * 20000)) > vtk/ParticleData_Fluid_$i.vtk; done && "
        "head -c 6000000 /dev/urandom > big.bin && : > empty.txt && "
        "echo 'solver converged' > log/SPH_log.txt && echo x > 'ünï cöde/file'"
    )
    assert ended(service, task_id) == S.SUCCESS
    copy = tmp_path / "copy"
    result = mounted.run(f"cp -r {mounted / task_id}/outputs {copy}")
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "reference"
    task = service.call(lambda api: api.get_task(task_id))
    url = service.call(lambda api: api.download_url(task.storage_output_path))
    with zipfile.ZipFile(io.BytesIO(httpx.get(url).content)) as zf:
        for info in zf.infolist():
            if info.filename.startswith("artifacts/") and not info.is_dir():
                target = reference / info.filename.removeprefix("artifacts/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(info))
    assert_same_tree(reference, copy)


def assert_same_tree(expected: Path, actual: Path) -> None:
    want = sorted(p.relative_to(expected) for p in expected.rglob("*"))
    got = sorted(p.relative_to(actual) for p in actual.rglob("*"))
    assert want == got
    for rel in want:
        if (expected / rel).is_file():
            assert filecmp.cmp(expected / rel, actual / rel, shallow=False), rel


def test_find_and_grep(mounted: Mount) -> None:
    service = mounted.service
    task_id = service.submit(
        "mkdir -p a/b c && echo needle > a/b/one.txt && echo hay > c/two.txt && "
        "echo 'needle again' > top.txt"
    )
    ended(service, task_id)
    outputs = mounted / task_id / "outputs"
    found = mounted.run(f"cd {outputs} && find . -type f | sort")
    assert found.stdout.split() == [
        "./a/b/one.txt",
        "./c/two.txt",
        "./stderr.txt",
        "./stdout.txt",
        "./top.txt",
    ]
    dirs = mounted.run(f"cd {outputs} && find . -type d | sort")
    assert dirs.stdout.split() == [".", "./a", "./a/b", "./c"]
    grep = mounted.run(f"cd {outputs} && grep -rn needle . | sort")
    assert grep.stdout.splitlines() == ["./a/b/one.txt:1:needle", "./top.txt:1:needle again"]


def test_writes_are_refused(mounted: Mount) -> None:
    service = mounted.service
    task_id = service.submit("echo hi")
    ended(service, task_id)
    task = mounted / task_id
    for command in (
        f"touch {task}/status",
        f"echo x > {task}/status",
        f"echo x > {task}/outputs/stdout.txt",
        f"mkdir {task}/outputs/new",
        f"mkdir {mounted.path}/newtask",
        f"rm {task}/status",
        f"mv {task}/status {task}/renamed",
        f"chmod 777 {task}/status",
        f"chmod 777 {task}/control",
        f"ln -s status {task}/link",
        f"truncate -s 0 {task}/outputs/stdout.txt",
    ):
        result = mounted.run(command)
        assert result.returncode != 0, command
        assert "Read-only file system" in result.stderr, (command, result.stderr)
    assert (task / "status").read_text() == "success\n"


def test_new_tasks_show_up_and_unlisted_ids_resolve(mounted: Mount) -> None:
    service = mounted.service
    mounted.run(f"ls {mounted.path}")  # prime the listing cache
    task_id = service.submit("true")
    # By name at once, even before the listing knows it.
    assert mounted.run(f"cat {mounted / task_id}/status").returncode == 0
    wait_until(lambda: task_id in mounted.run(f"ls {mounted.path}").stdout.split(), timeout=10)
    missing = mounted.run(f"ls {mounted.path}/no-such-task")
    assert missing.returncode != 0 and "No such file or directory" in missing.stderr


def test_unmount_by_signal(service: Service, tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        mount = start_mount(service, tmp_path / f"m{sig}", tmp_path / "cache")
        assert mount.run(f"ls {mount.path}").returncode == 0
        assert stop(mount.proc, sig) == 0
        assert "unmounted" in mount.log.read_text()
        from taskfs.fs.mount import mount_entry

        assert mount_entry(mount.path) is None
        assert list(mount.path.iterdir()) == []


def test_mount_refuses_busy_or_bad_mountpoints(mounted: Mount, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("x")
    cases = {
        str(mounted.path): "already mounted",
        str(full): "not empty",
        str(tmp_path / "missing"): "does not exist",
        str(full / "file"): "not a directory",
    }
    for path, message in cases.items():
        result = subprocess.run(
            taskfs_cmd("mount", path, "--data-dir", str(mounted.service.data_dir)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_background_mount_and_unmount_command(service: Service, tmp_path: Path) -> None:
    path = tmp_path / "bg"
    path.mkdir()
    started = subprocess.run(
        taskfs_cmd(
            "mount",
            str(path),
            "--data-dir",
            str(service.data_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    assert "mounted" in started.stdout
    assert "started the local service" not in started.stderr  # it was running
    assert subprocess.run(["ls", str(path)], capture_output=True, check=False).returncode == 0
    done = subprocess.run(
        taskfs_cmd("unmount", str(path)), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    from taskfs.fs.mount import mount_entry

    wait_until(lambda: mount_entry(path) is None)
    time.sleep(0.1)


@pytest.mark.parametrize(
    ("shadow", "name"),
    [("taskfs", "café"), ("taskfs.py", "a b\\c")],
    ids=["in-a-clone-at-a-utf8-name", "beside-a-module-at-an-escaped-name"],
)
def test_a_background_mount_from_any_directory_at_any_name(
    service: Service, tmp_path: Path, shadow: str, name: str
) -> None:
    """Where the user stands changes nothing (the folder they cloned taskfs into holds a
    ``taskfs`` folder; a ``taskfs.py`` would be imported as well), and a mountpoint named in
    UTF-8 or with what /proc/self/mountinfo escapes (a space, a backslash) comes up, answers
    and unmounts; the detached processes keep no hold on the user's directory."""
    here = tmp_path / "work"
    here.mkdir()
    if shadow.endswith(".py"):
        (here / shadow).write_text('raise SystemExit("the wrong taskfs was imported")\n')
    else:
        (here / shadow).mkdir()  # a namespace package: it hides an editable install
    (here / name).mkdir()
    command = str(Path(sys.executable).with_name("taskfs"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command, *args], cwd=here, capture_output=True, text=True, timeout=60, check=False
        )

    started = run("mount", name, "--data-dir", str(service.data_dir), "--cache-dir", "cache")
    assert started.returncode == 0, started.stderr
    assert (here / "cache").is_dir()  # relative paths are the user's, not the daemon's
    pid = int(re.search(r"\(pid (\d+),", started.stdout).group(1))  # type: ignore[union-attr]
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        found = mounted_at(here / name)
        assert found is not None and found.fstype == "fuse.taskfs"
        assert ".taskfs" in os.listdir(here / name)
        assert (here / name / ".taskfs" / "stats").read_bytes().startswith(b"{")
    finally:
        done = run("unmount", name)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: mounted_at(here / name) is None)
    served = run("serve", "--background", "--data-dir", "data", "--port", "0")
    assert served.returncode == 0, served.stderr
    assert served.stdout.startswith("http://127.0.0.1:")
    stopped = run("serve", "--stop", "--data-dir", "data")
    assert stopped.returncode == 0, stopped.stderr


def test_a_mountpoint_named_through_a_link_and_a_closed_output(
    service: Service, tmp_path: Path
) -> None:
    """A mountpoint reached through a symbolic link is the directory it leads to (as mount(8)
    and umount(8) take it): the mount comes up and unmounts by either name. A mount whose
    one line cannot be written (standard output closed) is taken back, in one line."""
    real = tmp_path / "real" / "mnt"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    via = tmp_path / "link" / "mnt"
    data = ["--data-dir", str(service.data_dir), "--cache-dir", str(tmp_path / "cache")]
    started = subprocess.run(
        taskfs_cmd("mount", str(via), *data), capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    assert mounted_at(real) is not None and f"at {real} " in started.stdout
    assert unmount_cmd(via).returncode == 0
    wait_until(lambda: mounted_at(real) is None)
    closed = subprocess.run(
        ["sh", "-c", " ".join([*taskfs_cmd("mount", str(via), *data), ">&-"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert closed.returncode == 1
    assert closed.stderr == (
        "taskfs: error: cannot write to standard output: standard output is closed; "
        "unmounted it again\n"
    )
    assert mounted_at(real) is None


def test_unmount_recovers_a_mount_whose_process_died(service: Service, tmp_path: Path) -> None:
    from taskfs.fs.mount import mount_entry

    mount = start_mount(service, tmp_path / "dead", tmp_path / "cache")
    assert stop(mount.proc, signal.SIGKILL) == -signal.SIGKILL
    dead = mount.run(f"ls {mount.path}")
    assert dead.returncode != 0 and "Transport endpoint is not connected" in dead.stderr
    refused = subprocess.run(
        taskfs_cmd("mount", str(mount.path), "--data-dir", str(service.data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "already mounted" in refused.stderr
    done = unmount_cmd(mount.path)
    assert done.returncode == 0, done.stderr
    assert mount_entry(mount.path) is None
    again = start_mount(service, mount.path, tmp_path / "cache")
    assert again.run(f"ls {again.path}").returncode == 0
    stop_mount(again)
    assert again.proc.returncode == 0


def test_recursive_tools_finish_over_a_running_task(mounted: Mount, tmp_path: Path) -> None:
    """grep -r, cp -r, tar, rsync -a and find -exec cat read every file they find: none of
    them may block on ``wait`` (listed nowhere, reachable by name)."""
    task_id = mounted.service.submit("echo needle; sleep 120")
    mounted.service.wait_for(task_id, lambda s: s.status == S.COMPUTATION_STARTED)
    task = mounted / task_id
    for command in (
        f"grep -r needle {task}",
        f"cp -r {task} {tmp_path / 'copy'}",
        f"tar -cf {tmp_path / 'task.tar'} -C {mounted.path} {task_id}",
        f"find {task} -type f -exec cat {{}} +",
        f"rsync -a {task}/ {tmp_path / 'synced'}",
    ):
        started = time.monotonic()
        done = mounted.run(f"timeout 60 {command}", timeout=90)
        assert done.returncode != 124, f"{command} hung"
        assert done.returncode == 0, f"{command}: {done.stderr}"
        assert time.monotonic() - started < 30, command
    assert "needle" in mounted.run(f"grep -r needle {task}").stdout
    assert not (tmp_path / "copy" / "wait").exists()
    assert (tmp_path / "synced" / "status").read_text() == "computation-started\n"
    mounted.service.call(lambda api: api.kill(task_id))


def test_tar_rsync_and_cp_of_the_whole_mount_exit_0(tmp_path: Path) -> None:
    """The mount's root as a whole, its own ``.taskfs/stats`` (a snapshot per open, which
    changes as it is read) and views included: every tool finishes without a complaint."""
    service = start_service(tmp_path / "data")
    mount = None
    try:
        done = service.submit("mkdir -p a/b; echo one > a/b/one.txt; echo out")
        failed = service.submit("echo err >&2; exit 3")
        for task_id in (done, failed):
            service.wait_for(task_id, lambda s: s.is_terminated)
        mount = start_mount(service, tmp_path / "tasks", tmp_path / "cache")
        for command in (
            f"tar -cf {tmp_path / 'all.tar'} -C {mount.path} .",
            f"rsync -a {mount.path}/ {tmp_path / 'synced'}",
            f"cp -r {mount.path} {tmp_path / 'copy'}",
        ):
            ran = mount.run(f"timeout 60 {command}", timeout=90)
            assert ran.returncode == 0, f"{command}: {ran.stderr}"
        listed = subprocess.run(
            ["tar", "-tvf", str(tmp_path / "all.tar")], capture_output=True, text=True, check=True
        ).stdout
        assert f"./{done}/outputs/a/b/one.txt" in listed and "./.taskfs/stats" in listed
        copied = json.loads((tmp_path / "copy" / ".taskfs" / "stats").read_text())
        assert copied["api_requests"]  # cp reads the snapshot whole
        assert (tmp_path / "synced" / failed / "status").read_text() == "failed\n"
        assert (tmp_path / "synced" / done / "outputs" / "a" / "b" / "one.txt").read_text() == (
            "one\n"
        )
    finally:
        if mount is not None:
            stop_mount(mount)
        stop(service.proc)


def test_a_busy_unmount_says_it_was_lazy(service: Service, tmp_path: Path) -> None:
    mount = start_mount(service, tmp_path / "busy", tmp_path / "cache")
    holder = subprocess.Popen(["sleep", "60"], cwd=mount.path)
    try:
        done = unmount_cmd(mount.path)
        assert done.returncode == 0, done.stderr
        assert f"{mount.path} was busy (in use by {holder.pid} (sleep))" in done.stderr
        assert "unmounted lazily" in done.stderr
        wait_until(lambda: mount_entry(mount.path) is None)
    finally:
        holder.kill()
        holder.wait()
        stop_mount(mount)
    quiet = start_mount(service, tmp_path / "idle", tmp_path / "cache2")
    done = unmount_cmd(quiet.path)
    assert (done.returncode, done.stderr) == (0, "")
    stop_mount(quiet)


def test_df_shows_the_listed_outputs(mounted: Mount) -> None:
    """df: Size and Used are the listed tasks' output archives (as the API reports them),
    nothing Available (read-only); df -i: the listed tasks."""
    task_id = mounted.service.submit("head -c 300000 /dev/urandom > noise.bin")
    ended(mounted.service, task_id)
    time.sleep(2.1)  # the listing refreshes
    os.listdir(mounted.path)
    page = mounted.service.call(lambda api: api.list_page(1, 500))
    expected = sum(int(t.metrics.output_zipped_size_bytes or 0) for t in page.tasks)
    assert expected > 300000
    out = mounted.run(f"df -B1 --output=size,used,avail {mounted.path}").stdout.split()
    size, used, avail = (int(x) for x in out[-3:])
    assert size == used and avail == 0
    assert expected <= size < expected + (128 << 10) * len(page.tasks)
    inodes = mounted.run(f"df --output=itotal,iused,iavail {mounted.path}").stdout.split()
    assert [int(x) for x in inodes[-3:]] == [len(page.tasks), len(page.tasks), 0]


def test_inputs_show_the_input_archive(mounted: Mount, tmp_path: Path) -> None:
    """inputs/: the task's input archive's sim_dir/, read lazily like outputs/ (oracle: the
    input directory itself); empty for a task submitted without one."""
    sim = tmp_path / "sim"
    (sim / "mesh").mkdir(parents=True)
    (sim / "params.txt").write_text("steps=3\n")
    (sim / "mesh" / "grid.dat").write_bytes(bytes(range(256)) * 400)
    with_input = mounted.service.submit("cat params.txt", input_dir=sim)
    without = mounted.service.submit("true")
    ended(mounted.service, with_input)
    ended(mounted.service, without)
    inputs = mounted / with_input / "inputs"
    assert sorted(p.name for p in inputs.iterdir()) == ["mesh", "params.txt"]
    assert (inputs / "params.txt").read_text() == "steps=3\n"
    assert (inputs / "mesh" / "grid.dat").read_bytes() == (sim / "mesh" / "grid.dat").read_bytes()
    assert filecmp.cmpfiles(sim, inputs, ["params.txt"], shallow=False)[0] == ["params.txt"]
    assert list((mounted / without / "inputs").iterdir()) == []
    assert mounted.run(f"echo x > {inputs}/params.txt").returncode != 0  # read-only


def test_mount_options_as_fstab_gives_them(service: Service, tmp_path: Path) -> None:
    """-o takes what an fstab line holds (mount(8)'s rw, exec, ... mean nothing more; ro and
    noexec the kernel applies); uid, gid and umask set every node's owner and mode."""
    task_id = service.submit("true")
    ended(service, task_id)
    path = tmp_path / "opts"
    options = f"rw,nosuid,nodev,data_dir={service.data_dir},cache_dir={tmp_path / 'c'}"
    mount = start_mount(None, path, tmp_path / "cache", "-o", f"{options},uid=1234,gid=4321")
    try:
        st = (mount / task_id / "status").stat()
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (1234, 4321, "0o444")
    finally:
        stop_mount(mount)
    mount = start_mount(None, path, tmp_path / "cache", "-o", options, "--umask", "027")
    try:
        assert oct((mount / task_id / "status").stat().st_mode & 0o777) == "0o440"
        assert oct((mount / task_id).stat().st_mode & 0o777) == "0o550"
        assert oct((mount / task_id / "control").stat().st_mode & 0o777) == "0o600"
    finally:
        stop_mount(mount)
    running = service.submit("sleep 60")
    mount = start_mount(None, path, tmp_path / "cache", "-o", f"{options},ro,noexec")
    try:
        found = mounted_at(path)
        assert found is not None and {"ro", "noexec"} <= found.options, found
        refused = mount.run(f"echo kill > {mount / running / 'control'}")
        assert "Read-only file system" in refused.stderr
        assert service.call(lambda api: api.get_status(running)).status != S.KILLED
    finally:
        stop_mount(mount)
        service.call(lambda api: api.kill(running))
    bad = subprocess.run(
        taskfs_cmd("mount", str(path), "-o", "colour=blue"), capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "unsupported mount option 'colour=blue'" in bad.stderr
    bad = subprocess.run(
        taskfs_cmd("mount", str(path), "-o", "umask=999"), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not an octal mask" in bad.stderr
    bad = subprocess.run(
        taskfs_cmd("mount", str(path), "-o", "api_url="), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "mount option 'api_url=' needs a value" in bad.stderr


def ended_task_for_mount_8(service: Service) -> str:
    """A task that has ended, to be seen through a mount made by mount(8), which needs root
    for a FUSE type (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mount(8) of a FUSE type needs root (CI runs as root)")
    task_id = service.submit("true")
    ended(service, task_id)
    return task_id


def test_mount_8_mounts_it_as_an_fstab_line_would(service: Service, tmp_path: Path) -> None:
    """mount(8) through mount.fuse3: ``mount -t fuse /path/to/taskfs#taskfs DIR -o ...`` (the
    fstab line ``/path/to/taskfs#taskfs DIR fuse data_dir=...,cache_dir=... 0 0``) runs
    ``taskfs taskfs DIR -o rw,...,data_dir=...`` with mount(8)'s clean environment."""
    task_id = ended_task_for_mount_8(service)
    path = tmp_path / "fstab"
    path.mkdir()
    program = Path(sys.executable).parent / "taskfs"
    done = subprocess.run(
        [
            "mount",
            "-t",
            "fuse",
            f"{program}#taskfs",
            str(path),
            "-o",
            f"data_dir={service.data_dir},cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    try:
        assert done.returncode == 0, done.stderr
        found = mount_entry(path)
        assert found is not None and found[0] == "fuse.taskfs"
        assert (path / task_id / "status").read_text() == "success\n"
    finally:
        subprocess.run(taskfs_cmd("unmount", str(path)), timeout=60, check=False)


def test_mount_8_mounts_the_fuse_taskfs_type_and_an_fstab_line(
    service: Service, tmp_path: Path
) -> None:
    """``mount -t fuse.taskfs`` and an fstab line of that type (``mount -T FSTAB DIR``: a
    table of the test's own), with ``taskfs`` where mount(8)'s PATH finds it: in
    /usr/local/bin, here bind-mounted in a private mount namespace, so that the machine is
    left as it was."""
    task_id = ended_task_for_mount_8(service)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "taskfs").symlink_to(Path(sys.executable).parent / "taskfs")
    by_type, by_fstab = tmp_path / "by-type", tmp_path / "by-fstab"
    by_type.mkdir()
    by_fstab.mkdir()
    options = f"data_dir={service.data_dir},cache_dir={tmp_path / 'cache'}"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"taskfs  {by_fstab}  fuse.taskfs  {options},noauto  0 0\n")
    status = f"{task_id}/status"
    script = f"""
        set -e
        trap 'rc=$?; set +e; umount -l {by_type} {by_fstab} 2>/dev/null; exit $rc' EXIT
        mount --bind {bin_dir} /usr/local/bin
        mount -t fuse.taskfs taskfs {by_type} -o {options}
        grep " {by_type} fuse.taskfs " /proc/self/mounts
        cat {by_type}/{status}
        mount -T {fstab} {by_fstab}
        grep " {by_fstab} fuse.taskfs " /proc/self/mounts
        cat {by_fstab}/{status}
        /usr/local/bin/taskfs unmount {by_type}
        /usr/local/bin/taskfs unmount {by_fstab}
        ! grep -q " {tmp_path}/by-" /proc/self/mounts
    """
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("success\n") == 2, done.stdout


def test_the_readme_systemd_unit_runs(service: Service, tmp_path: Path) -> None:
    """The README's unit, started as systemd would start it (its ExecStart in the foreground,
    then its ExecStop), with this machine's paths and the local service for the cloud's."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    unit = readme.split("```ini\n", 1)[1].split("```", 1)[0]
    lines = dict(
        line.split("=", 1)
        for line in unit.splitlines()
        if line.startswith(("ExecStart=", "ExecStop="))
    )
    program = str(Path(sys.executable).parent / "taskfs")
    path = tmp_path / "unit"
    path.mkdir()

    def local(command: str) -> list[str]:
        command = command.replace("/opt/taskfs/.venv/bin/taskfs", program)
        command = command.replace("/mnt/tasks", str(path))
        command = re.sub(
            r"api_url=[^,]+,api_key_file=[^,]+", f"data_dir={service.data_dir}", command
        )
        return shlex.split(command.replace("/var/cache/taskfs", str(tmp_path / "cache")))

    start = local(lines["ExecStart"])
    assert "--foreground" in start
    main = subprocess.Popen(start, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        wait_until(lambda: mount_entry(path) is not None)
        task_id = service.submit("true")
        ended(service, task_id)
        assert (path / task_id / "status").read_text() == "success\n"
        stopped = subprocess.run(local(lines["ExecStop"]), timeout=60, check=False)
        assert stopped.returncode == 0
        assert main.wait(timeout=30) == 0
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
