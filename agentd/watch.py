"""File watching: hot reload of the config and template sources, drift repair of rendered files.

Theory of operation: one inotify instance (pyinotify's ``WatchManager``; this is the only module
that imports pyinotify) watches directories, never single files, because editors and config
management replace files by rename. Its fd is driven from trio with
``trio.lowlevel.wait_readable``: no thread, no pyinotify event loop. When the fd is readable,
``Notifier.read_events()`` and ``process_events()`` turn the kernel's records into
``(path, mask)`` pairs.

Dispatch (``run``):

- the main config file or any ``conf.d/*.toml`` changed: the same reload as SIGHUP
  (``Agent.reload()``), debounced: a burst of changes (config management writing ten files) gives
  one reload, ``RELOAD_QUIET`` seconds after the last event and at most ``RELOAD_MAX`` after the
  first. An invalid new config is logged and the old one keeps running (``reload`` does that);
- anything else goes to ``Renderer.notify_path``: a template ``source`` changed (re-render), or a
  rendered file was deleted, replaced, chmod'ed or chown'ed (``IN_ATTRIB``): the renderer compares
  the file with what it last wrote and writes it back if it drifted (rate-limited there).

The watched set is recomputed after each reload (a SIGHUP one is noticed within
``RESYNC_EVERY`` seconds). ``Watcher.close()`` closes the inotify fd.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyinotify
import trio

if TYPE_CHECKING:
    from agentd.daemon import Agent

log = logging.getLogger("agentd.watch")

RELOAD_QUIET = 0.5
RELOAD_MAX = 5.0
RESYNC_EVERY = 5.0
MASK = (pyinotify.IN_CREATE | pyinotify.IN_DELETE | pyinotify.IN_MOVED_TO
        | pyinotify.IN_MOVED_FROM | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_ATTRIB
        | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF)


class _Collect(pyinotify.ProcessEvent):  # type: ignore[misc]
    def my_init(self, sink: list[tuple[Path, int]]) -> None:  # pyinotify's constructor hook
        self.sink = sink

    def process_default(self, event: Any) -> None:
        self.sink.append((Path(event.pathname), int(event.mask)))


class Watcher:
    """Directories watched with inotify; ``await next_events()`` for what changed."""

    def __init__(self) -> None:
        self._events: list[tuple[Path, int]] = []
        self._wm = pyinotify.WatchManager()
        self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=_Collect(sink=self._events),
                                            timeout=0)
        self._wds: dict[Path, int] = {}

    def set_dirs(self, dirs: Iterable[Path]) -> None:
        """Watch exactly ``dirs`` (those that exist; missing ones are skipped)."""
        wanted = {Path(d) for d in dirs}
        for path in list(self._wds):
            if path not in wanted:
                self._wm.rm_watch(self._wds.pop(path), quiet=True)
        for path in wanted - set(self._wds):
            if not path.is_dir():
                continue
            result = self._wm.add_watch(str(path), MASK, quiet=True)
            wd = result.get(str(path), -1)
            if wd >= 0:
                self._wds[path] = wd

    @property
    def dirs(self) -> list[Path]:
        return sorted(self._wds)

    async def next_events(self) -> list[tuple[Path, int]]:
        """Wait for at least one event and return every event read so far."""
        while not self._events:
            await trio.lowlevel.wait_readable(self._wm.get_fd())
            if self._notifier.check_events(timeout=0):
                self._notifier.read_events()
                self._notifier.process_events()
        events = list(self._events)
        self._events.clear()
        return events

    def close(self) -> None:
        self._wm.close()


def config_dirs(config_path: Path | None) -> list[Path]:
    if config_path is None:
        return []
    return [config_path.parent, config_path.parent / "conf.d"]


def is_config_event(config_path: Path | None, path: Path) -> bool:
    if config_path is None:
        return False
    if path == config_path or path == config_path.parent / "conf.d":
        return True
    return path.parent == config_path.parent / "conf.d" and path.suffix == ".toml"


async def run(agent: Agent, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
              ) -> None:
    """Watch until cancelled; reload on config changes, hand file events to the renderer."""
    watcher = Watcher()
    try:
        def resync() -> None:
            watcher.set_dirs([*config_dirs(agent.config_path), *agent.renderer.watched_paths()])

        resync()
        task_status.started()
        first = due = math.inf
        synced = agent.reloads
        while True:
            # wake at least every RESYNC_EVERY to pick up the paths of a SIGHUP reload
            with trio.move_on_at(min(due, trio.current_time() + RESYNC_EVERY)):
                events = await watcher.next_events()
                for path, _mask in events:
                    if is_config_event(agent.config_path, path):
                        now = trio.current_time()
                        first = min(first, now)
                        due = min(now + RELOAD_QUIET, first + RELOAD_MAX)
                    else:
                        agent.renderer.notify_path(path)
                continue
            if trio.current_time() >= due:
                first = due = math.inf
                log.info("config files changed: reloading")
                agent.reload()
            if agent.reloads != synced:
                synced = agent.reloads
                resync()
    finally:
        watcher.close()
