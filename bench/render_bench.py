"""Rendering figures for agentd (issue 3), against a real OpenBao dev server.

Seeds ``--count`` KV v2 secrets (1,000) in a ``bao server -dev``, writes a config with one
``[secrets.sN]`` and one ``[[template]]`` per secret, starts ``python -m agentd run`` as a child
(as a user would) and measures, ``--rounds`` times from a cold start (fresh state dir, no
snapshot, empty output directory):

- spawn -> every file rendered with its expected content;
- the agent's RSS once they are (``VmRSS`` of the agent, and of its render worker process);
- one secret updated upstream -> its file rewritten (bounded by the secret's ``refresh``).

Every wait is bounded; everything started is stopped in a ``finally``. Prints a markdown table.
Not part of ``make test``. Run: ``.venv/bin/python bench/render_bench.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.demo import AgentProcess  # noqa: E402
from tests.conftest import READ_ALL_SECRETS  # noqa: E402
from tests.openbao import DevServer  # noqa: E402

LOG_LEVEL = os.environ.get("RENDER_BENCH_LOG_LEVEL", "warning")


TEMPLATES = {
    # the same output from both engines: Jinja2 by name, Go (consul-template) by upstream path
    "jinja": 'contents = "user={{{{ secret(\'s{i}\').user }}}}\\npassword={{{{ secret(\'s{i}\')'
             '.password }}}}\\n"',
    "go": 'engine = "go"\ncontents = "{{{{ with secret \\"secret/data/{prefix}/s{i}\\" }}}}'
          'user={{{{ .Data.data.user }}}}\\npassword={{{{ .Data.data.password }}}}\\n'
          '{{{{ end }}}}"',
}


def write_config(work: Path, address: str, role: tuple[str, str], prefix: str, count: int,
                 out: Path, engine: str = "jinja") -> Path:
    role_file, secret_file = work / "role_id", work / "secret_id"
    for path, value in ((role_file, role[0]), (secret_file, role[1])):
        path.write_text(value + "\n")
        path.chmod(0o600)
    parts = [f"""
[agent]
socket = "{work / 'agentd.sock'}"
state_dir = "{work / 'state'}"
ready_timeout = "120s"
log_level = "{LOG_LEVEL}"

[upstream]
addresses = ["{address}"]

[upstream.auth]
method = "approle"
role_id_file = "{role_file}"
secret_id_file = "{secret_file}"

[[policy]]
name = "root"
uids = [0]
allow = ["*"]
admin = true
"""]
    for i in range(count):
        parts.append(f"""
[secrets.s{i}]
kind = "kv2"
path = "secret/data/{prefix}/s{i}"
refresh = "2s"

[[template]]
destination = "{out / f's{i}.conf'}"
{TEMPLATES[engine].format(i=i, prefix=prefix)}
mode = "0640"
""")
    config = work / "agentd.toml"
    config.write_text("".join(parts))
    return config


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """Child processes of every thread (trio spawns the render worker from a worker thread)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return sorted(found)


def wait_for(predicate: object, timeout: float, what: str, agent: AgentProcess) -> float:
    assert callable(predicate)
    start = time.monotonic()
    while not predicate():
        agent.check_alive()
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}\n{agent.log_tail()}")
        time.sleep(0.02)
    return time.monotonic()


def expected(i: int, password: str) -> str:
    return f"user=u{i}\npassword={password}\n"


def all_rendered(out: Path, passwords: list[str]) -> bool:
    for i, password in enumerate(passwords):
        try:
            if (out / f"s{i}.conf").read_text() != expected(i, password):
                return False
        except FileNotFoundError:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", choices=sorted(TEMPLATES), default="jinja",
                        help="template engine of the rendered templates (same output)")
    args = parser.parse_args()
    work_root = Path(tempfile.mkdtemp(prefix="agentd-render-bench-"))
    bao = DevServer.start(work_root / "bao")
    try:
        bao.put_policy("bench-read", READ_ALL_SECRETS)
        role = bao.approle("bench", policies=["bench-read"], token_ttl="1h")
        prefix = f"rb-{uuid.uuid4().hex[:8]}"
        passwords = []
        t0 = time.monotonic()
        for i in range(args.count):
            password = f"pw-{i}-{uuid.uuid4().hex}"
            bao.kv_put(f"{prefix}/s{i}", {"user": f"u{i}", "password": password})
            passwords.append(password)
        seed_s = time.monotonic() - t0
        cold, agent_rss, worker_rss, update = [], [], [], []
        for r in range(args.rounds):
            work = work_root / f"round{r}"
            out = work / "out"
            out.mkdir(parents=True)
            config = write_config(work, bao.address, role, prefix, args.count, out, args.engine)
            start = time.monotonic()
            agent = AgentProcess(config, work / "agent.log")
            try:
                done = wait_for(lambda out=out: all_rendered(out, passwords), 300,
                                "every file", agent)
                cold.append(done - start)
                time.sleep(1)
                agent_rss.append(rss_kib(agent.pid))
                worker_rss.append(sum(rss_kib(c) for c in children(agent.pid)))
                new = f"pw-new-{uuid.uuid4().hex}"
                bao.kv_put(f"{prefix}/s0", {"user": "u0", "password": new})
                t1 = time.monotonic()
                dest = out / "s0.conf"
                update.append(wait_for(lambda dest=dest, new=new: dest.read_text()
                                       == expected(0, new), 30, "the update", agent) - t1)
                bao.kv_put(f"{prefix}/s0", {"user": "u0", "password": passwords[0]})
                wait_for(lambda out=out: all_rendered(out, passwords), 30, "the revert", agent)
            finally:
                agent.stop()
            shutil.rmtree(work, ignore_errors=True)
    finally:
        bao.stop()
        shutil.rmtree(work_root, ignore_errors=True)

    def row(name: str, values: list[float], fmt: str) -> str:
        return (f"| {name} | {fmt.format(statistics.median(values))} | "
                f"{fmt.format(min(values))} | {fmt.format(max(values))} |")

    print(f"\nagentd render bench: {args.count} KV v2 secrets, {args.count} {args.engine} "
          "templates, "
          f"{args.rounds} cold starts; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()} (seeding took {seed_s:.1f} s)\n")
    print("| metric | median | min | max |")
    print("|---|---|---|---|")
    print(row("spawn -> all files rendered (s)", cold, "{:.2f}"))
    print(row("agent RSS after render (MiB)", [v / 1024 for v in agent_rss], "{:.1f}"))
    print(row("render worker RSS (MiB)", [v / 1024 for v in worker_rss], "{:.1f}"))
    print(row("KV update -> file rewritten (s, refresh 2s)", update, "{:.2f}"))


if __name__ == "__main__":
    main()
