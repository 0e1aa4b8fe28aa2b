"""Bytes in, entries out: the ZIP end records, central directory and the tree taskfs shows.

Owns: finding the end-of-central-directory record (and the zip64 locator and record) in a tail
buffer, saying which bytes are still needed, parsing the central directory into ``Entry``
records, and building the directory tree of one subtree (``artifacts/``) with implicit
directories and sanitised names.

Must stay true:
* no I/O: every function takes bytes and returns values or raises ``ArchiveError``;
* hostile input never loops, never allocates more than the bytes it was given suggest (counts
  from the end record are checked against the data, never used to preallocate), and never
  produces a name that escapes the tree: absolute names, ``..`` components, NUL bytes and
  components longer than 255 bytes are dropped; ``.`` and empty components are folded;
* duplicate paths keep the last entry; where a file and a directory share a path the directory
  wins (its contents stay reachable);
* names flagged UTF-8 are decoded with ``surrogateescape`` (so ``os.fsencode`` gives the
  original bytes back), others as CP437, as ``zipfile`` does.
"""

from __future__ import annotations

import bisect
import calendar
import stat
import struct
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from taskfs.errors import ArchiveError

EOCD_SIG = b"PK\x05\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_EOCD_SIG = b"PK\x06\x06"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"

EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
CENTRAL = struct.Struct("<4sBBHHHHHIIIHHHHHII")  # 46 bytes
LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes

MAX_COMMENT = 0xFFFF
# The suffix a reader fetches first: the end record with the longest comment, the zip64
# locator and the zip64 end record always fit (65,633 bytes; DESIGN.md rounds it to 64 KiB).
TAIL_SIZE = EOCD.size + 0xFFFF + ZIP64_LOCATOR.size + ZIP64_EOCD.size
# Refuse central directories larger than this (a hostile size would otherwise be fetched).
MAX_DIRECTORY_BYTES = 1 << 30
MAX_NAME_COMPONENT = 255
# Sizes and offsets at or above this are nonsense (st_size is a signed 64-bit number).
MAX_MEMBER_BYTES = 1 << 62

STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
FLAG_ENCRYPTED = 0x1
FLAG_UTF8 = 0x800
UNIX = 3
DOS_EPOCH = 315532800  # 1980-01-01T00:00:00Z


class Names(Sequence[str]):
    """Entry names packed in one buffer (UTF-8, lone surrogates kept): a name costs its
    bytes and one offset, not a Python string of its own; ``names[i]`` decodes on demand."""

    __slots__ = ("_blob", "_ends")

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")

    def append(self, name: str) -> None:
        self.append_utf8(name.encode("utf-8", "surrogatepass"))

    def append_utf8(self, raw: bytes | bytearray) -> None:
        self._blob += raw
        self._ends.append(len(self._blob))

    def compact(self) -> None:
        """Done appending: ends in 4 bytes each where the names fit in 4 GiB."""
        self._ends = _narrowed(self._ends)

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self._ends)
        end = self._ends[i]  # IndexError past the end, as a list would
        start = self._ends[i - 1] if i else 0
        return self._blob[start:end].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        blob, start = self._blob, 0
        for end in self._ends:
            yield blob[start:end].decode("utf-8", "surrogatepass")
            start = end


@dataclass(frozen=True, slots=True)
class Entry:
    """One central-directory record; offsets are absolute positions in the archive file."""

    index: int
    name: str
    header_offset: int
    compressed_size: int
    size: int
    method: int
    crc: int
    flags: int
    mtime: float
    mode: int
    # Lengths of the name and extra field in the central directory: the local header usually
    # repeats them, so header + data is about ``LOCAL.size + name_len + extra_len`` + data.
    name_len: int
    extra_len: int

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)


class Index(Sequence[Entry]):
    """The central directory in columns: a few machine words and one string per entry.

    ``index[i]`` builds the ``Entry`` of record ``i`` on demand; nothing else keeps per-entry
    Python objects, so a 70,000-entry archive costs a few MiB, not tens.
    """

    __slots__ = (
        "crcs",
        "csizes",
        "extra_lens",
        "flags",
        "methods",
        "modes",
        "mtimes",
        "name_lens",
        "names",
        "offsets",
        "sizes",
    )

    def __init__(self) -> None:
        self.names = Names()
        self.offsets = array("q")
        self.csizes = array("q")
        self.sizes = array("q")
        self.crcs = array("I")
        self.methods = array("H")
        self.flags = array("H")
        self.name_lens = array("H")
        self.extra_lens = array("H")
        self.mtimes = array("q")  # whole seconds: DOS times and extended timestamps are
        self.modes = array("H")  # DIR_MODE, FILE_MODE or EXEC_MODE

    def __len__(self) -> int:
        return len(self.names)

    def compact(self) -> None:
        """Done appending: offsets, sizes and times in 4 bytes each where they fit (they
        do in archives under 4 GiB with times before 2038: 16 bytes an entry less)."""
        self.names.compact()
        self.offsets = _narrowed(self.offsets)
        self.csizes = _narrowed(self.csizes)
        self.sizes = _narrowed(self.sizes)
        if not self.mtimes or -(1 << 31) <= min(self.mtimes) <= max(self.mtimes) < 1 << 31:
            self.mtimes = array("i", self.mtimes)

    @overload
    def __getitem__(self, i: int) -> Entry: ...

    @overload
    def __getitem__(self, i: slice) -> list[Entry]: ...

    def __getitem__(self, i: int | slice) -> Entry | list[Entry]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return Entry(
            index=i,
            name=self.names[i],
            header_offset=self.offsets[i],
            compressed_size=self.csizes[i],
            size=self.sizes[i],
            method=self.methods[i],
            crc=self.crcs[i],
            flags=self.flags[i],
            mtime=self.mtimes[i],
            mode=self.modes[i],
            name_len=self.name_lens[i],
            extra_len=self.extra_lens[i],
        )


def _narrowed(column: array[int]) -> array[int]:
    """``column`` (non-negative) in 4-byte items if they fit, else as it is."""
    if column.typecode == "I" or (column and max(column) >= 1 << 32):
        return column
    return array("I", column)


@dataclass(frozen=True, slots=True)
class Directory:
    """Where the central directory is: ``[start, start + size)``, ``count`` records."""

    start: int
    size: int
    count: int
    # Bytes prepended to the archive (self-extractors): added to every recorded offset.
    shift: int
    zip64: bool


@dataclass(frozen=True, slots=True)
class NeedBytes:
    """The tail did not hold enough: fetch from ``start`` up to the current tail start."""

    start: int


def locate_directory(
    tail: bytes | bytearray, tail_start: int, file_size: int
) -> Directory | NeedBytes:
    """Find the central directory from the last bytes of the archive.

    ``tail`` holds bytes ``[tail_start, file_size)``. Returns where the directory is, or which
    earlier bytes are needed (a zip64 end record before the tail).
    """
    if len(tail) != file_size - tail_start or tail_start < 0:
        raise ArchiveError("tail buffer does not match the file size")
    if file_size < EOCD.size:
        raise ArchiveError(f"not a ZIP archive: only {file_size} bytes")
    pos = _find_eocd(tail)
    if pos < 0:
        raise ArchiveError("not a ZIP archive: no end-of-central-directory record")
    eocd_offset = tail_start + pos
    (_, disk, cd_disk, _on_disk, count, cd_size, cd_offset, _) = EOCD.unpack_from(tail, pos)
    zip64 = False
    loc_pos = pos - ZIP64_LOCATOR.size
    if loc_pos >= 0 and tail[loc_pos : loc_pos + 4] == ZIP64_LOCATOR_SIG:
        _, _, record_offset, _ = ZIP64_LOCATOR.unpack_from(tail, loc_pos)
        if record_offset < 0 or record_offset + ZIP64_EOCD.size > eocd_offset:
            raise ArchiveError("zip64 locator points outside the archive")
        if record_offset < tail_start:
            return NeedBytes(record_offset)
        rel = record_offset - tail_start
        fields = ZIP64_EOCD.unpack_from(tail, rel)
        if fields[0] != ZIP64_EOCD_SIG:
            raise ArchiveError("zip64 end record missing where the locator points")
        disk, cd_disk, count, cd_size, cd_offset = (
            fields[4],
            fields[5],
            fields[7],
            fields[8],
            fields[9],
        )
        end_of_cd = record_offset
        zip64 = True
    else:
        if 0xFFFFFFFF in (cd_size, cd_offset):
            raise ArchiveError("zip64 values without a zip64 end record")
        end_of_cd = eocd_offset
    if disk != 0 or cd_disk != 0:
        raise ArchiveError("multi-disk archives are not supported")
    if cd_size > MAX_DIRECTORY_BYTES:
        raise ArchiveError(f"central directory of {cd_size} bytes is too large")
    start = end_of_cd - cd_size
    if start < 0:
        raise ArchiveError("central directory size exceeds the archive")
    shift = start - cd_offset
    if shift < 0:
        raise ArchiveError("central directory offset points past its end")
    return Directory(start=start, size=cd_size, count=count, shift=shift, zip64=zip64)


def _find_eocd(tail: bytes | bytearray) -> int:
    """Position of the end record: the last plausible one whose comment reaches the end, else
    the last plausible one (trailing bytes after the archive), else -1."""
    limit = max(0, len(tail) - EOCD.size - MAX_COMMENT)
    fallback = -1
    pos = tail.rfind(EOCD_SIG, limit)
    while pos >= 0:
        if pos + EOCD.size <= len(tail):
            _, disk, cd_disk, on_disk, count, _, _, comment_len = EOCD.unpack_from(tail, pos)
            plausible = disk == cd_disk == 0 and on_disk == count
            if plausible and pos + EOCD.size + comment_len == len(tail):
                return pos
            if plausible and fallback < 0 and pos + EOCD.size + comment_len <= len(tail):
                fallback = pos
        pos = tail.rfind(EOCD_SIG, limit, pos)
    return fallback


def parse_directory(data: bytes | bytearray | memoryview, directory: Directory) -> Index:
    """Parse the central directory bytes ``data`` (exactly ``directory.size`` long).

    A member whose data would lie outside the data area (before the directory) is still
    listed; reading it fails (``RemoteArchive`` checks the bounds).
    """
    if len(data) != directory.size:
        raise ArchiveError("central directory buffer has the wrong size")
    parser = DirectoryParser(directory)
    parser.feed(data)
    return parser.finish()


class DirectoryParser:
    """The central directory parsed as its bytes arrive, in pieces of any size (a record cut
    between two pieces waits for the next): the whole directory never has to be held at once,
    only the ``Index`` it becomes (a 1,000,000-member archive's directory is 80 MB; its index
    about as much again).

    ``feed`` the bytes in order, then ``finish`` (which checks the size and the count)."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.entries = Index()
        self._dos_times: dict[int, int] = {}  # archives hold few distinct times
        self._rest = b""  # the start of a record cut by the end of the last piece
        self._fed = 0

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        self._fed += len(piece)
        if self._fed > self.directory.size:
            raise ArchiveError("central directory is longer than its end record says")
        data = self._rest + piece if self._rest else piece
        self._rest = bytes(data[self._parse(data) :])

    def finish(self) -> Index:
        if self._fed != self.directory.size:
            raise ArchiveError("central directory buffer has the wrong size")
        if self._rest:
            count = len(self.entries)
            if len(self._rest) < CENTRAL.size:
                raise ArchiveError(f"central directory truncated at record {count}")
            raise ArchiveError(f"central directory record {count} runs past its end")
        count, found = self.directory.count, len(self.entries)
        if found != count and found % 0x10000 != count % 0x10000:
            raise ArchiveError(f"end record says {count} entries, central directory holds {found}")
        self.entries.compact()
        return self.entries

    def _parse(self, data: bytes | bytearray | memoryview) -> int:
        """Parse the whole records at the start of ``data``; where the first cut one starts."""
        entries, directory, dos_times = self.entries, self.directory, self._dos_times
        pos = 0
        end = len(data)
        while end - pos >= CENTRAL.size:
            fields = CENTRAL.unpack_from(data, pos)
            if fields[0] != CENTRAL_SIG:
                raise ArchiveError(f"bad central directory record {len(entries)}")
            (
                _,
                _ver,
                system,
                _need,
                flags,
                method,
                dtime,
                ddate,
                crc,
                csize,
                usize,
                name_len,
                extra_len,
                comment_len,
                disk_start,
                _iattr,
                eattr,
                offset,
            ) = fields
            name_start = pos + CENTRAL.size
            extra_start = name_start + name_len
            next_pos = extra_start + extra_len + comment_len
            if next_pos > end:
                break  # cut: the rest comes with the next piece
            raw_name = bytes(data[name_start:extra_start])
            mtime: int | None = None
            if extra_len:
                extra = data[extra_start : extra_start + extra_len]
                usize, csize, offset, mtime = _apply_extra(extra, usize, csize, offset, disk_start)
            offset += directory.shift
            if max(usize, csize, offset) >= MAX_MEMBER_BYTES:
                raise ArchiveError(f"member {len(entries)} claims an impossible size or offset")
            if raw_name.isascii():  # the same text in UTF-8 and CP437: no decoding needed
                entries.names.append_utf8(raw_name)
            else:
                entries.names.append(_decode(raw_name, flags))
            entries.offsets.append(offset)
            entries.csizes.append(csize)
            entries.sizes.append(usize)
            entries.crcs.append(crc)
            entries.methods.append(method)
            entries.flags.append(flags)
            entries.name_lens.append(name_len)
            entries.extra_lens.append(extra_len)
            if mtime is None:
                mtime = dos_times.get((ddate << 16) | dtime)
                if mtime is None:
                    mtime = dos_times[(ddate << 16) | dtime] = _dos_time(ddate, dtime)
            entries.mtimes.append(mtime)
            if raw_name.endswith(b"/"):
                entries.modes.append(DIR_MODE)
            else:
                executable = system == UNIX and (eattr >> 16) & 0o111
                entries.modes.append(EXEC_MODE if executable else FILE_MODE)
            pos = next_pos
        return pos


def _decode(raw: bytes | bytearray, flags: int) -> str:
    if flags & FLAG_UTF8:
        return raw.decode("utf-8", "surrogateescape")
    return raw.decode("cp437")


def _apply_extra(
    extra: bytes | bytearray | memoryview, usize: int, csize: int, offset: int, disk: int
) -> tuple[int, int, int, int | None]:
    """Zip64 sizes/offset (0x0001) and the extended timestamp (0x5455) from an extra field."""
    mtime: int | None = None
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if len(body) < length:
            break  # truncated extra field: ignore the rest, as zip tools do
        if tag == 0x0001:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            wanted = [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF, offset == 0xFFFFFFFF]
            it = iter(values)
            try:
                if wanted[0]:
                    usize = next(it)
                if wanted[1]:
                    csize = next(it)
                if wanted[2]:
                    offset = next(it)
            except StopIteration:
                raise ArchiveError("zip64 extra field is too short") from None
        elif tag == 0x5455 and length >= 5 and body[0] & 1:
            mtime = struct.unpack_from("<i", body, 1)[0]
        pos += 4 + length
    if disk not in (0, 0xFFFF):
        raise ArchiveError("multi-disk archives are not supported")
    return usize, csize, offset, mtime


def _dos_time(ddate: int, dtime: int) -> int:
    """DOS date/time to epoch seconds, read as UTC; invalid -> 1980.

    A DOS time has no time zone. Zip tools write the packer's local time, which a reader
    cannot know: taking it as UTC makes the time the same for every reader, whatever its
    time zone (taskfs's own archives, and the cloud's, carry the exact time in an extended
    timestamp field, which wins where present)."""
    year = 1980 + (ddate >> 9)
    month = (ddate >> 5) & 0xF
    day = ddate & 0x1F
    hour, minute, second = dtime >> 11, (dtime >> 5) & 0x3F, (dtime & 0x1F) * 2
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 62):
        return DOS_EPOCH
    try:
        return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (OverflowError, ValueError):
        return DOS_EPOCH


DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
EXEC_MODE = stat.S_IFREG | 0o555


def parse_local_header(data: bytes | bytearray | memoryview, entry: Entry) -> int:
    """Length of ``entry``'s local header at the start of ``data``.

    The signature and the name must match the central directory (as ``zipfile`` checks): a
    record pointing at another member's header (overlapping members) is an ``ArchiveError``.
    """
    if len(data) < LOCAL.size:
        raise ArchiveError(f"{entry.name}: local header truncated")
    signature, *_, name_len, extra_len = LOCAL.unpack_from(data, 0)
    if signature != LOCAL_SIG:
        raise ArchiveError(f"{entry.name}: bad local header signature")
    raw = bytes(data[LOCAL.size : LOCAL.size + name_len])
    expected = entry.name.encode(
        "utf-8" if entry.flags & FLAG_UTF8 else "cp437",
        "surrogateescape" if entry.flags & FLAG_UTF8 else "strict",
    )
    if raw != expected:
        raise ArchiveError(f"{entry.name}: the local header names another member")
    return int(LOCAL.size + name_len + extra_len)


# -- the tree ------------------------------------------------------------------------------------


class _Leaves:
    """The shown name of every file record of a tree: the last component of its archive name,
    or (rarely: names ending in ``/.``) the one ``clean_path`` gave, kept apart."""

    __slots__ = ("names", "odd")

    def __init__(self, names: Sequence[str]) -> None:
        self.names = names
        self.odd: dict[int, str] = {}

    def __call__(self, index: int) -> str:
        odd = self.odd.get(index) if self.odd else None
        return odd if odd is not None else self.names[index].rpartition("/")[2]


@dataclass(slots=True, eq=False)
class DirNode:
    """A directory of the tree: its subdirectories by name, and its files as record numbers
    in the ``Index`` sorted by name (4 bytes a file: an archive of a million members keeps no
    Python object per file). ``children`` shows both as one mapping (a file child is its
    record number)."""

    dirs: dict[str, DirNode] = field(default_factory=dict)
    files: array[int] = field(default_factory=lambda: array("i"))
    leaves: _Leaves | None = None
    mtime: float = DOS_EPOCH
    explicit: bool = False

    @property
    def children(self) -> Children:
        return Children(self)

    def get(self, name: str) -> DirNode | int | None:
        """The child called ``name`` (a binary search among the files)."""
        found = self.dirs.get(name)
        if found is not None or self.leaves is None:
            return found
        files = self.files
        i = bisect.bisect_left(files, name, key=self.leaves)
        return files[i] if i < len(files) and self.leaves(files[i]) == name else None

    def file_names(self) -> Iterator[tuple[str, int]]:
        leaves = self.leaves
        if leaves is not None:
            for index in self.files:
                yield leaves(index), index


class Children(Mapping[str, "DirNode | int"]):
    """A directory's children as a read-only mapping: subdirectories first, then files by
    name."""

    __slots__ = ("_node",)

    def __init__(self, node: DirNode) -> None:
        self._node = node

    def __getitem__(self, name: str) -> DirNode | int:
        found = self._node.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def get(self, name: str, default: object = None) -> Any:
        found = self._node.get(name)
        return default if found is None else found

    def __iter__(self) -> Iterator[str]:
        yield from self._node.dirs
        for name, _ in self._node.file_names():
            yield name

    def items(self) -> Iterator[tuple[str, DirNode | int]]:  # type: ignore[override]
        yield from self._node.dirs.items()
        yield from self._node.file_names()

    def values(self) -> Iterator[DirNode | int]:  # type: ignore[override]
        yield from self._node.dirs.values()
        yield from self._node.files

    def __len__(self) -> int:
        return len(self._node.dirs) + len(self._node.files)


def _plain(leaf: str) -> bool:
    """A last component that ``clean_path`` keeps as it is."""
    return (
        leaf not in ("", ".", "..")
        and "\x00" not in leaf
        and (len(leaf) <= MAX_NAME_COMPONENT // 4 or _fits(leaf))
    )


def _fits(part: str) -> bool:
    return len(part.encode("utf-8", "surrogateescape")) <= MAX_NAME_COMPONENT


def clean_path(name: str) -> tuple[str, ...] | None:
    """The path components of an archive name, or ``None`` if it must not be shown."""
    if not name or name.startswith("/") or "\x00" in name:
        return None
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == ".." or len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_COMPONENT:
            return None
        parts.append(part)
    return tuple(parts) if parts else None


def build_tree(entries: Index, prefix: str = "artifacts/") -> DirNode:
    """The tree of everything under ``prefix`` (not shown itself), names sanitised."""
    leaves = _Leaves(entries.names)
    root = DirNode(explicit=True, leaves=leaves)
    names, mtimes = entries.names, entries.mtimes
    # Files of each directory in archive order, sorted and deduplicated at the end.
    # (Record numbers in arrays, not lists: a million members make no int objects.)
    found: dict[int, tuple[DirNode, array[int]]] = {}
    # The file list of each parent path seen, for names that need no cleaning.
    parents: dict[str, array[int]] = {}
    for index, name in enumerate(names):
        if not name.startswith(prefix):
            continue
        head, _, leaf = name.rpartition("/")
        listed = parents.get(head)
        if listed is not None and _plain(leaf):
            listed.append(index)
            continue
        # Below the prefix a leading slash cannot escape: "artifacts//x" is "x".
        parts = clean_path(name[len(prefix) :].lstrip("/"))
        if parts is None:
            continue
        mtime = mtimes[index]
        node = root
        for part in parts[:-1]:
            child = node.dirs.get(part)
            if child is None:
                child = node.dirs[part] = DirNode(mtime=mtime, leaves=leaves)
            node = child
        leaf = parts[-1]
        if name.endswith("/"):
            existing = node.dirs.get(leaf)
            if existing is None:
                node.dirs[leaf] = DirNode(mtime=mtime, explicit=True, leaves=leaves)
            else:
                existing.explicit = True
                existing.mtime = mtime
            continue
        slot = found.get(id(node))
        if slot is None:
            slot = found[id(node)] = (node, array("i"))
        if leaf != name.rpartition("/")[2]:
            leaves.odd[index] = leaf
        elif clean_path(head[len(prefix) :].lstrip("/")) == parts[:-1] and head.startswith(prefix):
            parents[head] = slot[1]  # names under ``head`` with a plain leaf go straight here
        slot[1].append(index)
    for node, files in found.values():
        # Sorted by name, then record: a duplicate name's last record comes last.
        named = sorted(zip(map(leaves, files), files, strict=True))
        kept = array("i")
        for i, (name, index) in enumerate(named):
            if (i + 1 < len(named) and named[i + 1][0] == name) or name in node.dirs:
                continue  # duplicates keep the last record; a directory wins over a file
            kept.append(index)
        node.files = kept
    _settle_mtimes(root, mtimes)
    return root


def _settle_mtimes(root: DirNode, mtimes: array[int]) -> None:
    """Implicit directories take the newest mtime below them (iteratively, no recursion)."""
    order: list[DirNode] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.dirs.values())
    for node in reversed(order):
        if node.explicit and node is not root:
            continue
        times = [c.mtime for c in node.dirs.values()]
        if node.files:
            times.append(max(mtimes[i] for i in node.files))
        if times:
            node.mtime = max(times)


def walk_dirs(root: DirNode) -> Iterator[tuple[tuple[str, ...], DirNode]]:
    """Every directory below ``root`` with its path, parents first (iteratively)."""
    stack: list[tuple[tuple[str, ...], DirNode]] = [((), root)]
    while stack:
        path, node = stack.pop()
        for name, child in node.dirs.items():
            yield (*path, name), child
            stack.append(((*path, name), child))


def walk(
    root: DirNode, entries: Index, base: Sequence[str] = ()
) -> Iterator[tuple[tuple[str, ...], Entry]]:
    """Every file of the tree with its path, depth first (iteratively)."""
    stack: list[tuple[tuple[str, ...], DirNode]] = [(tuple(base), root)]
    while stack:
        path, node = stack.pop()
        for name, child in node.dirs.items():
            stack.append(((*path, name), child))
        for name, index in node.file_names():
            yield (*path, name), entries[index]
