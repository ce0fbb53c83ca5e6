"""Run a client as another uid: fork, drop to (uid, gid) with no supplementary groups (unless
given), call.

The child never touches trio: it uses the blocking ``agentd.client.Client``, sends back a JSON
result through a pipe and leaves with ``os._exit``. The parent reads the pipe in a worker thread so
the trio loop (and the agent running in it) keeps serving meanwhile.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import trio

from agentd.errors import RequestError


def _child(uid: int, gid: int, call: Callable[[], Any], write_fd: int,
           groups: Sequence[int] = ()) -> None:
    result: dict[str, Any]
    try:
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
        try:
            result = {"ok": True, "value": call()}
        except RequestError as exc:
            result = {"ok": False, "code": exc.code, "message": exc.message}
    except BaseException as exc:  # report, never return into the test runner
        result = {"ok": False, "code": "child-crashed", "message": repr(exc)}
    try:
        os.write(write_fd, json.dumps(result, default=str).encode())
    finally:
        os._exit(0)


def _fork(uid: int, gid: int, call: Callable[[], Any], groups: Sequence[int] = ()
          ) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(uid, gid, call, write_fd, groups)
    os.close(write_fd)
    return pid, read_fd


def _collect(pid: int, read_fd: int) -> dict[str, Any]:
    chunks = []
    with os.fdopen(read_fd, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks)) if chunks else {"ok": False, "code": "no-output"}


async def run_as(uid: int, gid: int, call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call()`` in a child process as ``uid``/``gid``.

    Returns {"ok": True, "value": ...} or {"ok": False, "code": <wire code>, "message": ...}.
    """
    pid, read_fd = _fork(uid, gid, call)
    return await trio.to_thread.run_sync(_collect, pid, read_fd)


def run_as_blocking(uid: int, gid: int, call: Callable[[], Any], *,
                    groups: Sequence[int] = ()) -> dict[str, Any]:
    """``run_as`` for tests with no trio loop (an agent in a subprocess); ``groups`` are the
    child's supplementary groups."""
    return _collect(*_fork(uid, gid, call, groups))
