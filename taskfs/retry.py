"""Deadlines and retries for network operations, shared by the API client and range reader.

Owns: the retry loop (jittered exponential backoff, ``Retry-After`` honoured), which HTTP
statuses are worth another try and how ``Retry-After`` is read, and the rule that one
operation, all its attempts and all its waits included, ends by its deadline.

Must stay true:
* an operation never outlives its deadline: each attempt runs under ``trio.fail_at`` of the
  overall deadline, and a wait that would end past it is not started;
* only failures an attempt marks as ``Retryable`` are retried; anything else propagates at once;
* when retries run out the error is a ``ServiceError`` (EIO) chained to the last cause.

No I/O library is imported here; the callers classify their own exceptions.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from taskfs.errors import ServiceError

log = logging.getLogger(__name__)
T = TypeVar("T")

# HTTP statuses that may succeed if tried again (throttled, or the server failing for now).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), if present."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Retryable(Exception):  # noqa: N818 - it is a signal, not an error shown to users
    """Raised by an attempt that may succeed if tried again; ``retry_after`` overrides backoff."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff ``min(max_delay, base_delay * 2**n)`` with full jitter, within ``deadline``."""

    deadline: float = 10.0
    base_delay: float = 0.1
    max_delay: float = 2.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # noqa: S311


async def with_retries(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """Run ``attempt`` until it succeeds, fails for good, or ``policy.deadline`` passes."""
    end = trio.current_time() + policy.deadline
    last: Retryable | None = None
    tries = 0
    while True:
        tries += 1
        try:
            with trio.fail_at(end):
                return await attempt()
        except trio.TooSlowError:
            cause = f" (last error: {last})" if last is not None else ""
            raise ServiceError(f"{what}: no answer within {policy.deadline:g} s{cause}") from last
        except Retryable as exc:
            last = exc
            delay = exc.retry_after if exc.retry_after is not None else policy.backoff(tries - 1)
            if trio.current_time() + delay >= end:
                spent = policy.deadline - (end - trio.current_time())
                raise ServiceError(
                    f"{what}: {exc} (gave up after {tries} attempts in {spent:.1f} s)"
                ) from exc
            log.debug("%s: %s; retry %d in %.2f s", what, exc, tries, delay)
            await trio.sleep(delay)
