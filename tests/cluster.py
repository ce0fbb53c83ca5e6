"""A real three-node OpenBao cluster with integrated (raft) storage on loopback ports.

Not dev mode: each node runs ``bao server -config=nN.hcl``; node 1 is initialised (one key share)
and unsealed, autopilot's stabilisation time is shortened, nodes 2 and 3 join node 1 and are
unsealed, and ``start()`` returns once autopilot reports three voters (about 9 s). The short
autopilot timers in ``NODE_HCL`` and the stabilisation time matter: without them the joined nodes
stay non-voters for a while, and killing the leader then leaves no quorum.

Each node is a ``tests.openbao.DevServer`` (same ``api``/``kv_put``/``approle`` helpers, the
cluster's root token). ``kill(node)`` SIGKILLs one; ``active()`` finds the leader; ``stop()``
kills them all. Blocking (urllib, subprocess): call it from ``trio.to_thread`` in trio tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.openbao import DevServer, bao_binary, free_port
from tests.support import wait_until

NODE_HCL = """
storage "raft" {{
  path = "{data}"
  node_id = "{node_id}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "1s"
  autopilot_update_interval = "500ms"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
disable_mlock = true
ui = false
"""


def health(address: str) -> int | None:
    """``/v1/sys/health`` status code: 200 active, 429 standby, 503 sealed, 501 not initialised;
    None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{address}/v1/sys/health", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _call(address: str, method: str, path: str, body: object = None,
          token: str | None = None) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{address}/v1/{path}", data=data, method=method)
    if token:
        req.add_header("X-Vault-Token", token)
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    result: dict[str, object] = json.loads(raw) if raw else {}
    return result


@dataclass
class RaftCluster:
    workdir: Path
    nodes: list[DevServer] = field(default_factory=list)
    unseal_key: str = ""
    root_token: str = ""

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    @classmethod
    def start(cls, workdir: Path, size: int = 3) -> RaftCluster:
        cluster = cls(workdir)
        try:
            cluster._start(size)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, index: int) -> DevServer:
        port, cluster_port = free_port(), free_port()
        data = self.workdir / f"n{index}"
        data.mkdir(parents=True, exist_ok=True)
        hcl = self.workdir / f"n{index}.hcl"
        hcl.write_text(NODE_HCL.format(data=data, node_id=f"n{index}", port=port,
                                       cluster_port=cluster_port))
        log_path = self.workdir / f"n{index}.log"
        env = dict(os.environ, HOME=str(self.workdir), BAO_LOG_LEVEL="warn")
        env.pop("BAO_ADDR", None)
        env.pop("VAULT_ADDR", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [bao_binary(), "server", f"-config={hcl}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        node = DevServer(port=port, proc=proc, log_path=log_path)
        wait_until(lambda: health(node.address) is not None,
                   f"raft cluster: n{index} to listen", 30)
        return node

    def _unseal(self, node: DevServer) -> None:
        def unsealed() -> bool:
            code = health(node.address)
            if code in (200, 429):
                return True
            with contextlib.suppress(OSError, urllib.error.HTTPError):
                _call(node.address, "PUT", "sys/unseal", {"key": self.unseal_key})
            return False

        wait_until(unsealed, f"raft cluster: {node.address} to unseal", 60)

    def _start(self, size: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        first = self._spawn(1)
        self.nodes.append(first)
        init = _call(first.address, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        keys = init["keys_base64"]
        assert isinstance(keys, list)
        self.unseal_key = str(keys[0])
        self.root_token = str(init["root_token"])
        first.token = self.root_token
        self._unseal(first)
        wait_until(lambda: health(first.address) == 200,
                   "raft cluster: node 1 to become active", 30)
        _call(first.address, "POST", "sys/storage/raft/autopilot/configuration",
              {"server_stabilization_time": "1s"}, token=self.root_token)
        for index in range(2, size + 1):
            node = self._spawn(index)
            node.token = self.root_token
            self.nodes.append(node)
            _call(node.address, "PUT", "sys/storage/raft/join",
                  {"leader_api_addr": first.address})
            self._unseal(node)
        wait_until(lambda: self.voters() >= size, f"raft cluster: {size} raft voters", 60)

    def voters(self) -> int:
        leader = self.active() or self.nodes[0]
        try:
            state = _call(leader.address, "GET", "sys/storage/raft/autopilot/state",
                          token=self.root_token)
        except (OSError, urllib.error.HTTPError):
            return 0
        data = state.get("data")
        voters = data.get("voters") if isinstance(data, dict) else None
        return len(voters) if isinstance(voters, list) else 0

    def active(self) -> DevServer | None:
        for node in self.nodes:
            if node.proc.poll() is None and health(node.address) == 200:
                return node
        return None

    def wait_active(self, timeout: float = 60) -> DevServer:
        wait_until(lambda: self.active() is not None, "raft cluster: an active node", timeout)
        node = self.active()
        assert node is not None
        return node

    def kill(self, node: DevServer) -> None:
        node.stop()

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                node.stop()
