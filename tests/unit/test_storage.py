"""Service storage: path confinement, URL signatures, output packing, ZIP metadata."""

from __future__ import annotations

import os
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from taskfs.server.storage import Storage, check_storage_path


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "root", b"secret")


@pytest.mark.parametrize(
    "path",
    ["", "//abs", "a/../b", "..", ".", "a//b", "a/", "/", "a\\b", "a\x00b", "a b", "x" * 1025],
)
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="storage path"):
        check_storage_path(path)


def test_good_paths(storage: Storage) -> None:
    assert check_storage_path("proj/abc123/output.zip") == "proj/abc123/output.zip"
    # The official client's form with an empty storage prefix: a leading slash is no slash.
    assert check_storage_path("/abc123/input.zip") == "abc123/input.zip"
    assert storage.resolve("/a/b.zip") == storage.resolve("a/b.zip")
    assert storage.resolve("a/b.zip") == storage.root.resolve() / "a" / "b.zip"


def test_symlink_out_of_root_is_refused(storage: Storage, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (storage.root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="escapes"):
        storage.resolve("link/file")


def test_signatures(storage: Storage) -> None:
    expires, sig = storage.sign("download", "a/b.zip", 60)
    assert storage.verify("download", "a/b.zip", str(expires), sig) is None
    assert storage.verify("upload", "a/b.zip", str(expires), sig) == "bad signature"
    assert storage.verify("download", "a/c.zip", str(expires), sig) == "bad signature"
    assert storage.verify("download", "a/b.zip", str(expires + 1), sig) == "bad signature"
    assert storage.verify("download", "a/b.zip", "soon", sig) == "malformed expiry"
    # Whatever text a client sends is a bad signature or expiry, never an exception.
    assert storage.verify("download", "a/b.zip", str(expires), "sïg\udcff") == "bad signature"
    assert storage.verify("download", "a/b.zip", str(expires), "") == "bad signature"
    assert storage.verify("download", "a/b.zip", "²", sig) == "malformed expiry"
    assert storage.verify("download", "a/b.zip", "9" * 400, sig) == "malformed expiry"
    past = int(time.time()) - 1
    old = storage.signature("download", "a/b.zip", past)
    assert storage.verify("download", "a/b.zip", str(past), old) == "signed URL expired"
    other = Storage(storage.root, b"other secret")
    assert other.verify("download", "a/b.zip", str(expires), sig) == "bad signature"


def test_pack_outputs(storage: Storage, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "vtk").mkdir(parents=True)
    (work / "stdout.txt").write_text("out\n")
    (work / "vtk" / "p_1.vtk").write_bytes(b"1 2 3\n" * 1000)
    (work / "empty").write_bytes(b"")
    (work / "inside-link").symlink_to(work / "stdout.txt")
    (tmp_path / "secret.txt").write_text("do not pack")
    (work / "outside-link").symlink_to(tmp_path / "secret.txt")
    stats = storage.pack_outputs(work, "t1/output.zip")
    archive = storage.resolve("t1/output.zip")
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == [
            "artifacts/",
            "artifacts/empty",
            "artifacts/inside-link",
            "artifacts/stdout.txt",
            "artifacts/vtk/p_1.vtk",
            "artifacts/taskfs-packing.txt",
        ]
        assert zf.read("artifacts/vtk/p_1.vtk") == b"1 2 3\n" * 1000
        assert zf.read("artifacts/inside-link") == b"out\n"
        report = zf.read("artifacts/taskfs-packing.txt").decode()
        assert 'skipped: "outside-link": a symbolic link pointing out of' in report
        assert "do not pack" not in report
        assert zf.getinfo("artifacts/vtk/p_1.vtk").compress_type == zipfile.ZIP_DEFLATED
    assert stats.total_files == 4
    assert stats.size_bytes == 4 + 6000 + 0 + 4
    assert [i.path for i in stats.issues] == ["outside-link"]
    assert stats.zipped_size_bytes == archive.stat().st_size
    assert not [p for p in archive.parent.iterdir() if p.name.startswith(".")]


def test_pack_replaces_atomically(storage: Storage, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "a").write_text("1")
    storage.pack_outputs(work, "t/output.zip")
    first = os.stat(storage.resolve("t/output.zip"))
    (work / "a").write_text("22")
    storage.pack_outputs(work, "t/output.zip")
    second = os.stat(storage.resolve("t/output.zip"))
    assert first.st_ino != second.st_ino  # renamed over, never rewritten in place
    assert Storage.etag(first) != Storage.etag(second)


def test_pack_missing_workdir_gives_empty_archive(storage: Storage, tmp_path: Path) -> None:
    stats = storage.pack_outputs(tmp_path / "nope", "t/output.zip")
    assert stats.total_files == 0
    with zipfile.ZipFile(storage.resolve("t/output.zip")) as zf:
        assert zf.namelist() == ["artifacts/"]


def test_zip_metadata(storage: Storage, tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "d").mkdir(parents=True)
    (work / "top.txt").write_bytes(b"top")
    (work / "d" / "deep.txt").write_bytes(b"deep " * 50)
    storage.pack_outputs(work, "t/output.zip")
    info = storage.zip_contents("t/output.zip", "artifacts/", recursive=True)
    assert {c["name"] for c in info["contents"]} == {"top.txt", "d/deep.txt"}
    assert info["size"] == storage.resolve("t/output.zip").stat().st_size
    flat = storage.zip_contents("t/output.zip", "artifacts", recursive=False)
    assert [c["name"] for c in flat["contents"]] == ["top.txt"]
    rng = storage.zip_file_range("t/output.zip", "artifacts/", "d/deep.txt")
    raw = storage.resolve("t/output.zip").read_bytes()
    data = raw[rng["range_start"] : rng["range_end"] + 1]
    assert zlib.decompress(data, -15) == b"deep " * 50
    with pytest.raises(KeyError):
        storage.zip_file_range("t/output.zip", "artifacts/", "missing")


def test_incompressible_files_are_stored(storage: Storage, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "random.bin").write_bytes(os.urandom(200_000))
    (work / "text.vtk").write_bytes(b"0.125 0.250 0.375\n" * 20_000)
    (work / "tiny").write_bytes(os.urandom(100))
    storage.pack_outputs(work, "t/output.zip")
    with zipfile.ZipFile(storage.resolve("t/output.zip")) as zf:
        methods = {i.filename: i.compress_type for i in zf.infolist()}
        assert zf.testzip() is None
    assert methods["artifacts/random.bin"] == zipfile.ZIP_STORED
    assert methods["artifacts/text.vtk"] == zipfile.ZIP_DEFLATED
    assert methods["artifacts/tiny"] == zipfile.ZIP_DEFLATED
