"""The audit stream: one line per decision, coalesced (decision 10).

Theory of operation: ``record()`` is called for every decision on the main socket, the
credentials socket, ``watch`` and admin ops. It is sync, never blocks and never raises: it only
counts the record under its key (socket, op, decision, pid, process start time, uid, exe, unit,
name, version, stale, transport) in a bounded in-memory table. ``run()`` flushes the table every
``flush_interval``: one JSON line per key with the time of the key's first record and a
``count``, so a process reading the same version a thousand times a second costs one line a
second. Past ``max_pending`` distinct keys between two flushes, new keys are counted as
``dropped`` (metric, and one ``"decision": "dropped"`` line at the next flush) instead of growing
memory without bound.

A peer must not be able to flood the stream (issue 13, item 8). Refusals of a peer
(``COALESCED_BY_UID``: ``rate_limited``, ``pid_reused``, ``no_identity``) are keyed by socket, op,
decision and uid only, so a fork/connect/exit loop or a flood costs one line per uid and flush:
its pid, exe, unit and name are those of the first record of the group, ``count`` says how many
there were. String fields (exe, unit, name) are cut to ``MAX_FIELD_CHARS`` (head and tail kept,
``...`` between). A uid has at most ``MAX_KEYS_PER_UID`` distinct keys of decisions other than
``allow`` pending between two flushes (a peer asking for a new made-up name each time); past
that its records are counted as ``dropped`` like the ones over ``max_pending``.

Lines never carry a secret value (``record()`` has no argument for one). Keys are sorted::

    {"count":3,"decision":"allow","exe":"/usr/bin/app","name":"db","op":"get","pid":42,
     "socket":"main","stale":false,"time":"2025-01-01T00:00:00.000Z","uid":1000,
     "unit":"app.service","version":7}

A decision taken for the main socket's HTTP face carries ``"transport":"http"`` as well; lines
for v1 frames have no ``transport`` key (they are as they were before the HTTP face).

Sinks: ``cfg.path`` absolute -> a JSON-lines file (created 0600 with O_NOFOLLOW, missing parent
directories 0700), rotated by size to ``path.1`` .. ``path.<backups>``; ``"journal"`` ->
journald's native protocol (fields MESSAGE, SYSLOG_IDENTIFIER=agentd-audit, AGENTD_AUDIT=1,
PRIORITY=6), or stderr when there is no journal socket; None -> off. Writes run in a worker thread
(``trio.to_thread``); a failed write is counted in ``write_errors`` and logged once per burst of
failures, never raised to callers.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import trio

from agentd.cell import Cell
from agentd.config import AuditConfig
from agentd.readmodel import COUNTER, metric

log = logging.getLogger(__name__)

JOURNAL = "journal"
JOURNAL_SOCKET = "/run/systemd/journal/socket"  # read at each flush (tests patch it)
MAX_PENDING = 10_000
MAX_KEYS_PER_UID = 256     # distinct keys of non-allow decisions per uid between two flushes
MAX_FIELD_CHARS = 256      # exe, unit and name are cut to this many characters
COALESCED_BY_UID = frozenset({"rate_limited", "pid_reused", "no_identity"})
FINAL_FLUSH_TIMEOUT = 5.0  # seconds a flush at shutdown may take before lines are given up

# (socket, op, decision, pid, start_time, uid, exe, unit, name, version, stale, transport); pid
# is None in the key of a group coalesced by uid
_Key = tuple[str, str, str, int | None, int | None, int, str | None, str | None, str | None,
             int | None, bool | None, str | None]


@dataclass(frozen=True)
class AuditStatistics:
    records: int = metric("Audit records (before coalescing)", COUNTER,
                        name="agentd_audit_records")
    lines_written: int = metric("Audit lines written (after coalescing)", COUNTER,
                              name="agentd_audit_lines_written")
    dropped: int = metric("Audit records dropped (too many distinct records pending)", COUNTER,
                        name="agentd_audit_dropped")
    write_errors: int = metric("Failed audit writes", COUNTER, name="agentd_audit_write_errors")


class _Group:
    """Records under one key: when the first came, how many, and the first one's fields."""

    __slots__ = ("count", "first", "sample")

    def __init__(self, first: float, sample: _Key) -> None:
        self.first = first
        self.sample = sample
        self.count = 0


def _cap(text: str | None) -> str | None:
    """``text`` cut to ``MAX_FIELD_CHARS``, keeping its head and tail."""
    if text is None or len(text) <= MAX_FIELD_CHARS:
        return text
    half = (MAX_FIELD_CHARS - 3) // 2
    return text[:half] + "..." + text[-half:]


class _Sink(Protocol):
    def begin(self) -> None: ...
    def write_line(self, line: str) -> None: ...
    def end(self) -> None: ...
    def close(self) -> None: ...


def _iso(t: float) -> str:
    stamp = datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask


class _FileSink:
    """Appends to ``path``; rotates to ``path.1`` .. ``path.<backups>`` past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self._path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._size = 0

    def begin(self) -> None:
        # Reopen when someone else moved or removed the file (logrotate, an admin).
        if self._fd is None:
            return
        try:
            st = os.stat(self._path, follow_symlinks=False)
        except FileNotFoundError:
            self.close()
            return
        if (st.st_dev, st.st_ino) != self._id:
            self.close()

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode()
        fd = self._open()
        if self._size > 0 and self._size + len(data) > self._max_bytes:
            self._rotate()
            fd = self._open()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
            self._size += n

    def end(self) -> None:
        pass

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        _make_dirs(self._path.parent)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{self._path} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._id, self._size = fd, (st.st_dev, st.st_ino), st.st_size
        return fd

    def _rotate(self) -> None:
        self.close()
        base = str(self._path)
        if self._backups <= 0:
            os.unlink(base)
            return
        for i in range(self._backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{base}.{i}", f"{base}.{i + 1}")
        os.replace(base, f"{base}.1")


class _JournalSink:
    """journald's native protocol; stderr when there is no journal to talk to."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._warned = False

    def begin(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(1.0)

    def write_line(self, line: str) -> None:
        # json.dumps escapes newlines, so every value fits the simple KEY=VALUE form.
        payload = (f"MESSAGE={line}\nSYSLOG_IDENTIFIER=agentd-audit\nAGENTD_AUDIT=1\n"
                   "PRIORITY=6\n").encode()
        assert self._sock is not None
        try:
            self._sock.sendto(payload, JOURNAL_SOCKET)
        except (FileNotFoundError, ConnectionRefusedError):
            if not self._warned:
                log.warning("no journal at %s; audit lines go to stderr", JOURNAL_SOCKET)
                self._warned = True
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


class Audit:
    """Coalesces audit records and writes them out periodically.

    Start ``run()`` in the daemon's nursery; cancelling it flushes what is pending (for at most
    ``FINAL_FLUSH_TIMEOUT`` seconds) and closes the file. ``flush()`` is the sync equivalent for
    shutdown paths outside trio and for tests; ``close()`` releases the file without flushing.

    Args:
        cfg: the ``[audit]`` section.
        clock: wall-clock seconds, for each group's ``time``.
        max_pending: distinct keys kept between two flushes.

    Raises:
        ValueError: ``cfg.path`` is neither None, ``"journal"`` nor an absolute path.
    """

    def __init__(self, cfg: AuditConfig, *, clock: Callable[[], float] = time.time,
                 max_pending: int = MAX_PENDING) -> None:
        self._cfg = cfg
        self._clock = clock
        self._max_pending = max_pending
        self._sink: _Sink | None
        if cfg.path is None:
            self._sink = None
        elif cfg.path == JOURNAL:
            self._sink = _JournalSink()
        elif os.path.isabs(cfg.path):
            self._sink = _FileSink(Path(cfg.path), cfg.max_bytes, cfg.backups)
        else:
            raise ValueError("audit path must be absolute, 'journal', or None")
        self._pending: dict[_Key, _Group] = {}
        self._per_uid: dict[int, int] = {}     # non-allow keys pending, by uid
        self._dropped_pending = 0
        self._dropped_first = 0.0
        self._records = 0
        self._dropped = 0
        self._lines_written = 0
        self._write_errors = 0
        self._failing = False
        self._lock = threading.Lock()  # one writer at a time: run()'s thread or flush()
        # Batches taken from the table and not written yet, oldest first. run() queues one and
        # writes it in a worker thread; a sync flush() meanwhile writes it itself, first, so a
        # line recorded before flush() is in the sink when flush() returns, in order.
        self._unwritten: collections.deque[list[str]] = collections.deque()
        self.flushed: Cell[int] = Cell(0)  # number of completed flushes

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    def record(self, *, op: str, decision: str, pid: int, uid: int, exe: str | None = None,
               unit: str | None = None, name: str | None = None, version: int | None = None,
               stale: bool | None = None, start_time: int | None = None,
               socket: str = "main", transport: str | None = None) -> None:
        """Count one decision. Sync, never blocks, never raises.

        ``decision`` is e.g. "allow", "deny", "not_found", "unavailable", "error",
        "rate_limited"; ``socket`` is "main", "credentials", or "admin"; ``transport`` is
        "http" for the main socket's HTTP face, None for v1 frames (no key in the line).
        """
        if self._sink is None:
            return
        try:
            self._records += 1
            sample: _Key = (socket, op, decision, pid, start_time, uid, _cap(exe), _cap(unit),
                            _cap(name), version, stale, transport)
            key = sample
            if decision in COALESCED_BY_UID:
                key = (socket, op, decision, None, None, uid, None, None, None, None, None,
                       transport)
            group = self._pending.get(key)
            if group is None:
                per_uid = self._per_uid.get(uid, 0) if decision != "allow" else 0
                if (len(self._pending) >= self._max_pending
                        or per_uid >= MAX_KEYS_PER_UID):
                    if self._dropped_pending == 0:
                        self._dropped_first = self._clock()
                    self._dropped_pending += 1
                    self._dropped += 1
                    return
                if decision != "allow":
                    self._per_uid[uid] = per_uid + 1
                group = self._pending[key] = _Group(self._clock(), sample)
            group.count += 1
        except Exception:
            log.exception("audit record failed")

    def flush(self) -> None:
        """Write what is pending now, and what a running flush took and has not written yet.

        Sync: blocks on file or journal I/O (and on a write ``run()``'s thread has begun).
        """
        self._queue_pending()
        if self._unwritten:
            self._write_unwritten()
        self.flushed.set(self.flushed.value + 1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Flush every ``cfg.flush_interval`` until cancelled; then flush once more and close."""
        task_status.started()
        if self._sink is None:
            await trio.sleep_forever()
        try:
            while True:
                await trio.sleep(self._cfg.flush_interval)
                await self._flush_async(final=False)
        finally:
            with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                await self._flush_async(final=True)

    def close(self) -> None:
        """Close the audit file (it is reopened by the next write)."""
        if self._sink is not None:
            with self._lock:
                self._sink.close()

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(records=self._records, lines_written=self._lines_written,
                               dropped=self._dropped, write_errors=self._write_errors)

    async def _flush_async(self, *, final: bool) -> None:
        self._queue_pending()
        if self._unwritten or final:
            # The final flush may be abandoned by its timeout; the thread then finishes alone.
            await trio.to_thread.run_sync(self._write_unwritten, final,
                                          abandon_on_cancel=final)
        self.flushed.set(self.flushed.value + 1)

    def _queue_pending(self) -> None:
        """Take the table's lines into the queue of batches to write (trio thread)."""
        lines = self._take()
        if lines:
            self._unwritten.append(lines)

    def _take(self) -> list[str]:
        """Swap out the pending table and format it (trio thread: no lock needed)."""
        pending, self._pending = self._pending, {}
        self._per_uid = {}
        lines = [self._line(group) for group in pending.values()]
        if self._dropped_pending:
            line: dict[str, Any] = dict.fromkeys(
                ("socket", "pid", "uid", "unit", "exe", "name", "version", "stale"))
            line.update(time=_iso(self._dropped_first), op="audit", decision="dropped",
                        count=self._dropped_pending)
            lines.append(json.dumps(line, sort_keys=True, separators=(",", ":")))
            log.warning("audit dropped %d records: more than %d distinct keys pending, or "
                        "more than %d for one uid", self._dropped_pending, self._max_pending,
                        MAX_KEYS_PER_UID)
            self._dropped_pending = 0
        return lines

    @staticmethod
    def _line(group: _Group) -> str:
        (sock, op, decision, pid, _start_time, uid, exe, unit, name, version, stale,
         via) = group.sample
        obj = {"time": _iso(group.first), "socket": sock, "op": op, "decision": decision,
               "pid": pid, "uid": uid, "unit": unit, "exe": exe, "name": name,
               "version": version, "stale": stale, "count": group.count}
        if via is not None:
            obj["transport"] = via
        # ensure_ascii: an exe path with odd bytes (surrogate escapes) or newlines stays one line
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def _write_unwritten(self, close: bool = False) -> None:
        """Write the queued batches, oldest first (worker thread or sync flush); never raise."""
        sink = self._sink
        if sink is None:
            return
        with self._lock:
            while self._unwritten:
                self._write(sink, self._unwritten.popleft())
            if close:
                with contextlib.suppress(OSError):
                    sink.close()

    def _write(self, sink: _Sink, lines: list[str]) -> None:
        """Write ``lines`` to ``sink`` (under ``_lock``); count, never raise."""
        done = 0
        try:
            sink.begin()
            for line in lines:
                sink.write_line(line)
                done += 1
                self._lines_written += 1
        except (OSError, ValueError) as exc:
            self._write_errors += len(lines) - done
            with contextlib.suppress(OSError):
                sink.close()
            if not self._failing:
                self._failing = True
                log.error("audit write failed (%s); lines are being lost", exc)
        else:
            if self._failing:
                self._failing = False
                log.warning("audit writes work again after %d lost lines",
                            self._write_errors)
        finally:
            with contextlib.suppress(OSError):
                sink.end()
