"""The same tree over a service that is not ours: a TASK_API.md fake with zipfile archives."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from taskfs.api.models import TaskStatusCode as S
from tests.fakeapi import FakeApi
from tests.fuse.conftest import Mount, cloud_mount, wait_until
from tests.support import artifacts_zip

FILES = {
    "stdout.txt": b"SPlisHSPlasH v2.13\nsimulation finished\n",
    "stderr.txt": b"",
    "vtk/ParticleData_Fluid_1.vtk": b"# vtk DataFile Version 3.0\n" + b"0.1 0.2 0.3\n" * 20000,
    "vtk/ParticleData_Fluid_2.vtk": b"# vtk DataFile Version 3.0\n" + b"0.4 0.5 0.6\n" * 20000,
    "log/SPH_log.txt": b"[info] converged\n",
}


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[Mount, FakeApi]]:
    fake = FakeApi()
    fake.add(
        "i4ir3kvv62odsfrhko4y8w2an",
        S.SUCCESS,
        archive=artifacts_zip(FILES, outside={"output.json": b"{}"}),
        computation_seconds=192.4,
    )
    fake.add(
        "running0000000000000000000",
        S.COMPUTATION_STARTED,
        computation_start=datetime.now(UTC) - timedelta(hours=27, seconds=3),
    )
    fake.add("queued00000000000000000000", S.SUBMITTED, vm_type=None)
    with cloud_mount(tmp_path, fake) as mount:
        yield mount, fake
    assert mount.proc.returncode == 0


def test_tree_over_another_service(cloud: tuple[Mount, FakeApi], tmp_path: Path) -> None:
    mount, fake = cloud
    listing = mount.run(f"ls -U {mount.path}").stdout.split()  # directory order: newest first
    assert listing == [
        "queued00000000000000000000",
        "running0000000000000000000",
        "i4ir3kvv62odsfrhko4y8w2an",
    ]
    done = mount / "i4ir3kvv62odsfrhko4y8w2an"
    assert (done / "status").read_text() == "success\n"
    assert (done / "machine_type").read_text() == "c2-standard-4\n"
    assert (done / "computation_time").read_text() == "00:03:12\n"
    running = mount / "running0000000000000000000"
    assert (running / "computation_time").read_text().startswith("27:00:0")
    assert (running / "outputs").is_dir() and list((running / "outputs").iterdir()) == []
    queued = mount / "queued00000000000000000000"
    assert (queued / "machine_type").read_text() == ""
    copy = tmp_path / "copy"
    assert mount.run(f"cp -r {done}/outputs {copy}").returncode == 0
    got = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert got == {name: data for name, data in FILES.items()}
    result = mount.run(f"echo kill > {running}/control")
    assert result.returncode == 0, result.stderr
    assert fake.tasks["running0000000000000000000"]["status"] == "pending-kill"
    wait_until(lambda: (running / "status").read_text() == "pending-kill\n")
    failed = mount.run(f"bash -c 'echo kill > {done}/control'")
    assert "No such process" in failed.stderr


def test_wait_on_a_task_that_disappears_is_enoent(cloud: tuple[Mount, FakeApi]) -> None:
    """Shells blocked on ``cat wait`` of a task the service then forgets (404) are answered
    "No such file or directory" instead of blocking forever."""
    mount, fake = cloud
    wait = mount / "running0000000000000000000" / "wait"
    readers = [
        subprocess.Popen(["cat", str(wait)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    time.sleep(1.5)
    assert all(r.poll() is None for r in readers)  # blocked while the task runs
    del fake.tasks["running0000000000000000000"]
    for reader in readers:
        out, err = reader.communicate(timeout=30)
        assert reader.returncode == 1 and out == b""
        assert b"No such file or directory" in err


def test_views_by_project_and_status_cost_no_request(tmp_path: Path) -> None:
    """tasks/.projects/<p>/<id> and tasks/.status/<s>/<id> are links to ../../<id>, made from
    the root's listing: looking through them asks the API nothing more."""
    fake = FakeApi()
    fake.add("done00", S.SUCCESS)
    fake.add("broke0", S.FAILED)
    fake.add("queued", S.SUBMITTED)
    fake.tasks["broke0"]["project"] = "other/project"  # not a name: left out of .projects
    fake.add("long00", S.SUCCESS)
    fake.tasks["long00"]["project"] = "é" * 128  # 256 bytes: longer than a name may be
    with cloud_mount(tmp_path, fake) as mount:
        assert sorted(p.name for p in mount.path.iterdir())[:2] == [".projects", ".status"]
        assert mount.run(f"cd {mount.path} && echo *").stdout.split() == sorted(
            ["done00", "broke0", "queued", "long00"]
        )  # dot names stay out of globs
        lists = fake.calls["GET tasks"]
        assert lists > 0
        projects = mount / ".projects"
        assert sorted(p.name for p in projects.iterdir()) == ["fake-project"]
        assert sorted(p.name for p in (projects / "fake-project").iterdir()) == ["done00", "queued"]
        link = mount / ".status" / "success" / "done00"
        assert os.readlink(link) == "../../done00"
        assert (link / "status").read_text() == "success\n"
        assert sorted(p.name for p in (mount / ".status").iterdir()) == [
            "failed",
            "submitted",
            "success",
        ]
        assert fake.calls["GET tasks"] == lists  # all from the listing already fetched
        for missing in (".status/success/queued", ".status/nope", ".projects/x/done00"):
            assert not os.path.lexists(mount / missing), missing
        killed = mount.run(
            f"cd {mount.path} && for t in .status/submitted/*; do echo kill > $t/control; done"
        )
        assert killed.returncode == 0, killed.stderr
        assert fake.tasks["queued"]["status"] in ("pending-kill", "killed")


def test_stats_counts_what_the_mount_did(cloud: tuple[Mount, FakeApi]) -> None:
    """tasks/.taskfs/stats: one JSON document of the mount's counters, checked against the
    fake API's own count of what it was asked; reading it asks nothing."""
    mount, fake = cloud
    assert len(os.listdir(mount.path)) == 6  # three tasks, .taskfs and the two views
    done = mount / "i4ir3kvv62odsfrhko4y8w2an"
    assert (done / "outputs" / "log" / "SPH_log.txt").read_bytes() == FILES["log/SPH_log.txt"]
    assert mount.run(f"cat {done}/nope").returncode != 0
    waiter = subprocess.Popen(["cat", str(mount / "running0000000000000000000" / "wait")])
    try:
        time.sleep(0.5)
        asked = sum(fake.calls.values())
        stats = json.loads((mount / ".taskfs" / "stats").read_text())
        assert sum(fake.calls.values()) == asked  # stats asks nothing
        assert stats["wait_readers"] == 1
    finally:
        waiter.terminate()
        waiter.wait()
    # Endpoints as the fake counts them (it saw at least as many: some came after).
    assert stats["api_requests"]["GET tasks"] >= 1
    for name, count in stats["api_requests"].items():
        assert 1 <= count <= fake.calls[name], (name, count, fake.calls)
    assert stats["storage_gets"] >= 1 and stats["storage_bytes"] > 0
    assert stats["errors"]["ENOENT"] >= 1
    # Refusals answered without the vfs are counted too: one EROFS each.
    before = stats["errors"].get("EROFS", 0)
    refused = [
        f"mkdir {done}/x",
        f"touch {done}/y",
        f"rm -f {done}/status",
        f"mv {done}/status {done}/z",
        f"ln -s a {done}/l",
    ]
    for command in refused:
        assert "Read-only file system" in mount.run(command).stderr, command
    stats = json.loads((mount / ".taskfs" / "stats").read_text())
    assert stats["errors"]["EROFS"] == before + len(refused), stats["errors"]
    assert stats["open_archives"] == 1
    assert set(stats["cache"]) == {"memory_hits", "disk_hits", "misses"}
    assert stats["peak_rss_bytes"] > 10 << 20
    text = (mount / ".taskfs" / "stats").read_text()
    assert "i4ir3kvv62odsfrhko4y8w2an" not in text and "token" not in text
    assert sorted(os.listdir(mount / ".taskfs")) == ["stats"]


def test_extended_attributes_with_xattr(tmp_path: Path) -> None:
    """--xattr: user.taskfs.* on output files (oracle: zipfile's record) and task
    directories (the API's record); without it, no xattr requests reach the mount."""
    fake = FakeApi()
    data = artifacts_zip(FILES)
    fake.add("i4ir3kvv62odsfrhko4y8w2an", S.SUCCESS, archive=data)
    records = {
        info.filename.removeprefix("artifacts/"): info
        for info in zipfile.ZipFile(io.BytesIO(data)).infolist()
    }
    with cloud_mount(tmp_path, fake, "--xattr") as mount:
        task = mount / "i4ir3kvv62odsfrhko4y8w2an"
        assert os.getxattr(task, "user.taskfs.status") == b"success"
        assert os.getxattr(task, "user.taskfs.project") == b"fake-project"
        assert (
            os.getxattr(task, "user.taskfs.storage_path")
            == b"fake-bucket/i4ir3kvv62odsfrhko4y8w2an"
        )
        for name in ("log/SPH_log.txt", "vtk/ParticleData_Fluid_1.vtk"):
            path = task / "outputs" / name
            info = records[name]
            assert sorted(os.listxattr(path)) == [
                "user.taskfs.compressed_size",
                "user.taskfs.crc32",
                "user.taskfs.etag",
                "user.taskfs.method",
            ]
            assert os.getxattr(path, "user.taskfs.crc32") == f"{info.CRC:08x}".encode()
            assert int(os.getxattr(path, "user.taskfs.compressed_size")) == info.compress_size
            method = {zipfile.ZIP_STORED: b"stored", zipfile.ZIP_DEFLATED: b"deflate"}
            assert os.getxattr(path, "user.taskfs.method") == method[info.compress_type]
            assert os.getxattr(path, "user.taskfs.etag")
        counted = json.loads((mount / ".taskfs" / "stats").read_text())["errors"]
        with pytest.raises(OSError) as missing:
            os.getxattr(task / "status", "user.taskfs.crc32")
        assert missing.value.errno == errno.ENODATA
        errors = json.loads((mount / ".taskfs" / "stats").read_text())["errors"]
        assert errors.get("ENODATA", 0) == counted.get("ENODATA", 0) + 1
        assert os.listxattr(task / "status") == []
        with pytest.raises(OSError) as readonly:
            os.setxattr(task / "status", "user.x", b"1")
        assert readonly.value.errno in (errno.EROFS, errno.EPERM, errno.ENOTSUP)
    (tmp_path / "plain").mkdir()
    with cloud_mount(tmp_path / "plain", fake) as mount:
        with pytest.raises(OSError) as off:
            os.listxattr(mount / "i4ir3kvv62odsfrhko4y8w2an")
        assert off.value.errno == errno.EOPNOTSUPP


def test_listing_many_tasks_inputs_and_outputs_again_asks_nothing(tmp_path: Path) -> None:
    """outputs/ and inputs/ each open an archive: ``ls */outputs */inputs`` of 40 tasks (80
    archives) a second time is served from the archives kept open."""
    fake = FakeApi()
    for i in range(40):
        task_id = f"many{i:02d}"
        record = fake.add(task_id, S.SUCCESS, archive=artifacts_zip({"stdout.txt": b"x\n"}))
        record["storage_input_path"] = f"fake-bucket/{task_id}/input.zip"
        inputs = artifacts_zip({}, outside={"sim_dir/params.txt": b"steps=3\n"})
        fake.objects.put(f"fake-bucket/{task_id}/input.zip", inputs)
    with cloud_mount(tmp_path, fake) as mount:
        command = f"cd {mount.path} && ls -d many*/outputs/* many*/inputs/* | wc -l"
        assert mount.run(command).stdout.split() == ["80"]
        asked, got = sum(fake.calls.values()), fake.objects.gets()
        for _ in range(2):
            assert mount.run(command).stdout.split() == ["80"]
        assert fake.objects.gets() == got
        assert sum(fake.calls.values()) - asked <= 2  # at most the root's listing, refreshed
