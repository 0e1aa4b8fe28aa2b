"""Hostile archives through a real mount: never a crash, never a name outside outputs/."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from taskfs.api.models import TaskStatusCode as S
from tests.fakeapi import FakeApi
from tests.fuse.conftest import cloud_mount
from tests.hostile import Member, corpus, many_entries, raw_zip

ERRORS = {"EIO": "Input/output error", "ENOTSUP": "Operation not supported"}


def test_hostile_archives_through_a_mount(tmp_path: Path) -> None:
    fake = FakeApi()
    cases = corpus()
    for i, case in enumerate(cases):
        fake.add(f"case{i:02d}", S.SUCCESS, archive=case.data)
    fake.add("many", S.SUCCESS, archive=many_entries())
    with cloud_mount(tmp_path, fake) as mount:
        for i, case in enumerate(cases):
            outputs = mount.path / f"case{i:02d}" / "outputs"
            listing = mount.run(f"ls -R {outputs}")
            if not case.opens:
                assert listing.returncode != 0, case.name
                assert "Input/output error" in listing.stderr, (case.name, listing.stderr)
                continue
            assert listing.returncode == 0, (case.name, listing.stderr)
            found = subprocess.run(
                ["find", str(outputs), "-mindepth", "1"], capture_output=True, check=False
            )
            paths = {
                os.fsdecode(p)[len(str(outputs)) + 1 :] for p in found.stdout.split(b"\n") if p
            }
            for path in case.shown:
                assert path in paths, (case.name, path, sorted(paths))
            for path in paths:
                assert ".." not in path.split("/") and (outputs / path).resolve().is_relative_to(
                    outputs.resolve()
                ), (case.name, path)
            for path, kind in case.unreadable.items():
                failed = mount.run(f"cat '{outputs / path}' > /dev/null")
                assert failed.returncode != 0 and ERRORS[kind] in failed.stderr, (
                    case.name,
                    path,
                    failed.stderr,
                )
            for path, body in case.contents.items():
                assert (outputs / path).read_bytes() == body, (case.name, path)
        many = mount.run(f"find {mount.path}/many/outputs -type f | wc -l")
        assert many.stdout.strip() == "70000"
        # The mount is still up and answering.
        assert mount.run(f"cat {mount.path}/case00/status").stdout == "success\n"
    assert "Traceback" not in mount.log.read_text()


def test_a_hostile_input_archive_through_inputs(tmp_path: Path) -> None:
    """inputs/ reads the input archive through the same reader as outputs/: names that would
    escape are never shown, a CRC mismatch is EIO, the rest reads back exactly."""
    members = [
        Member(b"sim_dir/", b""),
        Member(b"sim_dir/params.txt", b"steps=3\n"),
        Member(b"sim_dir/../../escape.txt", b"no"),
        Member(b"/etc/absolute.txt", b"no"),
        Member(b"sim_dir/a/../../../up.txt", b"no"),
        Member(b"sim_dir/bad_crc.bin", b"x" * 1000, crc=1),
        Member(b"sim_dir/deep/ok.dat", b"\x00\x01" * 500, method=8),
        Member(b"outside_sim_dir.txt", b"not an input"),
    ]
    fake = FakeApi()
    record = fake.add("hostile", S.SUCCESS)
    record["storage_input_path"] = "fake-bucket/hostile/input.zip"
    fake.objects.put("fake-bucket/hostile/input.zip", raw_zip(members))
    with cloud_mount(tmp_path, fake) as mount:
        inputs = mount.path / "hostile" / "inputs"
        found = subprocess.run(
            ["find", str(inputs), "-mindepth", "1"], capture_output=True, text=True, check=False
        )
        paths = sorted(p[len(str(inputs)) + 1 :] for p in found.stdout.splitlines())
        assert "params.txt" in paths and "deep/ok.dat" in paths
        for path in paths:
            assert ".." not in path.split("/"), path
            assert (inputs / path).resolve().is_relative_to(inputs.resolve()), path
        assert not any("escape" in p or "absolute" in p or "outside" in p for p in paths)
        assert (inputs / "params.txt").read_bytes() == b"steps=3\n"
        assert (inputs / "deep" / "ok.dat").read_bytes() == b"\x00\x01" * 500
        bad = mount.run(f"cat {inputs}/bad_crc.bin > /dev/null")
        assert bad.returncode != 0 and "Input/output error" in bad.stderr
        assert mount.run(f"cat {mount.path}/hostile/status").stdout == "success\n"
    assert "Traceback" not in mount.log.read_text()
