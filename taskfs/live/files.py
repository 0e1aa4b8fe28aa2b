"""The answering side's file operations on a computing task's working directory.

Owns: ``ls``, ``tail`` (one-shot and followed), ``top`` and ``last_modified_file`` as the
live channel answers them, on the directory that becomes the outputs archive's ``artifacts/``.
Plain blocking functions: the answerer runs them in a worker thread.

Must stay true:
* nothing outside the working directory is ever read: names are relative, ``..`` is refused,
  and a link is followed only when it resolves inside the directory; only regular files are
  opened, non-blocking (a FIFO never hangs a reader);
* memory is bounded whatever the file: ``tail`` of any number of lines of any file reads it in
  ``CHUNK`` pieces, backwards to find where the lines start and then forwards, and holds at
  most one answer's worth of lines (a line longer than ``LONG_LINE`` is cut: ``Cut`` pieces);
* a followed file that is truncated, or whose name comes to mean another file (``mv new
  stdout.txt``), ends the stream with "File was truncated or replaced" (the protocol cannot
  say "start again"; the follower asks again); text that is not UTF-8 ends it with "File is
  not a text file".
"""

from __future__ import annotations

import codecs
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import psutil

from taskfs.live.protocol import (
    BAD_NAME,
    CANNOT_OPEN,
    MAX_LISTING,
    NOT_A_FILE,
    NOT_FOUND,
    NOT_REGULAR,
    NOT_TEXT,
    OUTSIDE,
    STARTED_AGAIN,
    Cut,
    TailArgs,
)
from taskfs.packing import escape_name
from taskfs.proc import helper

CHUNK: Final = 1 << 20
LONG_LINE: Final = 1 << 20
TOP_TIMEOUT: Final = 10.0
# A one-shot tail sends one message: it never reads more than this of the file's end.
ONE_SHOT_BYTES: Final = 1 << 20


class OperationError(Exception):
    """An operation that cannot be answered; the text goes to the peer as an ``error``."""


def resolve(root: Path, name: str) -> Path:
    """``name`` inside ``root`` (links resolved), or ``OperationError``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\0" in name or not parts:
        raise OperationError(f"{BAD_NAME}: {name}")
    try:
        base = os.path.realpath(root)
        real = os.path.realpath(os.path.join(base, *parts))
    except (OSError, ValueError) as exc:  # a link loop, a name the system refuses
        raise OperationError(f"{CANNOT_OPEN} {name}: {exc}") from None
    if not _inside(real, base):
        raise OperationError(f"{OUTSIDE}: {name}")
    return Path(real)


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base + os.sep)


def open_regular(root: Path, name: str) -> int:
    """A descriptor of the regular file ``name`` in ``root``; ``FileNotFoundError`` when it
    does not exist, ``OperationError`` for anything else that is wrong."""
    path = resolve(root, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise OperationError(f"{NOT_A_FILE}: {name}") from None
    except OSError as exc:
        raise OperationError(f"{CANNOT_OPEN} {name}: {exc.strerror}") from None
    try:
        # What was opened, not what the name resolved to a moment ago: a directory on the
        # way swapped for a link out of the task between the two must not be read.
        opened = os.readlink(f"/proc/self/fd/{fd}")
        if not _inside(opened, os.path.realpath(root)):
            raise OperationError(f"{OUTSIDE}: {name}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OperationError(f"{NOT_REGULAR}: {name}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def list_tree(root: Path) -> list[Any]:
    """The nested listing of ``root``: ``["file", {"dir": [...]}, ...]``, names sorted, links
    and special files listed as files (never entered), unreadable directories as empty."""
    top: list[Any] = []
    stack: list[tuple[str, list[Any]]] = [(str(root), top)]
    count = 0
    while stack:
        path, into = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            count += 1
            if count > MAX_LISTING:
                raise OperationError(f"More than {MAX_LISTING} files in the task's directory")
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            name = escape_name(entry.name)  # as the archive will name it (not UTF-8: %XX)
            if is_dir:
                children: list[Any] = []
                into.append({name: children})
                stack.append((entry.path, children))
            else:
                into.append(name)
    return top


def last_modified(root: Path) -> dict[str, Any]:
    """The most recently modified file under ``root`` (links not followed)."""
    best: tuple[float, str] | None = None
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(root / rel if rel else root) as it:
                for entry in it:
                    name = f"{rel}/{escape_name(entry.name)}" if rel else escape_name(entry.name)
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(name)
                            continue
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except OSError:
                        continue
                    if best is None or mtime > best[0]:
                        best = (mtime, name)
        except OSError:
            continue
    if best is None:
        raise OperationError("No files in the task's directory yet")
    now = time.time()
    return {
        "most_recent_file": best[1],
        "most_recent_timestamp": best[0],
        "now_timestamp": now,
        "time_since_last_mod": max(0.0, now - best[0]),
    }


def top() -> str:
    """``top -b -H -n 1`` of this machine (a short psutil summary where top is missing)."""
    exe = shutil.which("top")
    if exe is not None:
        env = {"PATH": os.defpath, "LC_ALL": "C", "COLUMNS": "200", "TERM": "dumb"}
        try:
            # A helper: the service's sweep of orphaned task processes must not take it
            # for one.
            with helper(
                [exe, "-b", "-H", "-n", "1"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                env=env,
            ) as child:
                out, _ = child.communicate(timeout=TOP_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OperationError(f"top failed: {exc}") from None
        if child.returncode == 0:
            return out.decode("utf-8", "replace")
    return _psutil_top()


def _psutil_top() -> str:
    mem = psutil.virtual_memory()
    load = os.getloadavg()
    lines = [
        f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}",
        f"%Cpu(s): {psutil.cpu_percent(interval=0.1):.1f} us",
        f"MiB Mem : {mem.total / 2**20:.1f} total, {mem.available / 2**20:.1f} avail",
        "",
        f"{'PID':>8} {'USER':<10} {'RES':>10} {'%CPU':>6}  COMMAND",
    ]
    for proc in psutil.process_iter(["pid", "username", "memory_info", "cpu_percent", "name"]):
        info = proc.info
        res = info["memory_info"].rss // 1024 if info["memory_info"] else 0
        lines.append(
            f"{info['pid']:>8} {(info['username'] or '?')[:10]:<10} {res:>10} "
            f"{info['cpu_percent'] or 0.0:>6.1f}  {info['name']}"
        )
    return "\n".join(lines) + "\n"


class ReplacedError(OperationError):
    """The followed file was truncated, or its name now is another file."""


class Tail:
    """``tail`` of one file: the last ``lines`` lines, then (``follow``) what is appended.

    Call ``open()`` until it returns True (False: the file does not exist yet, and the
    request said ``wait``), then iterate ``initial()``, then call ``appended()`` now and then.
    Followed, only complete lines are sent (see ``protocol``); one-shot, the last line is sent
    whether or not it ends with a newline.
    """

    def __init__(self, root: Path, args: TailArgs, follow: bool) -> None:
        self.root = root
        self.args = args
        self.follow = follow
        self.fd = -1
        self.cursor = 0  # bytes of the file read and decoded so far
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._carry = ""  # text after the last newline read

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open(self) -> bool:
        try:
            self.fd = open_regular(self.root, self.args.filename)
        except FileNotFoundError:
            if self.args.wait:
                return False
            raise OperationError(f"{NOT_FOUND}: {self.args.filename}") from None
        return True

    def initial(self) -> Iterator[str]:
        """The last ``lines`` lines of the file as it is now."""
        size = os.fstat(self.fd).st_size
        # Followed, an unterminated last line is not one of the last lines: it is read (and
        # checked to be text) but held back until its newline comes.
        end = self._last_newline(size) if self.follow else size
        self.cursor = self._start_of_last_lines(end, self.args.lines)
        if not self.follow and end - self.cursor > ONE_SHOT_BYTES:
            self.cursor = self._line_start_after(end - ONE_SHOT_BYTES, end)
        yield from self._lines_until(size, final=not self.follow)

    def appended(self, limit: int = CHUNK) -> list[str]:
        """Complete lines appended since the last call, from at most ``limit`` bytes (call
        again while ``behind()``: memory stays bounded whatever a task writes at once).
        ``ReplacedError`` when the file was truncated, or its name now is another file."""
        st = os.fstat(self.fd)
        if st.st_size < self.cursor or self._replaced(st):
            raise ReplacedError(f"{STARTED_AGAIN}: {self.args.filename}")
        if st.st_size == self.cursor:
            return []
        return list(self._lines_until(min(st.st_size, self.cursor + limit), final=False))

    def behind(self) -> bool:
        return os.fstat(self.fd).st_size > self.cursor

    def rest(self) -> list[str]:
        """The text after the last newline (the last line, unterminated), once."""
        rest, self._carry = self._carry, ""
        return [Cut(rest)] if rest else []  # not ended by a newline

    def _replaced(self, st: os.stat_result) -> bool:
        try:
            now = os.stat(resolve(self.root, self.args.filename))
        except (OSError, OperationError):
            return False  # gone, or not resolvable now: keep following what is open
        return (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)

    def _lines_until(self, end: int, final: bool) -> Iterator[str]:
        while self.cursor < end:
            chunk = os.pread(self.fd, min(CHUNK, end - self.cursor), self.cursor)
            if not chunk:
                break
            self.cursor += len(chunk)
            try:
                text = self._carry + self._decoder.decode(chunk)
            except UnicodeDecodeError:
                raise OperationError(f"{NOT_TEXT}: {self.args.filename}") from None
            parts = text.split("\n")
            self._carry = parts.pop()
            yield from parts
            while len(self._carry) > LONG_LINE:
                yield Cut(self._carry[:LONG_LINE])  # continued by what follows
                self._carry = self._carry[LONG_LINE:]
        if final and self._carry:
            yield Cut(self._carry)  # the last line, not ended by a newline
            self._carry = ""

    def _line_start_after(self, pos: int, end: int) -> int:
        """The start of the first line after ``pos`` (or, in a line longer than the window,
        the first character boundary)."""
        block = os.pread(self.fd, min(CHUNK, end - pos), pos)
        at = block.find(b"\n")
        if at >= 0:
            return pos + at + 1
        skip = 0
        while skip < len(block) and 0x80 <= block[skip] < 0xC0:
            skip += 1
        return pos + skip

    def _last_newline(self, size: int) -> int:
        """The offset just after the file's last newline (0 when it has none)."""
        pos = size
        while pos > 0:
            start = max(0, pos - CHUNK)
            block = os.pread(self.fd, pos - start, start)
            at = block.rfind(b"\n")
            if at >= 0:
                return start + at + 1
            pos = start
        return 0

    def _start_of_last_lines(self, end: int, lines: int) -> int:
        """Where the last ``lines`` lines of ``[0, end)`` start."""
        if lines == 0:
            return end
        pos = end
        # A newline that ends the region terminates the last line; it does not start one.
        if end > 0 and os.pread(self.fd, 1, end - 1) == b"\n":
            pos = end - 1
        need = lines
        while pos > 0:
            start = max(0, pos - CHUNK)
            block = os.pread(self.fd, pos - start, start)
            count = block.count(b"\n")
            if count >= need:
                at = len(block)
                for _ in range(need):
                    at = block.rfind(b"\n", 0, at)
                return start + at + 1
            need -= count
            pos = start
        return 0
