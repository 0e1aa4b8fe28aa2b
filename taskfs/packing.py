"""Packing a directory tree into a ZIP archive: one set of rules for a task's input
(``taskfs submit``, ``Task.submit``) and its outputs (the embedded service).

Owns: walking a tree without following links out of it, deciding what is archived, skipped or
changed, and writing the members as a stream. Whatever a tree holds, packing finishes and
says what it could not keep; it never raises for the tree's content.

What packing does with each thing it meets (``Issue`` records every departure):

* regular files: archived byte for byte, streamed in 1 MiB chunks, up to the length they had
  when opened (a file that grows while it is packed is archived as it was; one that shrinks,
  as read, and reported); deflate, except files whose first MiB does not compress (stored);
  zip64 when needed;
* modification times are stored twice, as zip tools do: in the DOS date field (local time,
  1980-01-01 to 2107-12-31: a time outside is clamped to the nearest end and reported) and
  exactly (UTC, whole seconds) in an extended timestamp field (0x5455) wherever 32 bits hold
  it, which readers such as ``unzip`` and taskfs prefer;
* names that are not UTF-8 are archived with each undecodable byte written as ``%XX`` and
  reported; a path is a file or a directory in the archive, once: an entry whose name (after
  escaping) is already taken, or whose path is longer than a ZIP name can be (65,535 bytes),
  is skipped and reported;
* symbolic links are never followed out of the tree: a link to a file inside the tree is
  archived as that file's content (as ``shutil.make_archive``, which the cloud's task runner
  uses, does), a link to a directory inside the tree as an empty directory (likewise); links
  that point out of the tree, dangle or loop are skipped and reported;
* FIFOs, sockets and device nodes are skipped and reported; they are never opened (a FIFO
  would block);
* a file or directory that cannot be read is skipped and reported with the reason; a file
  whose read fails part way is taken out of the archive again, never left truncated;
* directories that end up with nothing archived under them (empty ones included) are kept as
  directory entries;
* with ``one_filesystem`` (the service's outputs), nothing mounted below the root is entered.

Must stay true: nothing here follows a link out of ``root`` or opens anything but regular
files and directories; walking is iterative and holds one directory descriptor at a time, so
depth costs no recursion, no descriptors and no path length; memory is one chunk plus the
archive's central directory plus the names of the directories being walked.
"""

from __future__ import annotations

import codecs
import errno
import json
import math
import os
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO

from taskfs.mounts import mount_points_under

CHUNK = 1 << 20
# The first chunk decides deflate or stored: stored when it shrinks by less than 3%.
SAMPLE = CHUNK
DOS_MIN = (1980, 1, 1, 0, 0, 0)
DOS_MAX = (2107, 12, 31, 23, 59, 58)
REPORT_NAME = "taskfs-packing.txt"
# The longest member name a ZIP can hold (a 16-bit length), in UTF-8 bytes.
MAX_NAME = 0xFFFF
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@dataclass(frozen=True)
class Issue:
    """One departure from "archived as it is": ``action`` is ``skipped``, ``clamped``,
    ``renamed`` or ``changed``; ``path`` is relative to the packed root."""

    action: str
    path: str
    reason: str

    def line(self) -> str:
        return f"{self.action}: {json.dumps(self.path, ensure_ascii=False)}: {self.reason}"


@dataclass
class PackResult:
    """What packing archived, and every departure from the tree as it was."""

    files: int = 0
    size_bytes: int = 0
    issues: list[Issue] = field(default_factory=list)

    def report(self) -> str:
        """The text of the report member: one line per issue."""
        header = (
            "taskfs packing report: what the archive does not hold exactly as it was found.\n"
            "Each line: action, the path (JSON-quoted, relative to the packed directory), why.\n"
        )
        return header + "".join(issue.line() + "\n" for issue in self.issues)


class PackingCancelled(Exception):  # noqa: N818 - it is not an error
    """``cancelled()`` said stop: the archive written so far is incomplete; discard it."""


def pack_tree(
    root: Path | None,
    out: BinaryIO,
    prefix: str,
    *,
    report_name: str | None = None,
    follow_root: bool = True,
    one_filesystem: bool = False,
    cancelled: Callable[[], bool] = lambda: False,
) -> PackResult:
    """Write a ZIP to ``out`` (seekable) holding the directory ``prefix`` and every file under
    ``root`` as ``prefix + relative path``; ``root`` missing or ``None``: just the directory.

    With ``report_name``, the report of any issues is added as the member
    ``prefix + report_name`` (another free name if the tree has one so called).
    ``follow_root=False`` refuses a ``root`` that is itself a symbolic link (a task's working
    directory swapped for a link); a user's input directory may be one. ``one_filesystem``
    skips (and reports) whatever is mounted below ``root``, as ``tar --one-file-system``.
    ``cancelled`` is asked between files and chunks; when it answers true,
    ``PackingCancelled`` is raised.
    """
    result = PackResult()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        zf.mkdir(prefix.rstrip("/"))
        packer = _Packer(zf, out, prefix, result, cancelled)
        if root is not None:
            packer.pack(root, follow_root, one_filesystem)
        if report_name is not None and result.issues:
            name = packer.free_name(report_name)
            info = zipfile.ZipInfo(prefix + name, date_time=time.localtime()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o444) << 16
            zf.writestr(info, result.report().encode())
    return result


@dataclass
class _Dir:
    raw: str  # path from the root as the OS spells it: "" for the root, else "a/b/"
    arc: str  # the same as it is archived (names that are not UTF-8 escaped)
    names: Iterator[str]
    st: os.stat_result
    archived: int = 0


class _Packer:
    def __init__(
        self,
        zf: zipfile.ZipFile,
        out: BinaryIO,
        prefix: str,
        result: PackResult,
        cancelled: Callable[[], bool],
    ) -> None:
        self.zf = zf
        self.out = out
        self.prefix = prefix
        self.result = result
        self.cancelled = cancelled
        self.real_root = ""
        # Archived paths (relative, no trailing slash): a name is a file or a directory, once.
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def issue(self, action: str, arc: str, reason: str) -> None:
        self.result.issues.append(Issue(action, arc, reason))

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise PackingCancelled

    def free_name(self, name: str) -> str:
        """``name``, or ``stem-2.ext``, ... if a file or directory of the tree has it."""
        stem, dot, ext = name.rpartition(".")
        candidate, n = name, 1
        while candidate in self.files or candidate in self.dirs:
            n += 1
            candidate = f"{stem}-{n}{dot}{ext}"
        return candidate

    def pack(self, root: Path, follow_root: bool, one_filesystem: bool) -> None:
        """Walk ``root`` depth first holding one directory descriptor at a time: going down
        opens the child relative to its parent, going back up opens ``..`` of the child and
        checks it is the directory it left (so depth costs neither descriptors nor paths)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = os.open(root, flags if follow_root else flags | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        except OSError as exc:
            if not follow_root and os.path.islink(root):
                self.issue("skipped", ".", "the directory was replaced by a symbolic link")
            else:
                self.issue("skipped", ".", f"the directory cannot be read: {_why(exc)}")
            return
        self.real_root = os.path.realpath(root)
        root_dev = os.fstat(fd).st_dev
        mounts = mount_points_under(self.real_root) if one_filesystem else set()
        stack: list[_Dir] = []
        if not self._enter(stack, fd, "", ""):
            os.close(fd)
            return
        while stack:
            self.check_cancelled()
            top = stack[-1]
            name = next(top.names, None)
            if name is None:
                stack.pop()
                if top.arc and top.archived == 0:
                    top.archived = self._add_dir_entry(top.arc, top.st)
                if stack:
                    stack[-1].archived += top.archived
                    fd = self._up(fd, stack)
                    if fd < 0:
                        return
                continue
            escaped = escape_name(name)
            renamed = escaped != name
            raw, arc = top.raw + name, top.arc + escaped
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                self.issue("skipped", arc, f"it vanished or cannot be examined: {_why(exc)}")
                continue
            if one_filesystem and (st.st_dev != root_dev or f"{self.real_root}/{raw}" in mounts):
                self.issue("skipped", arc, "another filesystem is mounted here")
                continue
            if stat.S_ISDIR(st.st_mode):
                if not self._claim(arc, renamed, directory=True):
                    continue
                try:
                    child = os.open(name, _OPEN_DIR, dir_fd=fd)
                except OSError as exc:
                    self.issue("skipped", arc + "/", f"the directory cannot be read: {_why(exc)}")
                    continue
                if self._enter(stack, child, raw + "/", arc + "/"):
                    self._renamed(arc, renamed)
                    os.close(fd)
                    fd = child
                else:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                top.archived += self._add_file(arc, renamed, partial(_open, name, fd))
            elif stat.S_ISLNK(st.st_mode):
                top.archived += self._add_link(raw, arc, renamed)
            else:
                self.issue("skipped", arc, f"{_kind(st.st_mode)} is not a regular file")
        os.close(fd)

    def _enter(self, stack: list[_Dir], fd: int, raw: str, arc: str) -> bool:
        try:
            st = os.fstat(fd)
            names = sorted(os.listdir(fd))  # names only: a stat per entry is not kept
        except OSError as exc:
            self.issue("skipped", arc or ".", f"the directory cannot be listed: {_why(exc)}")
            return False
        stack.append(_Dir(raw, arc, iter(names), st))
        return True

    def _up(self, fd: int, stack: list[_Dir]) -> int:
        """The descriptor of ``stack[-1]``, opened as ``..`` of ``fd`` (which is closed);
        -1 (and the walk ends, reported) if the tree was moved around meanwhile."""
        parent = stack[-1]
        try:
            up = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            up = -1
        finally:
            os.close(fd)
        if up >= 0:
            st = os.fstat(up)
            if (st.st_dev, st.st_ino) == (parent.st.st_dev, parent.st.st_ino):
                return up
            os.close(up)
        for level in stack:
            why = "the tree moved while it was packed: the rest of this directory is missing"
            self.issue("skipped", level.arc or ".", why)
        stack.clear()
        return -1

    def _claim(self, arc: str, renamed: bool, *, directory: bool) -> bool:
        """Reserve ``arc`` for a file or a directory; False (reported) if it cannot be one."""
        shown = arc + "/" if directory else arc
        if len((self.prefix + shown).encode()) > MAX_NAME:
            self.issue("skipped", shown, "its path is longer than a ZIP member name can be")
            return False
        if arc in self.files or (not directory and arc in self.dirs) or arc in self.dirs:
            why = "another member has this name"
            if renamed:
                why = "its name is not UTF-8, and written with %XX it is another member's name"
            self.issue("skipped", shown, why)
            return False
        (self.dirs if directory else self.files).add(arc)
        return True

    def _renamed(self, arc: str, renamed: bool) -> None:
        if renamed:
            self.issue("renamed", arc, "the name is not UTF-8: %XX stands for a byte")

    def _add_dir_entry(self, arc: str, st: os.stat_result) -> int:
        """A directory entry for ``arc`` (claimed already)."""
        self.zf.mkdir(self._info(arc, self.prefix + arc, st))
        return 1

    def _info(self, arc: str, name: str, st: os.stat_result) -> zipfile.ZipInfo:
        """A member's header fields from ``st``: time (clamped, reported), mode, size."""
        date_time, clamped = dos_time(st.st_mtime)
        exact = extended_timestamp(st.st_mtime)
        if clamped:
            shown = "{:04d}-{:02d}-{:02d} {:02d}:{:02d}:{:02d}".format(*date_time)
            kept = "; its extended timestamp keeps the exact time" if exact else ""
            self.issue(
                "clamped", arc, f"mtime {_show_time(st.st_mtime)}: its ZIP date is {shown}{kept}"
            )
        info = zipfile.ZipInfo(name, date_time=date_time)
        info.extra = exact
        info.external_attr = (st.st_mode & 0xFFFF) << 16
        if stat.S_ISDIR(st.st_mode):
            info.external_attr |= 0x10  # MS-DOS directory flag, as zipfile sets it
            info.CRC = info.compress_size = 0
        else:
            info.file_size = st.st_size
        return info

    def _add_link(self, raw: str, arc: str, renamed: bool) -> int:
        try:
            target = os.path.realpath(os.path.join(self.real_root, raw), strict=True)
        except OSError as exc:
            what = {errno.ELOOP: "loops", errno.ENOENT: "dangles"}.get(
                exc.errno or 0, "cannot be resolved"
            )
            self.issue("skipped", arc, f"a symbolic link that {what}: {_why(exc)}")
            return 0
        if target == self.real_root:
            self.issue("skipped", arc, "a symbolic link to the packed directory itself")
            return 0
        if os.path.commonpath([self.real_root, target]) != self.real_root:
            self.issue("skipped", arc, "a symbolic link pointing out of the directory")
            return 0
        try:
            st = os.stat(target, follow_symlinks=False)
        except OSError as exc:
            self.issue("skipped", arc, f"a symbolic link whose target vanished: {_why(exc)}")
            return 0
        if stat.S_ISDIR(st.st_mode):
            if not self._claim(arc, renamed, directory=True):
                return 0
            self._renamed(arc, renamed)
            self.issue("changed", arc, "a symbolic link to a directory: stored as an empty one")
            return self._add_dir_entry(arc + "/", st)
        if not stat.S_ISREG(st.st_mode):
            self.issue("skipped", arc, f"a symbolic link to {_kind(st.st_mode)}")
            return 0
        return self._add_file(arc, renamed, partial(_open, target, None))

    def _add_file(self, arc: str, renamed: bool, opener: Callable[[], int]) -> int:
        """Archive one regular file; 1 if it was archived, else 0 (and the issue noted)."""
        if not self._claim(arc, renamed, directory=False):
            return 0
        try:
            fd = opener()
        except OSError as exc:
            self.issue("skipped", arc, f"it cannot be opened: {_why(exc)}")
            return 0
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped for something else since listed
                self.issue("skipped", arc, "it stopped being a regular file while packing")
                return 0
            done = self._write(arc, self.prefix + arc, fd, st)
        finally:
            os.close(fd)
        if done:
            self._renamed(arc, renamed)
        return done

    def _write(self, arc: str, name: str, fd: int, st: os.stat_result) -> int:
        info = self._info(arc, name, st)
        start = self.zf.start_dir
        done = 0
        try:
            sample = read(fd, min(SAMPLE, st.st_size))
            info.compress_type = method_for(sample)
            with self.zf.open(info, "w") as dst:
                chunk = sample
                while chunk:
                    dst.write(chunk)
                    done += len(chunk)
                    self.check_cancelled()
                    chunk = read(fd, min(CHUNK, st.st_size - done))
        except OSError as exc:
            self._drop_since(start, name)
            self.issue("skipped", arc, f"reading it failed after {done} bytes: {_why(exc)}")
            return 0
        if done < st.st_size:
            self.issue("changed", arc, f"it shrank while packing: {done} of {st.st_size} bytes")
        self.result.files += 1
        self.result.size_bytes += done
        return 1

    def _drop_since(self, start: int, name: str) -> None:
        """Take the member started at ``start`` out again (its read failed part way)."""
        zf = self.zf
        if zf.filelist and zf.filelist[-1].filename == name:
            zf.filelist.pop()
            zf.NameToInfo.pop(name, None)
        self.out.seek(start)
        self.out.truncate()
        zf.start_dir = start


def _open(name: str, dir_fd: int | None) -> int:
    return os.open(name, _OPEN_FILE, dir_fd=dir_fd)


def read(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes (fewer only at end of file); a seam for fault-injecting tests."""
    parts: list[bytes] = []
    while size > 0:
        try:
            part = os.read(fd, size)
        except BlockingIOError:  # O_NONBLOCK on a regular file never blocks; be safe anyway
            continue
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def method_for(sample: bytes) -> int:
    """Deflate, unless the sample does not compress (random or already compressed data)."""
    if len(sample) < 4096:
        return zipfile.ZIP_DEFLATED
    compressed = len(zlib.compress(sample, 1))
    return zipfile.ZIP_STORED if compressed > 0.97 * len(sample) else zipfile.ZIP_DEFLATED


def extended_timestamp(mtime: float) -> bytes:
    """The extended timestamp extra field (0x5455, "UT") holding ``mtime`` exactly (whole
    seconds, UTC, what zip and unzip write and read), or nothing where 32 bits cannot hold it."""
    try:
        seconds = math.floor(mtime)
    except (OverflowError, ValueError):
        return b""
    if not -(2**31) <= seconds < 2**31:
        return b""
    return struct.pack("<HHBi", 0x5455, 5, 1, seconds)


def dos_time(mtime: float) -> tuple[tuple[int, int, int, int, int, int], bool]:
    """``mtime`` as a ZIP (DOS, local time) date_time, clamped to what ZIP can hold."""
    try:
        local = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):
        return (DOS_MIN if mtime < 0 else DOS_MAX), True
    value = (local.tm_year, local.tm_mon, local.tm_mday, local.tm_hour, local.tm_min, local.tm_sec)
    if value < DOS_MIN:
        return DOS_MIN, True
    if value > DOS_MAX:
        return DOS_MAX, True
    return value, False


def _show_time(mtime: float) -> str:
    try:
        return datetime.fromtimestamp(mtime, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return f"{mtime:.0f} s from the epoch"


def escape_name(name: str) -> str:
    """``name`` (as ``os`` decodes it) with each byte that is not UTF-8 written as ``%XX``."""
    if name.isascii():
        return name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "taskfs-percent")
    return name


def _percent(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    bad = exc.object[exc.start : exc.end]
    return "".join(f"%{b:02X}" for b in bad), exc.end


codecs.register_error("taskfs-percent", _percent)


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
