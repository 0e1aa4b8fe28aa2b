"""The two deflate engines give the same bytes, whatever the data, level and step sizes.

The oracle is the standard library's ``zlib`` (neither engine's code): a stream compressed
by it is inflated by ISA-L as a sequential reader does (``FastDeflateCodec``) and by zlib-ng
as a random reader does (``DeflateCodec``, taking checkpoints; then again from each
checkpoint to the end), in steps of arbitrary input and output sizes.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskfs.archive import codecs
from taskfs.archive.codecs import Codec, DeflateCodec, FastDeflateCodec
from taskfs.errors import ArchiveError


def _data(draw: st.DrawFn) -> bytes:
    """Text-like, random or highly repetitive bytes (the ratios that move piece sizes)."""
    kind = draw(st.sampled_from(["text", "random", "runs"]))
    size = draw(st.integers(0, 300_000))
    rng = draw(st.randoms(use_true_random=False))
    if kind == "random":
        return rng.randbytes(size)
    if kind == "runs":
        return b"".join(bytes([rng.randrange(4)]) * rng.randrange(1, 5000) for _ in range(64))[
            :size
        ]
    words = [rng.randbytes(rng.randrange(1, 9)).hex().encode() for _ in range(200)]
    return b" ".join(rng.choice(words) for _ in range(size // 8))[:size]


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, bytes, int, int]:
    data = _data(draw)
    level = draw(st.sampled_from([0, 1, 6, 9]))
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    packed = packer.compress(data) + packer.flush()
    step_in = draw(st.sampled_from([97, 4096, 65536, 1 << 20]))
    step_out = draw(st.sampled_from([4000, 65536, 1 << 20]))
    return data, packed, step_in, step_out


def drive(codec: Codec, packed: bytes, start_in: int, step_in: int, step_out: int) -> bytes:
    """Run ``codec`` as the member cursor does: leftover input goes back in first."""
    out: list[bytes] = []
    pos, tail = start_in, b""
    while not codec.eof:
        if not tail:
            tail = packed[pos : pos + step_in]
            pos += len(tail)
        step = codec.run(tail, step_out, 1 << 18)
        assert step.chunks or step.consumed or tail, "input ended before the stream did"
        out += step.chunks
        tail = tail[step.consumed :]
    return b"".join(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_isal_and_zlib_ng_inflate_alike(stream: tuple[bytes, bytes, int, int]) -> None:
    data, packed, step_in, step_out = stream
    assert drive(FastDeflateCodec(), packed, 0, step_in, step_out) == data

    codec = DeflateCodec()
    points: list[tuple[int, int, codecs.CopyableInflater]] = []
    out: list[bytes] = []
    pos, tail, produced = 0, b"", 0
    while not codec.eof:
        if not tail:
            tail = packed[pos : pos + step_in]
            pos += len(tail)
        step = codec.run(tail, step_out, 1 << 16)
        if step.point is not None:
            got, used, state = step.point
            # A checkpoint pins at most a small piece of input (never a whole step).
            assert len(state.unconsumed_tail) <= codecs.SMALL_PIECE
            points.append((produced + got, pos - len(tail) + used, state))
        out += step.chunks
        produced += sum(map(len, step.chunks))
        tail = tail[step.consumed :]
    assert b"".join(out) == data
    for out_pos, in_pos, state in points[:4]:  # on from a checkpoint: the rest, exactly
        again = drive(DeflateCodec(state.copy()), packed, in_pos, step_in, step_out)
        assert again == data[out_pos:]


@pytest.mark.parametrize("codec", [FastDeflateCodec, DeflateCodec])
def test_corrupt_deflate_is_an_archive_error_in_both(codec: type[DeflateCodec]) -> None:
    with pytest.raises(ArchiveError, match="corrupt deflate"):
        codec().run(b"\xff" * 1000, 1 << 20, 1 << 62)


def test_one_method_name_table() -> None:
    assert codecs.method_name(93) == "zstd"
    assert codecs.method_name(8) == "deflate"
    assert codecs.method_name(77) == "method 77"
