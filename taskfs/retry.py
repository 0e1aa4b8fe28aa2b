"""Deadlines and retries for network operations, shared by the API client and range reader.

Owns: the retry loop (jittered exponential backoff, ``Retry-After`` honoured), which HTTP
statuses are worth another try and how ``Retry-After`` is read, the rule that one operation,
all its attempts and all its waits included, ends by its deadline, the budget that several
remote calls made for one user-visible operation share (``operation_budget``), and the
circuit breaker that remembers a service is down (``Breaker``).

Must stay true:
* an operation never outlives its deadline: each attempt runs under ``trio.fail_at`` of the
  overall deadline, and a wait that would end past it is not started; inside an
  ``operation_budget`` the deadline is also never later than the budget's end (only for the
  task that opened the budget: work it starts in the background has its own deadlines);
* only failures an attempt marks as ``Retryable`` are retried; anything else propagates at once;
* when retries run out the error is a ``ServiceError`` (EIO) chained to the last cause;
* a breaker that saw a call run out of time or retries answers later calls at once with
  ``ServiceError`` until one of them, let through as a probe at most once per
  ``probe_interval`` and limited to ``probe_timeout``, gets an answer from the service.

No I/O library is imported here; the callers classify their own exceptions.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import trio

from taskfs.errors import ServiceError, TaskfsError

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


# (the task that opened the budget, its end on trio's clock)
_BUDGET: contextvars.ContextVar[tuple[object, float] | None] = contextvars.ContextVar(
    "taskfs_operation_budget", default=None
)


@contextlib.contextmanager
def operation_budget(seconds: float) -> Iterator[None]:
    """Every remote call of this task inside the block ends by ``seconds`` from now, however
    many there are (a user waits for the whole operation, not for each call)."""
    task = trio.lowlevel.current_task()
    end = trio.current_time() + seconds
    outer = _BUDGET.get()
    if outer is not None and outer[0] is task:
        end = min(end, outer[1])
    token = _BUDGET.set((task, end))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _budget_end() -> float:
    budget = _BUDGET.get()
    if budget is None or budget[0] is not trio.lowlevel.current_task():
        return math.inf
    return budget[1]


class Breaker:
    """Remembers that a service is down, so that calls fail at once instead of each waiting
    out its deadline; lets one call through now and then to find out it is back."""

    def __init__(self, name: str, probe_interval: float = 1.0, probe_timeout: float = 1.5):
        self.name = name
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.down_since: float | None = None
        self.reason = ""
        self._last_probe = -math.inf
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self.down_since is not None

    def admit(self, what: str) -> float | None:
        """``None``: go ahead. A number: go ahead as the probe, for at most that long.
        ``ServiceError``: the service is down and a probe is not due."""
        if self.down_since is None:
            return None
        now = trio.current_time()
        if self._probing or now - self._last_probe < self.probe_interval:
            raise ServiceError(f"{what}: {self.name} is unreachable ({self.reason})")
        self._last_probe = now
        self._probing = True
        return self.probe_timeout

    def answered(self) -> None:
        """The service answered (whatever it said): it is up."""
        if self.down_since is not None:
            log.info("%s answers again", self.name)
        self.down_since = None
        self._probing = False

    def failed(self, error: ServiceError) -> None:
        """A call ran out of time or retries: the service is down (for now)."""
        if self.down_since is None:
            log.warning("%s is unreachable: %s", self.name, error)
            self.down_since = trio.current_time()
        self.reason = str(error)
        self._last_probe = trio.current_time()
        self._probing = False


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    breaker: Breaker | None = None,
) -> T:
    """Run ``attempt`` until it succeeds, fails for good, or the deadline passes: the policy's
    deadline, or the end of the ``operation_budget`` if sooner (or a probe's time limit)."""
    now = trio.current_time()
    end = min(now + policy.deadline, _budget_end())
    if end <= now:
        raise ServiceError(f"{what}: the operation ran out of time before this call")
    probe = breaker.admit(what) if breaker is not None else None
    if probe is not None:
        end = min(end, now + probe)
    try:
        result = await _retry_until(attempt, policy, what, end)
    except ServiceError as exc:
        if breaker is not None:
            breaker.failed(exc)
        raise
    except TaskfsError:
        if breaker is not None:
            breaker.answered()  # a refusal (404, 401, ...) is an answer: the service is up
        raise
    except BaseException:
        if breaker is not None:
            breaker._probing = False  # a cancelled probe: try another later
        raise
    if breaker is not None:
        breaker.answered()
    return result


async def _retry_until(
    attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str, end: float
) -> T:
    allowed = end - trio.current_time()
    last: Retryable | None = None
    tries = 0
    while True:
        tries += 1
        try:
            with trio.fail_at(end):
                return await attempt()
        except trio.TooSlowError:
            cause = f" (last error: {last})" if last is not None else ""
            raise ServiceError(f"{what}: no answer within {allowed:.3g} s{cause}") from last
        except Retryable as exc:
            last = exc
            delay = exc.retry_after if exc.retry_after is not None else policy.backoff(tries - 1)
            if trio.current_time() + delay >= end:
                spent = allowed - (end - trio.current_time())
                raise ServiceError(
                    f"{what}: {exc} (gave up after {tries} attempts in {spent:.1f} s)"
                ) from exc
            log.debug("%s: %s; retry %d in %.2f s", what, exc, tries, delay)
            await trio.sleep(delay)
