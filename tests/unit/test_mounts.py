"""``taskfs.mounts``: /proc/self/mountinfo as the kernel writes it (proc(5)): optional fields
of any number, octal escapes for space, tab, newline and backslash, every other byte raw (UTF-8
names and names that are not UTF-8 at all)."""

from __future__ import annotations

import os
from pathlib import Path

from taskfs.mounts import mount_points_under, mount_table, mounted_at, parse_line

TABLE = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    b"40 22 0:50 / /home/u/caf\xc3\xa9 rw,nosuid,nodev,relatime shared:20 - fuse.taskfs "
    b"taskfs rw,user_id=0\n"
    b"41 22 0:51 / /home/u/a\\040b\\134c\\011d rw,nosuid,nodev,noexec - fuse.taskfs taskfs "
    b"ro\n"
    b"42 22 0:52 / /home/u/bad\xff rw - tmpfs none rw\n"
    b"43 40 0:53 / /home/u/caf\xc3\xa9/inner rw master:3 propagate_from:2 - tmpfs t rw\n"
    b"44 22 0:54 / /home/u/caf\xc3\xa9 ro - fuse.other src rw\n"
    b"not a line of the table\n"
)


def test_names_are_unescaped_and_decoded_as_paths(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(TABLE)
    points = [entry.mountpoint for entry in mount_table(table)]
    assert points == [
        "/",
        "/home/u/café",
        "/home/u/a b\\c\td",
        os.fsdecode(b"/home/u/bad\xff"),
        "/home/u/café/inner",
        "/home/u/café",
    ]
    escaped = mounted_at("/home/u/a b\\c\td", table)
    assert escaped is not None
    assert escaped.fstype == "fuse.taskfs" and escaped.source == "taskfs"
    assert escaped.device == "0:51" and "noexec" in escaped.options
    assert mounted_at(os.fsdecode(b"/home/u/bad\xff"), table) is not None


def test_the_mount_on_top_wins_and_below_means_below(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(TABLE)
    top = mounted_at("/home/u/café", table)
    assert top is not None and top.fstype == "fuse.other" and top.options == {"ro"}
    assert mounted_at("/home/u/caf", table) is None
    assert mount_points_under("/home/u/café", table) == {"/home/u/café/inner"}
    assert mount_points_under("/home/u/café/", table) == {"/home/u/café/inner"}
    assert mount_points_under("/nowhere", table) == set()


def test_what_is_not_a_line_of_the_table_is_passed_over(tmp_path: Path) -> None:
    assert parse_line(b"") is None
    assert parse_line(b"1 2 3:4 / /x rw no-separator here") is None
    assert mount_table(tmp_path / "missing") == []


def test_this_process_sees_its_root() -> None:
    root = mounted_at("/")
    assert root is not None and root.mountpoint == "/"
