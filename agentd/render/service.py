"""The renderer service: every template and bundle of the config, rendered again on change.

Theory of operation (decision 8):

- **Which secrets a template reads** is taken from its text (``secret('name')`` with a literal
  name, ``agentd.refs``, the rule config validation uses); only those secrets are handed to the
  worker (``agentd.render.pool``), and ``secret()`` with any other name fails the render. A
  target is rendered again only when the version of one of its inputs changes (a
  ``cache.listeners`` callback marks exactly the targets indexed under that secret whose last
  attempt saw another version), when its ``source`` file changes, or when its file drifted.
- **Each target** runs one task: wait for a request (``Target.wake``), render, write (batched
  with other targets' writes into one thread job, ``agentd.render.files``), and tell its command
  task (``agentd.render.commands``) when a file changed. Its progress is one explicit state,
  ``TargetState`` (``agentd.render.target``); what the target writes is its ``Output``
  (``agentd.render.outputs``).
- **Fail closed**: a render or write that fails keeps the last good file; the error is logged
  with the target and reason, counted, and retried with backoff; other targets go on.

Leftover temp files (``.NAME.agentd-tmp-*``), a stray ``..data_tmp`` and unreferenced version
directories are removed when the renderer starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agentd.backoff import Backoff
from agentd.cache import Cache
from agentd.config import Config
from agentd.errors import RenderError
from agentd.frozen import thaw
from agentd.refs import allowed, paths_of, template_refs, upstream_reply
from agentd.render.commands import serve_commands
from agentd.render.files import DATA_TMP, TMP_MARK, FileWrite, open_dir, remove_version, write_files
from agentd.render.outputs import Output, Written, outputs_of
from agentd.render.pool import RenderWorker
from agentd.render.target import WRITING_STATES, Target, TargetState, TargetStatistics

log = logging.getLogger("agentd.render")

WRITE_BATCH = 256               # rendered files written in one thread job (open fds: 2 each)
DRIFT_INTERVAL = 1.0            # at most one drift repair per target per this many seconds


class _Waiting(RenderError):
    """An input has no value yet (or was revoked): wait for a change, no backoff, no count."""


class _Revoked(_Waiting):
    """An input was revoked upstream: an error, and with ``on_revoke = "remove"`` the file goes."""


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
        self._paths: tuple[Config, dict[str, str]] | None = None   # see _by_path
        self._by_ref: dict[str, set[Target]] = {}                 # secret -> targets using it
        self._write_queue: list[_WriteJob] = []
        self._write_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._pending: list[Target] = [Target(config=o.config) for o in outputs_of(config)]

    # -- service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await trio.to_thread.run_sync(self._clean_all, [t.output for t in self._pending])
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
    def _clean_all(outputs: Iterable[Output]) -> None:
        done: set[tuple[Path, type]] = set()
        for output in outputs:
            directory = output.directory
            if (directory, type(output)) in done:
                continue
            done.add((directory, type(output)))
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                removed = output.clean(fd)
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

    def _by_path(self) -> dict[str, str]:
        """Upstream path -> declared secret name, for Go templates' ``secret "path"``."""
        if self._paths is None or self._paths[0] is not self.config:
            self._paths = (self.config, paths_of(self.config.secrets))
        return self._paths[1]

    def apply_config(self, config: Config) -> None:
        """Swap targets on reload: unchanged ones keep running, removed ones stop; every
        template's secrets are taken afresh (a reload is the admin accepting its sources)."""
        self.config = config
        for target in self.targets.values():
            target.baseline = None
        wanted = {o.key: o.config for o in outputs_of(config)}
        for key, target in list(self.targets.items()):
            if wanted.get(key) != target.config:
                target.cancel.cancel()
                self._set_refs(target, [])
                del self.targets[key]
                self._sources = None
        for key, c in wanted.items():
            if key not in self.targets:
                target = Target(config=c)
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
            if hit is not None and (key == str(path) or hit.output.links):
                candidates.append((hit, False))
        if self._sources is None:
            self._sources = {}
            for target in self.targets.values():
                if target.output.source is not None:
                    self._sources.setdefault(target.output.source, []).append(target)
        candidates += [(target, True) for target in self._sources.get(path, ())]
        for target, source in candidates:
            if source:
                target.mark("template source changed")
            elif target.state in WRITING_STATES:
                target.to(TargetState.WRITING_RECHECK)
            elif target.attempted_once.is_set() and target.fingerprint() != target.written:
                target.status.drift_repairs += 1
                log.warning("rendered file changed by someone else: writing it back",
                            extra={"target": target.key, "path": str(path)})
                target.mark("drift", drift=True)

    def watched_paths(self) -> list[Path]:
        """Directories the watcher should watch: template sources' and outputs' directories."""
        dirs: dict[Path, None] = {}
        for target in self.targets.values() or self._pending:
            if target.output.source is not None:
                dirs[target.output.source.parent] = None
            dirs[target.directory] = None
        return list(dirs)

    def statistics(self) -> dict[str, TargetStatistics]:
        """Per target (by its destination): counts and the last error. Never a value."""
        return {key: TargetStatistics(**t.status.__dict__)
                for key, t in sorted(self.targets.items())}

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
            if target.attempted is not None and target.state is TargetState.IDLE \
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
                    nursery.start_soon(serve_commands, target, self.backoff)
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
            target.to(TargetState.RENDERING)
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
                        await trio.to_thread.run_sync(target.output.remove)
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
        """RENDERING -> (WRITING ->) RENDERING -> IDLE, whatever happens."""
        try:
            return await self._render_once(target)
        finally:
            target.to(TargetState.IDLE)
            if target.attempted is not None and self._versions(target.refs) != target.attempted:
                target.mark("input changed during the render")

    async def _render_once(self, target: Target) -> bool:
        if target.output.source is not None:
            texts = await trio.to_thread.run_sync(target.texts)     # reads a file
        else:
            texts = target.texts()
        reader = target.config.reader
        by_path = self._by_path()
        refs: list[str] = []
        for text in texts.values():
            refs += template_refs(text, reader, by_path, template=target.key)
        refs = list(dict.fromkeys(refs))
        allow = target.config.allow
        if allow is None and target.baseline is None:
            target.baseline = frozenset(refs)
        outside = [n for n in refs if (not allowed(n, allow) if allow is not None
                                        else n not in (target.baseline or ()))]
        if outside:
            raise RenderError(
                f"{target.key}: the template now names {', '.join(map(repr, outside))}, "
                + ("outside its allow list" if allow is not None else
                   "which it did not name when the config was loaded (reload to accept)")
                + ": the last good file stays")
        if refs != target.refs:
            self._set_refs(target, refs)
        versions = self._versions(target.refs)
        target.attempted = versions
        data: dict[str, Any] = {}
        go = reader.name == "go"
        for name in target.refs:
            secret = self.config.secrets.get(name)
            if secret is None:
                raise RenderError(f"{target.key}: refers to undeclared secret {name!r}")
            got = self.cache.get(name)
            if got is None and self.is_revoked(name):
                raise _Revoked(f"{target.key}: secret {name!r} was revoked upstream")
            if got is None:
                raise _Waiting(f"{target.key}: secret {name!r} has no value "
                               "(not fetched yet, or revoked): waiting for it")
            if go:          # by upstream path, in OpenBao's reply shape (decision 3)
                left = None if got.expires_at is None else got.expires_at - time.time()
                reply = upstream_reply(secret.kind, thaw(got.data), version=got.version,
                                       expires_in=left)
                for path, owner in by_path.items():     # its API path and kv2's short one
                    if owner == name:
                        data[path] = reply
            else:
                data[name] = thaw(got.data)
        target.status.renders += 1
        outputs: dict[str, bytes] = {}
        for name, text in texts.items():
            try:
                outputs[name] = await self.worker.render(
                    text, data, go=reader.options(target.key) if go else None)
            except RenderError as exc:
                raise RenderError(f"{target.key}: {name}: {exc}") from None
        del data
        target.to(TargetState.WRITING)  # events meanwhile are looked at once the write is done
        try:
            changed, target.written = await self._write_queued(target, outputs)
        finally:
            recheck = target.state is TargetState.WRITING_RECHECK
            target.to(TargetState.RENDERING)
        if target.written is None or (recheck and target.fingerprint() != target.written):
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
        """In a thread: each output writes itself or hands back a ``FileWrite``; those go
        through ``write_files`` together (directories opened and checked once each)."""
        dirs: dict[Path, int] = {}         # opened and checked (a failure is not kept)
        files: list[tuple[_WriteJob, FileWrite]] = []
        try:
            for job in batch:
                try:
                    staged = job.target.output.write(job.outputs, dirs)
                except RenderError as exc:
                    job.error = exc
                    job.done = True
                    continue
                if isinstance(staged, FileWrite):
                    files.append((job, staged))
                    continue
                self._written(job, staged)
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

    def _written(self, job: _WriteJob, written: Written) -> None:
        """In a thread: a write that finished on its own; an old bundle version goes later."""
        if written.old_version and self._nursery is not None:
            trio.from_thread.run_sync(self._nursery.start_soon, self._remove_later,
                                      job.target.directory, written.old_version, written.grace)
        job.result = (written.changed, job.target.fingerprint())
        job.done = True

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
