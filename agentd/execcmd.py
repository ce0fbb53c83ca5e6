"""``agentd exec``: run a program with secrets in its environment, optionally supervised.

``agentd exec --env DB_PASSWORD=db.password --env API_TOKEN=api.token -- prog args`` asks the
agent's socket *as the calling user* (so the caller's own policies decide, nothing runs as the
agent's user), puts each value into the environment (``NAME.FIELD``: the field's value as text;
``NAME``: the secret's data as JSON) and replaces itself with ``prog`` (``execvpe``).

With ``--restart-on-change`` it stays as the parent instead (the envconsul / Vault Agent
process-supervisor use case):

- a watcher task keeps a ``watch`` connection on the names used (reconnecting with backoff when
  the agent restarts, then checking for anything missed meanwhile);
- on an event it fetches the values again; if the environment would differ, it sends the child
  ``--signal`` (default SIGTERM), waits ``--grace`` seconds (default 10), sends SIGKILL if the
  child is still there, and starts it again with the new environment. A value that cannot be
  fetched (revoked, unavailable) keeps the running child as it is, with a message on stderr;
- SIGTERM, SIGINT and SIGHUP are passed on to the child; when the child exits on its own, or
  after a passed-on SIGTERM/SIGINT, ``agentd exec`` exits with its status (128+N for a signal).

Values never appear in messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from agentd.backoff import Backoff
from agentd.client import AsyncClient, Client, open_client
from agentd.errors import AgentdError, ClientError, RequestError, UsageError

log = logging.getLogger("agentd.exec")

_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class EnvSpec:
    """One ``--env VAR=NAME[.FIELD]``."""

    var: str
    name: str
    field: str | None


def parse_env_spec(text: str) -> EnvSpec:
    """Parse ``VAR=NAME`` or ``VAR=NAME.FIELD``.

    Raises:
        UsageError: not of that form.
    """
    var, sep, ref = text.partition("=")
    if not sep or not _VAR.fullmatch(var) or not ref:
        raise UsageError(f"--env {text.split('=', 1)[0]!r}...: expected VAR=NAME or "
                         "VAR=NAME.FIELD")
    name, dot, field = ref.partition(".")
    if not name or (dot and not field):
        raise UsageError(f"--env {var}=...: expected VAR=NAME or VAR=NAME.FIELD")
    return EnvSpec(var=var, name=name, field=field or None)


def _env_value(spec: EnvSpec, data: Any) -> str:
    if spec.field is None:
        return json.dumps(_plain(data), sort_keys=True, separators=(",", ":"))
    if isinstance(data, str):
        value = data
    elif isinstance(data, (bytes, bytearray)):
        value = bytes(data).decode("utf-8", "surrogateescape")
    else:
        value = json.dumps(_plain(data), sort_keys=True, separators=(",", ":"))
    if "\0" in value:
        raise AgentdError(f"{spec.name}.{spec.field} holds a NUL byte; it cannot go into "
                          f"${spec.var}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value


def fetch_env(client: Client, specs: Sequence[EnvSpec]) -> dict[str, str]:
    """``{VAR: value}`` for every spec, read through ``client``."""
    return {spec.var: _env_value(spec, client.get(spec.name, spec.field)["data"])
            for spec in specs}


async def fetch_env_async(client: AsyncClient, specs: Sequence[EnvSpec]) -> dict[str, str]:
    return {spec.var: _env_value(spec, (await client.get(spec.name, spec.field))["data"])
            for spec in specs}


def exec_with_env(
    socket_path: str, specs: Sequence[EnvSpec], argv: Sequence[str], *, timeout: float,
    environ: Mapping[str, str],
) -> NoReturn:
    """Fetch the values and replace this process with ``argv``.

    Raises:
        RequestError, ClientError: the agent refused or could not be asked.
        UsageError: ``argv`` cannot be executed.
    """
    with Client.connect(socket_path, timeout=timeout) as client:
        values = fetch_env(client, specs)
    env = {**environ, **values}
    try:
        os.execvpe(argv[0], list(argv), env)  # noqa: S606 (an argv list, by design no shell)
    except OSError as exc:
        raise UsageError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc


def exit_status(returncode: int) -> int:
    """A shell-style exit status: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs ``argv`` with the values in its environment and restarts it when they change.

    Args:
        socket_path: the agent's socket.
        specs: the variables to set.
        argv: the program and its arguments.
        stop_signal: sent to the child before a restart.
        grace: seconds to wait for the child after ``stop_signal`` before SIGKILL.
        environ: the environment the values are added to.
    """

    def __init__(
        self,
        socket_path: str,
        specs: Sequence[EnvSpec],
        argv: Sequence[str],
        *,
        stop_signal: int = signal.SIGTERM,
        grace: float = 10.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.specs = tuple(specs)
        self.argv = list(argv)
        self.stop_signal = stop_signal
        self.grace = grace
        self.environ = dict(os.environ if environ is None else environ)
        self.restarts = 0
        self._process: trio.Process | None = None
        self._names = sorted({spec.name for spec in self.specs})

    async def _fetch(self) -> dict[str, str]:
        async with AsyncClient.connect(self.socket_path) as client:
            return await fetch_env_async(client, self.specs)

    async def run(self) -> int:
        """Supervise until the child exits by itself or after a passed-on SIGTERM/SIGINT;
        return the exit status to leave with.

        Raises:
            RequestError, ClientError: the first fetch failed (nothing was started).
        """
        with trio.fail_after(30):
            values = await self._fetch()
        send_changed, receive_changed = trio.open_memory_channel[None](1)
        with trio.open_signal_receiver(*_FORWARDED) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, send_changed)
                status = await self._supervise(values, receive_changed, signals)
                nursery.cancel_scope.cancel()
        return status

    async def _supervise(
        self,
        values: dict[str, str],
        changed: trio.MemoryReceiveChannel[None],
        signals: Any,
    ) -> int:
        process = await self._start(values)
        try:
            return await self._loop(process, values, changed, signals)
        finally:
            current = self._process
            if current is not None and current.returncode is None:   # going away abnormally
                current.kill()

    async def _start(self, values: dict[str, str]) -> trio.Process:
        try:
            self._process = await trio.lowlevel.open_process(
                self.argv, env={**self.environ, **values}
            )
            return self._process
        except OSError as exc:
            raise UsageError(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from exc

    async def _loop(
        self,
        process: trio.Process,
        values: dict[str, str],
        changed: trio.MemoryReceiveChannel[None],
        signals: Any,
    ) -> int:
        stopping = False
        while True:
            what = "exit"
            if not stopping:
                what = await _first_of(process, changed, signals)
            if what == "exit":
                await process.wait()
                assert process.returncode is not None
                return exit_status(process.returncode)
            if what == "stop":
                stopping = True
                continue
            try:
                with trio.fail_after(30):
                    new_values = await self._fetch()
            except (RequestError, ClientError, trio.TooSlowError) as exc:
                _say(f"agentd exec: keeping the running program: cannot fetch new values: "
                     f"{getattr(exc, 'code', type(exc).__name__)}")
                continue
            if new_values == values:
                continue
            _say(f"agentd exec: secrets changed; restarting {self.argv[0]}")
            await self._stop(process)
            values = new_values
            self.restarts += 1
            process = await self._start(values)

    async def _stop(self, process: trio.Process) -> None:
        if process.returncode is None:
            process.send_signal(self.stop_signal)
            with trio.move_on_after(self.grace):
                await process.wait()
            if process.returncode is None:
                process.kill()
        await process.wait()

    async def _watch(self, changed: trio.MemorySendChannel[None]) -> None:
        """Keep a watch on the names; send a wake-up on each event and after each reconnect."""
        backoff = Backoff(0.2, 10.0)
        while True:
            try:
                client = await open_client(self.socket_path)
                async with client:
                    events = await client.watch(self._names)
                    backoff.reset()
                    # Anything may have changed before the watch was set up (or while we were
                    # reconnecting): check once now.
                    _notify(changed)
                    async for _event in events:
                        _notify(changed)
            except (ClientError, RequestError, OSError) as exc:
                _say(f"agentd exec: watch lost ({getattr(exc, 'code', type(exc).__name__)}); "
                     "reconnecting")
            await trio.sleep(backoff.next_delay())


async def _first_of(
    process: trio.Process, changed: trio.MemoryReceiveChannel[None], signals: Any
) -> str:
    """Wait for whichever comes first: the child exits ("exit"), a wake-up from the watcher
    ("change"), or SIGTERM/SIGINT, which is passed on ("stop"; SIGHUP is passed on and the wait
    goes on)."""
    outcome: list[str] = []
    async with trio.open_nursery() as nursery:

        async def on_exit() -> None:
            await process.wait()
            outcome.append("exit")
            nursery.cancel_scope.cancel()

        async def on_change() -> None:
            await changed.receive()
            outcome.append("change")
            nursery.cancel_scope.cancel()

        async def on_signal() -> None:
            async for signum in signals:
                if process.returncode is None:
                    process.send_signal(signum)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    outcome.append("stop")
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_exit)
        nursery.start_soon(on_change)
        nursery.start_soon(on_signal)
    return outcome[0] if outcome else "exit"


def _notify(channel: trio.MemorySendChannel[None]) -> None:
    # One pending wake-up is enough: the supervisor re-reads every value when it wakes.
    with contextlib.suppress(trio.WouldBlock):
        channel.send_nowait(None)


def _say(message: str) -> None:
    # The CLI routes this logger to stderr as plain lines (see cli._exec_command).
    log.warning("%s", message)


def parse_signal(text: str) -> int:
    """``TERM``, ``SIGTERM`` or ``15`` -> the signal number.

    Raises:
        UsageError: not a signal.
    """
    name = text.upper()
    if name.isdigit():
        number = int(name)
        if 0 < number < signal.NSIG:
            return number
    else:
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise UsageError(f"--signal: unknown signal {text!r}")


def parse_grace(text: str) -> float:
    """``--grace``: seconds as a number, or a duration like ``"10s"``.

    Raises:
        UsageError: neither.
    """
    from agentd.config import parse_duration

    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise UsageError(f"--grace: {exc}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise UsageError("--grace must be zero or more seconds")
    return seconds
