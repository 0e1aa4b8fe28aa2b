"""Whatever a task leaves behind, the service ends it, archives what can be read and says what
it could not, and keeps running (issue: durability against what tasks leave behind).

Each case runs one hostile task next to a harmless bystander on a real ``taskfs serve``
process, then checks against ``zipfile`` reading the stored archive: the task ended, every
readable file is in the archive byte for byte, the packing report lists exactly the rest, the
bystander succeeded, and the service restarts cleanly with both tasks intact.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from taskfs.api.models import TaskStatusCode as S
from tests.support import Service, alive, start_service, stop

PY = shlex.quote(sys.executable)
ROOT = os.geteuid() == 0


@dataclass
class Case:
    name: str
    commands: list[str]
    files: dict[str, bytes] = field(default_factory=dict)
    issues: set[tuple[str, str]] = field(default_factory=set)
    dirs: set[str] = field(default_factory=set)
    report: str = "taskfs-packing.txt"
    # For members too large to hold in a dict: name -> check of the open member.
    large: dict[str, Callable[[zipfile.ZipFile, zipfile.ZipInfo], None]] = field(
        default_factory=dict
    )


def _deep_tree(depth: int) -> str:
    script = (
        "import os\n"
        f"for _ in range({depth}):\n"
        "    os.mkdir('level-0123'); os.chdir('level-0123')\n"
        "open('leaf', 'w').write('bottom')\n"
    )
    return f"{PY} -c {shlex.quote(script)}"


def _many_files(n: int) -> str:
    script = (
        "import os\n"
        "os.mkdir('many')\n"
        f"for i in range({n}):\n"
        "    with open(f'many/{i:06d}', 'w') as f: f.write(f'{i}\\n')\n"
    )
    return f"{PY} -c {shlex.quote(script)}"


def _all_zeros(size: int) -> Callable[[zipfile.ZipFile, zipfile.ZipInfo], None]:
    def check(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        assert info.file_size == size
        zeros = bytes(8 << 20)
        total = 0
        with archive.open(info) as member:  # zipfile checks the CRC at the end
            while chunk := member.read(len(zeros)):
                assert chunk == zeros[: len(chunk)]
                total += len(chunk)
        assert total == size

    return check


CASES = [
    Case(
        "mtimes-before-1980",
        [
            "echo a > a; touch -d @0 a",
            "echo b > b; touch -d @1 b",
            "echo c > c; touch -d @-31536000 c",
            "mkdir old; echo d > old/d; touch -d @0 old",
        ],
        files={"a": b"a\n", "b": b"b\n", "c": b"c\n", "old/d": b"d\n"},
        issues={("clamped", "a"), ("clamped", "b"), ("clamped", "c")},
    ),
    Case(
        "mtimes-far-future",
        ["echo f > f; touch -d @99999999999 f", "echo g > g; touch -d 2200-01-01 g"],
        files={"f": b"f\n", "g": b"g\n"},
        issues={("clamped", "f"), ("clamped", "g")},
    ),
    Case(
        "fifo",
        ["mkfifo pipe; mkdir d; mkfifo d/p2; echo x > x"],
        files={"x": b"x\n"},
        issues={("skipped", "pipe"), ("skipped", "d/p2")},
        dirs={"d/"},
    ),
    Case(
        "socket",
        [f"{PY} -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\"; echo y > y"],
        files={"y": b"y\n"},
        issues={("skipped", "sock")},
    ),
    Case(
        "device-node",
        ["mknod dev c 1 3 2>/dev/null || mkfifo dev"],  # a device as root, else a FIFO
        issues={("skipped", "dev")},
    ),
    Case(
        "symlink-loops",
        ["ln -s l2 l1; ln -s l1 l2; ln -s self self; mkdir d; ln -s .. d/up"],
        issues={("skipped", "l1"), ("skipped", "l2"), ("skipped", "self"), ("skipped", "d/up")},
        dirs={"d/"},
    ),
    Case(
        "symlinks-out-of-the-tree",
        [
            "ln -s /etc/hostname host",
            "ln -s ../../api_key key",  # the service's own API key, two levels up
            "ln -s / root; ln -s .. up; ln -s missing dangling",
        ],
        issues={
            ("skipped", "host"),
            ("skipped", "key"),
            ("skipped", "root"),
            ("skipped", "up"),
            ("skipped", "dangling"),
        },
    ),
    Case(
        "symlinks-inside-the-tree",
        ["mkdir d; echo in > d/f; ln -s d/f flink; ln -s d dlink"],
        files={"d/f": b"in\n", "flink": b"in\n"},
        issues={("changed", "dlink")},
        dirs={"dlink/"},
    ),
    Case(
        "names-not-utf8",
        [
            "printf x > \"$(printf 'caf\\351')\"",
            "mkdir \"$(printf 'd\\377')\"; printf y > \"$(printf 'd\\377')/in\"",
        ],
        files={"caf%E9": b"x", "d%FF/in": b"y"},
        issues={("renamed", "caf%E9"), ("renamed", "d%FF")},
    ),
    Case(
        "unreadable-file",
        ["echo secret > locked; chmod 000 locked; mkdir shut; echo z > shut/z; chmod 000 shut"],
        # The service runs as this test's user: root reads everything, others cannot.
        files={"locked": b"secret\n", "shut/z": b"z\n"} if ROOT else {},
        issues=set() if ROOT else {("skipped", "locked"), ("skipped", "shut/")},
    ),
    Case(
        "report-name-taken",
        ["echo mine > taskfs-packing.txt; mkfifo p"],
        files={"taskfs-packing.txt": b"mine\n"},
        issues={("skipped", "p")},
        report="taskfs-packing-2.txt",
    ),
    Case(
        "empty-directories",
        ["mkdir -p e1 e2/e3 full; echo z > full/z"],
        files={"full/z": b"z\n"},
        dirs={"e1/", "e2/e3/"},
    ),
    Case(
        "deeper-than-path-max",
        [_deep_tree(500)],
        files={"/".join(["level-0123"] * 500) + "/leaf": b"bottom"},
    ),
    Case(
        "100000-small-files",
        [_many_files(100_000)],
        files={f"many/{i:06d}": f"{i}\n".encode() for i in range(100_000)},
    ),
    Case(
        "2-GiB-sparse-file",
        ["truncate -s 2G sparse"],
        large={"sparse": _all_zeros(2 << 30)},
    ),
]
SLOW = {"100000-small-files", "2-GiB-sparse-file"}


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path / "data", slots=2)
    yield svc
    stop(svc.proc)


def _report(archive: zipfile.ZipFile, name: str) -> set[tuple[str, str]]:
    """``(action, path)`` of each line of the packing report (``action: "path": why``)."""
    if f"artifacts/{name}" not in archive.NameToInfo:
        return set()
    found = set()
    for line in archive.read(f"artifacts/{name}").decode().splitlines()[2:]:
        action, _, rest = line.partition(": ")
        path, end = json.JSONDecoder().raw_decode(rest)
        assert rest[end:].startswith(": ") and len(rest) > end + 2, line
        found.add((action, path))
    return found


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in SLOW else []) for c in CASES],
)
@pytest.mark.expected_warnings  # the service logs a warning per task with a packing report
@pytest.mark.timeout(300)
def test_hostile_task(service: Service, case: Case) -> None:
    bystander = service.submit("sleep 1; echo still here")
    task_id = service.submit(*case.commands)
    final = service.wait_for(task_id, lambda s: s.is_terminated, timeout=240)
    assert final.status == S.SUCCESS, service.call(lambda api: api.get_task(task_id))
    assert service.wait_for(bystander, lambda s: s.is_terminated).status == S.SUCCESS

    stored = service.data_dir / "storage" / task_id / "output.zip"
    with zipfile.ZipFile(stored) as archive:
        infos = {i.filename.removeprefix("artifacts/"): i for i in archive.infolist()}
        assert infos.pop("").is_dir()
        dirs = {name for name, info in infos.items() if info.is_dir()}
        assert dirs == case.dirs
        for name in (case.report, "stdout.txt", "stderr.txt", *dirs):
            infos.pop(name, None)
        for name, check in case.large.items():
            check(archive, infos.pop(name))
        assert infos.keys() == case.files.keys()
        for name, info in infos.items():
            assert archive.read(info) == case.files[name], name
        assert _report(archive, case.report) == case.issues
    task = service.call(lambda api: api.get_task(task_id))
    assert task.metrics.output_total_files == len(case.files) + len(case.large) + 2
    assert not (service.data_dir / "work" / task_id).exists()

    # The service restarts cleanly and keeps both tasks as they ended.
    assert stop(service.proc) == 0
    again = start_service(service.data_dir, slots=2)
    service.proc, service.url = again.proc, again.url
    assert service.status(task_id).status == S.SUCCESS
    assert service.status(bystander).status == S.SUCCESS
    after = service.submit("echo fine")
    assert service.wait_for(after, lambda s: s.is_terminated).status == S.SUCCESS


# -- what a task does to the service around it ---------------------------------------------


def _gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in pids if alive(pid)]:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("name", "sabotage"),
    [
        ("fifo", "rm stdout.txt; mkfifo stdout.txt"),
        ("directory", "rm stderr.txt; mkdir stderr.txt"),
        ("link", "rm stdout.txt; ln -s /tmp/taskfs-never-written stdout.txt"),
        ("workdir-link", 'd=$PWD; cd ..; rm -rf "$d"; ln -s / "$d"'),
    ],
)
@pytest.mark.expected_warnings
def test_a_task_that_breaks_its_own_output_files_fails_alone(
    service: Service, name: str, sabotage: str
) -> None:
    """The next command cannot start: the task fails with the reason; nothing blocks, nothing
    is written through a link, and the service and a task beside it go on."""
    bystander = service.submit("sleep 2; echo still here")
    task_id = service.submit(sabotage, "echo second")
    final = service.wait_for(task_id, lambda s: s.is_terminated, timeout=30)
    assert final.status == S.FAILED
    task = service.call(lambda api: api.get_task(task_id))
    assert task.error_detail is not None
    assert (
        "cannot write the output" in task.error_detail or "working directory" in task.error_detail
    )
    assert service.wait_for(bystander, lambda s: s.is_terminated).status == S.SUCCESS
    assert not Path("/tmp/taskfs-never-written").exists()
    with zipfile.ZipFile(service.data_dir / "storage" / task_id / "output.zip") as archive:
        names = set(archive.namelist())
    if name == "workdir-link":  # the link is neither followed nor left behind
        assert names == {"artifacts/", "artifacts/taskfs-packing.txt"}
    assert not (service.data_dir / "work" / task_id).exists()
    assert not (service.data_dir / "work" / task_id).is_symlink()


@pytest.mark.parametrize(
    "attack",
    [
        "kill -9 $PPID",  # the supervisor: killed by its own task
        "kill -9 0",  # the command's process group (the supervisor is not in it)
        "kill -STOP $PPID; sleep 2",  # the supervisor, stopped
    ],
)
@pytest.mark.expected_warnings
def test_a_task_cannot_free_its_processes_by_attacking_its_supervisor(
    service: Service, attack: str
) -> None:
    task_id = service.submit(f"setsid sleep 300 & echo $! > escapee.pid; sleep 0.3; {attack}")
    pid_file = service.data_dir / "work" / task_id / "escapee.pid"
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.05)
    escapee = int(pid_file.read_text())
    final = service.wait_for(task_id, lambda s: s.is_terminated, timeout=30)
    assert final.status in (S.SUCCESS, S.FAILED)
    assert _gone([escapee]), f"process {escapee} outlived its task ({attack})"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_and_restart_while_a_big_output_is_packed(service: Service) -> None:
    """Stopping abandons packing (it does not wait for it); the next start answers at once and
    ends the task with the end its commands earned."""
    task_id = service.submit("truncate -s 1G big.bin; echo done")  # a few seconds to pack
    service.wait_for(task_id, lambda s: s.status == S.COMPUTATION_ENDED, timeout=30)
    assert stop(service.proc) == 0
    log = (service.data_dir / "test-service.log").read_text()
    assert f"packing {task_id} abandoned until the next start" in log
    again = start_service(service.data_dir, slots=2)
    service.proc, service.url = again.proc, again.url
    assert service.status(task_id).status in (S.COMPUTATION_ENDED, S.SUCCESS)  # answering
    quick = service.submit("echo meanwhile")
    assert service.wait_for(quick, lambda s: s.is_terminated).status == S.SUCCESS
    assert service.wait_for(task_id, lambda s: s.is_terminated, timeout=240).status == S.SUCCESS


WALKER_C = r"""
#include <signal.h>
#include <unistd.h>
int main(void) {
    signal(SIGTERM, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    for (;;) { pid_t p = fork(); if (p > 0) _exit(0); if (p < 0) usleep(1000); }
}
"""
WALKER_PY = "import os\nwhile True:\n    if os.fork() > 0:\n        os._exit(0)\n"

# Attaches to its own supervisor with ptrace (which root may do even to a process that is not
# dumpable) and holds it stopped.
HOLD_PY = """
import ctypes, os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid = os.getpid()
while b"reaper.py" not in open(f"/proc/{pid}/cmdline", "rb").read():
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
libc = ctypes.CDLL(None, use_errno=True)
print("attach", libc.ptrace(16, pid, 0, 0), flush=True)
os.waitpid(pid, 0x40000000)
time.sleep(3600)
"""


def _walker(tmp_path: Path) -> list[str]:
    """A program that forks and exits in a tight loop (its pid changes all the time)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is not None:
        source = tmp_path / "walker.c"
        source.write_text(WALKER_C)
        subprocess.run([compiler, "-O2", "-o", str(tmp_path / "walker"), str(source)], check=True)
        return [str(tmp_path / "walker")]
    (tmp_path / "walker.py").write_text(WALKER_PY)
    return [sys.executable, str(tmp_path / "walker.py")]


def _by_name(name: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if name.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                continue
    return found


def _zombies_of(pid: int) -> int:
    count = 0
    for child in os.listdir("/proc"):
        if child.isdigit():
            try:
                with open(f"/proc/{child}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            count += fields[0] == "Z" and int(fields[1]) == pid
    return count


@pytest.mark.expected_warnings
def test_a_process_that_forks_in_a_loop_dies_with_its_task(
    service: Service, tmp_path: Path
) -> None:
    walker = shlex.join(_walker(tmp_path))
    task_id = service.submit(f"{walker} & sleep 1; echo done")
    assert service.wait_for(task_id, lambda s: s.is_terminated, timeout=30).status == S.SUCCESS
    name = Path(walker.split()[-1]).name
    assert _gone_by(lambda: not _by_name(name)), "the fork walker outlived its task"
    assert _zombies_of(service.proc.pid) < 5
    assert service.status(task_id).status == S.SUCCESS  # and the service answers


@pytest.mark.expected_warnings
def test_a_task_holding_its_supervisor_with_ptrace_cannot_stall_the_service(
    service: Service, tmp_path: Path
) -> None:
    (tmp_path / "hold.py").write_text(HOLD_PY)
    task_id = service.submit(
        f"setsid sleep 1300 & {shlex.quote(sys.executable)} {tmp_path / 'hold.py'}",
        ttl_seconds=2,
    )
    service.wait_for(task_id, lambda s: s.status == S.COMPUTATION_STARTED)
    time.sleep(3)
    started = time.monotonic()
    assert service.status(task_id) is not None  # answering while its supervisor is held
    assert time.monotonic() - started < 5
    final = service.wait_for(task_id, lambda s: s.is_terminated, timeout=30)
    assert final.status == S.TTL_EXCEEDED
    assert _gone_by(lambda: not _by_name("sleep 1300") and not _by_name("hold.py"))


@pytest.mark.expected_warnings
def test_a_stopped_supervisor_and_a_crashed_service_free_nothing(service: Service) -> None:
    task_id = service.submit(
        "sup=$PPID; sleep 1236 & echo $! > pid; while :; do kill -STOP $sup; sleep 0.01; done"
    )
    pid_file = service.data_dir / "work" / task_id / "pid"
    assert _gone_by(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    sleeper = int(pid_file.read_text())
    stop(service.proc, signal.SIGKILL)
    again = start_service(service.data_dir, slots=2)
    service.proc, service.url = again.proc, again.url
    final = service.wait_for(task_id, lambda s: s.is_terminated, timeout=30)
    assert final.status == S.EXECUTER_TERMINATED
    assert _gone_by(lambda: not alive(sleeper)), "a process of the task outlived the crash"


def test_a_filesystem_mounted_in_a_work_dir_is_neither_packed_nor_emptied(
    service: Service, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "keep.txt").write_text("important")
    task_id = service.submit(
        f"mkdir data && (mount --bind {precious} data 2>/dev/null || echo not root); echo ok"
    )
    assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.SUCCESS
    with zipfile.ZipFile(service.data_dir / "storage" / task_id / "output.zip") as archive:
        assert "artifacts/data/keep.txt" not in archive.namelist()
    assert (precious / "keep.txt").read_text() == "important"
    assert (precious / "sub").is_dir()
    work = service.data_dir / "work" / task_id
    if (work / "data").exists():  # the mount is left in place (and reported), not entered
        subprocess.run(["umount", str(work / "data")], check=False)


def test_a_hard_linked_output_file_is_never_appended_to(service: Service, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched\n")
    task_id = service.submit(f"rm stdout.txt; ln {outside} stdout.txt", "echo second")
    assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.FAILED
    task = service.call(lambda api: api.get_task(task_id))
    assert "other links" in (task.error_detail or "")
    assert outside.read_text() == "untouched\n"


def _gone_by(check: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False
