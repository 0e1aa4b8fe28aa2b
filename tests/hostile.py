"""A corpus of hostile and broken output archives, built byte by byte where zipfile would not.

Each case is ``(name, bytes, expectation)``: ``"tree"`` (lists as a safe tree), ``"error"``
(opening it is an archive error), and for the readable ones which members must fail to read.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

from tests.support import artifacts_zip

LOCAL = struct.Struct("<4sHHHHHIIIHH")
CENTRAL = struct.Struct("<4sBBHHHHHIIIHHHHHII")
EOCD = struct.Struct("<4sHHHHIIH")


@dataclass
class Member:
    name: bytes
    data: bytes
    method: int = 0  # stored
    flags: int = 0
    crc: int | None = None  # None: the right one
    size: int | None = None  # declared uncompressed size; None: the right one
    offset: int | None = None  # declared local header offset; None: where it is written
    raw: bytes | None = None  # the compressed bytes as written; None: ``data`` compressed


def raw_zip(
    members: list[Member],
    *,
    count: int | None = None,
    cd_offset_delta: int = 0,
    truncate_cd: int = 0,
    prefix: bytes = b"",
) -> bytes:
    """A ZIP written by hand, so every field can be wrong on purpose."""
    body = bytearray(prefix)
    central = bytearray()
    for member in members:
        compressed = member.data
        if member.raw is not None:
            compressed = member.raw
        elif member.method == 8:
            packer = zlib.compressobj(6, zlib.DEFLATED, -15)
            compressed = packer.compress(member.data) + packer.flush()
        crc = zlib.crc32(member.data) if member.crc is None else member.crc
        size = len(member.data) if member.size is None else member.size
        offset = len(body)
        body += LOCAL.pack(
            b"PK\x03\x04",
            20,
            member.flags,
            member.method,
            0,
            0x21,
            crc,
            len(compressed),
            size,
            len(member.name),
            0,
        )
        body += member.name + compressed
        central += (
            CENTRAL.pack(
                b"PK\x01\x02",
                20,
                3,
                20,
                member.flags,
                member.method,
                0,
                0x21,
                crc,
                len(compressed),
                size,
                len(member.name),
                0,
                0,
                0,
                0,
                0o100644 << 16,
                offset if member.offset is None else member.offset,
            )
            + member.name
        )
    cd_start = len(body)
    central = central[: len(central) - truncate_cd] if truncate_cd else central
    n = len(members) if count is None else count
    end = EOCD.pack(b"PK\x05\x06", 0, 0, n, n, len(central), cd_start + cd_offset_delta, 0)
    return bytes(body + central + end)


@dataclass
class Case:
    name: str
    data: bytes
    opens: bool  # the central directory is usable
    shown: set[str] = field(default_factory=set)  # paths (under outputs/) that must be listed
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> "EIO" / "ENOTSUP"
    contents: dict[str, bytes] = field(default_factory=dict)  # path -> exact bytes


def corpus() -> list[Case]:
    a = b"artifacts/"
    good = b"fine\n"
    cases = [
        Case(
            "escaping-names",
            raw_zip(
                [
                    Member(a + b"../../etc/passwd", b"x"),
                    Member(b"/etc/shadow", b"x"),
                    Member(a + b"/abs", b"y"),
                    Member(a + b"a/../../b", b"x"),
                    Member(a + b"ok.txt", good),
                ]
            ),
            True,
            {"abs", "ok.txt"},
            contents={"ok.txt": good, "abs": b"y"},
        ),
        Case(
            "nul-and-invalid-utf8",
            raw_zip(
                [
                    Member(a + b"nul\x00name", b"x"),
                    Member(a + b"bad\xff\xfename", b"bytes", flags=0x800),
                    Member(a + b"ok.txt", good),
                ]
            ),
            True,
            {"ok.txt", "bad\udcff\udcfename"},
            contents={"ok.txt": good},
        ),
        Case(
            "duplicates-keep-the-last",
            raw_zip([Member(a + b"dup.txt", b"first"), Member(a + b"dup.txt", b"second")]),
            True,
            {"dup.txt"},
            contents={"dup.txt": b"second"},
        ),
        Case(
            "file-and-directory-with-one-name",
            raw_zip([Member(a + b"clash", b"a file"), Member(a + b"clash/inner", b"inside")]),
            True,
            {"clash/inner"},
            contents={"clash/inner": b"inside"},
        ),
        Case(
            "crc-mismatch",
            raw_zip([Member(a + b"bad.txt", b"payload" * 100, crc=1), Member(a + b"ok.txt", good)]),
            True,
            {"bad.txt", "ok.txt"},
            unreadable={"bad.txt": "EIO"},
            contents={"ok.txt": good},
        ),
        Case(
            "corrupt-deflate-stream",
            raw_zip(
                [
                    Member(a + b"before.txt", good),
                    Member(a + b"garbage.txt", b"x" * 100, method=8, raw=b"\xff" * 64),
                    Member(a + b"ok.txt", good),
                ]
            ),
            True,
            {"before.txt", "garbage.txt", "ok.txt"},
            unreadable={"garbage.txt": "EIO"},
            contents={"before.txt": good, "ok.txt": good},
        ),
        Case(
            "unsupported-method",
            raw_zip([Member(a + b"odd.bin", b"xyz", method=9), Member(a + b"ok.txt", good)]),
            True,
            {"odd.bin", "ok.txt"},
            unreadable={"odd.bin": "ENOTSUP"},
            contents={"ok.txt": good},
        ),
        Case(
            "encrypted",
            raw_zip([Member(a + b"secret.bin", b"xyz", flags=1), Member(a + b"ok.txt", good)]),
            True,
            {"secret.bin", "ok.txt"},
            unreadable={"secret.bin": "ENOTSUP"},
        ),
        Case(
            "overlapping-members",
            raw_zip(
                [
                    Member(a + b"one.txt", b"shared bytes"),
                    Member(a + b"two.txt", b"shared bytes", offset=0),
                ]
            ),
            True,
            {"one.txt", "two.txt"},
            unreadable={"two.txt": "EIO"},
            contents={"one.txt": b"shared bytes"},
        ),
        Case(
            "size-lies",
            raw_zip(
                [
                    Member(a + b"short.txt", b"abc", size=3_000_000),
                    Member(a + b"deflated.txt", b"z" * 1000, method=8, size=10),
                ]
            ),
            True,
            {"short.txt", "deflated.txt"},
            unreadable={"short.txt": "EIO", "deflated.txt": "EIO"},
        ),
        Case(
            "empty-member",
            artifacts_zip({"empty.txt": b""}),
            True,
            {"empty.txt"},
            contents={"empty.txt": b""},
        ),
        Case("wrong-counts", raw_zip([Member(a + b"x", b"x")], count=7), False),
        Case(
            "directory-past-the-end",
            raw_zip([Member(a + b"x", b"x")], cd_offset_delta=10**6),
            False,
        ),
        Case(
            "truncated-directory",
            raw_zip([Member(a + b"x", b"x"), Member(a + b"y", b"y")], truncate_cd=20),
            False,
        ),
        Case("not-a-zip", b"this is not a zip archive at all\n" * 100, False),
        Case("empty-archive-file", b"", False),
        Case(
            "zip64",
            _zip64([("artifacts/z64.txt", b"sixty-four\n")]),
            True,
            {"z64.txt"},
            contents={"z64.txt": b"sixty-four\n"},
        ),
    ]
    return cases


def _zip64(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files:
            with zf.open(zipfile.ZipInfo(name), "w", force_zip64=True) as out:
                out.write(data)
    return buf.getvalue()


def many_entries(count: int = 70_000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(f"artifacts/d{i % 100:02d}/f{i}.txt", b"")
    return buf.getvalue()
