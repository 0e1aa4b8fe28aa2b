"""DESIGN.md section 5 through a real mount: dead and stalled services, flaky storage,
concurrency, and restarts. Every bound here is a deadline (a correctness promise), not speed.
"""

from __future__ import annotations

import errno
import io
import random
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from tests.fakeapi import FakeApi
from tests.fuse.conftest import (
    DEADLINE,
    Mount,
    Service,
    cloud_mount,
    free_port,
    mount_other,
    start_mount,
    stop_mount,
    wait_until,
)
from tests.rangeserver import Answer, Seen, serve_answerer
from tests.support import artifacts_zip, start_service, stop


def timed(mount: Mount, command: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = mount.run(command, timeout=60)
    return result, time.monotonic() - start


def test_dead_and_stalled_service(tmp_path: Path) -> None:
    fake = FakeApi()
    fake.add("live", S.COMPUTATION_STARTED, computation_start=datetime.now(UTC))
    files = {"a.txt": b"alpha\n", "b.txt": b"beta\n" * 1000, "big.bin": bytes(3 << 20)}
    fake.add("opened", S.SUCCESS, archive=artifacts_zip(files, zipfile.ZIP_STORED))
    fake.add("closed", S.SUCCESS, archive=artifacts_zip(files))
    with cloud_mount(tmp_path, fake) as mount:
        m = mount.path
        assert mount.run(f"cat {m}/opened/outputs/a.txt").stdout == "alpha\n"  # archive open

        def all_fail(expected: str) -> None:
            for command in (
                f"cat {m}/live/status",
                f"ls {m}/closed/outputs",
                f"cat {m}/opened/outputs/big.bin",
            ):
                result, took = timed(mount, command)
                assert result.returncode != 0, command
                assert expected in result.stderr, (command, result.stderr)
                assert took <= DEADLINE + 3, (command, took)

        def all_work() -> None:
            # The mount answers at once while the service is down; a probe finds it back
            # within a second or two.
            wait_until(lambda: mount.run(f"cat {m}/live/status").returncode == 0, 3)
            wait_until(lambda: mount.run(f"ls {m}/closed/outputs").returncode == 0, 3)
            wait_until(lambda: mount.run(f"cat {m}/opened/outputs/b.txt").returncode == 0, 3)
            assert mount.run(f"cat {m}/live/status").stdout == "computation-started\n"
            assert sorted(mount.run(f"ls {m}/closed/outputs").stdout.split()) == [
                "a.txt",
                "b.txt",
                "big.bin",
            ]
            assert mount.run(f"cat {m}/opened/outputs/b.txt").stdout == "beta\n" * 1000
            assert (m / "opened" / "outputs" / "big.bin").read_bytes() == files["big.bin"]

        time.sleep(1.1)  # let the live task's state age past its 1 s
        # Stalled: every request hangs.
        fake.api_fault = lambda method, path: Answer(200, {}, b"", delay=3600)
        fake.objects.fault = lambda seen, answer: Answer(200, {}, b"", delay=3600)
        all_fail("Input/output error")
        fake.api_fault = None
        fake.objects.fault = None
        all_work()  # back without remounting
        time.sleep(1.1)
        # Failing: 503s until the deadline.
        fake.api_fault = lambda method, path: Answer(503, {"retry-after": "0"}, b"{}")
        fake.objects.fault = lambda seen, answer: Answer(503, {}, b"")
        mount.run(f"cat {m}/opened/outputs/big.bin > /dev/null")  # may or may not be cached
        result, took = timed(mount, f"cat {m}/live/status")
        assert result.returncode != 0 and "Input/output error" in result.stderr
        assert took <= DEADLINE + 3
        fake.api_fault = None
        fake.objects.fault = None
        wait_until(lambda: mount.run(f"cat {m}/live/status").returncode == 0, 3)
    # Dead: the server is gone (connection refused), then back on the same port.
    fake2 = FakeApi()
    fake2.add("live", S.COMPUTATION_STARTED)
    fake2.add("closed", S.SUCCESS, archive=artifacts_zip(files))
    port = free_port()
    server = serve_answerer(fake2, port=port)
    url = server.__enter__()
    fake2.base_url = url
    mount = mount_other(tmp_path, url, "--deadline", str(DEADLINE), name="mnt2")
    try:
        assert mount.run(f"cat {mount.path}/live/status").returncode == 0
        server.__exit__(None, None, None)
        time.sleep(1.1)
        for command in (f"cat {mount.path}/live/status", f"ls {mount.path}/closed/outputs"):
            result, took = timed(mount, command)
            assert result.returncode != 0 and "Input/output error" in result.stderr, command
            assert took <= DEADLINE + 3
        server = serve_answerer(fake2, port=port)
        server.__enter__()
        wait_until(lambda: mount.run(f"cat {mount.path}/live/status").returncode == 0, 10)
        assert "a.txt" in mount.run(f"ls {mount.path}/closed/outputs").stdout
    finally:
        stop_mount(mount)
        server.__exit__(None, None, None)
    assert mount.proc.returncode == 0


def test_copy_with_failing_gets(tmp_path: Path) -> None:
    rng = random.Random(1234)
    files = {f"d{i % 5}/f{i:03}.txt": f"{i} ".encode() * rng.randint(10, 3000) for i in range(120)}
    files["big/stored.bin"] = rng.randbytes(32 << 20)
    files["big/deflated.txt"] = b"".join(b"%d 0.5 1.5\n" % i for i in range(400_000))
    fake = FakeApi()
    data = artifacts_zip(files)
    fake.add("task", S.SUCCESS, archive=data)
    faults = {"503": 0, "reset": 0, "truncated": 0}
    kinds = list(faults)
    lock = threading.Lock()
    served = 0

    def flaky(seen: Seen, answer: Answer) -> Answer | None:
        """The 2nd, 4th and 6th ranged GETs fail, then every tenth, cycling through the
        kinds of failure (large requests make few GETs: every kind still happens)."""
        nonlocal served
        if seen.method != "GET" or answer.status != 206:
            return None
        with lock:
            served += 1
            if served not in (2, 4, 6) and served % 10 != 5:
                return None
            kind = kinds[sum(faults.values()) % len(kinds)]
            faults[kind] += 1
        if kind == "503":
            return Answer(503, {"retry-after": "0"}, b"busy")
        if kind == "reset":
            return Answer(206, answer.headers, answer.body, cut_after=len(answer.body) // 2)
        short = answer.body[: len(answer.body) // 3]
        return Answer(206, {**answer.headers, "content-length": str(len(short))}, short)

    fake.objects.fault = flaky
    with cloud_mount(tmp_path, fake) as mount:
        copy = tmp_path / "copy"
        result = mount.run(f"cp -r {mount.path}/task/outputs {copy}", timeout=120)
        assert result.returncode == 0, result.stderr
    assert all(n >= 1 for n in faults.values()), (faults, served)  # every kind happened
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in files:
            assert (copy / name).read_bytes() == zf.read(f"artifacts/{name}"), name


def _reads(path: Path, body: bytes) -> bool:
    """Whether ``path`` reads as ``body`` now (an EIO is a no)."""
    try:
        return path.read_bytes() == body
    except OSError:
        return False


def test_misbehaving_storage(tmp_path: Path) -> None:
    """Each way storage can answer badly fails one read with EIO, within the deadline, and
    leaves nothing wrong behind: the same member reads right once storage behaves."""
    rng = random.Random(11)
    body = rng.randbytes(2 << 20)
    data = artifacts_zip({"m.bin": body}, zipfile.ZIP_STORED)
    fake = FakeApi()
    for i in range(6):  # one task (one archive) per case: no read-ahead crosses between them
        fake.add(f"t{i}", S.SUCCESS, archive=data)

    def ranged(change: Callable[[Answer], Answer]) -> Callable[[Seen, Answer], Answer | None]:
        def fault(seen: Seen, answer: Answer) -> Answer | None:
            return change(answer) if seen.method == "GET" and answer.status == 206 else None

        return fault

    def whole(answer: Answer) -> Answer:
        headers = {k: v for k, v in answer.headers.items() if k != "content-range"}
        return Answer(200, {**headers, "content-length": str(len(data))}, data)

    def shifted(answer: Answer) -> Answer:
        first, _, rest = answer.headers["content-range"].removeprefix("bytes ").partition("-")
        last, _, size = rest.partition("/")
        bad = f"bytes {int(first) + 1}-{int(last) + 1}/{size}"
        return Answer(206, {**answer.headers, "content-range": bad}, answer.body)

    cases: dict[str, Callable[[Answer], Answer]] = {
        "200 instead of 206": whole,
        "wrong Content-Range": shifted,
        "stall before headers": lambda a: Answer(a.status, a.headers, a.body, delay=3600),
        "stall mid-body": lambda a: Answer(
            a.status, a.headers, a.body, stall_after=len(a.body) // 2, stall=3600
        ),
        "trickle slower than the deadline": lambda a: Answer(
            a.status, a.headers, a.body, trickle=(1024, 0.5)
        ),
    }
    with cloud_mount(tmp_path, fake) as mount:
        for i, (case, change) in enumerate([*cases.items(), ("trickle within", None)]):
            member = mount.path / f"t{i}" / "outputs" / "m.bin"
            assert mount.run(f"ls {member.parent}").stdout == "m.bin\n"  # archive open
            if change is None:
                # A trickle that ends within the deadline is only slow: the bytes arrive, right.
                fake.objects.fault = ranged(
                    lambda a: Answer(a.status, a.headers, a.body, trickle=(1 << 16, 0.01))
                )
                assert member.read_bytes() == body
                continue
            fake.objects.fault = ranged(change)
            result, took = timed(mount, f"cat {member} > /dev/null")
            assert result.returncode != 0 and "Input/output error" in result.stderr, case
            assert took <= DEADLINE + 3, (case, took)
            fake.objects.fault = None
            # An outage (stalls) is remembered: reads fail at once until a probe, within a
            # second or two, finds storage back.
            wait_until(partial(_reads, member, body), 3)
    assert "Traceback" not in mount.log.read_text()


def test_parallel_readers(tmp_path: Path) -> None:
    rng = random.Random(7)
    files = {f"m{i}.bin": rng.randbytes(rng.randint(1, 3) << 20) for i in range(6)}
    files.update({f"small/s{i}.txt": f"small {i}\n".encode() * 200 for i in range(20)})
    fake = FakeApi()
    fake.add("task", S.SUCCESS, archive=artifacts_zip(files, zipfile.ZIP_STORED))
    with cloud_mount(tmp_path, fake) as mount:
        names = list(files)

        def reader(i: int) -> bool:
            name = names[i % 3] if i < 16 else names[i % len(names)]  # same and different
            got = (mount.path / "task" / "outputs" / name).read_bytes()
            return got == files[name]

        with ThreadPoolExecutor(32) as pool:
            assert all(pool.map(reader, range(32)))


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Service, Mount]]:
    service = start_service(tmp_path / "data", slots=1)
    mount = start_mount(service, tmp_path / "mnt", tmp_path / "cache")
    try:
        yield service, mount
    finally:
        stop_mount(mount)
        stop(service.proc)


async def kill_task(task_id: str, api: ApiClient) -> object:
    return await api.kill(task_id)


def test_parallel_kills_and_listing_while_tasks_change(local: tuple[Service, Mount]) -> None:
    service, mount = local
    task_id = service.submit("sleep 60")
    service.wait_for(task_id, lambda s: s.status == S.COMPUTATION_STARTED)
    control = mount.path / task_id / "control"

    def kill(_: int) -> str:
        result = subprocess.run(
            ["bash", "-c", f"echo kill > {control}"], capture_output=True, text=True, check=False
        )
        return "ok" if result.returncode == 0 else result.stderr

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(kill, range(8)))
    assert "ok" in outcomes
    assert all(o == "ok" or "No such process" in o for o in outcomes), outcomes
    assert service.wait_for(task_id, lambda s: s.is_terminated).status == S.KILLED
    history = [h.status for h in service.call(lambda api: api.get_task(task_id)).status_history]
    assert history.count(S.PENDING_KILL) == 1 and history.count(S.KILLED) == 1

    stop_churn = threading.Event()
    made: list[str] = []

    def churn() -> None:
        while not stop_churn.is_set():
            new = service.submit("sleep 30")
            made.append(new)
            service.call(partial(kill_task, new))

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 5  # spans more than one listing refresh (2 s)
        while time.monotonic() < deadline:
            listing = mount.run(f"ls {mount.path}")
            assert listing.returncode == 0, listing.stderr
            names = listing.stdout.split()
            assert len(names) == len(set(names))
            time.sleep(0.1)
    finally:
        stop_churn.set()
        thread.join()
    # Tasks made during the churn show up once the listing is refreshed.
    assert len(made) >= 3
    wait_until(lambda: all(n in mount.run(f"ls {mount.path}").stdout.split() for n in made), 5)


def test_service_restart_under_a_mount(local: tuple[Service, Mount]) -> None:
    service, mount = local
    running = service.submit("echo partial; sleep 60")
    service.wait_for(running, lambda s: s.status == S.COMPUTATION_STARTED)
    queued = service.submit("echo later")
    assert mount.run(f"cat {mount.path}/{queued}/status").stdout == "submitted\n"
    stop(service.proc)
    restarted = start_service(service.data_dir, slots=1)
    try:
        # The restarted service listens on a new port: the mount follows it by itself.
        wait_until(
            lambda: (
                mount.run(f"cat {mount.path}/{running}/status").stdout == "executer-terminated\n"
            ),
            30,
        )
        assert mount.run(f"cat {mount.path}/{queued}/wait").stdout == "success\n"
        assert mount.run(f"cat {mount.path}/{running}/outputs/stdout.txt").stdout == "partial\n"
        assert mount.run(f"cat {mount.path}/{queued}/outputs/stdout.txt").stdout == "later\n"
    finally:
        stop(restarted.proc)


def test_stale_archive_is_estale(tmp_path: Path) -> None:
    fake = FakeApi()
    big = random.Random(3).randbytes(64 << 20)
    fake.add("task", S.SUCCESS, archive=artifacts_zip({"big.bin": big}, zipfile.ZIP_STORED))
    with cloud_mount(tmp_path, fake) as mount:
        path = mount.path / "task" / "outputs" / "big.bin"
        with open(path, "rb") as handle:
            assert handle.read(1 << 16) == big[: 1 << 16]
            fake.objects.put(
                "fake-bucket/task/output.zip",
                artifacts_zip({"big.bin": big[::-1]}, zipfile.ZIP_STORED),
            )
            handle.seek(60 << 20)  # far past anything read ahead
            with pytest.raises(OSError) as info:
                handle.read(1 << 16)
        assert info.value.errno == errno.ESTALE
        # The pages the kernel cached of the old archive were dropped: a new open reads the
        # new one, from its start (cached before) to its end.
        time.sleep(0.3)  # the invalidation runs beside the failed read
        with open(path, "rb") as handle:
            assert handle.read(1 << 16) == big[::-1][: 1 << 16]


def test_timestamps(tmp_path: Path) -> None:
    fake = FakeApi()
    fake.add("task", S.SUCCESS, archive=artifacts_zip({"x.txt": b"x"}))
    with cloud_mount(tmp_path, fake) as mount:
        task_dir = (mount.path / "task").stat()
        expected = datetime(2026, 11, 20, 9, 10, tzinfo=UTC)
        assert datetime.fromtimestamp(task_dir.st_mtime, UTC) == expected
        member = (mount.path / "task" / "outputs" / "x.txt").stat()
        assert abs(datetime.fromtimestamp(member.st_mtime, UTC) - datetime.now(UTC)) < timedelta(
            days=1
        )
