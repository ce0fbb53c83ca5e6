"""Composition root: build every component from the config and run them in one nursery.

Start order (decision 10):

1. harden the process (non-dumpable, no core dumps), then load nothing secret before that;
2. start the audit writer, restore the encrypted snapshot into the cache (stale, before the
   upstream is asked anything) with the leases, the token they hang on and each secret's
   schedule state (decision 12: a certificate within its validity is served as current and
   re-issued at its own re-issue point), and start its writer, then the authenticator (which
   logs in with backoff) and the refresher (which fetches every declared secret as soon as there
   is a token; restored ones when their own next step is due);
3. start the renderer (templates, bundles) and the file watcher (hot reload, drift repair);
   wait until every secret has a value (fetched or restored) and every template was rendered
   once, or ``ready_timeout`` at the latest, so a dead upstream on first boot or one broken
   template never blocks boot;
4. bind the socket (or take systemd's) and the private sockets of the uids and groups the
   policies name (decision 13), start accepting, then send ``READY=1``;
5. run until SIGTERM/SIGINT; on the way out write the snapshot, flush the audit stream, revoke
   a login token that no lease depends on, and remove the sockets.

Every long-running piece is ``async def run(..., task_status)`` and nothing holds a nursery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import signal
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from agentd import __version__, fsafe, logs, metrics, private, systemd, watch
from agentd import config as config_mod
from agentd.access import EXE_PATHS
from agentd.audit import Audit
from agentd.auth import Authenticator
from agentd.cache import Cache
from agentd.config import Config
from agentd.connectguard import open_guard
from agentd.creds import CredentialsServer, close_listener, open_credentials_listener
from agentd.crypto import Sealer, harden_process
from agentd.errors import ConfigError, UnsafePath
from agentd.listen import open_listener
from agentd.readmodel import as_status
from agentd.refresh import Refresher
from agentd.render import Renderer
from agentd.server import Server
from agentd.snapshot import Session, Snapshot, host_id
from agentd.upstream import Upstream

log = logging.getLogger("agentd.daemon")


class Agent:
    """One running agent: the components built from one config and their shared state."""

    def __init__(self, config: Config, *, config_path: Path | None = None) -> None:
        preflight(config, activated=systemd.socket_activated())  # before anything touches a path
        # Known before any upgrade replaces them, so a process still running an old binary
        # keeps matching (access.ExePaths).
        EXE_PATHS.prime(config.policies)
        self.config = config
        self.config_path = config_path or (config.files[0] if config.files else None)
        self.reloads = 0
        self.reload_failures = 0
        self.started_at = time.time()
        self.ready = trio.Event()
        self.host_id = host_id(override=config.agent.host_id)
        # per-host address order and schedule phases (decision 9)
        self.upstream = Upstream(config.upstream, order_seed=self.host_id, outage_gate=True)
        self.auth = Authenticator(config.upstream, self.upstream)
        self.cache = Cache(Sealer.generate())
        self.snapshot = Snapshot.from_config(config, host=self.host_id)
        self.snapshot.session_source = self._session
        self.audit = Audit(config.audit)
        self.refresher = Refresher(config, self.upstream, self.auth, self.cache,
                                   rng=random.Random(f"agentd-schedule:{self.host_id}"))
        self.snapshot.states_source = self.refresher.kinds.export_states
        self.snapshot.revoked_source = self.refresher.revoked_names
        self.server = Server(config, self.cache, self.refresher, self.audit, status=self.status)
        self.private = private.PrivateSockets(self.server, config.agent.socket)
        self.credentials = CredentialsServer(config, self.cache, self.refresher, self.audit)
        self.renderer = Renderer(config, self.cache, is_revoked=self.refresher.is_revoked)

    def _session(self) -> Session | None:
        """The login token, and the leases that depend on it, sealed into the snapshot: a
        restart neither logs in again nor re-reads a lease (decision 12). A token agentd did not
        log in for (a token file's) is the file's to keep, not ours."""
        leases = self.refresher.kinds.export_leases()
        token = self.auth.current()
        token = token if token is not None and token.from_login else None
        if token is None and not leases:
            return None
        return Session(token=token, leases=leases)

    def status(self) -> Mapping[str, Any]:
        """What ``agentd status`` shows: upstream, auth, every secret's state. Never a value."""
        up = self.upstream.statistics()
        auth = self.auth.statistics()
        secrets: dict[str, Any] = {}
        refresh_state = self.refresher.status()
        for name, secret in sorted(self.config.secrets.items()):
            info = self.cache.info(name)
            secrets[name] = {
                "kind": secret.kind,
                "path": secret.path,
                "version": info.version if info else None,
                "fetched_at": info.fetched_at if info else None,
                "stale": info.stale if info else None,
                **refresh_state[name],
            }
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "ready": self.ready.is_set(),
            "upstream": as_status(up),
            "auth": as_status(auth),
            "secrets": secrets,
            "counts": {
                "secrets": len(secrets),
                "cached": sum(1 for s in secrets.values() if s["version"] is not None),
                "stale": sum(1 for s in secrets.values() if s["stale"]),
                "templates": len(self.config.templates),
            },
            "server": as_status(self.server.statistics()),
            "credentials": as_status(self.credentials.statistics()),
            "snapshot": as_status(self.snapshot.statistics()),
            "alerts": {"policy_denied": self.refresher.policy_denied},
            "reloads": {"applied": self.reloads, "refused": self.reload_failures},
            "audit": as_status(self.audit.statistics()),
            "templates": {key: as_status(stats)
                          for key, stats in self.renderer.statistics().items()},
        }

    def reload(self) -> bool:
        """Re-read the config file and apply it without dropping the cache or the socket.

        An invalid new config is logged and the running one stays. Changes that need a restart
        (the socket, the upstream, the audit destination) are logged and not applied.
        Returns True when the new config was applied.
        """
        if self.config_path is None:
            return False
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            self.reload_failures += 1
            log.error(
                "reload refused: the new config is invalid; the running config stays",
                extra={"problems": exc.problems},
            )
            return False
        old = self.config
        for section in ("upstream", "audit"):
            if getattr(new, section) != getattr(old, section):
                log.warning("reload: changes to [%s] need a restart; not applied", section)
        if (new.agent.socket, new.agent.socket_mode, new.agent.socket_group,
                new.agent.credentials_socket, new.agent.private_sockets) != (
            old.agent.socket, old.agent.socket_mode, old.agent.socket_group,
            old.agent.credentials_socket, old.agent.private_sockets,
        ):
            log.warning("reload: changes to the socket need a restart; not applied")
        new = dataclasses.replace(
            new,
            upstream=old.upstream,
            audit=old.audit,
            agent=dataclasses.replace(
                new.agent,
                socket=old.agent.socket,
                socket_mode=old.agent.socket_mode,
                socket_group=old.agent.socket_group,
                credentials_socket=old.agent.credentials_socket,
                private_sockets=old.agent.private_sockets,
                connect_guard=old.agent.connect_guard,
            ),
        )
        self.config = new
        EXE_PATHS.prime(new.policies)   # the binaries the new rules name, as they are now
        self.refresher.apply_config(new)
        self.server.config = new
        self.credentials.config = new
        self.renderer.apply_config(new)
        logs.set_level(new.agent.log_level)
        self.reloads += 1
        log.info(
            "config reloaded",
            extra={"secrets": len(new.secrets), "policies": len(new.policies)},
        )
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the agent until cancelled. ``task_status.started()`` fires at READY."""
        config = self.config
        listener: socket.socket | None = None
        creds_listener: socket.socket | None = None
        activated = systemd.listen_fds()
        try:
            async with trio.open_nursery() as nursery:
                # From the start, not from READY: waiting for the first values can take up to
                # ready_timeout, and a loop wedged meanwhile must be restarted too.
                interval = systemd.watchdog_interval()
                if interval:
                    nursery.start_soon(_watchdog, interval)
                await nursery.start(self.audit.run)
                # the snapshot first, before the upstream is asked anything (decision 6)
                restored = self.snapshot.load_into(self.cache, names=set(config.secrets))
                session = self.snapshot.restored_session
                if session is not None:     # leases live on with the token that created them
                    self.refresher.kinds.restore_leases(
                        session.leases, config.secrets,
                        token=None if session.token is None else session.token.value)
                    if session.token is not None:
                        self.auth.restore(session.token)
                # each restored value's first step comes from its kind's state (decision 12)
                self.refresher.restore(restored, self.snapshot.restored_states,
                                       self.snapshot.restored_revoked)
                await nursery.start(self.snapshot.run, self.cache)
                await nursery.start(self.upstream.run)    # health probes of down addresses
                nursery.start_soon(self.auth.run)
                await nursery.start(self.refresher.run)
                await nursery.start(metrics.run, self)      # [metrics] listen / textfile
                await nursery.start(self.renderer.run)      # templates and bundles
                await nursery.start(watch.run, self, self.renderer)   # reload, drift repair
                with trio.move_on_after(config.agent.ready_timeout) as waited:
                    await self.refresher.wait_all_fetched()
                    await self.renderer.wait_first_pass()   # first render (decision 10)
                if waited.cancelled_caught:
                    log.warning(
                        "ready_timeout passed before every secret was fetched",
                        extra={"ready_timeout": config.agent.ready_timeout},
                    )
                if activated:
                    listener = activated[0]
                    for extra in activated[1:]:
                        extra.close()
                    # systemd listened with its own Backlog=; while agentd accepts, the server
                    # sizes the queue (decision 13), and it is made deep again at exit
                else:
                    listener = open_listener(
                        config.agent.socket,
                        mode=config.agent.socket_mode,
                        group=config.agent.socket_group,
                        backlog=config.agent.listen_backlog,
                    )
                # a queue per uid and group named, there before anything is served
                await nursery.start(self.private.run)
                await nursery.start(self.server.serve, listener)
                if config.agent.credentials_socket is not None:
                    creds_listener = open_credentials_listener(config.agent.credentials_socket)
                    await nursery.start(self.credentials.serve, creds_listener)
                self.ready.set()
                systemd.notify("READY=1")
                log.info(
                    "agentd ready",
                    extra={"socket": str(config.agent.socket), "secrets": len(config.secrets),
                           "version": __version__},
                )
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                systemd.notify("STOPPING=1")
                await self.snapshot.flush(self.cache)
                self.audit.flush()
                # The login token is kept, sealed in the snapshot just flushed: the next start
                # uses it (if lookup-self still accepts it) instead of logging in (decision 12).
                # Without a snapshot nothing can use it again: revoke it, unless leases hang on it.
                if not self.snapshot.enabled and not self.refresher.kinds.holds_leases():
                    await self.auth.revoke()
                await self.upstream.aclose()
            if listener is not None:
                if activated:
                    # systemd keeps this socket across the restart: let clients queue deep
                    # while nobody accepts (they are not competing with a storm then)
                    with contextlib.suppress(OSError):
                        listener.listen(socket.SOMAXCONN)
                listener.close()
                if not activated:
                    _unlink_socket(config.agent.socket)
            if creds_listener is not None and config.agent.credentials_socket is not None:
                close_listener(creds_listener, config.agent.credentials_socket)


def preflight(config: Config, *, activated: bool) -> None:
    """Refuse to start on filesystem mistakes that would otherwise surface late or be exploited.

    Checked before anything else starts (no login, no snapshot read): the sockets' and the
    state directory's paths must resolve through directories only root or the agent's user can
    change (``fsafe``; a missing directory is judged by the nearest one that exists, where it
    will be created), and a socket path must be free or hold a stale socket, not a file. A
    regular file there used to kill the agent with a traceback after it had logged in, which
    under systemd is a restart loop that logs in on every turn (issue 13 item 13).

    Raises:
        ConfigError: every problem found, one line each, naming the config key.
    """
    places: list[tuple[str, Path]] = [("agent.state_dir", config.agent.state_dir)]
    if not activated:
        places.append(("agent.socket", config.agent.socket.parent))
    elif config.agent.private_sockets:      # agentd makes <socket>.d there itself
        places.append(("agent.private_sockets", config.agent.socket.parent))
    if config.agent.credentials_socket is not None:
        places.append(("agent.credentials_socket", config.agent.credentials_socket.parent))
    problems: list[str] = []
    for key, directory in places:
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            os.close(fsafe.open_dir(existing))
        except UnsafePath as exc:
            problems.append(f"{key}: {exc}")
    for key, path in (("agent.socket", None if activated else config.agent.socket),
                      ("agent.credentials_socket", config.agent.credentials_socket)):
        if path is None:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            problems.append(f"{key}: {path} exists and is not a socket: remove it or choose "
                            "another path")
    if config.agent.private_sockets:
        where = private.directory(config.agent.socket)
        try:
            st = os.lstat(where)
        except OSError:
            pass
        else:
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                problems.append(f"agent.private_sockets: {where} exists and is not a directory "
                                "of agentd's own: remove it, or set private_sockets = false")
    if problems:
        raise ConfigError(problems)


async def _watchdog(interval: float) -> None:
    # Sent from the main loop: if the loop wedges, the pings stop and systemd restarts us.
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval)


def _unlink_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


async def serve(config: Config, *, config_path: Path | None = None) -> None:
    """Run an agent until SIGTERM or SIGINT; SIGHUP reloads the config."""
    harden_process()
    agent = Agent(config, config_path=config_path)      # the paths are checked first
    # here, not in Agent.run: connect_guard = "on" fails the start with one line (decision 13)
    guard = open_guard(config.agent.connect_guard, config.agent.socket,
                       also=[config.agent.credentials_socket])
    agent.server.blocks.guard = guard
    try:
        await _serve(agent)
    finally:
        if guard is not None:
            guard.close()


async def _serve(agent: Agent) -> None:
    async with trio.open_nursery() as nursery:
        watched = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        stall_hook = os.environ.get("AGENTD_TEST_STALL_ON_SIGUSR2") == "1"
        if stall_hook:
            watched.append(signal.SIGUSR2)
        with trio.open_signal_receiver(*watched) as signals:
            nursery.start_soon(agent.run)
            async for signum in signals:
                if stall_hook and signum == signal.SIGUSR2:
                    # TEST ONLY (AGENTD_TEST_STALL_ON_SIGUSR2=1): wedge the trio loop so that
                    # WATCHDOG=1 stops and systemd's watchdog has to restart the service.
                    log.warning("test hook: stalling the main loop")
                    time.sleep(3600)  # noqa: ASYNC251  (blocking on purpose)
                    continue
                if signum == signal.SIGHUP:
                    systemd.notify("RELOADING=1")
                    agent.reload()
                    systemd.notify("READY=1")
                    continue
                log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                nursery.cancel_scope.cancel()
                break
