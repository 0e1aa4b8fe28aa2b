"""The outputs listing as the official client prints it, and downloads, over a fake API."""

from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.archive.rangeio import data_client
from taskfs.config import ClientSettings
from taskfs.errors import NotFoundError
from taskfs.outputs import (
    OutputFile,
    OutputInfo,
    _TreeWriter,
    download,
    format_bytes,
    output_info,
)
from tests.fakeapi import KEY, FakeApi
from tests.rangeserver import AnswerTransport, mock_transport
from tests.support import artifacts_zip


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (859, "859 B"),
        (999, "999 B"),
        (1000, "1.00 KB"),
        (3120, "3.12 KB"),
        (262_000, "262.00 KB"),
        (5_760_000, "5.76 MB"),
        (2_500_000_000, "2.50 GB"),
    ],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


def test_listing_text_matches_the_official_client() -> None:
    info = OutputInfo(
        262_000,
        (
            OutputFile("stdout.txt", 3120, 859),
            OutputFile("stderr.txt", 242, 160),
            OutputFile("vtk/ParticleData_Fluid_40.vtk", 5760, 4100),
        ),
    )
    assert str(info) == (
        "Archive size: 262.00 KB\n"
        "Contents:\n"
        "  Size         Compressed   Name\n"
        "  3.12 KB      859 B        stdout.txt\n"
        "  242 B        160 B        stderr.txt\n"
        "  5.76 KB      4.10 KB      vtk/ParticleData_Fluid_40.vtk"
    )


def known_archive() -> bytes:
    files = {
        "stdout.txt": b"o" * 3120,
        "stderr.txt": b"e" * 242,
        "vtk/ParticleData_Fluid_40.vtk": b"v" * 5760,
    }
    return artifacts_zip(files, zipfile.ZIP_STORED, outside={"outside.json": b"{}"})


async def test_listing_reads_only_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeApi()
    data = known_archive()
    fake.add("t1", S.SUCCESS, archive=data)
    settings = ClientSettings(api_url=fake.base_url, api_key=KEY)

    def routed(**kwargs: Any) -> httpx.AsyncClient:
        return data_client(max_connections=4, transport=mock_transport(fake))

    monkeypatch.setattr("taskfs.outputs.data_client", routed)  # storage goes to the fake too
    monkeypatch.setattr("taskfs.outputs.HttpTransport", lambda **kwargs: AnswerTransport(fake))
    async with ApiClient.open(settings, transport=mock_transport(fake)) as api:
        info = await output_info(api, await api.get_task("t1"))
        assert str(info) == (
            f"Archive size: {format_bytes(len(data))}\n"
            "Contents:\n"
            "  Size         Compressed   Name\n"
            "  3.12 KB      3.12 KB      stdout.txt\n"
            "  242 B        242 B        stderr.txt\n"
            "  5.76 KB      5.76 KB      vtk/ParticleData_Fluid_40.vtk"
        )
        gets = [s for s in fake.objects.seen if s.method == "GET"]
        assert len(gets) == 1 and gets[0].range == "bytes=-65633"
        task = await api.get_task("t1")
        with pytest.raises(NotFoundError, match="nope"):
            await download(api, task, tmp_path / "d", ["stdout.txt", "nope"])
        assert not (tmp_path / "d").exists()  # nothing written for a bad request
        names = await download(
            api, task, tmp_path / "d", ["vtk/ParticleData_Fluid_40.vtk", "./stdout.txt"]
        )
        assert names == ["stdout.txt", "vtk/ParticleData_Fluid_40.vtk"]
        assert (tmp_path / "d" / "vtk" / "ParticleData_Fluid_40.vtk").is_file()
        assert (tmp_path / "d" / "stdout.txt").read_bytes() == b"o" * 3120


async def test_a_failed_write_names_the_member_not_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(dir_fd: int, name: str, entry: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", ".taskfs-part-0123456789ab")

    monkeypatch.setattr("taskfs.outputs._write_file", full)
    writer = _TreeWriter(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    try:
        with pytest.raises(OSError) as caught:
            writer.write_all([("sub/dir/result.csv", None, b"x")])  # type: ignore[list-item]
    finally:
        writer.close()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == "sub/dir/result.csv"
