"""A corrupt member is EIO through a real mount whatever order its bytes are read in.

Large members (stored: one flipped data byte; deflated: data fine but the directory's CRC-32
wrong) are read with ``pread`` in 128 KiB chunks in sequential, reverse, neighbour-swapped
(as the kernel's parallel read-ahead may deliver them) and random orders, and with ``tail``.
Reading every byte must fail with EIO somewhere; a sound member next to them reads fine.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

from taskfs.api.models import TaskStatusCode as S
from taskfs.outputs import MEMORY_CACHE
from tests.fakeapi import FakeApi
from tests.fuse.conftest import Mount, cloud_mount
from tests.support import artifacts_zip
from tests.unit.test_remote import corrupt_crc, flip_data_byte, text

SIZE = 12 << 20  # above the whole-member limits: read through the streaming readers
CHUNK = 128 << 10


def _orders(size: int) -> dict[str, list[int]]:
    offsets = list(range(0, size, CHUNK))
    swapped = offsets[:]
    for i in range(0, len(swapped) - 1, 2):
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    shuffled = offsets[:]
    random.Random(3).shuffle(shuffled)
    return {
        "reverse": offsets[::-1],
        "swapped-neighbours": swapped,
        "random": shuffled,
        "sequential": offsets,
    }


def _read_all(path: Path, offsets: list[int]) -> int | None:
    """pread every chunk in the given order; the errno of the first failure, if any."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # as little kernel read-ahead as it does
        for offset in offsets:
            try:
                os.pread(fd, CHUNK, offset)
            except OSError as exc:
                return exc.errno
    finally:
        os.close(fd)
    return None


def test_corrupt_members_are_eio_in_any_read_order(tmp_path: Path) -> None:
    stored, deflated, sound = text(SIZE, 1), text(SIZE, 2), text(SIZE, 3)
    bad_stored = flip_data_byte(artifacts_zip({"stored.bin": stored}, method=0), "stored.bin", 7)
    bad_deflated = corrupt_crc(artifacts_zip({"sim.vtk": deflated, "ok.vtk": sound}), "sim.vtk")
    fake = FakeApi()
    orders = _orders(SIZE)
    for i in range(len(orders)):  # an archive per order: a verdict is kept per archive
        fake.add(f"stored{i}", S.SUCCESS, archive=bad_stored)
        fake.add(f"deflated{i}", S.SUCCESS, archive=bad_deflated)
    with cloud_mount(tmp_path, fake) as mount:
        for i, (order, offsets) in enumerate(orders.items()):
            stored_path = mount.path / f"stored{i}" / "outputs" / "stored.bin"
            deflated_path = mount.path / f"deflated{i}" / "outputs" / "sim.vtk"
            assert _read_all(stored_path, offsets) == errno.EIO, order
            assert _read_all(deflated_path, offsets) == errno.EIO, order
            # Once found corrupt, always: a later plain read fails too, from the start.
            for path in (stored_path, deflated_path):
                result = mount.run(f"tail -c 100 {path}")
                assert result.returncode != 0 and "Input/output error" in result.stderr
        assert _check(mount, "deflated0", "ok.vtk", sound)


def _check(mount: Mount, task: str, name: str, body: bytes) -> bool:
    return (mount.path / task / "outputs" / name).read_bytes() == body


def test_a_loop_of_separate_reads_of_a_corrupt_member_ends_in_eio(tmp_path: Path) -> None:
    """``for k in ...; do dd skip=$k count=1; done``: each run opens, reads one MiB and
    closes; together they read every byte, so one of them fails, and every read after."""
    body = text(SIZE, 4)
    bad = flip_data_byte(artifacts_zip({"stored.bin": body}, method=0), "stored.bin", 5_000_000)
    fake = FakeApi()
    fake.add("bad", S.SUCCESS, archive=bad)
    with cloud_mount(tmp_path, fake) as mount:
        path = mount.path / "bad" / "outputs" / "stored.bin"
        failed = 0
        for k in reversed(range(SIZE >> 20)):
            run = mount.run(f"dd if={path} of=/dev/null bs=1M skip={k} count=1 status=none")
            failed += run.returncode != 0
        assert failed >= 1, "separate reads collected every byte of a corrupt member"
        again = mount.run(f"dd if={path} of=/dev/null bs=1M skip=0 count=1 status=none")
        assert again.returncode != 0 and "Input/output error" in again.stderr


def test_bytes_changed_under_the_same_etag_are_never_returned(tmp_path: Path) -> None:
    """Storage that changes an archive without a new ETag: a member read (and verified)
    once is read again after its blocks left every cache (no disk cache, page cache
    dropped); the changed block fails, with ESTALE, and no byte differs from the first read."""
    size = MEMORY_CACHE + (16 << 20)  # its first blocks leave the memory tier by the end
    body = text(size, 5)
    good = artifacts_zip({"big.bin": body}, method=0)
    fake = FakeApi()
    fake.add("done", S.SUCCESS, archive=good)
    name = "fake-bucket/done/output.zip"
    with cloud_mount(tmp_path, fake, "--cache-size", "0") as mount:
        path = mount.path / "done" / "outputs" / "big.bin"
        assert path.read_bytes() == body
        etag = fake.objects.etags[name]
        fake.objects.data[name] = flip_data_byte(good, "big.bin", 100_000)
        assert fake.objects.etags[name] == etag
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the page cache lets go
            offset, failure = 0, None
            while offset < size:
                try:
                    chunk = os.pread(fd, 1 << 20, offset)
                except OSError as exc:
                    failure = exc.errno
                    break
                assert chunk == body[offset : offset + len(chunk)], f"other bytes at {offset}"
                offset += len(chunk)
        finally:
            os.close(fd)
        assert failure == errno.ESTALE
