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
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator

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
