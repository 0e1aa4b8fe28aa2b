"""The vfs without FUSE: a fake kernel drives it against a fake API over MockTransport.

Every test ends with every inode forgotten and the inode table empty (the fixture checks).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing

from taskfs.api import models
from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.config import ClientSettings
from taskfs.errors import (
    BusyError,
    InvalidCommandError,
    IsDirError,
    NotDirError,
    NotFoundError,
    ReaderGoneError,
    ReadOnlyError,
    TaskEndedError,
)
from taskfs.fs import nodes
from taskfs.fs.inodes import ROOT_INODE, Inode
from taskfs.fs.vfs import Attr, Vfs, VfsSettings
from taskfs.outputs import Outputs, make_cache
from tests.fakeapi import KEY, FakeApi
from tests.rangeserver import AnswerTransport, mock_transport
from tests.support import artifacts_zip

FILES = {
    "stdout.txt": b"step 1\nstep 2\n",
    "stderr.txt": b"",
    "vtk/ParticleData_Fluid_1.vtk": b"1 2 3\n" * 500,
    "vtk/ParticleData_Fluid_2.vtk": b"4 5 6\n" * 500,
    "log/SPH_log.txt": b"converged\n",
}


class Kernel:
    """Plays the kernel: keeps the lookup counts it was given and forgets them at the end."""

    def __init__(self, vfs: Vfs) -> None:
        self.vfs = vfs
        self.refs: Counter[Inode] = Counter()

    async def lookup(self, parent: Inode, name: str) -> Attr:
        attr = await self.vfs.lookup(parent, name)
        self.refs[attr.inode] += 1
        return attr

    async def resolve(self, path: str) -> Attr:
        attr = await self.vfs.getattr(ROOT_INODE)
        for part in path.strip("/").split("/"):
            if part:
                attr = await self.lookup(attr.inode, part)
        return attr

    async def listdir(
        self, inode: Inode, batch: int = 3, views: bool = False
    ) -> list[tuple[str, Attr]]:
        """readdir in small batches, like a kernel with a small buffer (of the root: its task
        directories, and its views too when ``views``)."""
        fh = await self.vfs.opendir(inode)
        seen: list[tuple[str, Attr]] = []
        offset = 0
        got: list[tuple[str, Attr, int]] = []

        def emit(name: str, attr: Attr, next_id: int) -> bool:
            if len(got) == batch:
                return False
            got.append((name, attr, next_id))
            return True

        while True:
            got.clear()
            await self.vfs.readdir(fh, offset, emit)
            if not got:
                break
            for name, attr, next_id in got:
                seen.append((name, attr))
                if name not in (".", ".."):  # readdirplus counts no lookup for these
                    self.refs[attr.inode] += 1
                offset = next_id
        self.vfs.releasedir(fh)
        # Every directory lists itself and its parent first (ls -a).
        assert [name for name, _ in seen[:2]] == [".", ".."]
        assert seen[0][1].inode == inode
        seen = seen[2:]
        if inode == ROOT_INODE and not views:
            return [(name, attr) for name, attr in seen if not name.startswith(".")]
        return seen

    async def read(self, path: str, size: int = 4096) -> bytes:
        attr = await self.resolve(path)
        info = await self.vfs.open(attr.inode, os.O_RDONLY)
        out = b""
        while chunk := await self.vfs.read(info.fh, len(out), size):
            out += chunk
        self.vfs.release(info.fh)
        return out

    async def write(self, path: str, data: bytes) -> int:
        attr = await self.resolve(path)
        info = await self.vfs.open(attr.inode, os.O_WRONLY | os.O_TRUNC)
        try:
            await self.vfs.setattr(attr.inode, 0, False, True)
            return await self.vfs.write(info.fh, 0, data)
        finally:
            self.vfs.release(info.fh)

    def forget_all(self) -> None:
        self.vfs.forget(list(self.refs.items()))
        self.refs.clear()


@dataclass
class Env:
    vfs: Vfs
    fake: FakeApi
    kernel: Kernel


@pytest.fixture
async def env(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Env]:
    fake = FakeApi()
    settings = ClientSettings(api_url=fake.base_url, api_key=KEY, deadline=5)
    async with (
        ApiClient.open(settings, transport=mock_transport(fake)) as api,
        Outputs(
            api,
            make_cache(tmp_path / "cache", 1 << 30),
            transport=mock_transport(fake),
            bulk=AnswerTransport(fake),
        ) as outputs,
    ):
        vfs = Vfs(api, outputs, nursery, VfsSettings(uid=1234, gid=5678, max_waiters=4))
        kernel = Kernel(vfs)
        yield Env(vfs, fake, kernel)
        kernel.forget_all()
        assert len(vfs.inodes) == 0, "every inode must be forgotten"
        assert vfs.open_handles() == 0


async def test_root_lists_tasks_and_finds_unlisted_ones(env: Env) -> None:
    env.fake.add("aaa", S.SUCCESS, archive=artifacts_zip(FILES))
    env.fake.add("bbb", S.COMPUTATION_STARTED)
    env.fake.add("hidden1", S.SUCCESS, hidden=True)
    entries = await env.kernel.listdir(ROOT_INODE)
    assert [name for name, _ in entries] == ["bbb", "aaa"]
    assert all(stat.S_ISDIR(a.mode) and a.mode & 0o777 == 0o555 for _, a in entries)
    assert {a.uid for _, a in entries} == {1234}
    hidden = await env.kernel.lookup(ROOT_INODE, "hidden1")
    assert stat.S_ISDIR(hidden.mode)
    with pytest.raises(NotFoundError):
        await env.kernel.lookup(ROOT_INODE, "nope")


async def test_every_directory_lists_dot_and_dot_dot_with_their_inodes(env: Env) -> None:
    env.fake.add("aaa", S.SUCCESS, archive=artifacts_zip(FILES))
    parents = {
        "": "",
        ".taskfs": "",
        ".status": "",
        ".status/success": ".status",
        "aaa": "",
        "aaa/inputs": "aaa",
        "aaa/outputs": "aaa",
        "aaa/outputs/vtk": "aaa/outputs",
    }
    got: list[tuple[str, Attr]] = []

    def emit(name: str, attr: Attr, next_id: int) -> bool:
        got.append((name, attr))
        return True

    for path, parent in parents.items():
        directory = await env.kernel.resolve(path)
        parent_inode = (await env.kernel.resolve(parent)).inode
        fh = await env.vfs.opendir(directory.inode)
        got.clear()
        await env.vfs.readdir(fh, 0, emit)
        env.vfs.releasedir(fh)
        counted = {name: attr for name, attr in got if name not in (".", "..")}
        env.kernel.refs.update(attr.inode for attr in counted.values())
        assert [(n, a.inode) for n, a in got[:2]] == [
            (".", directory.inode),
            ("..", parent_inode),
        ], path
        assert stat.S_ISDIR(got[1][1].mode)


async def test_root_views_come_first_and_group_the_listing(env: Env) -> None:
    env.fake.add("aaa", S.SUCCESS, archive=artifacts_zip(FILES))
    env.fake.add("bbb", S.COMPUTATION_STARTED)
    names = [name for name, _ in await env.kernel.listdir(ROOT_INODE, views=True)]
    assert names == [".taskfs", ".projects", ".status", "bbb", "aaa"]
    status = await env.kernel.resolve(".status")
    assert [n for n, _ in await env.kernel.listdir(status.inode)] == [
        "computation-started",
        "success",
    ]
    link = await env.kernel.resolve(".status/success/aaa")
    assert stat.S_ISLNK(link.mode)
    assert await env.vfs.readlink(link.inode) == b"../../aaa"
    with pytest.raises(NotFoundError):
        await env.kernel.resolve(".status/success/bbb")


@pytest.mark.parametrize("name", ["bad name", "a/b", "x" * 65, "..", "dots.dots", "é"])
async def test_impossible_ids_cost_no_request(env: Env, name: str) -> None:
    before = sum(env.fake.calls.values())
    with pytest.raises(NotFoundError):
        await env.kernel.lookup(ROOT_INODE, name)
    assert sum(env.fake.calls.values()) == before


async def test_virtual_files_of_an_ended_task(env: Env) -> None:
    env.fake.add("done", S.SUCCESS, archive=artifacts_zip(FILES), computation_seconds=192.7)
    names = [n for n, _ in await env.kernel.listdir((await env.kernel.resolve("done")).inode)]
    assert names == [
        "status",
        "machine_type",
        "computation_time",
        "control",
        "info.json",
        "top",
        "inputs",
        "outputs",
    ]  # wait: reachable by name only (tools that read every listed file must not block)
    assert await env.kernel.read("done/status") == b"success\n"
    assert await env.kernel.read("done/top") == b""  # only a computing task has one
    assert await env.kernel.read("done/machine_type") == b"c2-standard-4\n"
    assert await env.kernel.read("done/computation_time") == b"00:03:12\n"
    assert await env.kernel.read("done/control") == b"kill\n"
    assert await env.kernel.read("done/wait") == b"success\n"
    info = json.loads(await env.kernel.read("done/info.json", size=100))
    assert info["task_id"] == "done" and info["executer"]["extra_field_from_the_future"]
    for name in ("status", "machine_type", "computation_time", "wait", "info.json"):
        attr = await env.kernel.resolve(f"done/{name}")
        assert attr.size == len(await env.kernel.read(f"done/{name}"))
        assert attr.mode == stat.S_IFREG | 0o444 and attr.timeout == 3600
    control = await env.kernel.resolve("done/control")
    assert control.mode == stat.S_IFREG | 0o600
    task_dir = await env.kernel.resolve("done")
    assert task_dir.mtime_ns == int(datetime(2026, 11, 20, 9, 10, tzinfo=UTC).timestamp() * 1e9)


async def test_virtual_files_of_queued_and_running_tasks(env: Env) -> None:
    env.fake.add("queued", S.SUBMITTED)
    start = datetime.now(UTC) - timedelta(seconds=75)
    env.fake.add("running", S.COMPUTATION_STARTED, computation_start=start)
    assert await env.kernel.read("queued/status") == b"submitted\n"
    assert await env.kernel.read("queued/machine_type") == b""
    assert await env.kernel.read("queued/computation_time") == b""
    assert (await env.kernel.resolve("queued/machine_type")).size == 0
    assert await env.kernel.read("running/machine_type") == b"c2-standard-4\n"
    live = await env.kernel.read("running/computation_time")
    assert live in (b"00:01:15\n", b"00:01:16\n")
    assert (await env.kernel.resolve("running/status")).timeout == 1.0
    outputs = await env.kernel.resolve("running/outputs")
    assert stat.S_ISDIR(outputs.mode)
    assert await env.kernel.listdir(outputs.inode) == []


async def test_freshness_of_live_and_ended_tasks(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.fake.add("live", S.COMPUTATION_STARTED)
    env.fake.add("done", S.FAILED)
    calls = env.fake.calls
    await env.kernel.read("live/status")
    first = calls["GET tasks/{id}"]
    await env.kernel.read("live/status")
    assert calls["GET tasks/{id}"] == first  # within the 1 s of a live task
    env.fake.set_status("live", S.SUCCESS)
    await trio.sleep(1.1)
    assert await env.kernel.read("live/status") == b"success\n"
    assert calls["GET tasks/{id}"] == first + 1
    await env.kernel.read("done/status")
    ended = calls["GET tasks/{id}"]
    await trio.sleep(600)
    assert await env.kernel.read("done/status") == b"failed\n"
    assert calls["GET tasks/{id}"] == ended  # an ended task never changes


@pytest.mark.parametrize("etag", ['W/"weak"', ""])
async def test_without_a_strong_etag_no_page_cache_is_kept(env: Env, etag: str) -> None:
    """Nothing would tell a replaced archive from the cached one: every open reads anew."""
    env.fake.add("done", S.SUCCESS, archive=artifacts_zip(FILES))
    env.fake.objects.etags["fake-bucket/done/output.zip"] = etag
    attr = await env.kernel.resolve("done/outputs/stdout.txt")
    info = await env.vfs.open(attr.inode, os.O_RDONLY)
    assert not info.keep_cache
    assert await env.vfs.read(info.fh, 0, 100) == FILES["stdout.txt"]
    env.vfs.release(info.fh)


async def test_outputs_tree_and_reads(env: Env) -> None:
    env.fake.add("done", S.SUCCESS, archive=artifacts_zip(FILES))
    outputs = await env.kernel.resolve("done/outputs")
    top = dict(await env.kernel.listdir(outputs.inode))
    assert set(top) == {"stdout.txt", "stderr.txt", "vtk", "log"}
    assert stat.S_ISDIR(top["vtk"].mode) and top["vtk"].nlink == 2
    assert top["stdout.txt"].size == len(FILES["stdout.txt"])
    assert top["stdout.txt"].mode == stat.S_IFREG | 0o444
    for name, data in FILES.items():
        assert await env.kernel.read(f"done/outputs/{name}", size=1000) == data
    file_attr = await env.kernel.resolve("done/outputs/stdout.txt")
    info = await env.vfs.open(file_attr.inode, os.O_RDONLY)
    assert info.keep_cache and not info.direct_io
    env.vfs.release(info.fh)
    status = await env.kernel.resolve("done/status")
    status_info = await env.vfs.open(status.inode, os.O_RDONLY)
    assert status_info.direct_io and not status_info.keep_cache
    env.vfs.release(status_info.fh)
    with pytest.raises(NotFoundError):
        await env.kernel.resolve("done/outputs/vtk/missing.vtk")
    with pytest.raises(NotFoundError):
        await env.kernel.resolve("done/outputs/stdout.txt/below")
    with pytest.raises(IsDirError):
        await env.vfs.open(top["vtk"].inode, os.O_RDONLY)
    with pytest.raises(NotDirError):
        await env.vfs.opendir(file_attr.inode)
    with pytest.raises(ReadOnlyError):
        await env.vfs.open(file_attr.inode, os.O_WRONLY)


async def test_task_without_archive_has_empty_outputs(env: Env) -> None:
    env.fake.add("noarchive", S.FAILED)  # the service never stored one
    outputs = await env.kernel.resolve("noarchive/outputs")
    assert await env.kernel.listdir(outputs.inode) == []


async def test_concurrent_readers_of_a_task_without_an_archive_all_see_it_empty(
    env: Env,
) -> None:
    """Readers that come while the first looks for the archive share its answer, "none"
    included (they got EIO from an assertion once)."""
    env.fake.add("noarchive", S.FAILED)
    env.fake.objects.fault = lambda seen, answer: replace(answer, delay=0.05)
    outputs = await env.kernel.resolve("noarchive/outputs")
    listed: list[list[tuple[str, Attr]]] = []

    async def ls() -> None:
        listed.append(await env.kernel.listdir(outputs.inode))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ls)
    assert listed == [[], [], []]
    assert len(env.fake.objects.seen) == 1  # one look for the archive


async def test_a_missing_archive_is_asked_for_again_after_a_while(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    """An ended task whose archive was missing for a moment (storage catching up, a file
    moved away and back) does not show an empty ``outputs`` for the rest of the mount."""
    env.fake.add("late", S.SUCCESS)
    outputs = await env.kernel.resolve("late/outputs")
    assert await env.kernel.listdir(outputs.inode) == []
    env.fake.objects.put("fake-bucket/late/output.zip", artifacts_zip(FILES))
    assert await env.kernel.listdir(outputs.inode) == []  # remembered for a while
    await trio.sleep(env.vfs.settings.archive_retry + 1)
    assert {name for name, _ in await env.kernel.listdir(outputs.inode)} == {
        "stdout.txt",
        "stderr.txt",
        "vtk",
        "log",
    }


async def test_open_archives_are_held_to_an_entry_budget(env: Env) -> None:
    """Archives with large central directories are let go, oldest first, when their indexes
    together pass ``max_index_entries`` (memory), whatever ``max_archives`` allows."""
    env.vfs.settings = replace(env.vfs.settings, max_index_entries=2500)
    many = {f"f{i:04d}.txt": b"x" for i in range(1000)}
    for name in ("a", "b", "c"):
        env.fake.add(name, S.SUCCESS, archive=artifacts_zip(many))
        outputs = await env.kernel.resolve(f"{name}/outputs")
        assert len(await env.kernel.listdir(outputs.inode)) == 1000
    gets = env.fake.objects.gets()
    outputs = await env.kernel.resolve("c/outputs")
    await env.kernel.listdir(outputs.inode)
    assert env.fake.objects.gets() == gets  # the newest two are still open
    outputs = await env.kernel.resolve("a/outputs")
    await env.kernel.listdir(outputs.inode)
    assert env.fake.objects.gets() > gets  # the oldest was let go, and is opened again


async def test_readdir_offsets_survive_changes(env: Env) -> None:
    for i in range(7):
        env.fake.add(f"t{i}", S.SUCCESS)
    fh = await env.vfs.opendir(ROOT_INODE)
    names: list[str] = []

    def take_two(batch: list[tuple[str, int]]) -> object:
        def emit(name: str, attr: Attr, next_id: int) -> bool:
            if len(batch) == 2:
                return False
            batch.append((name, next_id))
            if name not in (".", ".."):
                env.kernel.refs[attr.inode] += 1
            return True

        return emit

    offset = 0
    while True:
        batch: list[tuple[str, int]] = []
        await env.vfs.readdir(fh, offset, take_two(batch))  # type: ignore[arg-type]
        if not batch:
            break
        names += [n for n, _ in batch]
        offset = batch[-1][1]
        env.fake.add(f"new{offset}", S.SUBMITTED)  # tasks keep arriving meanwhile
    env.vfs.releasedir(fh)
    assert names == [
        ".",
        "..",
        ".taskfs",
        ".projects",
        ".status",
        *(f"t{i}" for i in reversed(range(7))),
    ]


async def test_unaccepted_readdir_entries_take_no_reference(env: Env) -> None:
    env.fake.add("one", S.SUCCESS)
    fh = await env.vfs.opendir(ROOT_INODE)
    await env.vfs.readdir(fh, 0, lambda name, attr, next_id: False)
    env.vfs.releasedir(fh)
    assert len(env.vfs.inodes) == 0


async def test_lookup_counts_and_forget(env: Env) -> None:
    env.fake.add("abc", S.SUCCESS)
    first = await env.vfs.lookup(ROOT_INODE, "abc")
    again = await env.vfs.lookup(ROOT_INODE, "abc")
    assert first.inode == again.inode and env.vfs.inodes.count(first.inode) == 2
    env.vfs.forget([(first.inode, 1)])
    assert env.vfs.inodes.key(first.inode) is not None
    env.vfs.forget([(first.inode, 1)])
    assert env.vfs.inodes.key(first.inode) is None
    renewed = await env.kernel.lookup(ROOT_INODE, "abc")
    assert renewed.inode > first.inode  # numbers are never reused
    with pytest.raises(NotFoundError):
        await env.vfs.getattr(first.inode)


async def test_control_kill_and_errors(env: Env) -> None:
    env.fake.add("run", S.COMPUTATION_STARTED)
    env.fake.add("done", S.SUCCESS)
    assert "run" in [name for name, _ in await env.kernel.listdir(ROOT_INODE)]
    assert await env.kernel.write("run/control", b"kill\n") == 5
    assert env.fake.tasks["run"]["status"] == "pending-kill"
    # Still listed (the cached listing is 2 s old at most), only its state is refetched.
    assert "run" in [name for name, _ in await env.kernel.listdir(ROOT_INODE)]
    assert await env.kernel.read("run/status") == b"pending-kill\n"  # shown at once
    assert await env.kernel.write("run/control", b"  kill  ") == 8  # already pending: fine
    with pytest.raises(TaskEndedError):
        await env.kernel.write("done/control", b"kill\n")
    with pytest.raises(InvalidCommandError):
        await env.kernel.write("run/control", b"restart\n")
    with pytest.raises(InvalidCommandError):
        await env.kernel.write("run/control", b"kill now\n")
    kills = env.fake.calls["POST tasks/{id}/kill"]
    with pytest.raises(InvalidCommandError):
        await env.kernel.write("run/control", b"ki")  # each write holds whole commands
    with pytest.raises(InvalidCommandError):
        await env.kernel.write("run/control", b"kill\nnonsense\n")  # all or nothing
    assert env.fake.calls["POST tasks/{id}/kill"] == kills
    assert await env.kernel.write("run/control", b"\n") == 1  # nothing to do
    assert await env.kernel.write("run/control", b"kill") == 4  # no newline: fine
    assert env.fake.calls["POST tasks/{id}/kill"] == kills + 1


async def test_everything_but_control_is_read_only(env: Env) -> None:
    env.fake.add("done", S.SUCCESS, archive=artifacts_zip(FILES))
    for path in ("done/status", "done/wait", "done/info.json", "done/outputs/stdout.txt"):
        attr = await env.kernel.resolve(path)
        with pytest.raises(ReadOnlyError):
            await env.vfs.open(attr.inode, os.O_WRONLY | os.O_TRUNC)
        with pytest.raises(ReadOnlyError):
            await env.vfs.setattr(attr.inode, 0, False, False)
    control = await env.kernel.resolve("done/control")
    assert (await env.vfs.setattr(control.inode, 0, False, True)).mode & 0o777 == 0o600
    with pytest.raises(ReadOnlyError):
        await env.vfs.setattr(control.inode, None, True, False)  # chmod
    with pytest.raises(ReadOnlyError):
        await env.vfs.setattr(control.inode, 10, False, False)


async def test_wait_uses_one_poller_per_task(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.fake.add("long", S.COMPUTATION_STARTED)
    results: list[bytes] = []
    attr = await env.kernel.resolve("long/wait")

    async def waiter() -> None:
        info = await env.vfs.open(attr.inode, os.O_RDONLY, pid=os.getpid())
        results.append(bytes(await env.vfs.read(info.fh, 0, 100)))
        assert await env.vfs.read(info.fh, len(results[-1]), 100) == b""
        env.vfs.release(info.fh)

    before = env.fake.calls["GET tasks/{id}"]
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(waiter)
        await trio.sleep(10)
        polls = env.fake.calls["GET tasks/{id}"] - before
        assert 3 <= polls <= 12, polls  # about one per second, not one per reader
        env.fake.set_status("long", S.KILLED)
    assert results == [b"killed\n"] * 4


async def test_wait_readers_of_a_task_that_disappears_get_enoent(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.fake.add("doomed", S.COMPUTATION_STARTED)
    attr = await env.kernel.resolve("doomed/wait")
    errors: list[Exception] = []

    async def waiter() -> None:
        info = await env.vfs.open(attr.inode, os.O_RDONLY, pid=os.getpid())
        try:
            await env.vfs.read(info.fh, 0, 100)
        except NotFoundError as exc:
            errors.append(exc)
        finally:
            env.vfs.release(info.fh)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiter)
            await trio.sleep(5)
            del env.fake.tasks["doomed"]  # the service forgot it: 404 from now on
    assert len(errors) == 3


async def test_wait_limits_and_abandoned_readers(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.fake.add("long", S.COMPUTATION_STARTED)
    attr = await env.kernel.resolve("long/wait")
    gone = subprocess.Popen(["true"])
    gone.wait()
    info = await env.vfs.open(attr.inode, os.O_RDONLY, pid=gone.pid)
    with pytest.raises(ReaderGoneError):
        await env.vfs.read(info.fh, 0, 100)
    env.vfs.release(info.fh)
    handles = []
    async with trio.open_nursery() as nursery:
        for _ in range(4):  # max_waiters=4 in the fixture
            handle = await env.vfs.open(attr.inode, os.O_RDONLY, pid=os.getpid())
            handles.append(handle)
            nursery.start_soon(env.vfs.read, handle.fh, 0, 100)
        await trio.sleep(1)
        extra = await env.vfs.open(attr.inode, os.O_RDONLY, pid=os.getpid())
        with pytest.raises(BusyError):
            await env.vfs.read(extra.fh, 0, 100)
        env.vfs.release(extra.fh)
        env.fake.set_status("long", S.SUCCESS)
    for handle in handles:
        env.vfs.release(handle.fh)


async def test_root_listing_pages_of_500(env: Env) -> None:
    for i in range(1000):
        env.fake.add(f"task{i:04}", S.SUCCESS)
    entries = await env.kernel.listdir(ROOT_INODE, batch=1000)
    assert len(entries) == 1000
    assert env.fake.calls["GET tasks"] == 2
    await env.kernel.listdir(ROOT_INODE, batch=1000)
    assert env.fake.calls["GET tasks"] == 2  # cached briefly


async def test_root_refresh_reads_pages_until_nothing_changed(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    """The API lists newest first: a refresh stops at the first page with nothing new once
    every task that had not ended has been seen, and keeps the rest of the previous
    listing."""

    async def listing() -> tuple[list[str], int]:
        before = env.fake.calls["GET tasks"]
        await trio.sleep(3)  # past the listing's 2 s
        names = [name for name, _ in await env.kernel.listdir(ROOT_INODE, batch=5000)]
        return names, env.fake.calls["GET tasks"] - before

    for i in range(1200):
        env.fake.add(f"task{i:04}", S.SUCCESS)
    expected = [f"task{i:04}" for i in reversed(range(1200))]
    assert await listing() == (expected, 3)  # the first listing reads every page
    assert await listing() == (expected, 1)  # unchanged: one request
    # A new task pushes one task to each following page: page 1 has something new, page 2
    # nothing (the shifted task was seen), so two requests.
    env.fake.add("new1", S.SUCCESS)
    assert await listing() == (["new1", *expected], 2)
    # A new running task: page 1 brought it, page 2 nothing new.
    env.fake.add("running", S.COMPUTATION_STARTED)
    names, requests = await listing()
    assert names == ["running", "new1", *expected] and requests == 2
    names, requests = await listing()
    assert requests == 1  # still running, seen again on page 1: nothing more to read
    # Enough new tasks to fill a page: every page that has one is read.
    for i in range(600):
        env.fake.add(f"more{i:03}", S.SUCCESS)
    names, requests = await listing()
    assert names[:600] == [f"more{i:03}" for i in reversed(range(600))]
    assert len(names) == 1802 and requests == 3
    # Nothing new, but the running task is on page 2 now: its state comes with page 2.
    assert (await listing())[1] == 2
    env.fake.set_status("running", S.SUCCESS)
    assert (await listing())[1] == 2  # it ended: seen on page 2 as it is now
    assert (await env.vfs.task_state("running")).task.status == S.SUCCESS
    assert (await listing())[1] == 1  # nothing running any more
    # A deleted task makes the count disagree with the API's total: every page again.
    deleted = expected[-1]
    env.fake.order.remove(deleted)
    names, requests = await listing()
    assert deleted not in names and len(names) == 1801
    assert requests == 1 + 4  # the short refresh, then all four pages


async def test_a_first_listing_read_side_by_side_falls_back_when_the_total_moves(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    """Pages 2 onwards of a large root are read side by side; a task submitted meanwhile
    shifts them, so they are read again one after another (every task once, in order), and
    the newcomer shows at the next refresh, as with paging one page at a time."""
    for i in range(1600):
        env.fake.add(f"task{i:04}", S.SUCCESS)
    calls = 0

    def submit_during_paging(method: str, path: str) -> None:
        nonlocal calls
        if method == "GET" and path == "/tasks":
            calls += 1
            if calls == 2:
                env.fake.add("newcomer", S.SUBMITTED)

    env.fake.api_fault = submit_during_paging
    old = [f"task{i:04}" for i in reversed(range(1600))]
    names = [name for name, _ in await env.kernel.listdir(ROOT_INODE, batch=5000)]
    assert names == old
    assert env.fake.calls["GET tasks"] == 4 + 3  # side by side, then pages 2-4 in a row
    env.fake.api_fault = None
    await trio.sleep(3)
    names = [name for name, _ in await env.kernel.listdir(ROOT_INODE, batch=5000)]
    assert names == ["newcomer", *old]


async def test_a_large_first_listing_reads_pages_side_by_side(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    """With every list request taking 1 s (mock clock), 8 pages take 1 + 7/4 rounds, not 8."""
    for i in range(3600):
        env.fake.add(f"task{i:04}", S.SUCCESS)
    in_flight = peak = 0
    real = env.vfs.api.list_page

    async def list_page(*args: object, **kwargs: object) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(1)
        in_flight -= 1
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    env.vfs.api.list_page = list_page  # type: ignore[method-assign,assignment]
    start = trio.current_time()
    names = [name for name, _ in await env.kernel.listdir(ROOT_INODE, batch=5000)]
    assert len(names) == 3600 and names[0] == "task3599"
    assert peak == 4
    assert trio.current_time() - start == 3  # page 1, then pages 2-5, then 6-8


async def test_a_new_kind_of_node_is_one_entry_or_one_class(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the nodes module's docstring promises: a file of every task, a file of
    ``.taskfs``, a view and a directory of every task are each one entry, with nothing
    else changed (listing, lookup, reads and errors follow)."""

    @dataclass(frozen=True)
    class Notes(nodes.Node):  # a directory of every task holding one fixed file
        task_id: str

        async def attr(self, vfs: Vfs) -> Attr:
            return vfs.attr(nodes.DIR_MODE, 0, 0, 1.0, 2)

        def describe(self) -> str:
            return f"{self.task_id}/notes"

        def child(self, name: str) -> nodes.Node:
            if name != "readme":
                raise NotFoundError(name)
            return nodes.MetaFile("hello")

        async def entries(self, vfs: Vfs) -> nodes.Entries:
            return await self._listed(vfs, ["readme"])

    owner = nodes.VirtualFile("owner", lambda vfs, s: f"{s.task.project}\n".encode())
    monkeypatch.setitem(nodes.VIRTUAL, "owner", owner)
    monkeypatch.setitem(nodes.META_FILES, "hello", lambda vfs: b"hi\n")
    monkeypatch.setitem(nodes.VIEWS, ".machines", models.machine_type)
    monkeypatch.setitem(nodes.TASK_DIRS, "notes", Notes)
    env.fake.add("done", S.SUCCESS, archive=artifacts_zip(FILES))
    task = await env.kernel.resolve("done")
    names = [name for name, _ in await env.kernel.listdir(task.inode)]
    assert names[-4:] == ["owner", "inputs", "outputs", "notes"]
    project = env.fake.tasks["done"]["project"]
    assert await env.kernel.read("done/owner") == f"{project}\n".encode()
    assert (await env.kernel.resolve("done/owner")).size == len(project) + 1
    with pytest.raises(ReadOnlyError):
        await env.vfs.open((await env.kernel.resolve("done/owner")).inode, os.O_WRONLY)
    assert await env.kernel.read(".taskfs/hello") == b"hi\n"
    meta = await env.kernel.resolve(".taskfs")
    assert [name for name, _ in await env.kernel.listdir(meta.inode)] == ["stats", "hello"]
    link = await env.kernel.resolve(".machines/c2-standard-4/done")
    assert await env.vfs.readlink(link.inode) == b"../../done"
    assert await env.kernel.read("done/notes/readme") == b"hi\n"
    with pytest.raises(NotFoundError):
        await env.kernel.resolve("done/notes/other")


async def test_a_tasks_mtime_holds_while_its_status_does(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    """The listing and the task's own record tell the time of its last change differently
    (its times; its status history): the mtime must not flip between them while the status
    stays, or tar says "file changed as we read it" and rsync copies again."""
    env.fake.add("run", S.COMPUTATION_STARTED)
    first = await env.kernel.resolve("run/status")  # the task's own record
    for _ in range(3):
        await trio.sleep(2.1)
        await env.kernel.listdir(ROOT_INODE)  # the listing's record replaces it
        assert (await env.vfs.getattr(first.inode)).mtime_ns == first.mtime_ns
        await trio.sleep(1.1)
        assert (await env.vfs.getattr(first.inode)).mtime_ns == first.mtime_ns
    env.fake.set_status("run", S.SUCCESS)
    await trio.sleep(1.1)
    assert (await env.vfs.getattr(first.inode)).mtime_ns > first.mtime_ns


async def test_outputs_of_a_task_that_just_stopped_computing_wait_for_its_archive(
    env: Env, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Between computing and ended its outputs are being stored: what is asked of outputs/
    moments after it stopped computing waits (half the deadline at most) for the archive; a
    task that has been storing for long shows an empty outputs/ at once."""
    env.fake.add("ending", S.COMPUTATION_STARTED)
    env.fake.set_status("ending", S.COMPUTATION_ENDED)  # just now

    async def store_and_end() -> None:
        await trio.sleep(1.5)
        env.fake.objects.put("fake-bucket/ending/output.zip", artifacts_zip(FILES))
        env.fake.set_status("ending", S.SUCCESS)

    nursery.start_soon(store_and_end)
    started = trio.current_time()
    assert await env.kernel.read("ending/outputs/stdout.txt") == FILES["stdout.txt"]
    assert 1.5 <= trio.current_time() - started <= 2.5
    env.fake.add("storing", S.COMPUTATION_ENDED)  # its last change: long ago
    started = trio.current_time()
    outputs = await env.kernel.resolve("storing/outputs")
    assert await env.kernel.listdir(outputs.inode) == []
    with pytest.raises(NotFoundError):
        await env.kernel.resolve("storing/outputs/stdout.txt")
    assert trio.current_time() - started < 0.5
