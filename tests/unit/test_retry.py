"""Deadlines shared by one operation, and the circuit breaker (``taskfs.retry``), on trio's
mock clock: what a user waits for when the service is dead, and how soon it works again."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from taskfs.errors import NotFoundError, ServiceError
from taskfs.retry import Breaker, Retryable, RetryPolicy, operation_budget, with_retries


class Service:
    """A remote service that is up, refusing, or dead (every attempt hangs)."""

    def __init__(self) -> None:
        self.state = "up"
        self.attempts = 0

    async def call(self) -> str:
        self.attempts += 1
        if self.state == "dead":
            await trio.sleep_forever()
        if self.state == "refusing":
            raise Retryable("connection refused")
        if self.state == "404":
            raise NotFoundError("no such task")
        return "answer"


async def test_chained_calls_share_one_budget(autojump_clock: trio.testing.MockClock) -> None:
    service = Service()
    service.state = "dead"
    policy = RetryPolicy(deadline=10.0)
    start = trio.current_time()
    with operation_budget(10.0), pytest.raises(ServiceError):
        for _ in range(4):  # get_task, signed URL, tail, directory: one budget for all
            try:
                await with_retries(service.call, policy, "call")
            except ServiceError:
                if trio.current_time() - start >= 10.0:
                    raise
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_the_budget_binds_only_its_own_task(autojump_clock: trio.testing.MockClock) -> None:
    """Work started in the background (read-ahead) keeps its own deadline."""
    service = Service()
    results: list[str] = []
    policy = RetryPolicy(deadline=5.0)
    async with trio.open_nursery() as nursery:
        with operation_budget(1.0):
            await trio.sleep(2.0)  # the budget has run out for this task...

            async def background() -> None:
                results.append(await with_retries(service.call, policy, "prefetch"))

            nursery.start_soon(background)
            with pytest.raises(ServiceError, match="ran out of time"):
                await with_retries(service.call, policy, "late")
    assert results == ["answer"]  # ...not for the task it started


@pytest.mark.expected_warnings  # the breaker logs the outage once
async def test_breaker_fails_fast_then_probes(autojump_clock: trio.testing.MockClock) -> None:
    service = Service()
    breaker = Breaker("the API", probe_interval=1.0, probe_timeout=1.5)
    policy = RetryPolicy(deadline=10.0)
    service.state = "dead"
    start = trio.current_time()
    with pytest.raises(ServiceError):
        await with_retries(service.call, policy, "lookup", breaker)
    assert trio.current_time() - start == pytest.approx(10.0)  # one deadline, once
    assert breaker.is_open
    # The kernel's second LOOKUP, and every call after: no waiting.
    for _ in range(5):
        before = trio.current_time()
        with pytest.raises(ServiceError, match="unreachable"):
            await with_retries(service.call, policy, "lookup again", breaker)
        assert trio.current_time() == before
    # A probe is let through once a second, for at most probe_timeout.
    await trio.sleep(1.1)
    before = trio.current_time()
    with pytest.raises(ServiceError):
        await with_retries(service.call, policy, "probe", breaker)
    assert trio.current_time() - before == pytest.approx(1.5)
    # The service returns: within a probe interval the next call goes through and closes it.
    service.state = "up"
    await trio.sleep(1.1)
    assert await with_retries(service.call, policy, "back", breaker) == "answer"
    assert not breaker.is_open
    assert await with_retries(service.call, policy, "normal", breaker) == "answer"


@pytest.mark.expected_warnings
async def test_a_refusal_is_an_answer(autojump_clock: trio.testing.MockClock) -> None:
    service = Service()
    breaker = Breaker("the API")
    policy = RetryPolicy(deadline=2.0)
    service.state = "refusing"
    with pytest.raises(ServiceError):
        await with_retries(service.call, policy, "call", breaker)
    assert breaker.is_open
    await trio.sleep(1.1)
    service.state = "404"
    with pytest.raises(NotFoundError):
        await with_retries(service.call, policy, "probe", breaker)
    assert not breaker.is_open  # it answered: it is up
