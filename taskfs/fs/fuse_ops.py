"""The pyfuse3 adapter: translates FUSE requests to ``Vfs`` calls and errors to errno.

Owns: argument and result translation (bytes names, ``EntryAttributes``, ``FileInfo``) and the
boundary where exceptions become errno, in one decorator over one table (``TaskfsError.errno``).

Must stay true: no exception but ``pyfuse3.FUSEError`` ever leaves a handler (anything else
would take the whole mount down): a ``TaskfsError`` answers its errno, anything unexpected is
logged with its traceback and answers EIO. No behaviour lives here; it belongs in ``vfs``.
Every write-type request except writes to ``control`` answers EROFS.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from taskfs.archive.cache import Buffer
from taskfs.errors import TaskfsError
from taskfs.fs.inodes import Inode
from taskfs.fs.vfs import Attr, Vfs

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
BLKSIZE = 128 << 10

# How loudly each errno is logged: user mistakes and normal misses quietly, failures loudly.
_QUIET = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EROFS,
        errno.ENODATA,
        errno.EINTR,
        errno.ENOTCONN,
    }
)
_NOTICE = frozenset({errno.ESRCH, errno.EINVAL, errno.EAGAIN, errno.EACCES, errno.ENOTSUP})


def errno_of(exc: BaseException) -> int:
    """The one errno table: ``TaskfsError`` knows its errno; anything else is EIO."""
    return exc.errno if isinstance(exc, TaskfsError) else errno.EIO


def handler(
    fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """Map exceptions to ``FUSEError`` at the boundary; the mount survives anything."""

    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with self.vfs.operation():
                return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            self.vfs.stats.error(exc.errno)  # answered here (ENODATA of an absent xattr)
            raise
        except TaskfsError as exc:
            code = errno_of(exc)
            self.vfs.stats.error(code)
            level = (
                logging.DEBUG
                if code in _QUIET
                else logging.INFO
                if code in _NOTICE
                else logging.WARNING
            )
            log.log(level, "%s: %s (%s)", fn.__name__, exc, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            self.vfs.stats.error(errno.EIO)
            log.exception("unexpected error in %s; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def entry(attr: Attr) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = pyfuse3.InodeT(attr.inode)
    out.generation = 0
    out.entry_timeout = attr.timeout
    out.attr_timeout = attr.timeout
    out.st_mode = pyfuse3.ModeT(attr.mode)
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = 0
    out.st_size = attr.size
    out.st_blksize = BLKSIZE
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.mtime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.mtime_ns
    return out


class Operations(pyfuse3.Operations):
    """The taskfs request handlers."""

    supports_dot_lookup = False  # no NFS export: the kernel never looks up "." or ".."
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs) -> None:
        super().__init__()
        self.vfs = vfs
        vfs.drop_cached = self._invalidate

    def _invalidate(self, inode: Inode) -> None:
        """Drop the kernel's cached pages of an inode (not from inside its handler)."""

        async def later() -> None:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except OSError as exc:
                log.debug("invalidating inode %d failed: %s", inode, exc)

        self.vfs.nursery.start_soon(later)

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry(await self.vfs.lookup(Inode(parent_inode), os.fsdecode(name), ctx.pid))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self.vfs.forget([(Inode(i), n) for i, n in inode_list])
        except Exception:
            log.exception("unexpected error in forget")

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry(await self.vfs.getattr(Inode(inode), ctx.pid))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        size = attr.st_size if fields.update_size else None
        ownership = fields.update_mode or fields.update_uid or fields.update_gid
        times = fields.update_atime or fields.update_mtime
        result = await self.vfs.setattr(Inode(inode), size, ownership, times)
        return entry(result)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.vfs.readlink(Inode(inode))

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.vfs.opendir(Inode(inode), ctx.pid)

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def emit(name: str, attr: Attr, next_id: int) -> bool:
            return bool(pyfuse3.readdir_reply(token, os.fsencode(name), entry(attr), next_id))

        await self.vfs.readdir(fh, start_id, emit)

    @handler
    async def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        info = await self.vfs.open(Inode(inode), flags, ctx.pid)
        return pyfuse3.FileInfo(fh=info.fh, direct_io=info.direct_io, keep_cache=info.keep_cache)

    @handler
    # pyfuse3 replies with any buffer (``PyObject_GetBuffer``; its stubs say ``bytes``): a view
    # of a cached block goes to the kernel with no copy.
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        return await self.vfs.read(fh, off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        # Nothing to flush (control acts in write): ENOSYS makes the kernel stop sending
        # FLUSH, one request less for every close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def release(self, fh: int) -> None:
        self.vfs.release(fh)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = BLKSIZE
        stats.f_frsize = BLKSIZE
        size, tasks = self.vfs.statfs()
        # Size and Used: the listed tasks' output archives; nothing available: read-only.
        stats.f_blocks = -(-size // BLKSIZE)
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = tasks
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    # Extended attributes only with ``--xattr``: without, ENOSYS makes the kernel stop asking
    # (``ls -l`` sends two xattr requests per file otherwise: 4-5x the time of ``ls -lR``).

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.vfs.settings.xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if not name.startswith(b"user.taskfs."):
            raise self._refuse(errno.ENODATA)  # security.*, ACLs: none, and no request
        return await self._getxattr(inode, os.fsdecode(name))

    @handler
    async def _getxattr(self, inode: int, name: str) -> bytes:
        value = (await self.vfs.xattrs(Inode(inode))).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if not self.vfs.settings.xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await self._listxattr(inode)

    @handler
    async def _listxattr(self, inode: int) -> list[bytes]:
        return [name.encode() for name in await self.vfs.xattrs(Inode(inode))]

    # Everything that would change the tree is refused: taskfs is read-only but for control.

    def _refuse(self, code: int) -> pyfuse3.FUSEError:
        """An error answered without the vfs, counted as ``handler`` counts the others
        (ENOSYS, which only tells the kernel what is not implemented, is not an error)."""
        self.vfs.stats.error(code)
        return pyfuse3.FUSEError(code)

    async def create(self, *args: Any) -> Any:
        raise self._refuse(errno.EROFS)

    async def mkdir(self, *args: Any) -> Any:
        raise self._refuse(errno.EROFS)

    async def mknod(self, *args: Any) -> Any:
        raise self._refuse(errno.EROFS)

    async def symlink(self, *args: Any) -> Any:
        raise self._refuse(errno.EROFS)

    async def link(self, *args: Any) -> Any:
        raise self._refuse(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise self._refuse(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise self._refuse(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise self._refuse(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise self._refuse(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise self._refuse(errno.EROFS)
