"""Waiting helpers shared by the tests (agentd's own support modules are tested in test_support.py).

- ``await until(predicate)``: poll a condition from trio until it holds. The deadline is the
  caller's ``trio.fail_after`` (every I/O test has one), so a wait never outlives its test.
- ``wait_until(predicate, what, timeout)``: the same, blocking, for code with nothing to await
  (a container, a raft cluster being built), with its own deadline.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import trio

POLL = 0.05          # seconds between two looks at a condition polled from trio


async def until(
    predicate: Callable[[], object],
    what: str = "",
    *,
    proc: subprocess.Popen[bytes] | None = None,
    interval: float = POLL,
) -> None:
    """Return once ``predicate()`` is true, looking every ``interval`` seconds.

    ``what`` says what is awaited (it shows in the traceback when the caller's deadline fires).
    With ``proc``, fail at once if that child process exits meanwhile.
    """
    while not predicate():
        assert proc is None or proc.poll() is None, f"process {proc.args!r} exited ({what})"
        await trio.sleep(interval)


def wait_until(
    predicate: Callable[[], object], what: str, timeout: float = 30, *, interval: float = 0.1
) -> None:
    """Block until ``predicate()`` is true; raise AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
