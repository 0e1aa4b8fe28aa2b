"""CRC-32 from pieces in any order (``taskfs.archive.verify``), against ``zlib.crc32``."""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskfs.archive.verify import Verifier, crc32_combine
from taskfs.errors import ChecksumError


@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_crc32_combine_is_zlibs(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_combine_long_lengths() -> None:
    a, b = b"x" * 1000, bytes(3 << 20)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _pieces(size: int, rng: random.Random, overlap: bool) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(0, 12))))
    bounds = [0, *cuts, size]
    pieces = list(itertools.pairwise(bounds))
    if overlap:  # re-reads of stretches already seen, partly overlapping others
        for _ in range(rng.randint(1, 6)):
            s = rng.randrange(size)
            pieces.append((s, min(size, s + rng.randint(1, size))))
    rng.shuffle(pieces)
    return pieces


@settings(max_examples=200)
@given(st.binary(min_size=2, max_size=5000), st.integers(0, 2**32), st.booleans())
def test_any_order_verifies_exactly_at_full_coverage(data: bytes, seed: int, overlap: bool) -> None:
    rng = random.Random(seed)
    pieces = _pieces(len(data), rng, overlap)
    good = Verifier("m", len(data), zlib.crc32(data))
    seen: set[int] = set()
    for start, end in pieces:
        assert not good.complete
        good.feed(start, data[start:end])
        seen.update(range(start, end))
        assert good.complete == (len(seen) == len(data))
        if good.complete:
            break
    assert good.good is True and good.stretches() == 1

    # One corrupted byte: whatever the order, the piece that completes the member raises.
    bad_at = rng.randrange(len(data))
    corrupt = bytearray(data)
    corrupt[bad_at] ^= 0xFF
    bad = Verifier("m", len(data), zlib.crc32(data))
    seen.clear()
    with pytest.raises(ChecksumError):
        for start, end in pieces:
            bad.feed(start, bytes(corrupt[start:end]))
            seen.update(range(start, end))
            assert len(seen) < len(data), "completed without an error"
    with pytest.raises(ChecksumError):
        bad.check()


def test_empty_member() -> None:
    assert Verifier("m", 0, 0).good is True
    assert Verifier("m", 0, 5).good is False


@settings(max_examples=100)
@given(st.binary(min_size=2, max_size=3000), st.integers(0, 2**32), st.booleans())
def test_feed_chunks_is_feed_of_the_joined_chunks(data: bytes, seed: int, corrupt: bool) -> None:
    rng = random.Random(seed)
    body = bytearray(data)
    if corrupt:
        body[rng.randrange(len(body))] ^= 1
    joined = Verifier("m", len(data), zlib.crc32(data))
    chunked = Verifier("m", len(data), zlib.crc32(data))
    for start, end in _pieces(len(data), rng, overlap=True):
        piece = bytes(body[start:end])
        cuts = sorted(rng.sample(range(len(piece) + 1), min(3, len(piece) + 1)))
        chunks = [piece[a:b] for a, b in itertools.pairwise([0, *cuts, len(piece)])]
        outcomes = [_outcome(partial(joined.feed, start, piece))]
        outcomes.append(_outcome(partial(chunked.feed_chunks, start, chunks)))
        assert chunked.good == joined.good
        assert outcomes[0] == outcomes[1]
    assert joined.good == chunked.good == (not corrupt)


def _outcome(feed: Callable[[], None]) -> str | None:
    try:
        feed()
    except ChecksumError:
        return "bad"
    return None
