"""Exponential backoff with full jitter and a cap (decision 9).

``Backoff(1, 60)`` gives delays drawn uniformly from [0, min(cap, base * 2**n)] on the n-th
consecutive failure; ``reset()`` after a success. Full jitter spreads a fleet that failed together.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for consecutive failures. Sync, never blocks; the caller sleeps."""

    def __init__(self, base: float, cap: float, *, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self, *, at_least: float = 0.0) -> float:
        """Count one more failure and return how long to wait before the next attempt.

        ``at_least`` raises the floor, e.g. for an upstream's Retry-After.
        """
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return max(at_least, self._rng.uniform(self.base / 2, ceiling))

    def reset(self) -> None:
        self.failures = 0


def jittered(interval: float, fraction: float = 0.1, *, rng: random.Random | None = None) -> float:
    """``interval`` spread by +-``fraction`` (a KV refresh of 300 s becomes 270..330 s)."""
    r = rng or random
    return max(0.0, interval * (1.0 + r.uniform(-fraction, fraction)))
