"""The CPU floors the bench measures beside the mount, each in a process of its own.

    floors.py fetch URL START END   the fetch layer alone: taskfs's HttpTransport receiving
                                    [START, END) in 4 MiB ranges into reused buffers
    floors.py memfs MOUNTPOINT SIZE a minimal pyfuse3 file system serving one file of SIZE
                                    bytes from memory (the pyfuse3 + kernel floor); runs until
                                    unmounted
    floors.py none                  nothing: what starting this script costs (subtracted)

Each prints nothing; the bench reads the process's CPU time from outside.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyfuse3
import trio

from taskfs.archive.fetch import HttpTransport, Stop
from taskfs.fs.mount import MountSettings, tune_readahead

STEP = 4 << 20


def fetch(url: str, start: int, end: int) -> None:
    transport = HttpTransport(timeout=60)
    buffer = memoryview(bytearray(STEP))
    try:
        for low in range(start, end, STEP):
            high = min(end, low + STEP)

            def accept(
                status: int, headers: Mapping[str, str], n: int = high - low
            ) -> Sequence[memoryview]:
                if status != 206:
                    raise RuntimeError(f"status {status}")
                return [buffer[:n]]

            transport.get(url, {"Range": f"bytes={low}-{high - 1}"}, accept, Stop())
    finally:
        transport.close()


def memfs(mountpoint: str, size: int) -> None:
    view = memoryview(bytearray(os.urandom(1 << 20)) * max(1, size >> 20))[:size]

    class Ops(pyfuse3.Operations):
        async def getattr(
            self, inode: int, ctx: pyfuse3.RequestContext | None = None
        ) -> pyfuse3.EntryAttributes:
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            root = inode == pyfuse3.ROOT_INODE
            attr.st_mode = (stat.S_IFDIR | 0o555) if root else (stat.S_IFREG | 0o444)
            attr.st_size = 0 if root else size
            attr.attr_timeout = attr.entry_timeout = 300
            return attr

        async def lookup(
            self, parent: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
        ) -> pyfuse3.EntryAttributes:
            if name != b"data":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(2)

        async def open(
            self, inode: int, flags: int, ctx: pyfuse3.RequestContext
        ) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=2, keep_cache=False)

        async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
            return view[off : off + size]

    options = set(pyfuse3.default_options)
    options.add("fsname=taskfs-floor")
    pyfuse3.init(Ops(), mountpoint, options)
    # The mount's kernel read-ahead (its reads are then 1 MiB, not 256 KiB): a fair floor.
    tune_readahead(Path(mountpoint), MountSettings.readahead_kb)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    if sys.argv[1] == "fetch":
        fetch(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "memfs":
        memfs(sys.argv[2], int(sys.argv[3]))
