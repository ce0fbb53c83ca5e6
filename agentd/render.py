"""Templates and bundles: sandboxed render, atomic file and bundle writes, change commands.

Theory of operation (decision 8):

- **Render** happens in a worker subprocess (``python -m agentd.render``), never on the trio
  thread and never in a thread: Jinja2's ``SandboxedEnvironment`` bounds neither time nor memory
  (``'x' * 10**8`` renders), and a thread cannot be killed. The worker gets one request at a time
  over a pipe (4-byte length + msgpack map: the template text, the data of the secrets it names,
  the output limit), renders with ``StrictUndefined`` and ``keep_trailing_newline`` (byte-exact
  output) and answers with the bytes or an error message scrubbed of secret values. The parent
  kills it (SIGKILL) when ``RENDER_TIMEOUT`` passes and starts a fresh one for the next request;
  the worker also runs under ``RLIMIT_AS`` and stops producing output past ``MAX_OUTPUT``. It is
  made non-dumpable like the agent, since it sees plaintext.
- **Which secrets a template reads** is taken from its text (``secret('name')`` with a literal
  name, the same rule config validation uses); only those secrets are handed to the worker, and
  ``secret()`` with any other name fails the render. A template is rendered again only when the
  version of one of its inputs changes (a ``cache.listeners`` callback marks exactly the
  targets indexed under that secret whose last attempt saw another version), when its
  ``source`` file changes, or when its file drifted.
- **Atomic write** (``write_file``): every step relative to an open directory fd. A random temp
  name is created with O_EXCL|O_NOFOLLOW and mode 0600, fchown'd and fchmod'ed to the final owner
  and mode before any byte is written, written, fsynced, renamed over the destination, and the
  directory fsynced. Identical output with the right mode and owner is not rewritten. A
  destination that is a symlink, or a directory writable by anyone but root or the agent, is
  refused.
- **Bundles** (``write_bundle``) use Kubernetes' AtomicWriter layout: files go into a fresh
  ``..<version>`` directory, ``..data`` is a symlink to it, each file name is a symlink to
  ``..data/<name>``; one rename of ``..data`` swaps the whole set, and the old version directory is
  removed after ``grace``.
- **Fail closed**: a render or write that fails keeps the last good file; the error is logged
  with the target and reason, counted, and retried with backoff; other targets go on.
- **Commands** run after a successful change: argv (no shell), debounced by ``wait = {min,
  max}``, one at a time per target, ``command_timeout`` then SIGTERM to the process group, then
  SIGKILL 5 s later; output captured into the log; a failure is retried with backoff.

Leftover temp files (``.NAME.agentd-tmp-*``), a stray ``..data_tmp`` and unreferenced version
directories are removed when the renderer starts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets as secrets_mod
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from agentd.backoff import Backoff
from agentd.cache import Cache, thaw
from agentd.config import BundleConfig, Config, TemplateConfig
from agentd.errors import AgentdError, RenderError
from agentd.refs import secret_refs

log = logging.getLogger("agentd.render")

RENDER_TIMEOUT = 5.0            # seconds a single render may take in the worker
MAX_BATCH = 64                  # render requests written to the worker at once
MAX_BATCH_BYTES = 4 << 20       # ...and at most this many bytes of them (at least one request)
WRITE_BATCH = 256               # rendered files written in one thread job (open fds: 2 each)
MAX_OUTPUT = 1 << 20            # bytes of output per file
WORKER_MEMORY = 1 << 30         # RLIMIT_AS of the worker
KILL_GRACE = 5.0                # seconds between SIGTERM and SIGKILL for a command
MAX_COMMAND_OUTPUT = 16384      # bytes of a command's output kept for the log
DRIFT_INTERVAL = 1.0            # at most one drift repair per target per this many seconds
TMP_MARK = ".agentd-tmp-"
DATA = "..data"
DATA_TMP = "..data_tmp"

class _Waiting(RenderError):
    """An input has no value yet (or was revoked): wait for a change, no backoff, no count."""


class _Revoked(_Waiting):
    """An input was revoked upstream: an error, and with ``on_revoke = "remove"`` the file goes."""


# --------------------------------------------------------------------------------------------
# The render worker (runs in its own process)
# --------------------------------------------------------------------------------------------


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _scrub(message: str, data: Mapping[str, Any]) -> str:
    """Remove every secret string from an error message (and keep it short)."""
    values: list[str] = []

    def collect(v: Any) -> None:
        if isinstance(v, Mapping):
            for x in v.values():
                collect(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                collect(x)
        elif isinstance(v, (str, bytes)) and len(v) >= 3:
            values.append(v if isinstance(v, str) else v.decode("utf-8", "replace"))

    collect(data)
    for v in sorted(values, key=len, reverse=True):
        message = message.replace(v, "***")
    return message[:300]


def _render_in_worker(env: Any, cache: dict[str, Any], request: Mapping[str, Any]) -> bytes:
    from types import MappingProxyType

    def freeze(v: Any) -> Any:
        if isinstance(v, dict):
            return MappingProxyType({k: freeze(x) for k, x in v.items()})
        if isinstance(v, list):
            return tuple(freeze(x) for x in v)
        return v

    data: Mapping[str, Any] = request["secrets"]
    frozen = {name: freeze(value) for name, value in data.items()}

    def secret(name: str) -> Any:
        if name not in frozen:
            raise RenderError(f"secret({name!r}): not available to this template "
                              "(undeclared, not fetched, or not named literally)")
        return frozen[name]

    text: str = request["template"]
    template = cache.get(text)
    if template is None:
        if len(cache) > 4096:
            cache.clear()
        template = cache[text] = env.from_string(text)
    limit: int = request["max_bytes"]
    out: list[bytes] = []
    size = 0
    for chunk in template.generate(secret=secret):
        piece = chunk.encode("utf-8", "surrogateescape")
        size += len(piece)
        if size > limit:
            raise RenderError(f"output larger than {limit} bytes")
        out.append(piece)
    return b"".join(out)


def worker_main() -> None:
    """The worker loop: read a request from stdin, write the answer to stdout, until EOF."""
    import base64
    import json
    import resource

    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    from agentd.crypto import harden_process

    harden_process()
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))

    def b64encode(value: Any) -> str:
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
        return base64.b64encode(raw).decode("ascii")

    def b64decode(value: Any) -> str:
        return base64.b64decode(str(value), validate=True).decode("utf-8", "surrogateescape")

    def tojson(value: Any) -> str:
        return json.dumps(thaw(value), sort_keys=True)

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True,
                               autoescape=False)
    env.filters.update(b64encode=b64encode, b64decode=b64decode, tojson=tojson)
    compiled: dict[str, Any] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack(">I", head)
        request = msgpack.unpackb(stdin.read(n), raw=False)
        try:
            reply: dict[str, Any] = {"ok": True,
                                     "output": _render_in_worker(env, compiled, request)}
        except MemoryError:
            reply = {"ok": False, "error": "out of memory while rendering"}
        except Exception as exc:  # any template error becomes a message
            name = type(exc).__name__
            reply = {"ok": False, "error": f"{name}: {_scrub(str(exc), request['secrets'])}"}
        stdout.write(_frame(reply))
        stdout.flush()


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
                [sys.executable, "-m", "agentd.render"],
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

    async def render(self, text: str, data: Mapping[str, Any]) -> bytes:
        job = _Job(_frame({"template": text, "secrets": dict(data), "max_bytes": self.max_bytes}))
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
                await _close_pipes(proc)

    async def aclose(self) -> None:
        await self._kill()


# --------------------------------------------------------------------------------------------
# Atomic writes (sync, blocking: called through trio.to_thread)
# --------------------------------------------------------------------------------------------


def _os_error(where: str, what: str, exc: OSError) -> RenderError:
    reason = exc.strerror or str(exc)
    hint = ""
    if exc.errno == errno.EROFS:
        hint = (" (under systemd, ProtectSystem=strict makes it read-only: add the directory to "
                "ReadWritePaths= in a drop-in)")
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = " (check the directory's permissions, or ReadWritePaths= under systemd)"
    elif exc.errno == errno.ENOSPC:
        hint = " (the file system is full)"
    return RenderError(f"{where}: {what}: {reason}{hint}")


def open_dir(path: Path) -> int:
    """Open a directory for ``write_file``/``write_bundle``; the caller closes the fd."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(str(path), "cannot open the directory", exc) from exc


def check_dir(dir_fd: int, where: str) -> None:
    """Refuse a directory that someone other than root or the agent could write to."""
    st = os.fstat(dir_fd)
    owners = {0, os.geteuid()}
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in owners:
        raise RenderError(f"{where}: directory is owned by uid {st.st_uid} (not root or the "
                          "agent): refusing to write there")
    if mode & 0o002 or (mode & 0o020 and st.st_gid not in {0, os.getegid()}):
        raise RenderError(f"{where}: directory is writable by others (mode {mode:04o}): "
                          "refusing to write there")


def _ids(uid: int | None, gid: int | None) -> tuple[int, int]:
    return (os.geteuid() if uid is None else uid, os.getegid() if gid is None else gid)


def _same_file(dir_fd: int, name: str, data: bytes, mode: int, uid: int, gid: int) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
        return False
    if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (mode, uid, gid):
        return False
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(len(data) + 1) == data
    finally:
        os.close(fd)


def _keep_backup(dir_fd: int, name: str) -> None:
    """Make ``name.bak`` the current inode of ``name``: link under a temp name, rename over."""
    link = f".{name}.bak{TMP_MARK}{secrets_mod.token_hex(8)}"
    os.link(name, link, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    try:
        os.rename(link, f"{name}.bak", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(link, dir_fd=dir_fd)
        raise


def write_file(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600,
               uid: int | None = None, gid: int | None = None, where: str = "",
               backup: bool = False) -> bool:
    """Atomically make ``name`` in ``dir_fd`` hold ``data`` with ``mode``/``uid``/``gid``.

    With ``backup``, the file being replaced is kept as ``name.bak``: a hard link to the old
    inode, so the backup has exactly the old file's owner and mode and is never copied through
    a moment with other permissions. Returns False when the file already was exactly that
    (nothing touched). Raises ``RenderError`` (the destination is kept as it was) on any failure.
    """
    result = write_files([FileWrite(dir_fd, name, data, mode=mode, uid=uid, gid=gid,
                                    where=where, backup=backup)])[0]
    if isinstance(result, RenderError):
        raise result
    return result


@dataclass
class FileWrite:
    """One file for ``write_files``: ``name`` in the open directory ``dir_fd``."""

    dir_fd: int
    name: str
    data: bytes = field(repr=False)
    mode: int = 0o600
    uid: int | None = None
    gid: int | None = None
    where: str = ""
    backup: bool = False
    tmp: str | None = None          # the staged temp file, while there is one
    fd: int | None = None

    @property
    def label(self) -> str:
        """How errors name the file."""
        return self.where or self.name


def _stage(w: FileWrite) -> bool:
    """Checks, then the temp file with its final owner and mode before any byte, written but
    not yet synced (``w.fd`` open). False: the destination already is exactly that."""
    where = w.label
    uid, gid = _ids(w.uid, w.gid)
    try:
        st: os.stat_result | None = os.stat(w.name, dir_fd=w.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _os_error(where, "cannot stat the destination", exc) from exc
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise RenderError(f"{where}: the destination is a symlink: refusing to write through it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RenderError(f"{where}: the destination is not a regular file")
    try:
        if st is not None and _same_file(w.dir_fd, w.name, w.data, w.mode, uid, gid):
            return False
    except OSError as exc:
        raise _os_error(where, "cannot read the destination", exc) from exc
    w.backup = w.backup and st is not None
    tmp = f".{w.name}{TMP_MARK}{secrets_mod.token_hex(8)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=w.dir_fd)
    except OSError as exc:
        raise _os_error(where, "cannot create a temp file", exc) from exc
    w.tmp, w.fd = tmp, fd
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, w.mode)
        view = memoryview(w.data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        _discard(w)
        raise _os_error(where, "cannot write", exc) from exc
    return True


def _discard(w: FileWrite) -> None:
    """Close and remove a staged temp file (after a failure)."""
    if w.fd is not None:
        with contextlib.suppress(OSError):
            os.close(w.fd)
        w.fd = None
    if w.tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(w.tmp, dir_fd=w.dir_fd)
        w.tmp = None


def write_files(writes: list[FileWrite]) -> list[bool | RenderError]:
    """``write_file`` for many files at once, with the same guarantees for each, in phases:
    stage every temp file (owner and mode set before any byte), fsync each, rename each over
    its destination, then fsync each directory once.

    The order is what makes a batch cheap: the first fsync commits the filesystem journal with
    every staged file in it, so the others find little left to do, and a directory holding a
    hundred renamed files is synced once. Every file is still durable before its rename, and
    every rename before the call returns. Per file: True (written), False (already exactly
    that, untouched) or the ``RenderError`` that kept its destination as it was.
    """
    results: list[bool | RenderError] = [False] * len(writes)
    staged: list[int] = []
    for i, w in enumerate(writes):
        try:
            if _stage(w):
                staged.append(i)
        except RenderError as exc:
            results[i] = exc
    synced: list[int] = []
    for i in staged:
        w = writes[i]
        assert w.fd is not None
        try:
            os.fsync(w.fd)
            os.close(w.fd)
            w.fd = None
        except OSError as exc:
            _discard(w)
            results[i] = _os_error(w.label, "cannot write", exc)
            continue
        synced.append(i)
    renamed: dict[int, list[int]] = {}
    for i in synced:
        w = writes[i]
        assert w.tmp is not None
        try:
            if w.backup:
                _keep_backup(w.dir_fd, w.name)
            os.rename(w.tmp, w.name, src_dir_fd=w.dir_fd, dst_dir_fd=w.dir_fd)
        except OSError as exc:
            _discard(w)
            results[i] = _os_error(w.label, "cannot write", exc)
            continue
        w.tmp = None
        results[i] = True
        renamed.setdefault(w.dir_fd, []).append(i)
    for dir_fd, done in renamed.items():
        try:
            os.fsync(dir_fd)
        except OSError as exc:
            for i in done:
                results[i] = _os_error(writes[i].label, "cannot fsync the directory", exc)
    return results


def clean_temps(dir_fd: int) -> list[str]:
    """Remove temp files left by an interrupted write (and a stray ``..data_tmp``)."""
    removed = []
    for name in os.listdir(dir_fd):
        if TMP_MARK in name or name == DATA_TMP:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
    return removed


def _readlink(name: str, dir_fd: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except (FileNotFoundError, OSError):
        return None


def _replace_symlink(dir_fd: int, target: str, name: str) -> None:
    tmp = f".{name}{TMP_MARK}{secrets_mod.token_hex(8)}"
    os.symlink(target, tmp, dir_fd=dir_fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def bundle_current(dir_fd: int, files: Mapping[str, bytes], modes: Mapping[str, int],
                   uid: int, gid: int) -> bool:
    """True when the live set already holds exactly ``files`` and every name links to it."""
    current = _readlink(DATA, dir_fd)
    if current is None or not current.startswith(".."):
        return False
    try:
        vfd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if sorted(os.listdir(vfd)) != sorted(files):
            return False
        for name, data in files.items():
            if not _same_file(vfd, name, data, modes[name], uid, gid):
                return False
            if _readlink(name, dir_fd) != f"{DATA}/{name}":
                return False
        return True
    finally:
        os.close(vfd)


def remove_output(c: TemplateConfig | BundleConfig) -> None:
    """``on_revoke = "remove"``: delete a template's file, or a bundle's file links and ``..data``
    (the version directories go with the usual cleanup). Errors are logged, never raised."""
    directory = c.directory if isinstance(c, BundleConfig) else c.destination.parent
    names = [*c.files, DATA] if isinstance(c, BundleConfig) else [c.destination.name]
    try:
        fd = open_dir(directory)
    except OSError as exc:
        log.error("cannot open the directory to remove a revoked file",
                  extra={"target": str(directory), "error": str(exc)})
        return
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
        os.fsync(fd)
    except OSError as exc:
        log.error("cannot remove a revoked file", extra={"target": str(directory),
                                                         "error": str(exc)})
    finally:
        os.close(fd)


def write_bundle(dir_fd: int, files: Mapping[str, bytes], *, modes: Mapping[str, int],
                 uid: int | None = None, gid: int | None = None, where: str = "") -> str | None:
    """Make ``files`` live together in the AtomicWriter layout.

    Returns None when nothing changed, else the name of the previous version directory (``""``
    if there was none), which the caller removes after the grace period.
    """
    uid, gid = _ids(uid, gid)
    try:
        if bundle_current(dir_fd, files, modes, uid, gid):
            return None
        old = _readlink(DATA, dir_fd)
        version = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets_mod.token_hex(6)}"
        os.mkdir(version, 0o755, dir_fd=dir_fd)
        vfd = os.open(version, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
        try:
            os.fchmod(vfd, 0o755)
            for name, data in files.items():
                write_file(vfd, name, data, mode=modes[name], uid=uid, gid=gid,
                           where=f"{where}/{name}")
        finally:
            os.close(vfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DATA_TMP, dir_fd=dir_fd)
        os.symlink(version, DATA_TMP, dir_fd=dir_fd)
        os.rename(DATA_TMP, DATA, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)   # the one swap
        for name in files:
            link = f"{DATA}/{name}"
            if _readlink(name, dir_fd) != link:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        raise RenderError(f"{where}/{name}: is a directory")
                except FileNotFoundError:
                    pass
                _replace_symlink(dir_fd, link, name)
        for name in os.listdir(dir_fd):
            target = _readlink(name, dir_fd)
            if (not name.startswith("..") and name not in files and target is not None
                    and target.startswith(f"{DATA}/")):
                os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise _os_error(where, "cannot write the bundle", exc) from exc
    return old or ""


def remove_version(dir_fd: int, version: str) -> None:
    """Remove an old version directory unless it is live again."""
    if version and version.startswith("..") and version not in (DATA, DATA_TMP) \
            and _readlink(DATA, dir_fd) != version:
        _remove_dir(dir_fd, version)


def _remove_dir(dir_fd: int, name: str) -> None:
    """Remove a version directory (plain files only) relative to ``dir_fd``; errors ignored."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return
    try:
        for entry in os.listdir(fd):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=dir_fd)


def clean_bundle(dir_fd: int) -> list[str]:
    """At start: temps, ``..data_tmp``, and version directories that ``..data`` does not name."""
    removed = clean_temps(dir_fd)
    live = _readlink(DATA, dir_fd)
    for name in os.listdir(dir_fd):
        if name.startswith("..") and name not in (DATA, DATA_TMP, live):
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    _remove_dir(dir_fd, name)
                    removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------
# Targets and the renderer service
# --------------------------------------------------------------------------------------------


@dataclass
class TargetStatus:
    """What ``status`` shows for one template or bundle. Never a value."""

    renders: int = 0
    writes: int = 0
    failures: int = 0
    drift_repairs: int = 0
    last_error: str | None = None
    last_ok_at: float | None = None
    command_runs: int = 0
    command_failures: int = 0
    last_command_error: str | None = None
    render_seconds: float = 0.0          # total time spent rendering and writing
    command_seconds: float = 0.0         # total time commands ran



@dataclass(eq=False)
class Target:
    """One ``[[template]]`` or ``[[bundle]]`` and its state."""

    config: TemplateConfig | BundleConfig
    status: TargetStatus = field(default_factory=TargetStatus)
    attempted: dict[str, int] | None = None       # input versions of the last attempt
    attempted_once: trio.Event = field(default_factory=trio.Event)
    wake: trio.Event = field(default_factory=trio.Event)
    command_wake: trio.Event = field(default_factory=trio.Event)
    refs: list[str] = field(default_factory=list)
    written: tuple[int, ...] | None = None          # lstat fingerprint after our last write
    last_render: float = -math.inf
    urgent: bool = True                             # False: only drift asked for a render
    writing: bool = False
    recheck: bool = False
    rendering: bool = False
    first_change: float | None = None
    last_change: float = 0.0
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def is_bundle(self) -> bool:
        return isinstance(self.config, BundleConfig)

    @property
    def key(self) -> str:
        c = self.config
        return str(c.directory if isinstance(c, BundleConfig) else c.destination)

    @property
    def directory(self) -> Path:
        c = self.config
        return c.directory if isinstance(c, BundleConfig) else c.destination.parent

    def texts(self) -> dict[str, str]:
        """File name -> template text (reads ``source``: blocking, call from a thread)."""
        c = self.config
        if isinstance(c, BundleConfig):
            return dict(c.files)
        if c.source is not None:
            try:
                return {c.destination.name: c.source.read_text(encoding="utf-8")}
            except (OSError, UnicodeDecodeError) as exc:
                raise RenderError(f"{c.destination}: cannot read the template "
                                  f"{c.source}: {exc}") from exc
        return {c.destination.name: c.contents or ""}

    def mark(self, reason: str, *, drift: bool = False) -> None:
        """Ask for a render; one asked for only because of drift is rate-limited."""
        log.debug("render requested", extra={"target": self.key, "reason": reason})
        if not drift:
            self.urgent = True
        self.wake.set()

    def fingerprint(self) -> tuple[int, ...] | None:
        """A cheap lstat-based fingerprint of what is on disk now (for drift detection)."""
        c = self.config
        try:
            if isinstance(c, BundleConfig):
                fd = os.open(c.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    live = _readlink(DATA, fd) or ""
                    parts: list[int] = [hash(live)]
                    for name in sorted(c.files):
                        parts.append(hash(_readlink(name, fd)))
                        st = os.stat(f"{live}/{name}", dir_fd=fd, follow_symlinks=False)
                        parts += [st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size]
                    return tuple(parts)
                finally:
                    os.close(fd)
            st = os.lstat(c.destination)
            return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
        except OSError:
            return None


def _modes(c: BundleConfig) -> dict[str, int]:
    return {name: c.modes.get(name, c.mode) for name in c.files}


@dataclass(eq=False)
class _WriteJob:
    target: Target
    outputs: Mapping[str, bytes] = field(repr=False)
    done: bool = False
    result: tuple[bool, tuple[int, ...] | None] | None = None
    error: RenderError | None = None


class Renderer:
    """Renders every template and bundle of the config, again when inputs change.

    ``run()`` is a service (started with ``nursery.start``); ``apply_config()`` swaps targets on
    reload; ``notify_path()`` is called by the watcher for source changes and drift;
    ``wait_first_pass()`` returns once each target was attempted once (decision 10).
    """

    def __init__(self, config: Config, cache: Cache, *, backoff: tuple[float, float] = (1.0, 60.0),
                 worker: RenderWorker | None = None,
                 is_revoked: Callable[[str], bool] = lambda name: False) -> None:
        self.config = config
        self.cache = cache
        self.is_revoked = is_revoked    # the refresher's: positive evidence of revocation
        self.backoff = backoff
        self.worker = worker or RenderWorker()
        self.targets: dict[str, Target] = {}
        self._sources: dict[Path, list[Target]] | None = None     # source file -> targets
        self._by_ref: dict[str, set[Target]] = {}                 # secret -> targets using it
        self._write_queue: list[_WriteJob] = []
        self._write_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._pending: list[Target] = [self._target(c) for c in self._configs(config)]

    @staticmethod
    def _configs(config: Config) -> list[TemplateConfig | BundleConfig]:
        return [*config.templates, *config.bundles]

    def _target(self, c: TemplateConfig | BundleConfig) -> Target:
        return Target(config=c)

    # -- service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await trio.to_thread.run_sync(self._clean_all, [t.config for t in self._pending])
                for target in self._pending:
                    self._start(target)
                self._pending = []
                nursery.start_soon(self._listen)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self.worker.aclose()

    def _start(self, target: Target) -> None:
        assert self._nursery is not None
        self.targets[target.key] = target
        self._sources = None
        target.mark("start")
        self._nursery.start_soon(self._run_target, target)

    @staticmethod
    def _clean_all(configs: Iterable[TemplateConfig | BundleConfig]) -> None:
        done: set[tuple[Path, bool]] = set()
        for c in configs:
            bundle = isinstance(c, BundleConfig)
            directory = c.directory if isinstance(c, BundleConfig) else c.destination.parent
            if (directory, bundle) in done:
                continue
            done.add((directory, bundle))
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                removed = clean_bundle(fd) if bundle else clean_temps(fd)
                if removed:
                    log.info("removed leftover temp files",
                             extra={"directory": str(directory), "count": len(removed)})
            except OSError as exc:
                log.warning("cannot clean leftover temp files",
                            extra={"directory": str(directory), "error": str(exc)})
            finally:
                os.close(fd)

    async def wait_first_pass(self) -> None:
        """Return once every target has been attempted at least once."""
        while True:
            for target in list(self.targets.values()) + list(self._pending):
                await target.attempted_once.wait()
            if not self._pending:
                return
            await trio.sleep(0.05)

    def apply_config(self, config: Config) -> None:
        """Swap targets on reload: unchanged ones keep running, removed ones stop."""
        self.config = config
        wanted = {str(c.directory if isinstance(c, BundleConfig) else c.destination): c
                  for c in self._configs(config)}
        for key, target in list(self.targets.items()):
            if wanted.get(key) != target.config:
                target.cancel.cancel()
                self._set_refs(target, [])
                del self.targets[key]
                self._sources = None
        for key, c in wanted.items():
            if key not in self.targets:
                target = self._target(c)
                if self._nursery is None:
                    self._pending.append(target)
                else:
                    self._start(target)

    def notify_path(self, path: Path) -> None:
        """A file changed on disk: re-render targets whose source it is or whose output drifted."""
        if TMP_MARK in path.name or path.name == DATA_TMP:
            return                                  # our own temp files
        candidates: list[tuple[Target, bool]] = []
        for key in (str(path), str(path.parent)):
            hit = self.targets.get(key)
            if hit is not None and (key == str(path) or hit.is_bundle):
                candidates.append((hit, False))
        if self._sources is None:
            self._sources = {}
            for target in self.targets.values():
                c = target.config
                if isinstance(c, TemplateConfig) and c.source is not None:
                    self._sources.setdefault(c.source, []).append(target)
        candidates += [(target, True) for target in self._sources.get(path, ())]
        for target, source in candidates:
            output = not source
            if source:
                target.mark("template source changed")
            elif output and target.writing:
                target.recheck = True
            elif output and target.attempted_once.is_set() and not target.writing \
                    and target.fingerprint() != target.written:
                target.status.drift_repairs += 1
                log.warning("rendered file changed by someone else: writing it back",
                            extra={"target": target.key, "path": str(path)})
                target.mark("drift", drift=True)

    def watched_paths(self) -> list[Path]:
        """Directories the watcher should watch: template sources' and outputs' directories."""
        dirs: dict[Path, None] = {}
        for target in self.targets.values() or self._pending:
            c = target.config
            if isinstance(c, TemplateConfig) and c.source is not None:
                dirs[c.source.parent] = None
            dirs[target.directory] = None
        return list(dirs)

    def statistics(self) -> dict[str, Any]:
        """Per target: counts and the last error. Never a value."""
        return {key: dict(t.status.__dict__) for key, t in sorted(self.targets.items())}

    # -- change detection

    def _versions(self, refs: Iterable[str]) -> dict[str, int]:
        out = {}
        for name in refs:
            info = self.cache.info(name)
            out[name] = info.version if info is not None else -1
        return out

    async def _listen(self) -> None:
        """Follow the cache's changes for as long as the renderer runs."""
        self.cache.listeners.append(self._input_changed)
        try:
            await trio.sleep_forever()
        finally:
            self.cache.listeners.remove(self._input_changed)

    def _input_changed(self, name: str, version: int) -> None:
        """A cache listener: ``name`` now has ``version`` (REMOVED: gone). Marks exactly the
        targets that read it and last rendered another version; one in the middle of a render
        compares again when it ends (``_render_target``)."""
        for target in self._by_ref.get(name, ()):
            if target.attempted is not None and not target.rendering \
                    and target.attempted.get(name) != version:
                target.mark("input changed")

    def _set_refs(self, target: Target, refs: list[str]) -> None:
        for name in target.refs:
            users = self._by_ref.get(name)
            if users is not None:
                users.discard(target)
                if not users:
                    del self._by_ref[name]
        target.refs = refs
        for name in refs:
            self._by_ref.setdefault(name, set()).add(target)

    # -- one target

    async def _run_target(self, target: Target) -> None:
        with target.cancel:                 # cancelled when a reload removes or changes it
            async with trio.open_nursery() as nursery:
                if target.config.command:
                    nursery.start_soon(self._run_commands, target)
                await self._render_loop(target)

    async def _render_loop(self, target: Target) -> None:
        backoff = Backoff(*self.backoff)
        while True:
            await target.wake.wait()
            target.wake = trio.Event()
            since = trio.current_time() - target.last_render
            if not target.urgent and since < DRIFT_INTERVAL:
                await trio.sleep(DRIFT_INTERVAL - since)    # rate-limit drift repair
            target.urgent = False
            target.last_render = trio.current_time()
            target.rendering = True
            started = time.monotonic()
            try:
                changed = await self._render_target(target)
            except _Revoked as exc:
                if target.status.last_error != str(exc):
                    remove = target.config.on_revoke == "remove"
                    log.error("an input of this template was revoked: "
                              + ("its file is removed" if remove else "the last file stays"),
                              extra={"target": target.key, "error": str(exc)})
                    target.status.failures += 1
                    if remove:
                        await trio.to_thread.run_sync(remove_output, target.config)
                target.status.last_error = str(exc)
                continue
            except _Waiting as exc:
                if target.status.last_error != str(exc):
                    # before the first fetch this is the normal start, not worth a warning
                    # per template (a thousand of them at a cold start)
                    level = logging.DEBUG if target.status.last_ok_at is None else logging.WARNING
                    log.log(level, "render waits for a secret; the last good file stays",
                            extra={"target": target.key, "error": str(exc)})
                target.status.last_error = str(exc)
                continue
            except RenderError as exc:
                target.status.failures += 1
                target.status.last_error = str(exc)
                delay = backoff.next_delay()
                log.error("render failed; the last good file stays",
                          extra={"target": target.key, "error": str(exc),
                                 "retry_in": round(delay, 3)})
                target.attempted_once.set()
                with trio.move_on_after(delay):
                    await target.wake.wait()
                target.mark("retry")
                continue
            finally:
                target.status.render_seconds += time.monotonic() - started
            backoff.reset()
            target.status.last_error = None
            target.status.last_ok_at = time.time()
            target.attempted_once.set()
            if changed:
                now = trio.current_time()
                if target.first_change is None:
                    target.first_change = now
                target.last_change = now
                target.command_wake.set()

    async def _render_target(self, target: Target) -> bool:
        try:
            return await self._render_once(target)
        finally:
            target.rendering = False
            if target.attempted is not None and self._versions(target.refs) != target.attempted:
                target.mark("input changed during the render")

    async def _render_once(self, target: Target) -> bool:
        c = target.config
        if isinstance(c, TemplateConfig) and c.source is not None:
            texts = await trio.to_thread.run_sync(target.texts)     # reads a file
        else:
            texts = target.texts()
        refs: list[str] = []
        for text in texts.values():
            refs += secret_refs(text)
        refs = list(dict.fromkeys(refs))
        if refs != target.refs:
            self._set_refs(target, refs)
        versions = self._versions(target.refs)
        target.attempted = versions
        data: dict[str, Any] = {}
        for name in target.refs:
            if name not in self.config.secrets:
                raise RenderError(f"{target.key}: refers to undeclared secret {name!r}")
            got = self.cache.get(name)
            if got is None and self.is_revoked(name):
                raise _Revoked(f"{target.key}: secret {name!r} was revoked upstream")
            if got is None:
                raise _Waiting(f"{target.key}: secret {name!r} has no value "
                               "(not fetched yet, or revoked): waiting for it")
            data[name] = thaw(got.data)
        target.status.renders += 1
        outputs: dict[str, bytes] = {}
        for name, text in texts.items():
            try:
                outputs[name] = await self.worker.render(text, data)
            except RenderError as exc:
                raise RenderError(f"{target.key}: {name}: {exc}") from None
        del data
        target.writing = True       # events meanwhile are looked at once the write is done
        target.recheck = False
        try:
            changed, target.written = await self._write_queued(target, outputs)
        finally:
            target.writing = False
        if target.written is None or (target.recheck and target.fingerprint() != target.written):
            target.mark("drift", drift=True)        # changed while we were writing
        if changed:
            target.status.writes += 1
            if target.attempted_once.is_set():
                log.info("rendered", extra={"target": target.key, "versions": versions})
        return changed

    async def _write_queued(self, target: Target, outputs: Mapping[str, bytes]
                            ) -> tuple[bool, tuple[int, ...] | None]:
        """Write ``outputs`` for ``target``: (changed, fingerprint after the write).

        Writes queue up while one is running in a thread; whoever holds the lock next takes
        up to ``WRITE_BATCH`` of them into one thread job (``_write_batch``), so a thousand
        templates rendered at once cost a few thread hand-offs and directory syncs, not a
        thousand of each. Raises the target's own RenderError.
        """
        job = _WriteJob(target, outputs)
        self._write_queue.append(job)
        try:
            async with self._write_lock:
                while not job.done:
                    batch = self._write_queue[:WRITE_BATCH]
                    del self._write_queue[:WRITE_BATCH]
                    if not batch:           # cannot happen; never spin if it does
                        raise RenderError(f"{target.key}: the write was lost")
                    try:
                        await trio.to_thread.run_sync(self._write_batch, batch)
                    except Exception as exc:    # a bug or an odd OSError: fail the batch, not
                        for other in batch:     # the renderer, and leave no job waiting
                            if not other.done:
                                other.error = RenderError(
                                    f"{other.target.key}: write failed: {type(exc).__name__}")
                                other.done = True
        finally:
            if not job.done and job in self._write_queue:
                self._write_queue.remove(job)   # cancelled: a removed target is not written
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _write_batch(self, batch: list[_WriteJob]) -> None:
        """In a thread: bundles one by one, plain files through ``write_files`` together
        (directories opened and checked once each)."""
        dirs: dict[Path, int] = {}         # opened and checked (a failure is not kept)
        files: list[tuple[_WriteJob, FileWrite]] = []
        try:
            for job in batch:
                c = job.target.config
                try:
                    if isinstance(c, BundleConfig):
                        job.result = (self._write_bundle(c, job.outputs),
                                      job.target.fingerprint())
                        job.done = True
                        continue
                    where = str(c.destination)
                    fd = dirs.get(c.destination.parent)
                    if fd is None:
                        fd = open_dir(c.destination.parent)
                        try:
                            check_dir(fd, where)
                        except RenderError:
                            os.close(fd)
                            raise
                        dirs[c.destination.parent] = fd
                    files.append((job, FileWrite(fd, c.destination.name,
                                                 job.outputs[c.destination.name], mode=c.mode,
                                                 uid=c.owner, gid=c.group, where=where,
                                                 backup=c.backup)))
                except RenderError as exc:
                    job.error = exc
                    job.done = True
            results = write_files([w for _, w in files])
            for (job, _), result in zip(files, results, strict=True):
                if isinstance(result, RenderError):
                    job.error = result
                else:
                    job.result = (result, job.target.fingerprint())
                job.done = True
        finally:
            for fd in dirs.values():
                os.close(fd)

    def _write_bundle(self, c: BundleConfig, outputs: Mapping[str, bytes]) -> bool:
        """In a thread: one bundle (plain templates go through ``write_files``)."""
        where = str(c.directory)
        try:
            os.mkdir(c.directory, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error(where, "cannot create the bundle directory", exc) from exc
        fd = open_dir(c.directory)
        try:
            check_dir(fd, where)
            old = write_bundle(fd, outputs, modes=_modes(c), uid=c.owner, gid=c.group,
                               where=where)
        finally:
            os.close(fd)
        if old is None:
            return False
        if old and self._nursery is not None:
            trio.from_thread.run_sync(self._nursery.start_soon, self._remove_later,
                                      c.directory, old, c.grace)
        return True

    async def _remove_later(self, directory: Path, version: str, grace: float) -> None:
        await trio.sleep(grace)

        def remove() -> None:
            with contextlib.suppress(OSError):
                fd = open_dir(directory)
                try:
                    remove_version(fd, version)
                finally:
                    os.close(fd)

        with contextlib.suppress(RenderError):
            await trio.to_thread.run_sync(remove)

    # -- commands

    async def _run_commands(self, target: Target) -> None:
        backoff = Backoff(*self.backoff)
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
            ok = await self._run_command(target)
            if ok:
                backoff.reset()
                continue
            delay = backoff.next_delay()
            log.warning("command will be retried", extra={"target": target.key,
                                                          "retry_in": round(delay, 3)})
            await trio.sleep(delay)
            target.command_wake.set()

    async def _run_command(self, target: Target) -> bool:
        started = time.monotonic()
        try:
            return await self._run_command_timed(target)
        finally:
            target.status.command_seconds += time.monotonic() - started

    async def _run_command_timed(self, target: Target) -> bool:
        c = target.config
        target.status.command_runs += 1
        try:
            proc = await trio.lowlevel.open_process(
                list(c.command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return self._command_failed(target, f"cannot start: {exc.strerror or exc}", b"")
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
                    await _close_pipes(proc)
        if timed_out:
            return self._command_failed(
                target, f"timed out after {c.command_timeout:g}s: killed", bytes(output))
        if proc.returncode != 0:
            return self._command_failed(target, f"exit status {proc.returncode}", bytes(output))
        log.info("command ran", extra={"target": target.key, "command": list(c.command),
                                       "output": output.decode("utf-8", "replace")})
        target.status.last_command_error = None
        return True

    def _command_failed(self, target: Target, reason: str, output: bytes) -> bool:
        target.status.command_failures += 1
        target.status.last_command_error = reason
        log.error("command failed", extra={
            "target": target.key, "command": list(target.config.command), "error": reason,
            "output": output.decode("utf-8", "replace")})
        return False


async def _close_pipes(proc: trio.Process) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            await stream.aclose()


def _killpg(proc: trio.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


if __name__ == "__main__":
    worker_main()


# --------------------------------------------------------------------------------------------
# agentd render --dry-run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedChange:
    """What a render would do to one file. ``reason`` never holds a value."""

    path: str
    action: str          # "create" | "update" | "unchanged" | "error"
    reason: str


def _compare(path: Path, data: bytes, mode: int, uid: int, gid: int, *,
             bundle: bool = False) -> PlannedChange:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return PlannedChange(str(path), "create", f"missing; would write {len(data)} bytes")
    except OSError as exc:
        return PlannedChange(str(path), "error", f"cannot stat: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode) and not bundle:
        return PlannedChange(str(path), "error", "the destination is a symlink: would refuse")
    try:
        current = path.read_bytes()
        st = path.stat()
    except OSError as exc:
        return PlannedChange(str(path), "error", f"cannot read: {exc.strerror}")
    reasons = []
    if current != data:
        reasons.append(f"content differs ({len(current)} -> {len(data)} bytes, values masked)")
    if stat.S_IMODE(st.st_mode) != mode:
        reasons.append(f"mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")
    if (st.st_uid, st.st_gid) != (uid, gid):
        reasons.append(f"owner {st.st_uid}:{st.st_gid} -> {uid}:{gid}")
    if reasons:
        return PlannedChange(str(path), "update", "; ".join(reasons))
    return PlannedChange(str(path), "unchanged", "identical")


async def dry_run(config: Config, fetch: Any) -> list[PlannedChange]:
    """What rendering ``config`` would change, file by file; nothing is written.

    ``fetch(name)`` is an async callable returning a secret's data (the CLI asks the running
    agent's socket, so the caller's own policies decide what it may see). Values never leave
    this function: the result holds paths, actions and reasons only.
    """
    plans: list[PlannedChange] = []
    worker = RenderWorker()
    try:
        for c in Renderer._configs(config):
            target = Target(config=c)
            try:
                texts = target.texts()
                data: dict[str, Any] = {}
                for text in texts.values():
                    for name in secret_refs(text):
                        if name not in data:
                            data[name] = thaw(await fetch(name))
                outputs = {n: await worker.render(t, data) for n, t in texts.items()}
            except (RenderError, AgentdError) as exc:
                plans.append(PlannedChange(target.key, "error", str(exc)))
                continue
            uid, gid = _ids(c.owner, c.group)
            if isinstance(c, BundleConfig):
                modes = _modes(c)
                for name, out in outputs.items():
                    plans.append(_compare(c.directory / name, out, modes[name], uid, gid,
                                          bundle=True))
            else:
                plans.append(_compare(c.destination, outputs[c.destination.name], c.mode,
                                      uid, gid))
    finally:
        await worker.aclose()
    return plans
