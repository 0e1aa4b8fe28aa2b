"""One deadline per user-visible operation, through a real mount (``--deadline 6``).

The kernel may send several requests for one command (``cat status`` on a cached dentry
revalidates it with a LOOKUP, then looks it up again); each used to wait out its own
deadline. After one call has run out of time, the mount knows the service is down and
answers at once until a probe finds it back. ``ls`` of a task never needs its archive.
The time bounds here are the deadline's promise (with a margin), not speed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from taskfs.api.models import TaskStatusCode as S
from tests.fakeapi import FakeApi
from tests.fuse.conftest import Mount, mount_other, stop_mount
from tests.rangeserver import Answer, serve_answerer
from tests.support import artifacts_zip

DEADLINE = 6.0


def _timed(mount: Mount, command: str) -> tuple[int, str, float]:
    start = time.monotonic()
    result = mount.run(command, timeout=60)
    return result.returncode, result.stderr, time.monotonic() - start


def _mount(tmp_path: Path, fake: FakeApi, url: str) -> Mount:
    fake.base_url = url
    return mount_other(tmp_path, url, "--deadline", str(DEADLINE))


def test_a_dead_api_costs_one_deadline_per_command(tmp_path: Path) -> None:
    fake = FakeApi()
    fake.add("live", S.COMPUTATION_STARTED, computation_start=datetime.now(UTC))
    with serve_answerer(fake) as url:
        mount = _mount(tmp_path, fake, url)
        try:
            status = mount.path / "live" / "status"
            assert status.read_text() == "computation-started\n"  # dentry and inode cached
            time.sleep(1.2)  # the live task's entry timeout (1 s) passes: revalidation next
            fake.api_fault = lambda method, path: Answer(200, {}, b"", delay=3600)  # stalled
            code, err, took = _timed(mount, f"cat {status}")
            assert code != 0 and "Input/output error" in err
            assert took <= DEADLINE + 2, f"cat status took {took:.1f} s (--deadline {DEADLINE})"
            for command in (f"cat {status}", f"ls {mount.path}/live", f"cat {status}"):
                code, err, took = _timed(mount, command)
                assert code != 0 and took <= 2, (command, took, err)  # the breaker answers
            fake.api_fault = None
            back = time.monotonic()
            while mount.run(f"cat {status}").returncode != 0:
                assert time.monotonic() - back <= 2 + 1, "not working 2 s after the API came back"
                time.sleep(0.1)
        finally:
            stop_mount(mount)


def test_ls_of_a_task_needs_no_archive(tmp_path: Path) -> None:
    fake = FakeApi()
    fake.add("done", S.SUCCESS, archive=artifacts_zip({"a.txt": b"a\n"}))
    with serve_answerer(fake) as url:
        mount = _mount(tmp_path, fake, url)
        try:
            task = mount.path / "done"
            fake.objects.fault = lambda seen, answer: Answer(503, {}, b"")  # storage down
            listed = mount.run(f"ls -l {task}")
            assert listed.returncode == 0, listed.stderr
            assert "outputs" in listed.stdout and "status" in listed.stdout
            assert mount.run(f"stat {task}/outputs").returncode == 0
            assert fake.objects.gets() == 0  # ls of a task opened no archive
            first, err, _ = _timed(mount, f"ls {task}/outputs")
            assert first != 0 and "Input/output error" in err
            asked = fake.objects.gets()
            code, _, _ = _timed(mount, f"ls {task}/outputs")
            assert code != 0 and fake.objects.gets() == asked  # the outage is remembered
            fake.objects.fault = None
            back = time.monotonic()
            while mount.run(f"cat {task}/outputs/a.txt").stdout != "a\n":
                assert time.monotonic() - back <= 2 + 1, "not working 2 s after storage came back"
                time.sleep(0.1)
        finally:
            stop_mount(mount)
