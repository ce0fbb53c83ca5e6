"""The systemd credentials socket: ``LoadCredential=ID:/run/agentd/creds.sock``.

Theory of operation (see the credentials-socket section of DESIGN.md and OPENBAO.md): to load a
credential from a socket, systemd (still root, in the child it forked for the unit, already moved
into the unit's cgroup) binds an AF_UNIX stream socket to the abstract address
``"\\0<16 hex digits>/unit/<unit>/<ID>"``, connects, shuts down its write side, sends nothing and
reads until EOF, at most 1 MiB. For each connection this module

1. takes the peer's address and credentials; a caller that is not root gets the connection
   closed with nothing (the socket is 0600, so only root can connect anyway);
2. parses the unit and ``ID`` from the address (``NAME.FIELD``: the field's raw value; ``NAME``:
   the secret's data as JSON);
3. requires the caller's own cgroup to be the claimed unit's, because any root process can bind
   an address naming any unit, while systemd connects from the unit's own cgroup (checked under
   ``systemd-nspawn`` with systemd 252: tests/test_creds_nspawn.py);
4. decides with the policies that list ``units`` and no other selector (uids, exe and the like
   describe the unit's processes, which cannot be checked on this socket: such a rule does not
   apply here), matched against the unit;
5. writes the value and closes; anything denied, unknown or unavailable is answered with
   ``DENIAL_BYTES`` zero bytes, more than systemd's 1 MiB credential limit, so that systemd fails
   the unit's start (status 243/CREDENTIALS) instead of starting it with an empty credential (a
   clean close without data gives an empty credential, and an AF_UNIX socket cannot be reset).

Every decision goes to the audit stream (``socket="credentials"``); values never reach a log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import trio

from agentd.access import Peer
from agentd.audit import Audit
from agentd.cache import Cache
from agentd.config import Config, PolicyConfig
from agentd.listen import open_listener, serve_listener
from agentd.readmodel import COUNTER, metric
from agentd.refresh import Refresher

log = logging.getLogger("agentd.creds")

DENIAL_BYTES = 2 * 1024 * 1024
_CHUNK = b"\0" * 65536
_ADDRESS = re.compile(rb"\0[0-9a-fA-F]{1,64}/unit/(?P<unit>[^/\0]+)/(?P<id>[^/\0]+)")
_OTHER_SELECTORS = ("uids", "gids", "exe", "exe_sha256")


class Denied(Exception):
    """This request gets the over-limit answer; the message is for the audit and the log."""

    def __init__(self, decision: str, message: str) -> None:
        super().__init__(message)
        self.decision = decision


def parse_address(address: bytes | str) -> tuple[str, str] | None:
    """``(unit, ID)`` from systemd's peer address, or None if it is not one."""
    raw = address.encode("utf-8", "surrogateescape") if isinstance(address, str) else address
    match = _ADDRESS.fullmatch(raw)
    if match is None:
        return None
    try:
        return match.group("unit").decode("ascii"), match.group("id").decode("ascii")
    except UnicodeDecodeError:
        return None


def unit_rules(policies: tuple[PolicyConfig, ...]) -> list[PolicyConfig]:
    """The rules that apply on the credentials socket: they list units and nothing else."""
    return [
        rule for rule in policies
        if rule.units and not any(getattr(rule, s) for s in _OTHER_SELECTORS)
    ]


def may_load(policies: tuple[PolicyConfig, ...], unit: str, name: str) -> bool:
    """True if a rule that applies on this socket grants ``name`` to ``unit``."""
    return any(
        unit in rule.units and any(fnmatchcase(name, p) for p in rule.allow)
        for rule in unit_rules(policies)
    )


def encode_value(value: Any) -> bytes:
    """A field's raw value: text as UTF-8, bytes as they are, anything else as JSON."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return encode_json(value)


def encode_json(value: Any) -> bytes:
    def plain(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return dict(obj)
        if isinstance(obj, (bytes, bytearray)):
            raise TypeError("binary data cannot be a JSON credential")
        raise TypeError(f"cannot encode {type(obj).__name__}")

    return json.dumps(value, default=plain, sort_keys=True, separators=(",", ":")).encode()



@dataclass(frozen=True)
class CredentialsStatistics:
    """The credentials socket's counters; each ``metric`` field is a series."""

    served: int = metric("Credentials handed to systemd units", COUNTER,
                       name="agentd_credentials_served")
    denied: int = metric("Credential requests refused (answered with the oversized reply)",
                       COUNTER, name="agentd_credentials_denied")

class CredentialsServer:
    """Serves ``LoadCredential=`` requests for one daemon. Reads its config on each request,
    so a reload applies at once."""

    def __init__(
        self,
        config: Config,
        cache: Cache,
        refresher: Refresher,
        audit: Audit,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._cache = cache
        self._refresher = refresher
        self._audit = audit
        self._clock = clock
        self._limiter = trio.CapacityLimiter(64)
        # How a connection's peer is identified; tests swap it (fake proc root).
        self.identify: Callable[[socket.socket], Peer] = Peer.from_socket
        self.served = 0
        self.denied = 0

    def statistics(self) -> CredentialsStatistics:
        return CredentialsStatistics(served=self.served, denied=self.denied)

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listener`` until cancelled. Does not close ``listener``."""
        await serve_listener(listener, self._handle, task_status=task_status)

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        peer: Peer | None = None
        try:
            async with self._limiter:
                try:
                    peer = self.identify(conn)  # type: ignore[arg-type]
                    address = conn.getpeername()
                except OSError as exc:
                    log.warning("credentials: no peer credentials", extra={"error": str(exc)})
                    return
                if peer.uid != 0:
                    # Not systemd: the socket's mode should have kept it out. Nothing for it.
                    self._audit.record(op="credential", decision="deny", pid=peer.pid,
                                       uid=peer.uid, exe=peer.exe, unit=peer.unit,
                                       socket="credentials")
                    return
                payload = self._answer(peer, address)
                with trio.move_on_after(max(self.config.agent.frame_timeout, 5.0) * 4):
                    if payload is None:
                        await _send_denial(stream)
                    else:
                        await stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass            # systemd stops reading past its limit: expected for a denial
        except Exception:
            log.exception("credentials handler failed")
        finally:
            if peer is not None:
                peer.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _answer(self, peer: Peer, address: Any) -> bytes | None:
        """The credential's bytes, or None for the over-limit answer."""
        unit: str | None = None
        name: str | None = None
        version: int | None = None
        try:
            parsed = parse_address(address) if isinstance(address, (bytes, str)) else None
            if parsed is None:
                raise Denied("bad_request", "peer address is not systemd's .../unit/UNIT/ID")
            unit, cred_id = parsed
            name, _, field = cred_id.partition(".")
            if peer.unit != unit:
                raise Denied("deny", f"caller's cgroup is unit {peer.unit!r}, "
                                     f"not the {unit!r} its address claims")
            if name not in self.config.secrets or not may_load(self.config.policies, unit, name):
                raise Denied("deny", f"no units policy grants {name[:64]!r} to {unit!r}")
            entry = self._cache.get(name)
            if entry is None:
                decision = "not_found" if self._refresher.is_revoked(name) else "unavailable"
                raise Denied(decision, f"secret {name!r} has no value")
            version = entry.version
            if self._clock() > entry.serve_until(self.config.max_stale_for(name)):
                # past the earlier of fetched_at + max_stale and the value's own expiry
                raise Denied("unavailable", f"secret {name!r} is past its stale deadline")
            if field:
                if field not in entry.data:
                    raise Denied("not_found", f"secret {name!r} has no field {field[:64]!r}")
                payload = encode_value(entry.data[field])
            else:
                payload = encode_json(entry.data)
            if len(payload) >= 1024 * 1024:
                raise Denied("too_large", "the credential is over systemd's 1 MiB limit")
            if not peer.still_same_process():
                raise Denied("pid_reused", "the caller went away")
        except Denied as denial:
            self.denied += 1
            log.info("credential denied",
                     extra={"unit": unit, "secret": name, "reason": str(denial)})
            self._record(peer, denial.decision, unit, name, version)
            return None
        except (TypeError, ValueError) as exc:
            self.denied += 1
            log.warning("credential cannot be encoded", extra={"unit": unit, "secret": name,
                                                                "error": type(exc).__name__})
            self._record(peer, "error", unit, name, version)
            return None
        self.served += 1
        self._record(peer, "allow", unit, name, version, stale=entry.stale)
        return payload

    def _record(self, peer: Peer, decision: str, unit: str | None, name: str | None,
                version: int | None, *, stale: bool | None = None) -> None:
        self._audit.record(op="credential", decision=decision, pid=peer.pid, uid=peer.uid,
                           exe=peer.exe, unit=unit, name=name, version=version, stale=stale,
                           start_time=peer.start_time, socket="credentials")


async def _send_denial(stream: trio.SocketStream) -> None:
    sent = 0
    while sent < DENIAL_BYTES:
        await stream.send_all(_CHUNK)
        sent += len(_CHUNK)


def open_credentials_listener(path: Path) -> socket.socket:
    """Bind the credentials socket at ``path`` with mode 0600: only root connects. The caller
    closes it with ``close_listener``."""
    return open_listener(path, mode=0o600, group=None)


def close_listener(listener: socket.socket, path: Path) -> None:
    """Close the credentials socket and remove its path."""
    listener.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
