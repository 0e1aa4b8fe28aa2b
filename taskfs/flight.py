"""One result on its way, shared by everyone who waits for it.

Owns the two shapes of "fetched once, waited for by many" that taskfs has:

* ``Flight``: one result (a value, or the error that ended its making) that any number of
  tasks wait for; whoever makes it calls ``land``, ``fail`` or ``abandon``. The archive reader
  keeps one per block or member being fetched (one request may land many of them).
* ``SingleFlight``: concurrent ``run`` calls for one key make the value once; the others wait
  for that flight. The mount keeps one per task state, root listing and archive being opened.

Must stay true: a waiter gets exactly what the maker gave (``None`` included: "no archive" is
a value, not a missing one), or the maker's ``Exception``; a maker that was cancelled
(``abandon``) hands its cancellation to nobody: ``SingleFlight`` waiters then run the fetch
themselves, and ``Flight.wait`` raises ``Abandoned`` for its callers to start again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar, cast

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_PENDING = object()


class Abandoned(Exception):  # noqa: N818 - a state, not an error
    """The flight's maker was cancelled before it had a result: ask again."""


class Flight(Generic[V]):
    """One result on its way (see the module docstring)."""

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: object = _PENDING
        self._error: Exception | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def land(self, value: V) -> None:
        self._value = value
        self._event.set()

    def fail(self, error: Exception) -> None:
        self._error = error
        self._event.set()

    def abandon(self) -> None:
        """The maker was cancelled: waiters get ``Abandoned`` (unless it had landed)."""
        if not self.done:
            self._error = Abandoned()
            self._event.set()

    async def wait(self) -> V:
        """The value once it has landed, or the maker's error (``Abandoned``: ask again)."""
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return cast(V, self._value)


class SingleFlight(Generic[K, V]):
    """Run one fetch per key at a time; concurrent callers share its result or error."""

    def __init__(self) -> None:
        self._flights: dict[K, Flight[V]] = {}

    async def run(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        while (flight := self._flights.get(key)) is not None:
            try:
                return await flight.wait()
            except Abandoned:
                continue  # the leader's cancellation is not ours: try again
        flight = self._flights[key] = Flight()
        try:
            value = await fetch()
        except Exception as exc:
            flight.fail(exc)
            raise
        except BaseException:
            flight.abandon()
            raise
        finally:
            del self._flights[key]
        flight.land(value)
        return value
