"""Verifying a member's CRC-32 from pieces that arrive in any order.

Owns: ``Verifier``, which
keeps the CRC of every stretch of a member's uncompressed bytes seen so far, merges adjacent
stretches, and checks the member's CRC-32 the moment the stretches cover all of it.

Must stay true: a verifier is complete exactly when every byte of the member has been fed;
bytes fed again for a stretch already covered are not counted twice (the first bytes seen
for an offset are the ones checked); once complete it never changes its verdict. Memory is
one entry per disjoint stretch; readers feed stretches of at least tens of KiB.

CRCs come from zlib-ng (``zlib_ng``: its CRC-32 runs at about 27 GB/s here, CPython's zlib at
about 4; it also has ``crc32_combine``, which Python's ``zlib`` does not expose).
"""

from __future__ import annotations

import bisect

from zlib_ng import zlib_ng

from taskfs.errors import ChecksumError


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` given ``crc32(a)``, ``crc32(b)`` and ``len(b)``."""
    return zlib_ng.crc32_combine(crc1, crc2, len2)


class Verifier:
    """The CRC-32 of one member, assembled from stretches of its bytes in any order."""

    def __init__(self, name: str, size: int, crc: int) -> None:
        self.name = name
        self.size = size
        self.expected = crc
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._crcs: list[int] = []
        # None until every byte was seen; then whether the CRC matched.
        self.good: bool | None = None if size else crc == 0

    @property
    def complete(self) -> bool:
        return self.good is not None

    def stretches(self) -> int:
        return len(self._starts)

    def covered(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` has been seen entirely."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def check(self) -> None:
        """``ChecksumError`` if the member is known to be corrupt."""
        if self.good is False:
            raise ChecksumError(f"{self.name}: CRC-32 mismatch; the archive is corrupt")

    def feed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Note ``data`` as the member's bytes at ``offset``; ``ChecksumError`` if this
        completes the member and its CRC-32 does not match (and on every call after)."""
        if self.good is None:
            end = min(self.size, offset + len(data))
            view = memoryview(data)
            for start, stop in self._missing(max(0, offset), end):
                self._insert(start, stop, zlib_ng.crc32(view[start - offset : stop - offset]))
            self._check_complete()
        self.check()

    def feed_crc(
        self, offset: int, length: int, crc: int, data: bytes | bytearray | memoryview
    ) -> None:
        """``feed(offset, data)`` where ``crc`` is already known to be ``crc32(data)`` (the
        usual case, a stretch not seen yet, costs no pass over the bytes)."""
        end = min(self.size, offset + length)
        if self.good is None:
            if end == offset + length and self._missing(offset, end) == [(offset, end)]:
                self._insert(offset, end, crc)
                self._check_complete()
            else:
                self.feed(offset, data)
        self.check()

    def feed_chunks(self, offset: int, chunks: list[bytes]) -> None:
        """``feed`` of the concatenation of ``chunks`` at ``offset``, without joining them
        (the usual case, a stretch not seen yet, needs one CRC pass and one merge)."""
        length = sum(len(chunk) for chunk in chunks)
        end = min(self.size, offset + length)
        if self.good is None and self._missing(offset, end) == [(offset, offset + length)]:
            crc = 0
            for chunk in chunks:
                crc = zlib_ng.crc32(chunk, crc)
            self._insert(offset, offset + length, crc)
            self._check_complete()
        else:
            for chunk in chunks:
                self.feed(offset, chunk)
                offset += len(chunk)
        self.check()

    def _check_complete(self) -> None:
        if len(self._starts) == 1 and self._starts[0] == 0 and self._ends[0] == self.size:
            self.good = self._crcs[0] == self.expected

    def _missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not seen yet."""
        gaps = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        pos = start
        while pos < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if e <= pos:
                i += 1
                continue
            if s >= end:
                break
            if s > pos:
                gaps.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def _insert(self, start: int, end: int, crc: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._ends[i - 1] == start:  # joins the stretch before
            i -= 1
            crc = crc32_combine(self._crcs[i], crc, end - start)
            start = self._starts[i]
            del self._starts[i], self._ends[i], self._crcs[i]
        if i < len(self._starts) and self._starts[i] == end:  # joins the stretch after
            crc = crc32_combine(crc, self._crcs[i], self._ends[i] - end)
            end = self._ends[i]
            del self._starts[i], self._ends[i], self._crcs[i]
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        self._crcs.insert(i, crc)
