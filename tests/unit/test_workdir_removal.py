"""Removing a task's working directory (``runner._remove_work_dir``), whatever the task did to
it, without ever reaching outside it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from taskfs.server.runner import _remove_work_dir


def test_modes_depth_and_links(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "locked" / "inner").mkdir(parents=True)
    (work / "locked" / "inner" / "f").write_text("x")
    (work / "locked").chmod(0)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (work / "link").symlink_to(outside)
    fd = os.open(work, os.O_RDONLY)
    for _ in range(1200):  # deeper than PATH_MAX
        os.mkdir("d" * 10, dir_fd=fd)
        child = os.open("d" * 10, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    for i in range(5000):
        (work / f"file{i}").write_text("x")
    _remove_work_dir(work)
    assert not work.exists()
    assert (outside / "keep").read_text() == "keep"


def test_a_work_dir_swapped_for_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (tmp_path / "work").symlink_to(outside)
    _remove_work_dir(tmp_path / "work")
    assert not (tmp_path / "work").exists()
    assert (outside / "keep").read_text() == "keep"


@pytest.mark.expected_warnings
def test_a_filesystem_mounted_inside_is_never_entered(tmp_path: Path) -> None:
    if os.geteuid() != 0:  # only root can mount; a task of a root service could
        work = tmp_path / "work"
        work.mkdir()
        _remove_work_dir(work)
        assert not work.exists()
        return
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "keep").write_text("important")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "other").write_text("x")
    subprocess.run(["mount", "--bind", str(precious), str(work / "data")], check=True)
    try:
        _remove_work_dir(work)
        assert (precious / "keep").read_text() == "important"
        assert (precious / "sub").is_dir()
        assert not (work / "other").exists()
    finally:
        subprocess.run(["umount", str(work / "data")], check=True)
