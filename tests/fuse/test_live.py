"""Running tasks through a real mount: ``outputs/`` over the live channel, GNU ``tail -f``
across the task's end, a reader polling many small appends, ``top``, and what a reader sees
of a file the live channel cannot carry.

Oracles: the outputs archive once the task has ended (read through the mount and by
``zipfile``), GNU ``tail``, ``ls`` and ``cat``; latency is measured from the timestamp each
line carries to when ``tail -f`` printed it."""

from __future__ import annotations

import io
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from taskfs.api.models import TaskStatusCode as S
from tests.fuse.conftest import Mount, Service, start_mount, stop_mount, wait_until

pytest.importorskip("aiortc")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_mount(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("live")
    mount = start_mount(service, base / "tasks", base / "cache", "--live-idle", "1")
    yield mount
    stop_mount(mount)
    assert mount.proc.returncode == 0, mount.log.read_text()
    log = mount.log.read_text()
    assert " WARNING " not in log and " ERROR " not in log, log


def webrtc_loaded(pid: int) -> bool:
    """Whether the WebRTC stack (PyAV's libraries) is mapped into process ``pid``."""
    return "libavcodec" in Path(f"/proc/{pid}/maps").read_text()


def test_the_webrtc_stack_loads_when_a_running_task_is_first_followed(
    service: Service, tmp_path: Path
) -> None:
    """An idle mount, and one that lists and reads ended tasks, has not loaded aiortc and
    PyAV (about 35 MB resident): the first look at a running task's outputs loads them."""
    mount = start_mount(service, tmp_path / "tasks", tmp_path / "cache")
    try:
        ended = service.submit("echo done")
        service.wait_for(ended, lambda s: s.is_terminated)
        assert (mount / ended / "outputs" / "stdout.txt").read_bytes() == b"done\n"
        rss = psutil.Process(mount.proc.pid).memory_info().rss
        print(f"\nresident memory of a mount before it follows a running task: {rss >> 20} MiB")
        assert not webrtc_loaded(mount.proc.pid)
        task_id = computing(service, "echo hi; sleep 30")
        wait_until(lambda: "stdout.txt" in os.listdir(mount / task_id / "outputs"))
        assert webrtc_loaded(mount.proc.pid)
        service.call(lambda api: api.kill(task_id))
    finally:
        stop_mount(mount)
    assert mount.proc.returncode == 0, mount.log.read_text()


def computing(service: Service, *commands: str) -> str:
    task_id = service.submit(*commands)
    status = service.wait_for(
        task_id, lambda s: s.status == S.COMPUTATION_STARTED or s.is_terminated
    )
    assert status.status == S.COMPUTATION_STARTED, status
    return task_id


def archive_member(service: Service, task_id: str, name: str) -> bytes:
    async def url(api: object) -> str:
        from taskfs.api.client import ApiClient

        assert isinstance(api, ApiClient)
        task = await api.get_task(task_id)
        assert task.storage_output_path is not None
        return await api.download_url(task.storage_output_path, task.storage_region)

    data = httpx.get(service.call(url), timeout=30).content
    return zipfile.ZipFile(io.BytesIO(data)).read(f"artifacts/{name}")


def udp_sockets(pid: int) -> int:
    """The mount's live connections: one UDP socket each (one loopback ICE candidate)."""
    return len(psutil.Process(pid).net_connections(kind="udp"))


TICKER = (
    'sleep 1; for i in $(seq 1 25); do echo "$i $(date +%s.%N)"; sleep 0.3; done; '
    "printf 'the end, no newline'"
)


def test_tail_f_follows_a_running_task_across_its_end(live_mount: Mount) -> None:
    service = live_mount.service
    task_id = computing(service, TICKER)
    path = live_mount / task_id / "outputs" / "stdout.txt"
    wait_until(path.exists, timeout=10)
    tail = subprocess.Popen(
        ["tail", "-n", "+1", "-f", str(path)], stdout=subprocess.PIPE, bufsize=0
    )
    got = bytearray()
    arrivals: list[tuple[bytes, float]] = []

    def pump() -> None:
        assert tail.stdout is not None
        pending = b""
        while chunk := tail.stdout.read(4096):
            now = time.time()
            got.extend(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            arrivals.extend((line, now) for line in lines)

    reader = threading.Thread(target=pump)
    reader.start()
    try:
        service.wait_for(task_id, lambda s: s.is_terminated, timeout=60)
        expected = archive_member(service, task_id, "stdout.txt")
        wait_until(lambda: len(got) >= len(expected), timeout=10)
        time.sleep(1.5)  # anything repeated would come now
    finally:
        tail.terminate()
        tail.wait()
        reader.join(timeout=10)
        assert tail.stdout is not None
        tail.stdout.close()
    # Every byte once, in order, the end that had no newline included (from the archive).
    assert bytes(got) == expected
    assert expected.endswith(b"\n25 " + expected.split(b"\n25 ")[1])
    delays = [now - float(line.split()[1]) for line, now in arrivals if len(line.split()) == 2]
    assert len(delays) == 25
    # Lines written before tail started are old; every line written after it came in 2 s.
    late = delays[5:]
    assert max(late) < 2.0, late
    print(
        f"\ntail -f latency: median {statistics.median(late):.3f} s, "
        f"p95 {sorted(late)[int(0.95 * (len(late) - 1))]:.3f} s, max {max(late):.3f} s"
    )


WRITER = r"""
import os, random, time
rnd = random.Random(11)
text = "".join(f"{i} {'x' * rnd.randrange(0, 120)}\n" for i in range(4000)).encode()
time.sleep(1)
pos = 0
while pos < len(text):
    step = rnd.randrange(1, 150)
    os.write(1, text[pos:pos + step])
    pos += step
    if rnd.random() < 0.1:
        time.sleep(0.002)
"""


def test_a_polling_reader_of_many_small_appends_loses_and_repeats_nothing(
    live_mount: Mount,
) -> None:
    service = live_mount.service
    task_id = computing(service, f"{sys.executable} -c {shlex.quote(WRITER)}")
    path = live_mount / task_id / "outputs" / "stdout.txt"
    wait_until(path.exists, timeout=10)
    got = bytearray()
    with open(path, "rb", buffering=0) as f:
        ended_at = None
        while ended_at is None or time.monotonic() - ended_at < 3:
            size = os.fstat(f.fileno()).st_size
            if size > len(got):
                chunk = os.pread(f.fileno(), size - len(got), len(got))
                got.extend(chunk)
            time.sleep(0.05)
            if ended_at is None and service.status(task_id).is_terminated:
                ended_at = time.monotonic()
    expected = archive_member(service, task_id, "stdout.txt")
    assert bytes(got) == expected
    lines = got.decode().splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(4000))


def test_listing_top_and_files_the_channel_cannot_carry(live_mount: Mount) -> None:
    service = live_mount.service
    task_id = computing(
        service,
        "mkdir -p a/b; echo deep > a/b/c.txt; head -c 1000 /dev/urandom > bin.dat; "
        "sleep 1.5; echo later > later.txt; sleep 60",
    )
    outputs = live_mount / task_id / "outputs"
    listed = wait_until(lambda: {"a", "bin.dat", "stdout.txt"} <= set(os.listdir(outputs)))
    assert listed
    assert os.listdir(outputs / "a" / "b") == ["c.txt"]
    assert (outputs / "a" / "b" / "c.txt").read_bytes() == b"deep\n"
    appeared = time.monotonic()
    wait_until(lambda: "later.txt" in os.listdir(outputs), timeout=4)
    assert time.monotonic() - appeared < 4
    bad = live_mount.run(f"cat {outputs}/bin.dat")
    assert bad.returncode == 1 and "No data available" in bad.stderr
    assert live_mount.run(f"cat {outputs}/nope").returncode == 1
    top = (live_mount / task_id / "top").read_text()
    assert "PID" in top and "COMMAND" in top
    assert (live_mount / task_id / "top").stat().st_size == 0  # a snapshot per open
    # ls, cat, top: one live connection for the task.
    assert udp_sockets(live_mount.proc.pid) == 1

    # Nobody reads: the connection closes (--live-idle 1, reaped every 0.5 s).
    wait_until(lambda: udp_sockets(live_mount.proc.pid) == 0, timeout=10)
    assert "later.txt" in os.listdir(outputs)  # and opens again when asked
    assert udp_sockets(live_mount.proc.pid) == 1

    service.call(lambda api: api.kill(task_id))
    service.wait_for(task_id, lambda s: s.is_terminated)
    time.sleep(1.2)  # the task directory's attributes expire (live timeout)
    # Ended: the archive, every byte, the binary file included; top is empty.
    assert (outputs / "bin.dat").read_bytes() == archive_member(service, task_id, "bin.dat")
    assert (live_mount / task_id / "top").read_bytes() == b""
    wait_until(lambda: udp_sockets(live_mount.proc.pid) == 0, timeout=10)


def test_two_tail_f_readers_share_one_connection(live_mount: Mount) -> None:
    service = live_mount.service
    task_id = computing(service, TICKER)
    path = live_mount / task_id / "outputs" / "stdout.txt"
    wait_until(path.exists, timeout=10)
    tails = [
        subprocess.Popen(["tail", "-f", str(path)], stdout=subprocess.DEVNULL) for _ in range(2)
    ]
    try:
        time.sleep(2)
        assert udp_sockets(live_mount.proc.pid) == 1
        err = live_mount.run(f"cat {live_mount / task_id / 'outputs' / 'stderr.txt'}")
        assert err.returncode == 0
        assert udp_sockets(live_mount.proc.pid) == 1
    finally:
        for tail in tails:
            tail.terminate()
            tail.wait()
    service.wait_for(task_id, lambda s: s.is_terminated, timeout=60)


def follow_to_end(mount: Mount, task_id: str, name: str) -> tuple[bytes, bytes, str]:
    """What ``tail -c +1 -f`` printed of ``name`` until 2 s after the task ended, the file
    as archived, and tail's stderr."""
    service = mount.service
    path = mount / task_id / "outputs" / name
    wait_until(path.exists, timeout=10)
    with open(mount.log.parent / f"{task_id}.tail", "w+b") as out:
        tail = subprocess.Popen(
            ["tail", "-c", "+1", "-f", str(path)], stdout=out, stderr=subprocess.PIPE
        )
        try:
            service.wait_for(task_id, lambda s: s.is_terminated, timeout=90)
            expected = archive_member(service, task_id, name)
            time.sleep(3)
        finally:
            tail.terminate()
            _, err = tail.communicate()
        out.seek(0)
        return out.read(), expected, err.decode()


def test_tail_f_across_the_end_of_lines_longer_than_a_message(live_mount: Mount) -> None:
    task_id = computing(
        live_mount.service,
        f'sleep 1.5; {sys.executable} -c \'print("a" * 20000 + "é" * 30000)\'; echo mid; '
        "sleep 2; printf 0123456789END",
    )
    printed, expected, err = follow_to_end(live_mount, task_id, "stdout.txt")
    assert printed == expected, err
    assert expected.endswith(b"mid\n0123456789END")


def test_tail_f_across_the_end_of_a_line_the_channel_cuts(live_mount: Mount) -> None:
    """A line longer than one message arrives in pieces, which the answers mark as continued:
    tail -f prints the file byte for byte, across the task's end too."""
    task_id = computing(
        live_mount.service,
        f"sleep 1.5; {sys.executable} -c 'print(\"0123456789\" * 70_000)'; echo mid; "
        "sleep 2; printf 'after the end'",
    )
    printed, expected, err = follow_to_end(live_mount, task_id, "stdout.txt")
    assert expected.endswith(b"mid\nafter the end"), expected[-50:]
    assert printed == expected, err


def test_a_task_ending_under_its_readers_never_answers_eio(live_mount: Mount) -> None:
    """The live channel ends as the task stops computing; the state the mount holds may say
    it computes for up to a second more: whatever is asked in between (its outputs listed,
    a file opened, top) waits for the archive instead of failing."""
    failures = []
    for i in range(6):
        task_id = computing(live_mount.service, "echo hi; sleep 1")
        time.sleep(0.85 + i * 0.05)  # around the task's end
        task = live_mount / task_id
        done = live_mount.run(
            f"ls {task}/outputs >/dev/null; cat {task}/outputs/stdout.txt; cat {task}/top >&2"
        )
        if done.returncode != 0 or done.stdout != "hi\n":
            failures.append((i, done.stdout, done.stderr))
    assert not failures, failures


def test_top_while_tasks_end_kills_nothing(live_mount: Mount) -> None:
    """``top`` runs a helper process of the service's; tasks that end meanwhile sweep the
    orphans the service adopted (it is a child subreaper) and must leave the helper alone."""
    log = live_mount.service.data_dir / "test-service.log"
    before = log.read_text().count("left behind")
    tops = " ".join(
        str(live_mount / computing(live_mount.service, "sleep 2") / "top") for _ in range(2)
    )
    live_mount.run(f"for i in $(seq 50); do cat {tops} > /dev/null 2>&1; sleep 0.05; done")
    assert log.read_text().count("left behind") == before, log.read_text()[-2000:]


def test_a_file_truncated_or_replaced_while_followed(live_mount: Mount) -> None:
    """GNU tail -f through the mount sees what it would see on a local disk: "file
    truncated", then the file from its start; what it prints last is the file as it ends."""
    task_id = computing(
        live_mount.service,
        'for i in 1 2 3 4 5 6; do echo "old line $i" >> log.txt; sleep 0.2; done; sleep 1.5; '
        ': > log.txt; for i in 1 2 3; do echo "new $i" >> log.txt; sleep 0.3; done; '
        "sleep 1.5; printf 'replaced\\nfile\\n' > t; mv t log.txt; sleep 2",
    )
    printed, expected, err = follow_to_end(live_mount, task_id, "log.txt")
    assert expected == b"replaced\nfile\n"
    assert "file truncated" in err
    assert printed.endswith(b"new 3\n" + expected) or printed.endswith(b"\n" + expected), printed
    assert b"old line 6\n" in printed


SHRINKER = r"""
import time
f = open("out.txt", "w")
for i in range(20):
    f.write(f"line {i}\n"); f.flush(); time.sleep(0.2)
f.truncate(0); f.seek(0); f.write("new 0\nnew 1\n"); f.flush()
"""
OLD_TEXT = "".join(f"line {i}\n" for i in range(20)).encode()


def test_a_file_that_shrinks_as_the_task_ends(live_mount: Mount) -> None:
    """The task cuts its file to a shorter text and exits at once, too late for the live
    channel to say: after the end, every reader gets the archive's bytes; one that held the
    file while the task ran reads what a local file would show it (the new text at offset
    0, nothing past its end), never text the file no longer holds; tail -f says "file
    truncated" and prints the new text."""
    service = live_mount.service
    task_id = computing(service, f"{sys.executable} -c {shlex.quote(SHRINKER)}")
    path = live_mount / task_id / "outputs" / "out.txt"
    wait_until(path.exists, timeout=10)
    held = os.open(path, os.O_RDONLY)
    try:
        early = os.pread(held, 1 << 16, 0)
        assert OLD_TEXT.startswith(early), early
        printed, expected, err = follow_to_end(live_mount, task_id, "out.txt")
        assert expected == b"new 0\nnew 1\n"
        assert os.fstat(held).st_size == len(expected)
        assert os.pread(held, 4096, 0) == expected
        assert os.pread(held, 4096, 200) == b""
        assert os.pread(held, 4096, 6) == b"new 1\n"
    finally:
        os.close(held)
    assert "file truncated" in err, err
    assert printed.endswith(expected), printed
    assert OLD_TEXT.startswith(printed[: -len(expected)]), printed
    assert path.read_bytes() == expected


def test_a_file_cut_at_the_end_reads_whole_for_everyone_but_its_follower(
    live_mount: Mount,
) -> None:
    """While ``tail -f`` is shown the cut file as size 0 (to make it start over), a fresh
    ``cat`` or ``stat`` right after the end (once the mount shows the task ended: until then
    it shows the file as the live channel last saw it) sees the file as archived, never
    empty."""
    service = live_mount.service
    task_id = computing(
        service,
        'for i in $(seq 1 20); do echo "old line $i" >> log.txt; sleep 0.1; done; '
        "echo 'final text' > log.txt",
    )
    path = live_mount / task_id / "outputs" / "log.txt"
    wait_until(path.exists, timeout=10)
    tail = subprocess.Popen(["tail", "-f", str(path)], stdout=subprocess.DEVNULL)
    try:
        service.wait_for(task_id, lambda s: s.is_terminated, timeout=30)
        expected = archive_member(service, task_id, "log.txt")
        status = live_mount / task_id / "status"
        wait_until(lambda: status.read_text() == "success\n", timeout=5, step=0.02)
        seen: set[tuple[int, bytes]] = set()
        until = time.monotonic() + 2  # longer than a restart is shown
        while time.monotonic() < until:
            seen.add((path.stat().st_size, path.read_bytes()))
    finally:
        tail.terminate()
        tail.wait()
    assert seen == {(len(expected), expected)}


def test_a_followed_file_deleted_in_the_task_stays_readable_to_its_holder(
    live_mount: Mount,
) -> None:
    """As a local file deleted under its reader: ``fstat`` of the open descriptor works
    (link count 0) and it reads what it had; ``tail -f`` does not give up, neither while the
    task runs nor after it ended."""
    service = live_mount.service
    task_id = computing(service, "echo one > log.txt; sleep 2; rm log.txt; sleep 2")
    path = live_mount / task_id / "outputs" / "log.txt"
    wait_until(path.exists, timeout=10)
    held = os.open(path, os.O_RDONLY)
    tail = subprocess.Popen(
        ["tail", "-f", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert os.pread(held, 100, 0) == b"one\n"
        wait_until(lambda: not path.exists(), timeout=10)
        gone = os.fstat(held)
        assert (gone.st_nlink, gone.st_size) == (0, 4)
        assert os.pread(held, 100, 0) == b"one\n"
        service.wait_for(task_id, lambda s: s.is_terminated, timeout=30)
        time.sleep(1.5)
        assert os.fstat(held).st_nlink == 0
        assert tail.poll() is None, "tail -f gave up"
    finally:
        os.close(held)
        tail.terminate()
        out, err = tail.communicate()
    assert out == b"one\n", err


@pytest.mark.parametrize("case", ["another reader", "just before the end"])
def test_a_file_replaced_by_a_longer_one_while_followed(live_mount: Mount, case: str) -> None:
    """tail -f polls once a second and sees only sizes: a file replaced by a longer one must
    still look truncated to it, or the new file's start is never printed; also while another
    process reads the file now and then, and when the task ends right after."""
    after = "0.2" if case == "just before the end" else "3"
    task_id = computing(
        live_mount.service,
        'for i in 1 2 3; do echo "old $i" >> log.txt; sleep 0.3; done; sleep 2; '
        f'seq -f "replacement line %g" 1 500 > t; mv t log.txt; sleep {after}',
    )
    path = live_mount / task_id / "outputs" / "log.txt"
    reader = None
    if case == "another reader":
        loop = f"while sleep 0.3; do cat {path} > /dev/null 2>&1; done"
        reader = subprocess.Popen(["sh", "-c", loop])
    try:
        printed, expected, err = follow_to_end(live_mount, task_id, "log.txt")
    finally:
        if reader is not None:
            reader.kill()
            reader.wait()
    assert expected.startswith(b"replacement line 1\n") and expected.endswith(b" 500\n")
    assert "file truncated" in err
    assert printed == b"old 1\nold 2\nold 3\n" + expected, printed[:200]


def test_a_running_task_with_hostile_names_and_links(live_mount: Mount, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("OUTSIDE\n")
    task_id = computing(
        live_mount.service,
        f"ln -s {secret} out.txt; ln -s /etc passwd-dir; mkfifo pipe; "
        "echo x > \"$(printf 'caf\\351.txt')\"; for i in $(seq 1 100); do echo tick $i; "
        "sleep 0.1; done",
    )
    outputs = live_mount / task_id / "outputs"
    wait_until(lambda: "caf%E9.txt" in os.listdir(outputs))  # named as the archive will
    for name in ("out.txt", "pipe", "passwd-dir/passwd", "caf%E9.txt"):
        got = live_mount.run(f"timeout 20 cat {outputs}/{name}")
        assert got.returncode == 1, (name, got)
        assert any(
            why in got.stderr for why in ("No data available", "No such file", "Not a directory")
        ), (name, got)
        assert "OUTSIDE" not in got.stdout
    assert b"tick" in (outputs / "stdout.txt").read_bytes()  # the rest still works
    live_mount.service.call(lambda api: api.kill(task_id))
    live_mount.service.wait_for(task_id, lambda s: s.is_terminated)


def test_cat_of_a_large_file_of_a_running_task_is_whole(live_mount: Mount) -> None:
    task_id = computing(
        live_mount.service,
        f"{sys.executable} -c \"import sys; sys.stdout.writelines('%09d %s\\n' % (i, 'y' * 90) "
        # Written whole under another name first (on a loaded machine the writer may take
        # seconds): the file read is complete, the task still running.
        'for i in range(300000))" > big.part && mv big.part big.txt; sleep 60',
    )
    big = live_mount / task_id / "outputs" / "big.txt"
    wait_until(big.exists, timeout=30)
    data = big.read_bytes()
    assert len(data) == 300000 * 101
    assert data.endswith(b"000299999 " + b"y" * 90 + b"\n")
    last = live_mount.run(f"tail -n 1 {big}")
    assert last.stdout.startswith("000299999 "), last
    live_mount.service.call(lambda api: api.kill(task_id))
    live_mount.service.wait_for(task_id, lambda s: s.is_terminated)


def test_tail_f_rides_out_an_api_outage(service: Service, tmp_path: Path) -> None:
    """tail -f polls fstat, which needs the task's state: while the API does not answer, a
    followed file keeps its attributes, and tail -f goes on when the service is back."""
    mount = start_mount(service, tmp_path / "tasks", tmp_path / "cache", "--deadline", "2")
    try:
        task_id = computing(service, "for i in $(seq 1 60); do echo tick $i; sleep 0.25; done")
        path = mount / task_id / "outputs" / "stdout.txt"
        wait_until(path.exists, timeout=10)
        with open(tmp_path / "tail.out", "w+b") as out:
            tail = subprocess.Popen(["tail", "-n", "+1", "-f", str(path)], stdout=out)
            try:
                time.sleep(2)
                os.kill(service.proc.pid, signal.SIGSTOP)
                try:
                    time.sleep(6)  # three deadlines of the mount
                    assert tail.poll() is None, "tail -f died during the outage"
                finally:
                    os.kill(service.proc.pid, signal.SIGCONT)
                service.wait_for(task_id, lambda s: s.is_terminated, timeout=60)
                wait_until(lambda: b"tick 60\n" in (tmp_path / "tail.out").read_bytes())
                assert tail.poll() is None
            finally:
                tail.terminate()
                tail.wait()
            printed = (tmp_path / "tail.out").read_bytes()
        assert printed == "".join(f"tick {i}\n" for i in range(1, 61)).encode()
    finally:
        stop_mount(mount)
