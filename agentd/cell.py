"""A latest-value cell: ``set()`` a value, ``await wait_changed(seen)`` for a newer one.

Consumers that fall behind skip intermediate values instead of queueing them, which is what a
token or a secret version needs (fan-out channels would buffer stale values without bound).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Cell(Generic[T]):
    """Holds one value and a generation counter that grows with each ``set()``."""

    def __init__(self, value: T) -> None:
        self._value = value
        self._generation = 0
        self._event = trio.Event()

    @property
    def value(self) -> T:
        return self._value

    @property
    def generation(self) -> int:
        return self._generation

    def set(self, value: T) -> None:
        """Store ``value`` and wake every waiter. Sync; safe from any trio task."""
        self._value = value
        self._generation += 1
        event, self._event = self._event, trio.Event()
        event.set()

    async def wait_changed(self, seen: int) -> tuple[int, T]:
        """Wait until the generation is past ``seen``; return (generation, value)."""
        while self._generation <= seen:
            await self._event.wait()
        await trio.lowlevel.checkpoint()
        return self._generation, self._value
