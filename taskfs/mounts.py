"""The kernel's table of mounts, ``/proc/self/mountinfo``, read in one place.

Owns: parsing the table (proc(5)) into ``MountEntry`` records, and the questions taskfs asks of
it: what is mounted at a path (the mount's parent waits for its child to come up; unmount and
``check_mountpoint`` ask), and which mounts lie below a directory (the service's packer stays
on one filesystem).

Must stay true: a path is compared as the kernel spells it, byte for byte: the table escapes
space, tab, newline and backslash as ``\\ooo`` octal and writes every other byte as it is
(UTF-8 names included, and names that are not UTF-8 at all), so the table is read as bytes,
unescaped, and decoded as ``os.fsdecode`` decodes paths (surrogate escapes for bad bytes).
Nothing here stats a path: the mount process must never touch its own mountpoint.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of the table: the fields taskfs uses."""

    device: str  # "major:minor"
    mountpoint: str
    options: frozenset[str]  # the mount's own (per-mount) options: ro, noexec, ...
    fstype: str
    source: str


def unescape(field: bytes) -> str:
    """A field of the table as the path (or name) it stands for."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_line(line: bytes) -> MountEntry | None:
    """One line of the table (``None``: not a line of it)."""
    fields = line.split()
    try:
        sep = fields.index(b"-", 6)
        return MountEntry(
            device=fields[2].decode("ascii"),
            mountpoint=unescape(fields[4]),
            options=frozenset(unescape(fields[5]).split(",")),
            fstype=unescape(fields[sep + 1]),
            source=unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
        )
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def mount_table(table: Path = MOUNTINFO) -> list[MountEntry]:
    """Every mount this process sees, in the table's order (later ones on top)."""
    try:
        data = table.read_bytes()
    except OSError:
        return []
    return [entry for line in data.splitlines() if (entry := parse_line(line)) is not None]


def mounted_at(path: str | os.PathLike[str], table: Path = MOUNTINFO) -> MountEntry | None:
    """The mount on top at ``path`` (made absolute, not resolved), if any."""
    target = os.path.abspath(path)
    found = None
    for entry in mount_table(table):
        if entry.mountpoint == target:
            found = entry  # the last mount on top wins
    return found


def mount_points_under(root: str, table: Path = MOUNTINFO) -> set[str]:
    """Paths below ``root`` (as ``realpath`` spells it) where a filesystem is mounted (bind
    mounts of the same filesystem included: their ``st_dev`` does not tell them apart)."""
    prefix = root.rstrip("/") + "/"
    return {e.mountpoint for e in mount_table(table) if e.mountpoint.startswith(prefix)}
