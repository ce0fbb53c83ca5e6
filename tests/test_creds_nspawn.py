"""``LoadCredential=`` with a real systemd (252, as PID 1 of a systemd-nspawn container).

The agent runs inside the container as a Type=notify unit (the repository and its virtualenv are
bind-mounted read-only at the same paths), against the session's OpenBao on the shared loopback.
A unit granted by a ``units`` policy starts with the value in ``$CREDENTIALS_DIRECTORY``; a unit
that is not granted fails to start (243/CREDENTIALS) on the over-limit answer. This also shows
where systemd connects from: the unit's own cgroup (the agent refuses other callers), as a
process named ``(sd-mkdcreds)``.

Needs root, ``systemd-nspawn`` (systemd-container) and ``mmdebstrap`` (the root is made once under
build/nspawn-creds/ and kept: about 15-40 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentd
from tests.openbao import DevServer

pytestmark = pytest.mark.slow

REPO = Path(agentd.__file__).resolve().parent.parent
BUILD = REPO / "build" / "nspawn-creds"
ROOTFS = BUILD / "root"
STAMP = BUILD / "root.done"


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="session")
def rootfs() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install systemd-container mmdebstrap)")
    # python3: the venv's interpreter, if it is Debian's, must exist inside the container too.
    include = "--include=systemd,systemd-sysv,dbus,python3"
    if not STAMP.exists() or STAMP.read_text() != include:
        shutil.rmtree(ROOTFS, ignore_errors=True)
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", include, "bookworm", str(ROOTFS), _mirror()],
            check=True, timeout=600, capture_output=True,
        )
        STAMP.write_text(include)
    return ROOTFS


class Container:
    """A booted container; ``run`` executes a command in all its namespaces."""

    def __init__(self, process: subprocess.Popen[bytes], console: Path) -> None:
        self.process = process
        self.console = console
        self.pid = 0

    def wait_booted(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nspawn exited: {self.console.read_text()[-2000:]}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            for child in children.read_text().split() if children.exists() else []:
                with_exe = Path(f"/proc/{child}/exe")
                try:
                    if os.readlink(with_exe).endswith("/systemd"):
                        self.pid = int(child)
                except OSError:
                    continue
            if self.pid:
                state = self.run("systemctl", "is-system-running", "--wait", check=False,
                                 timeout=60).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)   # nothing to await: nspawn gives no readiness signal here
        raise AssertionError("the container did not boot within 60 s")

    def run(self, *argv: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], check=check,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


UNIT_AGENT = f"""\
[Service]
Type=notify
ExecStart={sys.executable} -m agentd run -c /etc/agentd/agentd.toml
"""

UNIT_CONSUMER = """\
[Service]
Type=oneshot
LoadCredential={cred}:/run/agentd/creds.sock
ExecStart=/bin/sh -c 'cat "$CREDENTIALS_DIRECTORY/{cred}" > /run/{name}.out'
"""


@pytest.fixture
def container(rootfs: Path, tmp_path: Path, bao: DevServer,
              approle_files: tuple[Path, Path]) -> Iterator[tuple[Container, str]]:
    prefix = f"ns-{uuid.uuid4().hex[:10]}"
    marker = f"MARKER-nspawn-{uuid.uuid4().hex}"
    bao.kv_put(f"{prefix}/db", {"username": "app", "password": marker})
    etc = tmp_path / "etc-agentd"
    etc.mkdir(mode=0o755)
    role, secret = approle_files
    shutil.copy2(role, etc / "role_id")
    shutil.copy2(secret, etc / "secret_id")
    (etc / "agentd.toml").write_text(f"""
[agent]
credentials_socket = "/run/agentd/creds.sock"
ready_timeout = "20s"

[upstream]
addresses = ["{bao.address}"]

[upstream.auth]
method = "approle"
role_id_file = "/etc/agentd/role_id"
secret_id_file = "/etc/agentd/secret_id"

[audit]
path = "/run/agentd-audit.jsonl"
flush_interval = "200ms"

[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"

[secrets.other]
kind = "kv2"
path = "secret/data/{prefix}/db"

[[policy]]
name = "granted"
units = ["granted.service"]
allow = ["db"]
""")
    units = tmp_path / "units"
    units.mkdir()
    (units / "agentd-test.service").write_text(UNIT_AGENT)
    (units / "granted.service").write_text(UNIT_CONSUMER.format(cred="db.password",
                                                                 name="granted"))
    (units / "denied.service").write_text(UNIT_CONSUMER.format(cred="db.password",
                                                                name="denied"))
    (units / "ungranted-name.service").write_text(UNIT_CONSUMER.format(cred="other",
                                                                        name="ungranted-name"))
    binds = [f"--bind-ro={REPO}", f"--bind-ro={etc}:/etc/agentd"]
    venv = Path(sys.prefix).resolve()
    if not venv.is_relative_to(REPO):
        binds.append(f"--bind-ro={venv}")
    base = Path(sys.base_prefix).resolve()
    if base != Path("/usr"):
        binds.append(f"--bind-ro={base}")       # the venv's interpreter (e.g. pyenv)
    for unit in units.iterdir():
        binds.append(f"--bind-ro={unit}:/etc/systemd/system/{unit.name}")
    console = tmp_path / "console.log"
    with console.open("wb") as out:
        process = subprocess.Popen(
            ["systemd-nspawn", "-D", str(rootfs), "-b", "--register=no", "--keep-unit",
             "-M", prefix, "--volatile=overlay", *binds],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    box = Container(process, console)
    try:
        box.wait_booted()
        yield box, marker
    finally:
        box.stop()


def test_load_credential_with_real_systemd(container: tuple[Container, str]) -> None:
    box, marker = container
    started = box.run("systemctl", "start", "agentd-test.service", check=False)
    assert started.returncode == 0, box.run("journalctl", "-u", "agentd-test", "--no-pager",
                                            check=False).stdout[-3000:]

    granted = box.run("systemctl", "start", "granted.service", check=False)
    assert granted.returncode == 0, granted.stderr
    assert box.run("cat", "/run/granted.out").stdout == marker

    for unit in ("denied.service", "ungranted-name.service"):
        refused = box.run("systemctl", "start", unit, check=False)
        assert refused.returncode != 0
        show = box.run("systemctl", "show", unit, "-p", "Result", "-p", "ExecMainStatus").stdout
        assert "ExecMainStatus=243" in show, show        # 243/CREDENTIALS
        assert box.run("test", "-e", f"/run/{unit.split('.')[0]}.out",
                       check=False).returncode != 0

    journal = box.run("journalctl", "--no-pager", check=False).stdout
    assert marker not in journal
    assert "credential denied" in journal

    # Where systemd asked from: a root process of its own binary, in the unit's cgroup (which
    # the agent required: a caller elsewhere would have been denied).
    deadline = time.monotonic() + 20
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        text = box.run("cat", "/run/agentd-audit.jsonl", check=False).stdout
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        if any(line.get("unit") == "granted.service" for line in lines):
            break
        time.sleep(0.2)      # the audit stream is flushed every flush_interval
    allowed = [line for line in lines if line.get("op") == "credential"
               and line.get("decision") == "allow"]
    assert len(allowed) == 1, lines
    assert allowed[0]["unit"] == "granted.service"
    assert allowed[0]["uid"] == 0
    assert str(allowed[0]["exe"]).endswith("/systemd")
    assert marker not in json.dumps(lines)
