"""The test suite's OpenBao dev server: ``agentd.devserver.DevServer`` with a fixed root token.

``DevServer.start(workdir, port=None)`` runs ``bao server -dev`` on a free loopback port (or
``port``, to bring a server back on the same address) and waits until it answers; the one
implementation lives in ``agentd/devserver.py`` (shared with the demo and bench, stdlib only, so
this helper stays independent from the code under test). The root token is ``ROOT_TOKEN``, also
for servers built directly as ``DevServer(port=..., proc=..., log_path=...)`` around a ``bao``
process a test started itself. ``stop()`` kills it; ``pause()``/``resume()`` use SIGSTOP/SIGCONT
to make an outage. A server that does not come up raises ``SetupError`` (a ``RuntimeError``)
with the tail of its log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentd import devserver
from agentd.devserver import SetupError, bao_binary, free_port

__all__ = ["ROOT_TOKEN", "DevServer", "SetupError", "bao_binary", "free_port"]

ROOT_TOKEN = "agentd-test-root-token"


@dataclass
class DevServer(devserver.DevServer):
    token: str = ROOT_TOKEN

    @classmethod
    def start(  # type: ignore[override]
        cls, workdir: Path, *, port: int | None = None
    ) -> DevServer:
        port = port or free_port()
        try:
            return super().start(workdir, port=port, token=ROOT_TOKEN)
        except SetupError as exc:
            log = workdir / f"bao-{port}.log"      # where devserver.DevServer.start logs
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            raise SetupError(f"{exc}\n{tail}") from None
