"""``Flight`` and ``SingleFlight``: one fetch, many waiters, each getting exactly the result
(``None`` included), the error, or (their leader cancelled) a fetch of their own."""

from __future__ import annotations

import pytest
import trio

from taskfs.flight import Abandoned, Flight, SingleFlight


@pytest.mark.parametrize("value", [b"value", None])
async def test_single_flight_runs_once_and_every_caller_gets_its_value(
    value: bytes | None,
) -> None:
    """``None`` is a value ("this task has no archive"), given to every waiter as it is."""
    flights: SingleFlight[str, bytes | None] = SingleFlight()
    calls = 0
    results: list[bytes | None] = []

    async def fetch() -> bytes | None:
        nonlocal calls
        calls += 1
        await trio.sleep(0.01)
        return value

    async def user() -> None:
        results.append(await flights.run("k", fetch))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(user)
    assert calls == 1
    assert results == [value] * 10


async def test_single_flight_shares_errors_and_survives_cancel() -> None:
    flights: SingleFlight[str, bytes] = SingleFlight()

    async def fail() -> bytes:
        await trio.sleep(0.01)
        raise ValueError("boom")

    errors: list[BaseException] = []

    async def user() -> None:
        try:
            await flights.run("k", fail)
        except ValueError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(user)
    assert len(errors) == 3

    async def slow() -> bytes:
        await trio.sleep(10)
        return b"never"

    async def quick() -> bytes:
        return b"second"

    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await flights.run("j", slow)

        async def follow() -> None:
            await trio.sleep(0.01)
            got.append(await flights.run("j", quick))

        nursery.start_soon(lead)
        nursery.start_soon(follow)
        await trio.sleep(0.05)
        leader.cancel()
    assert got == [b"second"]


async def test_a_flight_gives_its_waiters_the_value_the_error_or_abandoned() -> None:
    landed: Flight[bytes | None] = Flight()
    failed: Flight[bytes] = Flight()
    dropped: Flight[bytes] = Flight()
    got: list[object] = []

    async def wait(flight: Flight[bytes] | Flight[bytes | None]) -> None:
        try:
            got.append(await flight.wait())
        except (ValueError, Abandoned) as exc:
            got.append(type(exc))

    async with trio.open_nursery() as nursery:
        for flight in (landed, failed, dropped):
            nursery.start_soon(wait, flight)
            nursery.start_soon(wait, flight)
        await trio.sleep(0.01)
        landed.land(None)
        failed.fail(ValueError("bad block"))
        dropped.abandon()
    assert sorted(map(repr, got)) == sorted(
        map(repr, [None, None, ValueError, ValueError, Abandoned, Abandoned])
    )
    landed.abandon()  # too late: it landed
    assert await landed.wait() is None
