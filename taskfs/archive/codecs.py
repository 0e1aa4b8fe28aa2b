"""The decompressors of ZIP members, as ``zipfile`` keeps its table of them.

Owns: which compression methods taskfs reads and what each is called, the decoder of each
(deflate through zlib-ng or ISA-L, bzip2, the ZIP flavour of LZMA), one decoding step as the
member cursor drives it, and the errors a corrupt stream raises.

Deflate has two engines giving the same bytes (a property test holds them to it):

* zlib-ng, whose state can be copied: the checkpoints that make random reads of a large
  member cheap are copies of it (``DeflateCodec``);
* ISA-L, about 1.4x zlib-ng's speed here and 2x zlib's, whose state cannot be copied: used by
  a reader that starts at the beginning of a member and reads on in order, where a checkpoint
  would only be wanted by some later reader (``FastDeflateCodec``).

Input goes to the inflater in pieces sized from the member's ratio so far: pieces of 16 KiB
cost a third more CPU than pieces of 256 KiB (zlib's work per call), and a state copied where
input was left over pins that input (at most ``SMALL_PIECE`` of it here).
"""

from __future__ import annotations

import bz2
import lzma
from dataclasses import dataclass
from typing import Protocol, cast

from isal import isal_zlib
from zlib_ng import zlib_ng

from taskfs.archive.cache import Buffer
from taskfs.archive.zipindex import BZIP2, DEFLATED, LZMA, STORED, Entry
from taskfs.errors import ArchiveError, UnsupportedError

SUPPORTED = frozenset({STORED, DEFLATED, BZIP2, LZMA})
# Every method of the ZIP specification taskfs may meet, by the name users know it by.
METHOD_NAMES = {
    STORED: "stored",
    1: "shrink",
    6: "implode",
    DEFLATED: "deflate",
    9: "deflate64",
    BZIP2: "bzip2",
    LZMA: "lzma",
    93: "zstd",
    95: "xz",
    98: "ppmd",
}
# What the decompressors raise for corrupt input (bz2 raises OSError, lzma LZMAError).
# zlib-ng's and ISA-L's error classes (their stubs declare them as instances).
INFLATE_ERRORS = (cast(type[Exception], zlib_ng.error), cast(type[Exception], isal_zlib.error))
DECODE_ERRORS = (*INFLATE_ERRORS, OSError, EOFError, lzma.LZMAError, ValueError)
# Input handed to the inflater per call: between these, aiming at half the output still
# wanted (so most pieces are taken whole and a checkpoint can be copied after them).
SMALL_PIECE = 16 << 10
LARGE_PIECE = 256 << 10
# A deflate stream's output per input byte until it has shown its own.
FIRST_RATIO = 4


def method_name(method: int) -> str:
    return METHOD_NAMES.get(method, f"method {method}")


def check_supported(entry: Entry) -> None:
    """``UnsupportedError`` for members taskfs cannot read (encrypted, other methods)."""
    if entry.encrypted:
        raise UnsupportedError(f"{entry.name}: encrypted members cannot be read")
    if entry.method not in SUPPORTED:
        raise UnsupportedError(
            f"{entry.name}: compression {method_name(entry.method)} is not supported"
        )


class Inflater(Protocol):
    """A raw-deflate decompressor (zlib-ng's or ISA-L's; zlib-ng's stubs leave out ``copy``,
    and ISA-L's has none)."""

    unconsumed_tail: bytes
    eof: bool

    def decompress(self, data: Buffer, max_length: int = 0) -> bytes: ...


class CopyableInflater(Inflater, Protocol):
    def copy(self) -> CopyableInflater: ...


def inflater() -> CopyableInflater:
    """zlib-ng's inflate: about 1.3x zlib's speed here, and its state can be copied."""
    return cast(CopyableInflater, zlib_ng.decompressobj(-15))


def fast_inflater() -> Inflater:
    """ISA-L's inflate: faster, but its state cannot be copied."""
    return cast(Inflater, isal_zlib.decompressobj(-15))


@dataclass
class Step:
    """What one decoding step gave."""

    chunks: list[bytes]
    consumed: int  # input bytes the decoder took
    # (output produced, input consumed, state copy) at a clean point past ``due_at`` (deflate)
    point: tuple[int, int, CopyableInflater] | None = None


class Codec(Protocol):
    """A decoder as the member cursor drives it: ``run`` one step.

    ``returns_input``: the codec hands back what it did not take (``Step.consumed``; the
    cursor keeps the rest), else it keeps its leftover input itself (bzip2, lzma)."""

    returns_input: bool

    @property
    def eof(self) -> bool: ...

    def wants_input(self) -> bool: ...

    def run(self, data: Buffer, limit: int, due_at: int) -> Step: ...


class _Ratio:
    """Output per input byte of one deflate stream so far, for sizing its input pieces."""

    def __init__(self) -> None:
        self.inflated = 0
        self.consumed = 0

    def piece(self, room: int) -> int:
        ratio = self.inflated // self.consumed if self.consumed else FIRST_RATIO
        return max(SMALL_PIECE, min(LARGE_PIECE, room // (2 * max(1, ratio))))


def inflate(
    state: Inflater, data: Buffer, limit: int, due_at: int, ratio: _Ratio | None = None
) -> Step:
    """Inflate ``data`` until ``limit`` bytes come out; snapshot a copyable state at the first
    piece boundary at least ``due_at`` bytes of output in where no input is left over (so the
    snapshot holds nothing but the inflater's own state), else at the end if what is left
    over is at most ``SMALL_PIECE``."""
    ratio = ratio if ratio is not None else _Ratio()
    copy = getattr(state, "copy", None) if due_at < MAX_DUE else None
    view = memoryview(data)
    chunks: list[bytes] = []
    pos = produced = 0
    point = None
    while produced < limit:
        # Past the input, one call with none: ISA-L may hold output of input it has taken.
        piece = view[pos : pos + ratio.piece(limit - produced)]
        out = state.decompress(piece, limit - produced)
        taken = len(piece) - len(state.unconsumed_tail)
        pos += taken
        ratio.consumed += taken
        if out:
            chunks.append(out)
            produced += len(out)
            ratio.inflated += len(out)
        if state.eof or not piece or (not taken and not out):
            break
        if copy is not None and point is None and produced >= due_at and not state.unconsumed_tail:
            point = (produced, pos, copy())
    if (
        copy is not None
        and point is None
        and produced >= due_at
        and not state.eof
        and len(state.unconsumed_tail) <= SMALL_PIECE
    ):
        point = (produced, pos, copy())
    return Step(chunks, pos, point)


class DeflateCodec:
    """zlib-ng's inflate, from the start or from a checkpoint's copy; takes checkpoints."""

    returns_input = True

    def __init__(self, state: CopyableInflater | None = None) -> None:
        self.state = state if state is not None else inflater()
        self.ratio = _Ratio()

    @property
    def eof(self) -> bool:
        return self.state.eof

    def wants_input(self) -> bool:
        return True  # leftover input stays with the cursor, not in the inflater

    def run(self, data: Buffer, limit: int, due_at: int) -> Step:
        try:
            return inflate(self.state, data, limit, due_at, self.ratio)
        except INFLATE_ERRORS as exc:
            raise ArchiveError(f"corrupt deflate data: {exc}") from exc


class FastDeflateCodec(DeflateCodec):
    """ISA-L's inflate from the start of a member; takes no checkpoints."""

    def __init__(self) -> None:
        self.state = cast(CopyableInflater, fast_inflater())  # never copied: due_at is ignored
        self.ratio = _Ratio()

    def run(self, data: Buffer, limit: int, due_at: int) -> Step:
        return super().run(data, limit, MAX_DUE)


class StreamCodec:
    """bzip2 or lzma: the decoder keeps its own leftover input; no checkpoints."""

    returns_input = False

    def __init__(self, entry: Entry) -> None:
        self.decoder = decoder(entry)

    @property
    def eof(self) -> bool:
        return self.decoder.eof

    def wants_input(self) -> bool:
        return self.decoder.needs_input

    def run(self, data: Buffer, limit: int, due_at: int) -> Step:
        try:
            out = self.decoder.decompress(data, limit)
        except DECODE_ERRORS as exc:
            raise ArchiveError(f"corrupt compressed data: {exc}") from exc
        return Step([out] if out else [], len(data))


class Decoder(Protocol):
    """The interface of ``bz2.BZ2Decompressor``, for every method."""

    eof: bool
    needs_input: bool

    def decompress(self, data: Buffer, max_length: int = -1) -> bytes: ...


class _LzmaZip:
    """The ZIP flavour of LZMA: a 4-byte header and 5 bytes of properties, then raw LZMA1."""

    def __init__(self) -> None:
        self._head = b""
        self._inner: lzma.LZMADecompressor | None = None
        self.eof = False
        self.needs_input = True

    def decompress(self, data: Buffer, max_length: int = -1) -> bytes:
        if self._inner is None:
            self._head += data
            if len(self._head) < 4:
                return b""
            props_len = int.from_bytes(self._head[2:4], "little")
            if len(self._head) < 4 + props_len:
                return b""
            props = self._head[4 : 4 + props_len]
            if props_len != 5:
                raise ArchiveError("unsupported LZMA properties in ZIP member")
            lc_lp_pb, dict_size = props[0], int.from_bytes(props[1:5], "little")
            lc, rest = lc_lp_pb % 9, lc_lp_pb // 9
            lp, pb = rest % 5, rest // 5
            filters = [
                {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
            ]
            self._inner = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)
            data, self._head = self._head[4 + props_len :], b""
        out = self._inner.decompress(data, max_length)
        self.eof = self._inner.eof
        self.needs_input = self._inner.needs_input
        return out


class _Bz2:
    def __init__(self) -> None:
        self._inner = bz2.BZ2Decompressor()
        self.eof = False
        self.needs_input = True

    def decompress(self, data: Buffer, max_length: int = -1) -> bytes:
        out = self._inner.decompress(data, max_length)
        self.eof = self._inner.eof
        self.needs_input = self._inner.needs_input
        return out


class _Inflate:
    """Raw deflate with the bz2/lzma interface (for whole-member reads), through ISA-L."""

    def __init__(self) -> None:
        self._inner = fast_inflater()
        self.eof = False
        self.needs_input = True

    def decompress(self, data: Buffer, max_length: int = -1) -> bytes:
        tail = self._inner.unconsumed_tail
        out = self._inner.decompress(tail + data if tail else data, max(0, max_length))
        self.eof = self._inner.eof
        self.needs_input = not self._inner.unconsumed_tail
        return out


def decoder(entry: Entry) -> Decoder:
    """A decoder of ``entry``'s method (deflate, bzip2 or lzma)."""
    try:
        if entry.method == DEFLATED:
            return _Inflate()
        if entry.method == BZIP2:
            return _Bz2()
        return _LzmaZip()
    except (lzma.LZMAError, ValueError) as exc:
        raise ArchiveError(f"{entry.name}: {exc}") from exc


# ``due_at`` for a step that takes no checkpoint.
MAX_DUE = 1 << 62
