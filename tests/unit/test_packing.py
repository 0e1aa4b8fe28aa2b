"""Packing rules (``taskfs.packing``), checked against ``zipfile`` reading the archive back.

Every hostile thing a task or an input directory can hold: old and future mtimes, FIFOs,
sockets, device nodes, symlink loops and links out of the tree, names that are not UTF-8,
files that cannot be read (as a user that is not root), files that vanish, shrink or fail to
read part way, trees deeper than PATH_MAX.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import resource
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskfs import packing
from taskfs.packing import PackResult, pack_tree


def pack(root: Path | None, report: bool = True) -> tuple[zipfile.ZipFile, PackResult]:
    out = io.BytesIO()
    result = pack_tree(
        root, out, "artifacts/", report_name="taskfs-packing.txt" if report else None
    )
    archive = zipfile.ZipFile(io.BytesIO(out.getvalue()))
    assert archive.testzip() is None  # every CRC checks out
    return archive, result


def files_of(archive: zipfile.ZipFile) -> dict[str, bytes]:
    return {
        i.filename.removeprefix("artifacts/"): archive.read(i)
        for i in archive.infolist()
        if not i.is_dir()
    }


def issues(result: PackResult) -> set[tuple[str, str]]:
    return {(i.action, i.path) for i in result.issues}


def raw(path: Path, name: bytes) -> bytes:
    return os.fsencode(path) + b"/" + name


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "work"
    root.mkdir()
    yield root
    for dirpath, dirnames, _ in os.walk(root):  # let pytest clean up what we locked away
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)


def test_hostile_tree(tree: Path, tmp_path: Path) -> None:
    (tree / "plain.txt").write_bytes(b"plain\n")
    (tree / "old").write_bytes(b"old")
    os.utime(tree / "old", (0, 0))
    (tree / "older").write_bytes(b"older")
    os.utime(tree / "older", (-86400 * 400, -86400 * 400))
    (tree / "future").write_bytes(b"future")
    os.utime(tree / "future", (99_999_999_999, 99_999_999_999))
    (tree / "far-future").write_bytes(b"far")
    os.utime(tree / "far-future", (2**62, 2**62))
    os.mkfifo(tree / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    (tree / "loop1").symlink_to("loop2")
    (tree / "loop2").symlink_to("loop1")
    (tree / "dangling").symlink_to("nowhere")
    (tmp_path / "secret").write_bytes(b"secret")
    (tree / "abs-out").symlink_to(tmp_path / "secret")
    (tree / "rel-out").symlink_to("../secret")
    (tree / "root-link").symlink_to(".")
    (tree / "in-link").symlink_to("plain.txt")
    (tree / "sub").mkdir()
    (tree / "sub" / "deep.txt").write_bytes(b"deep")
    (tree / "dir-link").symlink_to("sub")
    (tree / "empty").mkdir()
    (tree / "only-fifo").mkdir()
    os.mkfifo(tree / "only-fifo" / "f")
    with open(raw(tree, b"caf\xe9"), "wb") as f:
        f.write(b"latin-1 name")
    os.mkdir(raw(tree, b"d\xff"))
    with open(raw(tree, b"d\xff/inner"), "wb") as f:
        f.write(b"inner")
    (tree / "taskfs-packing.txt").write_bytes(b"the task's own file")
    device = os.geteuid() == 0
    if device:
        os.mknod(tree / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))

    archive, result = pack(tree)
    sock.close()
    files = files_of(archive)
    report = files.pop("taskfs-packing-2.txt").decode()
    assert files == {
        "plain.txt": b"plain\n",
        "old": b"old",
        "older": b"older",
        "future": b"future",
        "far-future": b"far",
        "in-link": b"plain\n",
        "sub/deep.txt": b"deep",
        "caf%E9": b"latin-1 name",
        "d%FF/inner": b"inner",
        "taskfs-packing.txt": b"the task's own file",
    }
    dirs = {i.filename for i in archive.infolist() if i.is_dir()}
    assert dirs == {"artifacts/", "artifacts/empty/", "artifacts/only-fifo/", "artifacts/dir-link/"}
    expected = {
        ("clamped", "old"),
        ("clamped", "older"),
        ("clamped", "future"),
        ("clamped", "far-future"),
        ("skipped", "fifo"),
        ("skipped", "sock"),
        ("skipped", "loop1"),
        ("skipped", "loop2"),
        ("skipped", "dangling"),
        ("skipped", "abs-out"),
        ("skipped", "rel-out"),
        ("skipped", "root-link"),
        ("changed", "dir-link"),
        ("skipped", "only-fifo/f"),
        ("renamed", "caf%E9"),
        ("renamed", "d%FF"),  # once for the directory, not again for what it holds
    }
    if device:
        expected.add(("skipped", "null"))
    assert issues(result) == expected
    for issue in result.issues:
        assert issue.line() in report
    times = {i.filename: i.date_time for i in archive.infolist()}
    assert times["artifacts/old"] == times["artifacts/older"] == (1980, 1, 1, 0, 0, 0)
    assert times["artifacts/future"] == times["artifacts/far-future"] == (2107, 12, 31, 23, 59, 58)
    assert b"secret" not in b"".join(files.values())
    assert result.files == len(files) and result.size_bytes == sum(map(len, files.values()))


def test_nothing_to_report_means_no_report(tree: Path) -> None:
    (tree / "a").write_bytes(b"a")
    archive, result = pack(tree)
    assert archive.namelist() == ["artifacts/", "artifacts/a"]
    assert result.issues == []


def test_missing_root_is_an_empty_archive(tmp_path: Path) -> None:
    for root in (tmp_path / "nope", None):
        archive, result = pack(root)
        assert archive.namelist() == ["artifacts/"]
        assert result.files == 0


def test_modes_and_methods(tree: Path) -> None:
    (tree / "run.sh").write_bytes(b"#!/bin/sh\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "random.bin").write_bytes(os.urandom(300_000))
    (tree / "text").write_bytes(b"1 2 3\n" * 100_000)
    archive, _ = pack(tree)
    info = {i.filename: i for i in archive.infolist()}
    assert (info["artifacts/run.sh"].external_attr >> 16) & 0o777 == 0o755
    assert info["artifacts/random.bin"].compress_type == zipfile.ZIP_STORED
    assert info["artifacts/text"].compress_type == zipfile.ZIP_DEFLATED
    assert archive.read("artifacts/text") == b"1 2 3\n" * 100_000


def test_deeper_than_path_max(tree: Path) -> None:
    """Walking uses one directory descriptor per level: no path length limit, no recursion."""
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    depth, name = 1500, "d" * 10
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"bottom")
    os.close(leaf)
    os.close(fd)
    # One directory descriptor at a time: a low descriptor limit does not matter.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        archive, result = pack(tree)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    path = "/".join([name] * depth) + "/leaf"
    assert len(path) > 4096
    assert files_of(archive) == {path: b"bottom"}
    assert result.issues == []
    # Clean up without PATH_MAX trouble.
    _rmtree_deep(tree / name)


def _rmtree_deep(top: Path) -> None:
    parent = os.open(top.parent, os.O_RDONLY | os.O_DIRECTORY)
    chain = [(parent, top.name)]
    while True:
        fd = os.open(chain[-1][1], os.O_RDONLY | os.O_DIRECTORY, dir_fd=chain[-1][0])
        names = os.listdir(fd)
        dirs = [n for n in names if stat.S_ISDIR(os.stat(n, dir_fd=fd).st_mode)]
        for n in names:
            if n not in dirs:
                os.unlink(n, dir_fd=fd)
        if not dirs:
            os.close(fd)
            break
        chain.append((fd, dirs[0]))
    for fd, name in reversed(chain):
        os.rmdir(name, dir_fd=fd)
        os.close(fd)


def test_vanished_before_open(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "gone", "z"):
        (tree / name).write_bytes(name.encode())
    real_open = packing._open

    def unlink_first(name: str, dir_fd: int | None) -> int:
        if name == "gone":
            os.unlink(name, dir_fd=dir_fd)
        return real_open(name, dir_fd)

    monkeypatch.setattr(packing, "_open", unlink_first)
    archive, result = pack(tree)
    assert files_of(archive).keys() == {"a", "z", "taskfs-packing.txt"}
    assert issues(result) == {("skipped", "gone")}
    assert "No such file or directory" in result.issues[0].reason


def test_a_tree_moved_while_packed_is_reported(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Going back up through ``..`` lands in another directory if the tree was moved under
    the walk: packing stops there and says so, never archiving files under wrong names."""
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "x").write_bytes(b"x")
    (tree / "a" / "z").write_bytes(b"z")
    (tree / "y").write_bytes(b"y")
    real_open = packing._open

    def move_first(name: str, dir_fd: int | None) -> int:
        if name == "x":
            os.rename(tree / "a" / "b", tree / "moved")
        return real_open(name, dir_fd)

    monkeypatch.setattr(packing, "_open", move_first)
    archive, result = pack(tree)
    assert set(files_of(archive)) == {"a/b/x", "taskfs-packing.txt"}
    assert issues(result) == {("skipped", "a/"), ("skipped", ".")}


def test_read_failing_part_way_leaves_no_truncated_member(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tree / "a").write_bytes(b"a" * 100)
    (tree / "bad").write_bytes(os.urandom(3 * packing.CHUNK))
    (tree / "z").write_bytes(b"z" * 100)
    real_read = packing.read
    calls = {"n": 0}

    def failing(fd: int, size: int) -> bytes:
        if os.fstat(fd).st_size == 3 * packing.CHUNK:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(5, "Input/output error")
        return real_read(fd, size)

    monkeypatch.setattr(packing, "read", failing)
    archive, result = pack(tree)
    assert files_of(archive) == {
        "a": b"a" * 100,
        "z": b"z" * 100,
        "taskfs-packing.txt": result.report().encode(),
    }
    assert issues(result) == {("skipped", "bad")}
    assert f"after {2 * packing.CHUNK} bytes" in result.issues[0].reason
    assert result.files == 2


def test_file_shrinking_while_packed(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree / "log").write_bytes(b"x" * (3 * packing.CHUNK))
    real_read = packing.read

    def shrink(fd: int, size: int) -> bytes:
        os.truncate(f"/proc/self/fd/{fd}", packing.CHUNK + 10)
        return real_read(fd, size)

    monkeypatch.setattr(packing, "read", shrink)
    archive, result = pack(tree)
    assert archive.read("artifacts/log") == b"x" * (packing.CHUNK + 10)
    assert issues(result) == {("changed", "log")}


def test_unreadable_as_another_user(tmp_path: Path) -> None:
    """As a user that is not root, files and directories without read permission are skipped
    and reported; everything else is archived. Run in a child that drops to ``nobody`` when
    this test runs as root (root reads everything)."""
    as_root = os.geteuid() == 0
    # Where ``nobody`` can reach it (pytest's own tmp dir is private to root).
    base = Path(tempfile.mkdtemp(prefix="taskfs-unreadable-")) if as_root else tmp_path
    try:
        tree = base / "work"
        tree.mkdir()
        (tree / "ok").write_bytes(b"ok")
        (tree / "locked").write_bytes(b"locked")
        (tree / "closed").mkdir()
        (tree / "closed" / "x").write_bytes(b"x")
        if as_root:
            nobody = pwd.getpwnam("nobody")
            base.chmod(0o755)
            for path in (tree, tree / "ok", tree / "locked", tree / "closed"):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        (tree / "locked").chmod(0)
        (tree / "closed").chmod(0)
        if not as_root:
            archive, result = pack(tree)
            found = set(files_of(archive)), issues(result)
        else:
            found = _pack_as(nobody, tree)
    finally:
        (tree / "closed").chmod(0o755)
        if as_root:
            shutil.rmtree(base)
    assert found == ({"ok", "taskfs-packing.txt"}, {("skipped", "locked"), ("skipped", "closed/")})


def _pack_as(user: pwd.struct_passwd, tree: Path) -> tuple[set[str], set[tuple[str, str]]]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            archive, result = pack(tree)
            text = json.dumps([sorted(files_of(archive)), sorted(issues(result))])
            os.write(write_end, text.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        names, found = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return set(names), {(a, b) for a, b in found}


def test_escape_name() -> None:
    assert packing.escape_name("plain") == "plain"
    assert packing.escape_name("café 名") == "café 名"
    assert packing.escape_name(os.fsdecode(b"caf\xe9")) == "caf%E9"
    assert packing.escape_name(os.fsdecode(b"\xff\xfe.txt")) == "%FF%FE.txt"


@pytest.mark.parametrize(
    ("mtime", "expected", "clamped"),
    [
        (0, (1980, 1, 1, 0, 0, 0), True),
        (-(2**40), (1980, 1, 1, 0, 0, 0), True),
        (2**62, (2107, 12, 31, 23, 59, 58), True),
        (float("inf"), (2107, 12, 31, 23, 59, 58), True),
    ],
)
def test_dos_time_clamps(mtime: float, expected: tuple[int, ...], clamped: bool) -> None:
    assert packing.dos_time(mtime) == (expected, clamped)


def test_a_root_swapped_for_a_link_is_not_followed(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret").write_bytes(b"secret")
    tree.rmdir()
    tree.symlink_to(tmp_path / "elsewhere")
    out = io.BytesIO()
    result = pack_tree(tree, out, "artifacts/", report_name="r.txt", follow_root=False)
    archive = zipfile.ZipFile(out)
    assert set(archive.namelist()) == {"artifacts/", "artifacts/r.txt"}
    assert issues(result) == {("skipped", ".")}
    # A user's input directory may be a link: submit follows it.
    archive, result = pack(tree)
    assert files_of(archive) == {"secret": b"secret"}


def test_paths_longer_than_a_zip_name_are_skipped(tree: Path) -> None:
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    name = "n" * 250
    for _ in range(270):  # 270 levels of 251 bytes: a path over 65,535 bytes
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.close(leaf)
    os.close(fd)
    (tree / "ok").write_bytes(b"ok")
    archive, result = pack(tree)
    assert files_of(archive)["ok"] == b"ok"
    [issue] = result.issues
    assert issue.action == "skipped" and "longer than a ZIP member name" in issue.reason
    assert all(len(n.encode()) <= 0xFFFF for n in archive.namelist())
    _rmtree_deep(tree / name)


def test_names_are_a_file_or_a_directory_once(tree: Path) -> None:
    """Escaping can make two names one; the report may meet a directory of its name."""
    (tree / "taskfs-packing.txt" / "sub").mkdir(parents=True)
    (tree / "taskfs-packing.txt" / "sub" / "f").write_bytes(b"f")
    (tree / "d%E9").write_bytes(b"literal file")
    os.mkdir(raw(tree, b"d\xe9"))
    with open(raw(tree, b"d\xe9/x"), "wb") as f:
        f.write(b"x")
    (tree / "e%E9").mkdir()
    (tree / "e%E9" / "y").write_bytes(b"y")
    with open(raw(tree, b"e\xe9"), "wb") as f:
        f.write(b"lost")
    (tree / "caf%E9").write_bytes(b"literal")
    with open(raw(tree, b"caf\xe9"), "wb") as f:
        f.write(b"escaped")
    os.mkfifo(tree / "fifo")
    archive, result = pack(tree)
    files = files_of(archive)
    report = files.pop("taskfs-packing-2.txt")
    assert files == {
        "taskfs-packing.txt/sub/f": b"f",
        "d%E9": b"literal file",
        "e%E9/y": b"y",
        "caf%E9": b"literal",
    }
    assert issues(result) == {
        ("skipped", "d%E9/"),
        ("skipped", "e%E9"),
        ("skipped", "caf%E9"),
        ("skipped", "fifo"),
    }
    assert sum("not UTF-8, and written with %XX" in i.reason for i in result.issues) == 3
    assert b"renamed" not in report
    names = [n.rstrip("/") for n in archive.namelist()]
    assert len(names) == len(set(names))


def test_cancelled_packing_stops(tree: Path) -> None:
    for i in range(10):
        (tree / f"f{i}").write_bytes(b"x" * 10)
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(packing.PackingCancelled):
        pack_tree(tree, io.BytesIO(), "artifacts/", cancelled=cancelled)


def test_one_filesystem_never_enters_a_mount(tree: Path, tmp_path: Path) -> None:
    """The service's outputs: what a task (of a root service) mounted is not packed."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("important")
    (tree / "data").mkdir()
    (tree / "own.txt").write_text("own")
    mounted = os.geteuid() == 0
    if mounted:  # only root can mount (and a task of a root service could)
        subprocess.run(["mount", "--bind", str(precious), str(tree / "data")], check=True)
    try:
        out = io.BytesIO()
        result = pack_tree(tree, out, "artifacts/", one_filesystem=True)
        names = set(zipfile.ZipFile(out).namelist())
        assert "artifacts/own.txt" in names
        assert "artifacts/data/keep.txt" not in names
        assert issues(result) == ({("skipped", "data")} if mounted else set())
    finally:
        if mounted:
            subprocess.run(["umount", str(tree / "data")], check=True)


def test_exact_times_in_the_extended_timestamp(tree: Path) -> None:
    """Packing keeps each file's exact mtime (UTC seconds) in the 0x5455 field, also where
    the DOS date had to be clamped; ``unzip`` and taskfs's reader prefer it."""
    cases = {"old": 0.0, "negative": -86400.0, "now": 1_764_497_220.7, "far": 2**40}
    for name, mtime in cases.items():
        (tree / name).write_bytes(b"x")
        os.utime(tree / name, (mtime, mtime))
    archive, _ = pack(tree)
    for name, mtime in cases.items():
        extra = archive.getinfo(f"artifacts/{name}").extra
        if mtime >= 2**31:
            assert extra == b""  # 32 bits cannot hold it: only the (clamped) DOS date
            continue
        tag, length, flags, seconds = struct.unpack("<HHBi", extra)
        assert (tag, length, flags) == (0x5455, 5, 1) and seconds == int(mtime // 1)
