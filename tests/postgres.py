"""A real PostgreSQL server for the leased-credential tests (apt-get install postgresql).

``Postgres.start(workdir)`` runs ``initdb`` (as user postgres when we are root) into a fresh
directory and ``pg_ctl start`` on a free loopback port, with password (scram-sha-256) logins
over TCP and trust on its private Unix socket directory (used only to set it up). It creates the
database ``app`` and an admin role for OpenBao's database engine. ``stop()`` runs
``pg_ctl stop -m immediate``. ``can_login(user, password)`` tries a real psql login over TCP.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.openbao import free_port


def pg_bin(program: str) -> str:
    """``program`` from PATH or Debian's /usr/lib/postgresql/N/bin (not on PATH there)."""
    found = shutil.which(program)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), reverse=True):
        return candidate
    raise RuntimeError(
        f"PostgreSQL's {program} is missing: apt-get install postgresql (.ci/run does this)"
    )


@dataclass
class Postgres:
    port: int
    workdir: Path
    datadir: Path
    sockdir: Path
    admin_user: str
    admin_password: str
    run_as: str | None          # "postgres" when started by root

    @classmethod
    def start(cls) -> Postgres:
        """Start a fresh server in its own temp directory (pytest's are 0700 root: the postgres
        user could not enter them); ``stop()`` removes it."""
        run_as = "postgres" if os.geteuid() == 0 else None
        workdir = Path(tempfile.mkdtemp(prefix="agentd-pg-"))
        datadir = workdir / "data"
        sockdir = workdir / "sock"
        sockdir.mkdir()
        if run_as is not None:
            pw = pwd.getpwnam(run_as)
            workdir.chmod(0o755)
            for path in (sockdir,):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            datadir.mkdir(mode=0o700)
            os.chown(datadir, pw.pw_uid, pw.pw_gid)
        server = cls(
            port=free_port(), workdir=workdir, datadir=datadir, sockdir=sockdir,
            admin_user="bao_admin",
            admin_password=uuid.uuid4().hex, run_as=run_as,
        )
        server._run([pg_bin("initdb"), "-D", str(datadir), "-U", "postgres", "--no-sync",
                     "--auth-local=trust", "--auth-host=scram-sha-256"])
        server._run([
            pg_bin("pg_ctl"), "-D", str(datadir), "-w", "-t", "60", "-l", str(datadir / "log"),
            "-o", f"-p {server.port} -k {sockdir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ])
        server.admin_sql(
            f"CREATE ROLE {server.admin_user} WITH LOGIN CREATEROLE SUPERUSER "
            f"PASSWORD '{server.admin_password}';"
        )
        server.admin_sql("CREATE DATABASE app;")
        return server

    def stop(self) -> None:
        self._run([pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"],
                  check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self, argv: list[str], *, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        if self.run_as is not None:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, env=env, cwd="/", check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result

    def admin_sql(self, sql: str, *, database: str = "postgres") -> str:
        """Run SQL as the superuser over the private Unix socket; return psql's output."""
        result = self._run([pg_bin("psql"), "-h", str(self.sockdir), "-p", str(self.port),
                            "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1",
                            "-At", "-c", sql])
        return result.stdout.strip()

    def role_exists(self, name: str) -> bool:
        escaped = name.replace("'", "''")
        return self.admin_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{escaped}'") == "1"

    def can_login(self, user: str, password: str) -> bool:
        """A real password login over TCP to database app (what an application does)."""
        env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="5")
        result = subprocess.run(
            [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", "app",
             "-w", "-At", "-c", "SELECT current_user"],
            capture_output=True, text=True, timeout=30, env=env, check=False,
        )
        return result.returncode == 0 and result.stdout.strip() == user

    @property
    def connection_url(self) -> str:
        """For OpenBao's database engine (it fills in username and password)."""
        return f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{self.port}/app" \
               "?sslmode=disable"
