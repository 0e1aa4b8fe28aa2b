"""The pyfuse3 adapter with fake request contexts: translation and the errno boundary."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from taskfs import errors
from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.config import ClientSettings
from taskfs.fs.fuse_ops import Operations
from taskfs.fs.inodes import ROOT_INODE
from taskfs.fs.mount import MountSettings, fuse_options
from taskfs.fs.vfs import Vfs, VfsSettings
from taskfs.outputs import Outputs, make_cache
from tests.fakeapi import KEY, FakeApi
from tests.rangeserver import AnswerTransport, mock_transport
from tests.support import artifacts_zip
from tests.unit.test_vfs import FILES


@dataclass
class Ctx:
    """Stands in for pyfuse3.RequestContext."""

    uid: int = 1000
    gid: int = 1000
    pid: int = os.getpid()
    umask: int = 0o022


@pytest.fixture
async def ops(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[Operations, FakeApi]]:
    fake = FakeApi()
    fake.add("done", S.SUCCESS, archive=artifacts_zip(FILES))
    fake.add("run", S.COMPUTATION_STARTED)
    settings = ClientSettings(api_url=fake.base_url, api_key=KEY, deadline=5)
    async with (
        ApiClient.open(settings, transport=mock_transport(fake)) as api,
        Outputs(
            api,
            make_cache(None, 0),
            transport=mock_transport(fake),
            bulk=AnswerTransport(fake),
        ) as outputs,
    ):
        operations = Operations(Vfs(api, outputs, nursery, VfsSettings()))
        yield operations, fake
        # Forget everything the "kernel" was given: the table must end empty.
        vfs = operations.vfs
        known = [(i, vfs.inodes.count(i)) for i in list(vfs.inodes._by_inode) if i != ROOT_INODE]
        await operations.forget(known)
        assert len(vfs.inodes) == 0


async def lookup(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    inode: int = ROOT_INODE
    attr: pyfuse3.EntryAttributes | None = None
    for part in path.split("/"):
        attr = await ops.lookup(inode, part.encode(), Ctx())  # type: ignore[arg-type]
        inode = attr.st_ino
    assert attr is not None
    return attr


async def test_entry_attributes(ops: tuple[Operations, FakeApi]) -> None:
    operations, _ = ops
    attr = await lookup(operations, "done/outputs/vtk/ParticleData_Fluid_1.vtk")
    assert attr.st_size == len(FILES["vtk/ParticleData_Fluid_1.vtk"])
    assert attr.st_mode == stat.S_IFREG | 0o444
    assert attr.entry_timeout == attr.attr_timeout == 3600
    assert attr.st_blocks == (attr.st_size + 511) // 512
    live = await lookup(operations, "run/status")
    assert live.entry_timeout == live.attr_timeout == 1.0
    again = await operations.getattr(live.st_ino, Ctx())  # type: ignore[arg-type]
    assert again.st_ino == live.st_ino and again.st_size == len(b"computation-started\n")


async def test_errors_become_errno(ops: tuple[Operations, FakeApi]) -> None:
    operations, _ = ops
    with pytest.raises(pyfuse3.FUSEError) as missing:
        await operations.lookup(ROOT_INODE, b"nope", Ctx())  # type: ignore[arg-type]
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as bad:
        await operations.lookup(ROOT_INODE, b"bad name", Ctx())  # type: ignore[arg-type]
    assert bad.value.errno == errno.ENOENT
    control = await lookup(operations, "done/control")
    info = await operations.open(control.st_ino, os.O_WRONLY, Ctx())  # type: ignore[arg-type]
    with pytest.raises(pyfuse3.FUSEError) as ended:
        await operations.write(info.fh, 0, b"kill\n")
    assert ended.value.errno == errno.ESRCH
    with pytest.raises(pyfuse3.FUSEError) as invalid:
        await operations.write(info.fh, 0, b"explode\n")
    assert invalid.value.errno == errno.EINVAL
    await operations.release(info.fh)
    status = await lookup(operations, "done/status")
    with pytest.raises(pyfuse3.FUSEError) as read_only:
        await operations.open(status.st_ino, os.O_WRONLY, Ctx())  # type: ignore[arg-type]
    assert read_only.value.errno == errno.EROFS


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("create", (1, b"x", 0o644, os.O_CREAT, None)),
        ("mkdir", (1, b"x", 0o755, None)),
        ("mknod", (1, b"x", 0o644, 0, None)),
        ("symlink", (1, b"x", b"y", None)),
        ("link", (2, 1, b"x", None)),
        ("unlink", (1, b"x", None)),
        ("rmdir", (1, b"x", None)),
        ("rename", (1, b"x", 1, b"y", 0, None)),
        ("setxattr", (1, b"user.x", b"v", None)),
        ("removexattr", (1, b"user.x", None)),
    ],
)
async def test_changes_are_read_only(
    ops: tuple[Operations, FakeApi], method: str, args: tuple[Any, ...]
) -> None:
    operations, _ = ops
    with pytest.raises(pyfuse3.FUSEError) as info:
        await getattr(operations, method)(*args)
    assert info.value.errno == errno.EROFS


@pytest.mark.expected_warnings
async def test_unexpected_errors_are_eio_and_logged(
    ops: tuple[Operations, FakeApi],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    operations, _ = ops

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(operations.vfs, "getattr", broken)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await operations.getattr(ROOT_INODE, Ctx())  # type: ignore[arg-type]
    assert info.value.errno == errno.EIO
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "getattr" in record.getMessage()
    # forget never raises, even on nonsense
    await operations.forget([(999_999, 1)])


async def test_readdir_stops_when_the_buffer_is_full(
    ops: tuple[Operations, FakeApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    operations, _ = ops
    accepted: list[bytes] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(accepted) == 3:
            return False
        accepted.append(name)
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    task = await lookup(operations, "done")
    fh = await operations.opendir(task.st_ino, Ctx())  # type: ignore[arg-type]
    await operations.readdir(fh, 0, None)  # type: ignore[arg-type]
    await operations.releasedir(fh)
    assert accepted == [b".", b"..", b"status"]
    counted = [i for i in operations.vfs.inodes._by_inode if operations.vfs.inodes.count(i)]
    assert len(counted) == 1 + 1  # the task directory and status (dots count no lookup)


def test_fuse_options() -> None:
    base = MountSettings(Path("/mnt"), ClientSettings("http://x", "k"), Path("/tmp/c"))
    options = fuse_options(base)
    assert {"default_permissions", "fsname=taskfs", "subtype=taskfs"} <= options
    assert "allow_other" not in options
    shared = replace(base, allow_other=True)
    assert "allow_other" in fuse_options(shared)
    assert base.max_tasks > base.vfs.max_waiters


# What the README's semantics table promises for each situation, written from the table (not
# from the classes): the boundary must answer exactly this, whatever the classes say.
README_ERRNO = {
    "NotFoundError": errno.ENOENT,  # no such task / no such output name
    "TaskEndedError": errno.ESRCH,  # kill on a task that has already ended
    "InvalidCommandError": errno.EINVAL,  # unknown word written to control
    "AuthError": errno.EACCES,  # API key missing or rejected
    "ServiceError": errno.EIO,  # unreachable, timed out, 5xx after retries
    "ProtocolError": errno.EIO,  # the service broke the protocol
    "ArchiveError": errno.EIO,  # outputs archive corrupt
    "ChecksumError": errno.EIO,  # CRC mismatch
    "UnsupportedError": errno.ENOTSUP,  # a method taskfs cannot read
    "StaleError": errno.ESTALE,  # archive replaced under an open file
    "ReadOnlyError": errno.EROFS,  # write to anything but control
    "NotDirError": errno.ENOTDIR,  # a directory operation on a file
    "IsDirError": errno.EISDIR,  # a file operation on a directory
    "BusyError": errno.EAGAIN,  # too many readers blocked on wait
    "LiveUnavailableError": errno.ENODATA,  # a file the live channel cannot carry
    "LiveError": errno.EIO,  # the live channel failed or did not answer
    "NoLiveChannelError": errno.EIO,  # (a live failure: no channel where one was needed)
    "ReaderGoneError": errno.EINTR,  # the reader blocked on wait was interrupted
    "UnmountingError": errno.ENOTCONN,  # the mount is being unmounted
}


@pytest.mark.expected_warnings
async def test_every_error_is_answered_with_its_errno_at_the_boundary(
    ops: tuple[Operations, FakeApi],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each error a handler may meet, raised inside a real request: the kernel gets the
    README table's errno (and the stats count it), logged as loudly as it deserves (failures
    of the service, the archive or the channel as warnings; a user's miss quietly); every
    class of the tree has an entry (a new one needs its errno decided here and in the
    README). The CLI's own (usage, local files) never reach the mount."""
    operations, _ = ops
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.TaskfsError)
    }
    assert set(classes) - {"TaskfsError", "UsageError", "LocalError"} == set(README_ERRNO)
    raised: list[BaseException] = []

    async def failing(*args: Any) -> Any:
        raise raised[-1]

    monkeypatch.setattr(operations.vfs, "getattr", failing)
    for name, expected in README_ERRNO.items():
        raised.append(classes[name](f"a {name}"))
        before = operations.vfs.stats.errors.get(errno.errorcode[expected], 0)
        with pytest.raises(pyfuse3.FUSEError) as answered:
            await operations.getattr(ROOT_INODE, Ctx())  # type: ignore[arg-type]
        assert answered.value.errno == expected, name
        assert operations.vfs.stats.errors[errno.errorcode[expected]] == before + 1, name
    warned = {r.getMessage().split()[2] for r in caplog.records if r.levelno >= logging.WARNING}
    loud = {name for name, code in README_ERRNO.items() if code in (errno.EIO, errno.ESTALE)}
    assert warned == loud
