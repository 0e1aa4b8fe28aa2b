"""ZIP end records, central directory parsing, tree building and hostile input."""

from __future__ import annotations

import calendar
import io
import os
import stat
import struct
import time
import warnings
import zipfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from taskfs.archive import zipindex as zi
from taskfs.errors import ArchiveError


def build(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # duplicate names are on purpose
        for name, data in members:
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def index(data: bytes, tail: int = zi.TAIL_SIZE) -> tuple[zi.Directory, zi.Index]:
    """Locate and parse like a reader would, fetching more only when told to."""
    start = max(0, len(data) - tail)
    location = zi.locate_directory(data[start:], start, len(data))
    while isinstance(location, zi.NeedBytes):
        start = location.start
        location = zi.locate_directory(data[start:], start, len(data))
    cd = data[location.start : location.start + location.size]
    return location, zi.parse_directory(cd, location)


def test_entries_match_zipfile() -> None:
    data = build([("artifacts/", b""), ("artifacts/a.txt", b"x" * 1000), ("artifacts/d/b", b"")])
    location, entries = index(data)
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert not location.zip64 and location.shift == 0 and location.count == 3
    assert [e.name for e in entries] == [i.filename for i in infos]
    for entry, info in zip(entries, infos, strict=True):
        assert entry.header_offset == info.header_offset
        assert entry.compressed_size == info.compress_size
        assert entry.size == info.file_size
        assert entry.crc == info.CRC
        assert entry.method == info.compress_type
        assert entry.mtime == calendar.timegm((*info.date_time, 0, 0, 0))  # DOS time as UTC
    assert entries[0].is_dir and not entries[1].is_dir


@pytest.mark.parametrize("zone", ["UTC", "America/Los_Angeles", "Asia/Kolkata"])
def test_times_do_not_depend_on_the_readers_time_zone(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DOS time reads as UTC in any zone; an extended timestamp (0x5455) wins where present,
    also before 1980, where a DOS date cannot go."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("artifacts/dos", date_time=(2026, 11, 30, 10, 7, 0)), b"a")
        for name, seconds in (("ut", 1_764_497_220), ("old", 0), ("older", -86400)):
            info = zipfile.ZipInfo(f"artifacts/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.extra = struct.pack("<HHBi", 0x5455, 5, 1, seconds)
            zf.writestr(info, b"b")
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        _, entries = index(buf.getvalue())
    finally:
        monkeypatch.undo()
        time.tzset()
    mtimes = {e.name.removeprefix("artifacts/"): e.mtime for e in entries}
    assert mtimes["dos"] == calendar.timegm((2026, 11, 30, 10, 7, 0))
    assert mtimes["ut"] == 1_764_497_220
    assert mtimes["old"] == 0 and mtimes["older"] == -86400


def test_comment_and_trailing_garbage() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.comment = b"PK\x05\x06 looks like a record but is a comment" * 100
        zf.writestr("artifacts/a", b"a")
    data = buf.getvalue()
    assert [e.name for e in index(data)[1]] == ["artifacts/a"]
    assert [e.name for e in index(data + b"junk after the archive")[1]] == ["artifacts/a"]


def test_prepended_bytes_are_accounted_for() -> None:
    data = build([("artifacts/a", b"payload")])
    stub = b"#!/bin/sh\nexit 0\n" * 10
    location, entries = index(stub + data)
    assert location.shift == len(stub)
    assert entries[0].header_offset == len(stub)


def test_zip64_many_entries_and_forced() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(70_000):
            zf.writestr(f"artifacts/{i}", b"")
    location, entries = index(buf.getvalue())
    assert location.zip64 and location.count == 70_000 and len(entries) == 70_000
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("artifacts/big")
        with zf.open(info, "w", force_zip64=True) as out:
            out.write(b"z" * 100)
    _, entries = index(buf.getvalue())
    assert entries[0].size == 100


def test_zip64_record_before_the_tail_asks_for_bytes() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(70_000):
            zf.writestr(f"artifacts/{i}", b"")
        zf.comment = b"c" * 65_475  # the end record fits in 64 KiB, the zip64 record not
    data = buf.getvalue()
    start = len(data) - 65_536
    first = zi.locate_directory(data[start:], start, len(data))
    assert isinstance(first, zi.NeedBytes) and first.start < start
    assert len(index(data)[1]) == 70_000


def test_names_utf8_cp437_and_modes() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("artifacts/ünïcode-名前.txt", b"u")
        info = zipfile.ZipInfo("artifacts/run.sh")
        info.create_system = 3
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        zf.writestr(info, b"#!/bin/sh")
    data = bytearray(buf.getvalue())
    _, entries = index(bytes(data))
    assert entries[0].name == "artifacts/ünïcode-名前.txt"
    assert entries[1].mode == stat.S_IFREG | 0o555
    assert entries[0].mode == stat.S_IFREG | 0o444
    raw = b"artifacts/caf\x82"  # CP437 e-acute, no UTF-8 flag
    cp437 = build([(raw.decode("cp437"), b"x")])
    assert index(cp437)[1][0].name == "artifacts/café"


def test_invalid_utf8_name_round_trips_as_bytes() -> None:
    data = bytearray(build([("artifacts/abc", b"x")]))
    # Flag the name UTF-8 in both headers and make it invalid UTF-8.
    for sig, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        pos = data.find(sig)
        flags = struct.unpack_from("<H", data, pos + flag_at)[0] | zi.FLAG_UTF8
        struct.pack_into("<H", data, pos + flag_at, flags)
        data[pos + name_at + 10] = 0xFF
    name = index(bytes(data))[1][0].name
    assert os.fsencode(name) == b"artifacts/\xffbc"


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b/c.txt", ("a", "b", "c.txt")),
        ("a//b/./c", ("a", "b", "c")),
        ("/etc/passwd", None),
        ("a/../../etc", None),
        ("..", None),
        ("a\x00b", None),
        ("./", None),
        ("x" * 256, None),
        ("back\\slash", ("back\\slash",)),
    ],
)
def test_clean_path(name: str, parts: tuple[str, ...] | None) -> None:
    assert zi.clean_path(name) == parts


def test_tree_rules() -> None:
    data = build(
        [
            ("artifacts/", b""),
            ("artifacts/implicit/deep/file.txt", b"1"),
            ("artifacts/dup.txt", b"old"),
            ("artifacts/dup.txt", b"new"),
            ("artifacts/clash", b"a file"),
            ("artifacts/clash/inner", b"wins"),
            ("artifacts/../escape.txt", b"no"),
            ("artifacts//abs", b"folded"),
            ("outside.txt", b"not shown"),
            ("artifacts/explicit/", b""),
        ]
    )
    _, entries = index(data)
    tree = zi.build_tree(entries)
    assert set(tree.children) == {"implicit", "dup.txt", "clash", "abs", "explicit"}
    deep = tree.children["implicit"]
    assert isinstance(deep, zi.DirNode) and not deep.explicit
    dup = tree.children["dup.txt"]
    assert dup == 3 and entries[dup].index == 3
    clash = tree.children["clash"]
    assert isinstance(clash, zi.DirNode) and set(clash.children) == {"inner"}
    explicit = tree.children["explicit"]
    assert isinstance(explicit, zi.DirNode) and explicit.children == {}
    paths = sorted("/".join(p) for p, _ in zi.walk(tree, entries))
    assert paths == ["abs", "clash/inner", "dup.txt", "implicit/deep/file.txt"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-10], "end-of-central-directory"),
        (lambda d: b"not a zip at all" * 10, "end-of-central-directory"),
        (lambda d: b"", "only 0 bytes"),
    ],
)
def test_not_zip(mutate: object, message: str) -> None:
    data = mutate(build([("artifacts/a", b"a")]))  # type: ignore[operator]
    with pytest.raises(ArchiveError, match=message):
        index(data)


def _eocd_at(data: bytes) -> int:
    return data.rfind(zi.EOCD_SIG)


def test_wrong_counts_and_truncated_directory() -> None:
    data = bytearray(build([("artifacts/a", b"a"), ("artifacts/b", b"b")]))
    pos = _eocd_at(bytes(data))
    wrong = bytearray(data)
    struct.pack_into("<HH", wrong, pos + 8, 5, 5)
    with pytest.raises(ArchiveError, match="says 5 entries"):
        index(bytes(wrong))
    short = bytearray(data)
    cd_size = struct.unpack_from("<I", short, pos + 12)[0]
    struct.pack_into("<I", short, pos + 12, cd_size - 10)
    with pytest.raises(ArchiveError):
        index(bytes(short))
    past = bytearray(data)
    struct.pack_into("<I", past, pos + 16, len(data) * 2)
    with pytest.raises(ArchiveError, match="offset"):
        index(bytes(past))
    huge = bytearray(data)
    struct.pack_into("<I", huge, pos + 12, 0xFFFFFFFE)
    with pytest.raises(ArchiveError):
        index(bytes(huge))


def test_absurd_member_size() -> None:
    name = b"artifacts/x"
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0x21, 0, 1, 1, len(name), 0)
    body = local + name + b"x"
    extra = struct.pack("<HHQQ", 1, 16, 1 << 63, 1)
    central = (
        struct.pack(
            "<4sBBHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            45,
            3,
            45,
            0,
            0,
            0,
            0x21,
            0,
            0xFFFFFFFF,
            0xFFFFFFFF,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            0,
        )
        + name
        + extra
    )
    eocd = struct.pack("<4sHHHHIIH", zi.EOCD_SIG, 0, 0, 1, 1, len(central), len(body), 0)
    with pytest.raises(ArchiveError, match="impossible"):
        index(body + central + eocd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=20),
    st.integers(0, 3),
)
def test_corrupted_archives_fail_cleanly(flips: list[tuple[int, int]], cut: int) -> None:
    """Any corruption gives entries or ArchiveError: never another exception, never a hang."""
    data = bytearray(build([(f"artifacts/d{i}/f{i}.txt", b"data" * i) for i in range(12)]))
    for pos, value in flips:
        data[len(data) - 1 - pos % len(data)] = value
    blob = bytes(data[: len(data) - cut * 7])
    try:
        _, entries = index(blob)
    except ArchiveError:
        return
    tree = zi.build_tree(entries)
    for path, _ in zi.walk(tree, entries):
        assert all(part not in ("", ".", "..") and "\x00" not in part for part in path)


def reference_tree(names: list[str], prefix: str = "artifacts/") -> dict[str, object]:
    """The tree the rules in the module docstring give, built the plain way (nested dicts,
    a file is its record number): the oracle for ``build_tree``'s packed form."""
    root: dict[str, object] = {}
    for index, name in enumerate(names):
        if not name.startswith(prefix):
            continue
        parts = zi.clean_path(name[len(prefix) :].lstrip("/"))
        if parts is None:
            continue
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        existing = node.get(parts[-1])
        if name.endswith("/"):
            if not isinstance(existing, dict):
                node[parts[-1]] = {}
        elif not isinstance(existing, dict):
            node[parts[-1]] = index
    return root


def as_dicts(node: zi.DirNode) -> dict[str, object]:
    return {
        name: as_dicts(child) if isinstance(child, zi.DirNode) else child
        for name, child in node.children.items()
    }


name_parts = st.sampled_from(["a", "b", "é", ".", "..", "", "x\x00", "z" * 256, "dir"])


@given(
    st.lists(
        st.lists(name_parts, min_size=1, max_size=4).map("/".join),
        max_size=40,
    ),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
@example(["a/b", "a/.", "a/..", "a/", "a//b", "a/b", "a/" + "z" * 256, "a/x\x00"], [True] * 40)
@example(["a/b", "a/b/c", "a/b", "a/b/"], [True] * 40)
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_packed_tree_matches_the_plain_rules(paths: list[str], prefixed: list[bool]) -> None:
    """Random names (dots, empty components, NULs, long components, duplicates, a file and a
    directory of one name): the packed tree, its lookups and its walk agree with the oracle."""
    index = zi.Index()
    for path, under in zip(paths, prefixed, strict=False):
        index.names.append(("artifacts/" if under else "") + path)
        index.mtimes.append(0)
    tree = zi.build_tree(index)
    expected = reference_tree(list(index.names))
    assert as_dicts(tree) == expected

    def check(node: zi.DirNode, plain: dict[str, object]) -> None:
        for name, child in plain.items():
            found = node.get(name)
            if isinstance(child, dict):
                assert isinstance(found, zi.DirNode)
                check(found, child)
            else:
                assert found == child
        assert node.get("no such name") is None

    check(tree, expected)


def test_names_round_trip_in_the_packed_column() -> None:
    names = zi.Names()
    samples = ["plain.txt", "café/ü.txt", "bad\udce9name", "", "a/b/c/"]
    for name in samples:
        names.append(name)
    assert list(names) == samples and [names[i] for i in range(-5, 5)] == samples * 2
    assert names[1:3] == samples[1:3]
    with pytest.raises(IndexError):
        names[5]


@given(
    st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=30),
    st.booleans(),
)
@settings(max_examples=200)
def test_a_directory_fed_in_pieces_parses_as_it_does_whole(cuts: list[int], zip64: bool) -> None:
    """Records cut anywhere between pieces (the directory as it arrives over the network)
    make the same index as the whole directory, and as zipfile sees it."""
    members = [(f"artifacts/{'d' * (i % 7)}/f{i}.txt", b"x" * i) for i in range(40)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            with zf.open(name, "w", force_zip64=zip64) as out:
                out.write(data)
        zf.comment = b"comment"
    data = buf.getvalue()
    location, whole = index(data)
    cd = data[location.start : location.start + location.size]
    parser = zi.DirectoryParser(location)
    pos = 0
    for cut in cuts:
        parser.feed(memoryview(cd)[pos : pos + cut])
        pos = min(len(cd), pos + cut)
    parser.feed(cd[pos:])
    pieces = parser.finish()
    assert list(pieces) == list(whole)
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert [(e.name, e.header_offset, e.crc) for e in pieces] == [
        (i.filename, i.header_offset, i.CRC) for i in infos
    ]


def test_a_directory_cut_short_or_fed_too_much_is_refused() -> None:
    data = build([("artifacts/a", b"a"), ("artifacts/b", b"b")])
    location, _ = index(data)
    cd = data[location.start : location.start + location.size]
    short = zi.DirectoryParser(location)
    short.feed(cd[:-5])
    with pytest.raises(ArchiveError, match="wrong size"):
        short.finish()
    long = zi.DirectoryParser(location)
    with pytest.raises(ArchiveError, match="longer than its end record"):
        long.feed(cd + b"PK\x01\x02")


def test_columns_are_narrowed_where_their_values_fit() -> None:
    """Offsets, sizes and name ends in 4 bytes, times in 4, where every value fits; a value
    that does not keeps its column wide (zip64 offsets, DOS times past 2038)."""
    _, small = index(build([("artifacts/a", b"a" * 100), ("artifacts/b", b"b")]))
    assert {small.offsets.typecode, small.sizes.typecode, small.csizes.typecode} == {"I"}
    assert small.mtimes.typecode == "i"
    wide = zi.Index()
    for offset, mtime in ((0, 0), (5 << 32, 4_200_000_000)):
        wide.names.append("artifacts/x")
        for column in (wide.csizes, wide.sizes):
            column.append(1)
        wide.offsets.append(offset)
        wide.mtimes.append(mtime)
    wide.compact()
    assert wide.offsets.typecode == "q" and wide.offsets[1] == 5 << 32
    assert wide.sizes.typecode == "I" and wide.mtimes.typecode == "q"
    assert wide.mtimes[1] == 4_200_000_000


def test_a_large_directory_costs_under_100_bytes_per_entry() -> None:
    """Index and tree of 20,000 members (the benchmark's P11 checks 1,000,000): the columns
    and the packed tree, measured by tracemalloc."""
    import gc
    import tracemalloc

    count = 20_000
    members = [(f"artifacts/case{i // 1000:04d}/probe_{i:07d}.csv", b"") for i in range(count)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
    data = buf.getvalue()
    start = max(0, len(data) - zi.TAIL_SIZE)
    location = zi.locate_directory(data[start:], start, len(data))
    assert isinstance(location, zi.Directory)
    cd = data[location.start : location.start + location.size]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        entries = zi.parse_directory(cd, location)
        tree = zi.build_tree(entries)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(entries) == count and len(tree.dirs) == 20
    # Names of 36 bytes; the rest is 4-byte offsets, sizes, CRCs and times, 2-byte lengths,
    # methods, flags and modes, and 4 bytes in the tree: 86 measured.
    assert used / count <= 100, f"{used / count:.0f} bytes per entry"
