"""The installed .deb under a real systemd: systemd-nspawn boots the clean Debian root as PID 1.

Each root (tests/test_packages.py: mmdebstrap, made once; Debian 12 and Debian 13) gets the
package with `apt-get install ./agentd.deb` (its venv built by the postinst), a config
that points at the session's OpenBao dev server on the host's loopback (nspawn shares the host
network), and one test-only drop-in: a 4 s watchdog and AGENTD_TEST_STALL_ON_SIGUSR2=1, which makes
SIGUSR2 block the daemon's trio loop. Everything else is the unit as shipped. Commands run inside
with nsenter; "another uid" is `nsenter -S UID -G GID`, a real process of that uid in the
container, so the daemon sees the peer as it is.
"""

from __future__ import annotations

import errno
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.openbao import DevServer, free_port
from tests.support import wait_until
from tests.test_creds_nspawn import Container
from tests.test_packages import SUITES, fresh_root, install_deb, package

pytestmark = pytest.mark.slow

ALICE, BOB = 1000, 1001
MAX_EXPOSURE = 2.5

CONFIG = """\
[agent]
log_level = "debug"
ready_timeout = "20s"

[upstream]
addresses = ["{address}"]
timeout = "3s"

[upstream.auth]
method = "approle"
role_id_file = "/etc/agentd/role_id"
secret_id_file = "/etc/agentd/secret_id"

[metrics]
listen = "127.0.0.1:{metrics_port}"
detailed = true

[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"
refresh = "1h"

[secrets.other]
kind = "kv2"
path = "secret/data/{prefix}/other"
refresh = "1h"

[[policy]]
name = "root-admin"
uids = [0]
allow = ["*"]
admin = true

[[policy]]
name = "alice"
uids = [{alice}]
allow = ["db"]
{extra}
"""

DROP_IN = """\
# test only: a short watchdog, SIGUSR2 wedges the main loop, and no start rate limit (the tests
# stop, activate and restart the unit more often than systemd's default 5 starts in 10 s allow)
[Unit]
StartLimitIntervalSec=0

[Service]
WatchdogSec=4s
Environment=AGENTD_TEST_STALL_ON_SIGUSR2=1
"""


class Booted:
    def __init__(self, box: Container, root: Path, prefix: str, markers: dict[str, str],
                 metrics_port: int, config: str) -> None:
        self.box, self.root, self.prefix, self.markers = box, root, prefix, markers
        self.metrics_port, self.config = metrics_port, config

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self.box.run(*argv, check=False)
        if check and result.returncode != 0:
            journal = self.box.run("journalctl", "-u", "agentd.service", "--no-pager", "-n", "30",
                                   check=False).stdout
            raise AssertionError(f"{argv}: {result.stdout[-2000:]} {result.stderr[-2000:]}\n"
                                 f"journal:\n{journal}")
        return result

    def as_uid(self, uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.box.pid), "-a", "-S", str(uid),
                               "-G", str(uid), *argv], capture_output=True, text=True,
                              timeout=60, check=False)

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "agentd.service", *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.run("journalctl", "-u", "agentd.service", "--no-pager", "-o", "cat").stdout


@pytest.fixture(scope="module", params=list(SUITES))
def booted(
    request: pytest.FixtureRequest, bao: DevServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Booted]:
    """The package installed with apt-get in a clean root of each Debian release, booted."""
    deb = package("deb")
    work = tmp_path_factory.mktemp(f"nspawn-{request.param}")
    root = fresh_root(work / "root", request.param)
    install_deb(root, deb)

    prefix = f"nspawn-{uuid.uuid4().hex[:10]}"
    markers = {name: f"MARKER-{name}-{uuid.uuid4().hex}" for name in ("db", "other")}
    for name, marker in markers.items():
        bao.kv_put(f"{prefix}/{name}", {"password": marker})
    role_id, secret_id = bao.approle("agentd-nspawn", policies=["agentd-read"], token_ttl="1h")
    etc = root / "etc" / "agentd"
    for name, value in (("role_id", role_id), ("secret_id", secret_id)):
        (etc / name).write_text(value + "\n")
        (etc / name).chmod(0o600)
    metrics_port = free_port()
    config = CONFIG.format(address=bao.address, metrics_port=metrics_port, prefix=prefix,
                           alice=ALICE, extra="{extra}")
    (etc / "agentd.toml").write_text(config.format(extra=""))
    dropin = root / "etc/systemd/system/agentd.service.d"
    dropin.mkdir(parents=True)
    (dropin / "test.conf").write_text(DROP_IN)

    console = work / "console.log"
    with console.open("wb") as out:
        process = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "-b", "--register=no", "--keep-unit",
             "-M", f"agentd-ops-{uuid.uuid4().hex[:6]}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    box = Container(process, console)
    try:
        box.wait_booted()
        yield Booted(box, root, prefix, markers, metrics_port, config)
    finally:
        box.stop()


def test_start_reaches_active_running_through_ready(booted: Booted) -> None:
    # Enabled by the package, so boot already started it: stop, then start as an admin would.
    booted.run("systemctl", "stop", "agentd.service")
    assert booted.show("ActiveState")["ActiveState"] == "inactive"
    # Type=notify: `systemctl start` returns once READY=1 arrived (or fails on timeout).
    booted.run("systemctl", "start", "agentd.service")
    state = booted.show("ActiveState", "SubState", "Type", "NotifyAccess", "StatusErrno",
                        "WatchdogUSec", "NRestarts")
    assert (state["ActiveState"], state["SubState"], state["Type"], state["NotifyAccess"]) == \
        ("active", "running", "notify", "main")
    assert state["WatchdogUSec"] == "4s"
    assert "agentd ready" in booted.journal()
    # The runtime and state directories as the unit declares them.
    assert booted.run("stat", "-c", "%a %U", "/var/lib/agentd").stdout.split() == ["700", "root"]
    assert booted.run("stat", "-c", "%a %F", "/run/agentd/agentd.sock").stdout.strip() == \
        "666 socket"


def test_socket_answers_get_with_each_uids_grants(booted: Booted) -> None:
    booted.run("systemctl", "start", "agentd.service")
    alice = booted.as_uid(ALICE, "agentd", "get", "db", "password")
    assert (alice.returncode, alice.stdout.strip()) == (0, booted.markers["db"]), alice.stderr
    denied = booted.as_uid(ALICE, "agentd", "get", "other")
    assert denied.returncode != 0 and "forbidden" in denied.stderr
    bob = booted.as_uid(BOB, "agentd", "get", "db")
    assert bob.returncode != 0 and "forbidden" in bob.stderr
    assert booted.markers["db"] not in bob.stdout + bob.stderr
    # alice's private socket (decision 13), made by the sandboxed unit in its RuntimeDirectory:
    # alice reaches it, bob (named by no policy) gets EACCES
    mine = f"/run/agentd/agentd.sock.d/uid-{ALICE}"
    connect = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
               "try:\n    s.connect(sys.argv[1]); print('connected')\n"
               "except OSError as e:\n    print(e.errno)")
    python = "/opt/agentd/venv/bin/python"
    assert booted.as_uid(ALICE, python, "-c", connect, mine).stdout.strip() == "connected"
    assert booted.as_uid(BOB, python, "-c", connect, mine).stdout.strip() == str(errno.EACCES)
    # The audit trail (flushed every second) saw alice's uid as it is, not mapped to nobody.
    wait_until(lambda: f'"uid":{ALICE}' in booted.run("cat", "/var/log/agentd/audit.jsonl",
                                                     check=False).stdout, "alice in the audit")


STORM = """\
import errno, socket, sys
tally = {}
for _ in range(200_000):
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(sys.argv[1]); key = "connected"
    except OSError as e:
        key = errno.errorcode.get(e.errno, "other")
    s.close()
    tally[key] = tally.get(key, 0) + 1
    if tally.get("EACCES", 0) >= 100:
        break
print(tally)
"""


def test_a_connect_storm_is_shut_out_of_the_socket_directory(booted: Booted) -> None:
    """Under the shipped unit the connect guard (decision 13) works in /run/agentd: a storm by
    bob (no grants) is refused by the kernel's path lookup, alice still reads, and the block
    is lifted after its hold."""
    booted.run("systemctl", "restart", "agentd.service")
    assert "connect guard ready" in booted.journal()
    python = "/opt/agentd/venv/bin/python"
    storm = booted.as_uid(BOB, python, "-c", STORM, "/run/agentd/agentd.sock")
    assert "'EACCES': 100" in storm.stdout, storm.stdout + storm.stderr
    assert booted.as_uid(BOB, "agentd", "get", "db").returncode != 0
    alice = booted.as_uid(ALICE, "agentd", "get", "db", "password")
    assert (alice.returncode, alice.stdout.strip()) == (0, booted.markers["db"]), alice.stderr
    wait_until(lambda: "this uid may connect again" in booted.journal(), "the block lifted",
               timeout=60)
    after = booted.as_uid(BOB, "agentd", "get", "db")
    assert "forbidden" in after.stderr, after.stderr      # reached agentd again


def test_reload_applies_a_config_change(booted: Booted) -> None:
    booted.run("systemctl", "start", "agentd.service")
    pid = booted.show("MainPID")["MainPID"]
    assert booted.as_uid(BOB, "agentd", "get", "db").returncode != 0
    conf = booted.root / "etc/agentd/agentd.toml"
    conf.write_text(booted.config.format(
        extra=f'\n[[policy]]\nname = "bob"\nuids = [{BOB}]\nallow = ["db"]\n'))
    try:
        booted.run("systemctl", "reload", "agentd.service")
        bob = booted.as_uid(BOB, "agentd", "get", "db", "password")
        assert (bob.returncode, bob.stdout.strip()) == (0, booted.markers["db"]), bob.stderr
        state = booted.show("MainPID", "ActiveState", "SubState")
        assert (state["MainPID"], state["ActiveState"], state["SubState"]) == \
            (pid, "active", "running")
        assert "config reloaded" in booted.journal()
    finally:
        conf.write_text(booted.config.format(extra=""))
        booted.run("systemctl", "reload", "agentd.service")


def test_metrics_endpoint_of_the_packaged_daemon(booted: Booted) -> None:
    booted.run("systemctl", "start", "agentd.service")
    assert booted.as_uid(ALICE, "agentd", "get", "db").returncode == 0
    reply = httpx.get(f"http://127.0.0.1:{booted.metrics_port}/metrics", timeout=10)
    assert reply.status_code == 200
    assert 'agentd_secret_version{kind="kv2",name="db"} 1.0' in reply.text
    assert 'agentd_decisions_total{decision="allow",op="get"}' in reply.text
    assert booted.markers["db"] not in reply.text
    assert httpx.get(f"http://127.0.0.1:{booted.metrics_port}/ready", timeout=10).text == \
        "ready\n"


def test_online_security_score(booted: Booted) -> None:
    out = booted.run("systemd-analyze", "security", "--no-pager", "agentd.service").stdout
    score = float(out.rsplit("Overall exposure level for agentd.service:", 1)[1].split()[0])
    assert score <= MAX_EXPOSURE, out
    print(f"online exposure of agentd.service under systemd 252: {score}")


def test_watchdog_restarts_a_stalled_loop(booted: Booted) -> None:
    booted.run("systemctl", "start", "agentd.service")
    before = booted.show("MainPID", "NRestarts")
    booted.run("systemctl", "kill", "-s", "SIGUSR2", "--kill-who=main", "agentd.service")

    def restarted() -> bool:
        now = booted.show("MainPID", "NRestarts", "ActiveState", "SubState")
        return (int(now["NRestarts"]) > int(before["NRestarts"]) and now["MainPID"] != "0"
                and now["MainPID"] != before["MainPID"]
                and (now["ActiveState"], now["SubState"]) == ("active", "running"))

    wait_until(restarted, "a watchdog restart", timeout=40)
    journal = booted.journal()
    assert "Watchdog timeout" in journal
    assert "test hook: stalling the main loop" in journal
    # Served again after the restart.
    alice = booted.as_uid(ALICE, "agentd", "get", "db", "password")
    assert alice.stdout.strip() == booted.markers["db"]


def test_stop_is_clean_and_the_socket_activates_it_again(booted: Booted) -> None:
    booted.run("systemctl", "start", "agentd.service")
    booted.run("systemctl", "stop", "agentd.service")
    state = booted.show("ActiveState", "Result", "ExecMainStatus")
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == \
        ("inactive", "success", "0")
    assert "shutting down" in booted.journal()
    # agentd.socket kept listening: a client connecting now starts the service by activation.
    alice = booted.as_uid(ALICE, "agentd", "get", "db", "password")
    assert alice.stdout.strip() == booted.markers["db"], alice.stderr
    assert booted.show("ActiveState")["ActiveState"] == "active"


def test_rendered_file_has_its_owner_and_mode(booted: Booted) -> None:
    try:
        import agentd.render  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pytest.skip("the renderer (agentd/render.py) is not in the tree yet")
    dropin = booted.root / "etc/systemd/system/agentd.service.d/render.conf"
    dropin.write_text("[Service]\nReadWritePaths=/etc/webapp\n")
    (booted.root / "etc/webapp").mkdir(exist_ok=True)
    conf = booted.root / "etc/agentd/agentd.toml"
    conf.write_text(booted.config.format(extra=(
        '\n[[template]]\ncontents = "password = {{ secret(\'db\').password }}\\n"\n'
        f'destination = "/etc/webapp/db.conf"\nmode = "0640"\nowner = "{ALICE}"\n'
        f'group = "{ALICE}"\n')))
    try:
        booted.run("systemctl", "daemon-reload")
        booted.run("systemctl", "restart", "agentd.service")
        out = booted.root / "etc/webapp/db.conf"
        wait_until(out.exists, "the rendered file")
        st = out.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (ALICE, ALICE, 0o640)
        assert out.read_text() == f"password = {booted.markers['db']}\n"
    finally:
        conf.write_text(booted.config.format(extra=""))
        dropin.unlink()
        booted.run("systemctl", "daemon-reload")
        booted.run("systemctl", "restart", "agentd.service")
