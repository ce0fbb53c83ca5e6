"""Change commands: what runs after a target's files changed.

Theory of operation: a command is argv (no shell), run after a successful change, debounced by
``wait = {min, max}`` (quiet for ``min``, never later than ``max`` after the first change), one
at a time per target, in its own process group. After ``command_timeout`` the group gets
SIGTERM, then SIGKILL ``KILL_GRACE`` seconds later; its output (at most ``MAX_COMMAND_OUTPUT``
bytes) goes to the log; a failure is retried with backoff. ``serve_commands`` runs for as long as
its target (it is cancelled with it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import trio

from agentd.backoff import Backoff

if TYPE_CHECKING:
    from agentd.render.target import Target

log = logging.getLogger("agentd.render")

KILL_GRACE = 5.0                # seconds between SIGTERM and SIGKILL for a command
MAX_COMMAND_OUTPUT = 16384      # bytes of a command's output kept for the log


async def serve_commands(target: Target, backoff: tuple[float, float]) -> None:
    """Run ``target``'s command after each change (``target.command_wake``), until cancelled."""
    delays = Backoff(*backoff)
    c = target.config
    while True:
        await target.command_wake.wait()
        # debounce: quiet for wait.min, but never later than wait.max after the first change
        while c.wait.min > 0:
            first = target.first_change if target.first_change is not None else 0.0
            deadline = target.last_change + c.wait.min
            if c.wait.max > 0:
                deadline = min(deadline, first + max(c.wait.max, c.wait.min))
            if trio.current_time() >= deadline:
                break
            await trio.sleep_until(deadline)
        target.command_wake = trio.Event()
        target.first_change = None
        ok = await run_command(target)
        if ok:
            delays.reset()
            continue
        delay = delays.next_delay()
        log.warning("command will be retried", extra={"target": target.key,
                                                      "retry_in": round(delay, 3)})
        await trio.sleep(delay)
        target.command_wake.set()


async def run_command(target: Target) -> bool:
    """Run the command once; True when it exited 0 (counted and logged either way)."""
    started = time.monotonic()
    try:
        return await _run_command_timed(target)
    finally:
        target.status.command_seconds += time.monotonic() - started


async def _run_command_timed(target: Target) -> bool:
    c = target.config
    target.status.command_runs += 1
    try:
        proc = await trio.lowlevel.open_process(
            list(c.command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return _command_failed(target, f"cannot start: {exc.strerror or exc}", b"")
    output = bytearray()
    timed_out = False
    drained = trio.Event()
    async with trio.open_nursery() as nursery:
        async def collect() -> None:
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                if len(output) < MAX_COMMAND_OUTPUT:
                    output.extend(chunk[: MAX_COMMAND_OUTPUT - len(output)])
            drained.set()

        nursery.start_soon(collect)
        try:
            with trio.move_on_after(c.command_timeout) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                timed_out = True
                _killpg(proc, signal.SIGTERM)
                with trio.move_on_after(KILL_GRACE) as grace:
                    await proc.wait()
                if grace.cancelled_caught:
                    _killpg(proc, signal.SIGKILL)
                    await proc.wait()
            with trio.move_on_after(1):     # a daemonized child may keep the pipe open
                await drained.wait()
            nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    _killpg(proc, signal.SIGKILL)
                    await proc.wait()
                await close_pipes(proc)
    if timed_out:
        return _command_failed(
            target, f"timed out after {c.command_timeout:g}s: killed", bytes(output))
    if proc.returncode != 0:
        return _command_failed(target, f"exit status {proc.returncode}", bytes(output))
    log.info("command ran", extra={"target": target.key, "command": list(c.command),
                                   "output": output.decode("utf-8", "replace")})
    target.status.last_command_error = None
    return True


def _command_failed(target: Target, reason: str, output: bytes) -> bool:
    target.status.command_failures += 1
    target.status.last_command_error = reason
    log.error("command failed", extra={
        "target": target.key, "command": list(target.config.command), "error": reason,
        "output": output.decode("utf-8", "replace")})
    return False


async def close_pipes(proc: trio.Process) -> None:
    """Close a child's pipes (a reload command's here, the render worker's in pool.py): each
    is a descriptor of ours until it is closed."""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            await stream.aclose()


def _killpg(proc: trio.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
