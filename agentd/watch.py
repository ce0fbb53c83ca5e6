"""File watching: hot reload of the config and template sources, drift repair of rendered files.

Theory of operation: one inotify instance (pyinotify's ``WatchManager``; this is the only module
that imports pyinotify) watches directories, never single files, because editors and config
management replace files by rename. Its fd is driven from trio with
``trio.lowlevel.wait_readable``: no thread, no pyinotify event loop. When the fd is readable, the
kernel's ``struct inotify_event`` records are read and turned into ``(path, mask)`` pairs here
(``parse_events``): pyinotify's own Notifier keeps every rename for a minute and scans them all
on each read, which made a burst of 1,000 rendered files cost the square of that. A queue
overflow (``IN_Q_OVERFLOW``) is logged; events were lost, so every watched directory is reported
as changed.

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

import errno
import logging
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyinotify
import trio

from agentd.render import DATA_TMP, TMP_MARK

if TYPE_CHECKING:
    from agentd.render import Renderer


class Reloader(Protocol):
    """What the watcher needs of the agent: the config file, and the reload it triggers."""

    config_path: Path | None
    reloads: int                 # grows with every applied reload (SIGHUP ones too)

    def reload(self) -> bool: ...

log = logging.getLogger("agentd.watch")

RELOAD_QUIET = 0.5
RELOAD_MAX = 5.0
RESYNC_EVERY = 5.0
MASK = (pyinotify.IN_CREATE | pyinotify.IN_DELETE | pyinotify.IN_MOVED_TO
        | pyinotify.IN_MOVED_FROM | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_ATTRIB
        | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF)


_EVENT = struct.Struct("iIII")       # struct inotify_event: wd, mask, cookie, len (then name)
READ_SIZE = 65536
# The renderer's own temp files and bundle swap link: five events per rendered file that
# nobody acts on (``Renderer.notify_path`` drops them too), skipped before any Path is made.
_OWN = (TMP_MARK.encode(), DATA_TMP.encode())


def parse_events(data: bytes, paths: dict[int, Path]) -> tuple[list[tuple[Path, int]], bool]:
    """The ``(path, mask)`` pairs in a buffer of inotify records, and whether the queue
    overflowed. Records of watches not in ``paths`` (just removed) are skipped."""
    events: list[tuple[Path, int]] = []
    overflow = False
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        if start + length > len(data):
            break                       # torn (the kernel never returns one; be safe anyway)
        name = data[start:start + length].rstrip(b"\0")
        offset = start + length
        if name and (_OWN[0] in name or name == _OWN[1]):
            continue
        if mask & pyinotify.IN_Q_OVERFLOW:
            overflow = True
            continue
        base = paths.get(wd)
        if base is not None:
            events.append((base / os.fsdecode(name) if name else base, int(mask)))
    return events, overflow


class Watcher:
    """Directories watched with inotify; ``await next_events()`` for what changed."""

    def __init__(self) -> None:
        self._events: list[tuple[Path, int]] = []
        self._wm = pyinotify.WatchManager()
        os.set_blocking(self._wm.get_fd(), False)
        self._wds: dict[Path, int] = {}
        self._paths: dict[int, Path] = {}

    def set_dirs(self, dirs: Iterable[Path]) -> None:
        """Watch exactly ``dirs`` (those that exist; missing ones are skipped)."""
        wanted = {Path(d) for d in dirs}
        for path in list(self._wds):
            if path not in wanted:
                wd = self._wds.pop(path)
                self._paths.pop(wd, None)
                self._wm.rm_watch(wd, quiet=True)
        for path in wanted - set(self._wds):
            if not path.is_dir():
                continue
            result = self._wm.add_watch(str(path), MASK, quiet=True)
            wd = result.get(str(path), -1)
            if wd >= 0:
                self._wds[path] = wd
                self._paths[wd] = path

    @property
    def dirs(self) -> list[Path]:
        return sorted(self._wds)

    async def next_events(self) -> list[tuple[Path, int]]:
        """Wait for at least one event and return every event read so far."""
        while not self._events:
            fd = self._wm.get_fd()
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, READ_SIZE)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                raise
            events, overflow = parse_events(data, self._paths)
            if overflow:
                log.warning("inotify queue overflowed: events were lost; "
                            "treating every watched directory as changed")
                events += [(path, pyinotify.IN_ATTRIB) for path in self._wds]
            self._events += events
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
    conf_d = config_path.parent / "conf.d"
    if path in (config_path, conf_d):
        return True
    return path.suffix == ".toml" and path.parent == conf_d


async def run(reloader: Reloader, renderer: Renderer, *,
              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Watch until cancelled; reload on config changes, hand file events to the renderer."""
    agent = reloader
    watcher = Watcher()
    try:
        def resync() -> None:
            watcher.set_dirs([*config_dirs(agent.config_path), *renderer.watched_paths()])

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
                        renderer.notify_path(path)
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
