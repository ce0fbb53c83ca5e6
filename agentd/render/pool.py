"""The parent side of the render worker: one child process, pipelined requests, a kill on timeout.

``RenderWorker`` starts ``python -m agentd.render.worker`` (``agentd.render.worker``) on first
use, sends it batches of requests and reads the replies in order; a worker that takes longer
than ``timeout`` for one reply is killed (SIGKILL) and a fresh one takes the next request.
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from agentd import jsonnum
from agentd.errors import RenderError
from agentd.render.commands import close_pipes
from agentd.render.worker import _frame

RENDER_TIMEOUT = 5.0            # seconds a single render may take in the worker
MAX_BATCH = 64                  # render requests written to the worker at once
MAX_BATCH_BYTES = 4 << 20       # ...and at most this many bytes of them (at least one request)
MAX_OUTPUT = 1 << 20            # bytes of output per file


@dataclass(eq=False)
class _Job:
    """One render request waiting for (or holding) its place in a batch to the worker."""

    frame: bytes
    done: trio.Event = field(default_factory=trio.Event)
    output: bytes | None = None
    error: RenderError | None = None
    abandoned: bool = False         # its caller was cancelled: nobody waits for it

    def finish(self, reply: Mapping[str, Any]) -> None:
        if reply.get("ok"):
            self.output = reply["output"]
        else:
            self.error = RenderError(str(reply.get("error")))
        self.done.set()

    def fail(self, error: RenderError) -> None:
        self.error = error
        self.done.set()


class RenderWorker:
    """Parent side of the worker process; a timed-out worker is killed.

    Requests are pipelined: whoever holds the lock sends every request queued meanwhile (up to
    ``MAX_BATCH``) in one write and reads the replies in order, each within ``timeout`` of the
    one before. A thousand templates at a cold start thus cost a few round trips to the worker,
    not a thousand. A request that times out kills the worker and fails alone; the requests
    queued behind it go to a fresh worker. ``aclose()`` kills the process. ``render`` raises
    ``RenderError`` for template errors and timeouts.
    """

    def __init__(self, *, timeout: float = RENDER_TIMEOUT, max_bytes: int = MAX_OUTPUT) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._proc: trio.Process | None = None
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._queue: list[_Job] = []
        self.started = 0
        self.killed = 0
        self.batches = 0            # write-then-read rounds with the worker (statistics, tests)

    async def _start(self) -> trio.Process:
        # (no returncode check here: that is a waitpid per render; a worker that died while
        # idle shows as a broken pipe, and the batch then goes to a new one)
        if self._proc is None:
            self._proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "agentd.render.worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
            self._buf = bytearray()
            self.started += 1
        return self._proc

    async def _read_exactly(self, proc: trio.Process, n: int) -> bytes:
        assert proc.stdout is not None
        while len(self._buf) < n:
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                raise RenderError("the render worker exited")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def render(self, text: str, data: Mapping[str, Any], *,
                     go: Mapping[str, Any] | None = None) -> bytes:
        """Render ``text`` with ``data`` in the worker. Jinja2: ``data`` maps secret names to
        their data. Go (``go`` holds the engine's options, ``refs.Engine.options``): ``data``
        maps upstream paths to OpenBao-shaped replies (``refs.upstream_reply``).

        Raises:
            RenderError: the template failed, or the worker timed out (it is then replaced).
        """
        # packed apart: the worker reads a number kept as text (1e-7) the way the template's
        # engine does (decision 14)
        request: dict[str, Any] = {"template": text, "secrets": jsonnum.packb(dict(data)),
                                   "max_bytes": self.max_bytes}
        if go is not None:
            request["go"] = dict(go)
        job = _Job(_frame(request))
        self._queue.append(job)
        try:
            async with self._lock:
                while not job.done.is_set():
                    batch = self._take_batch()
                    if not batch:           # cannot happen; never spin if it does
                        raise RenderError("the render request was lost")
                    await self._run(batch)
        finally:
            if not job.done.is_set():           # cancelled: nobody needs it any more
                job.abandoned = True
                with contextlib.suppress(ValueError):
                    self._queue.remove(job)
        if job.error is not None:
            raise job.error
        assert job.output is not None
        return job.output

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        size = 0
        while self._queue and len(batch) < MAX_BATCH and (not batch or size < MAX_BATCH_BYTES):
            job = self._queue.pop(0)
            if job.abandoned:
                continue
            batch.append(job)
            size += len(job.frame)
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        """Render ``batch``; every job in it ends done, or back at the front of the queue."""
        try:
            while True:
                fresh = self._proc is None
                proc = await self._start()
                try:
                    await self._exchange(proc, batch)
                    return
                except trio.TooSlowError:
                    await self._kill()
                    pending = [j for j in batch if not j.done.is_set()]
                    pending[0].fail(RenderError(f"render took longer than {self.timeout:g}s: "
                                                "worker killed"))
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, RenderError) as exc:
                    await self._kill()
                    pending = [j for j in batch if not j.done.is_set()]
                    if fresh or len(pending) < len(batch):
                        error = RenderError("the render worker died")
                        error.__cause__ = exc
                        pending[0].fail(error)
                        return
                    # it died while idle (killed from outside): once more with a new one
        finally:
            pending = [j for j in batch if not j.done.is_set()]
            if pending:
                if self._proc is not None:
                    await self._kill()          # cancelled mid-batch: the pipes hold a part
                # for the next holder of the lock (a job whose caller is gone is dropped)
                self._queue[:0] = [j for j in pending if not j.abandoned]

    async def _exchange(self, proc: trio.Process, batch: list[_Job]) -> None:
        """Write every request of ``batch``, read the replies in order (each within
        ``timeout``). The writing runs beside the reading: a reply may fill the pipe before
        the last request is written."""
        assert proc.stdin is not None
        stdin = proc.stdin
        data = b"".join(job.frame for job in batch)
        self.batches += 1

        async def send() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stdin.send_all(data)

        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            try:
                for job in batch:
                    with trio.fail_after(self.timeout):
                        (n,) = struct.unpack(">I", await self._read_exactly(proc, 4))
                        reply = msgpack.unpackb(await self._read_exactly(proc, n), raw=False)
                    job.finish(reply)
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                    RenderError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self.killed += 1
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
                await close_pipes(proc)

    async def aclose(self) -> None:
        await self._kill()
