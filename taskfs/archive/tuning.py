"""The sizes of the archive read path, in one frozen object passed in (as httpx's ``Limits``).

Owns: every size that decides how archive bytes are fetched, cached and decoded: blocks and
requests, read-ahead, batches of small members, which members are read whole, and the steps
and checkpoints of the decoders. ``RemoteArchive`` takes one (``DEFAULT`` unless told) and its
block fetcher and member readers read theirs from it; tests pass small ones to reach every
path with small archives, instead of patching module globals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tuning:
    # Blocks: aligned in the archive; consecutive missing ones go in one GET of at most
    # ``max_request``; the disk cache keeps them in files of ``segment`` blocks.
    block: int = 1 << 20
    max_request: int = 8 << 20
    segment: int = 4
    # A sequential reader's read-ahead: its first window, the requests it is fetched in
    # (several in flight on a capped link), how far out of order a read may come and still
    # count as following on (the kernel has several reads in flight), and its most.
    readahead_start: int = 1 << 20
    readahead_part: int = 4 << 20
    readahead_slack: int = 4 << 20
    readahead_max: int = 24 << 20
    # Batches of small members read in archive order: the first extra, the most one batch
    # keeps ahead, and the most one request of it carries.
    batch_start: int = 128 << 10
    batch_max: int = 8 << 20
    batch_part: int = 1 << 20
    # Members at most this large (compressed and uncompressed) are fetched and checked whole.
    small_compressed: int = 4 << 20
    small_size: int = 16 << 20
    # Decoding: output per step (and its least), input fed per step, how much a sequential
    # reader has decoded ahead of its last read, and the input above which a step runs in a
    # worker thread.
    step_out: int = 1 << 20
    min_step_out: int = 64 << 10
    step_in: int = 1 << 20
    inflate_ahead: int = 2 << 20
    thread_input: int = 64 << 10
    # A read further ahead than this repositions from a checkpoint instead of decoding on.
    far_ahead: int = 8 << 20
    # Deflate checkpoints: at least this far apart, at most this many per member.
    checkpoint_spacing: int = 1 << 20
    max_checkpoints: int = 256

    def is_small(self, compressed_size: int, size: int) -> bool:
        """Read whole (one fetch, verified before any byte is returned)?"""
        return compressed_size <= self.small_compressed and size <= self.small_size


DEFAULT = Tuning()
