"""The .deb and .rpm: contents and dependencies, reproducibility, and real installs.

Builds with packaging/build.sh (nfpm, venv under /opt/agentd) once per test run into a fresh
directory, and makes one clean Debian root with mmdebstrap that every install test copies (kept
under build/package-test/ between runs: about 20-40 s to make, then about 1 s to copy).
Needs root, /usr/bin/python3.11 and the apt packages that .ci/run installs (rpm, mmdebstrap).
tests/test_systemd_nspawn.py boots the same root with the package installed.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import agentd

pytestmark = pytest.mark.slow

REPO = Path(agentd.__file__).resolve().parent.parent
CACHE = REPO / "build" / "package-test"
ROOT_INCLUDE = "systemd,systemd-sysv,dbus,python3,adduser"
VERSION = agentd.__version__
EPOCH = "1700000000"
TOOLS = ("dpkg-deb", "rpm", "mmdebstrap", "chroot", "tar")


def _need_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the package tests need root (CI runs as root)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install rpm mmdebstrap (see .ci/run)")
    if not Path("/usr/bin/python3.11").exists():
        pytest.fail("the packages are built with /usr/bin/python3.11 (apt-get install python3.11)")


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="agentd-pkg-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def build(fmt: str, *, release: str = "1", build_dir: Path | None = None,
          out_dir: Path | None = None) -> Path:
    """Build one package with packaging/build.sh; returns its path."""
    env = dict(os.environ, BUILD_PYTHON=sys.executable, RELEASE=release, SOURCE_DATE_EPOCH=EPOCH,
               BUILD_DIR=str(build_dir or _workdir() / "build"),
               OUT_DIR=str(out_dir or _workdir() / "dist"))
    result = subprocess.run([str(REPO / "packaging" / "build.sh"), fmt], env=env, check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


@functools.cache
def package(fmt: str, release: str = "1") -> Path:
    """The package of this run (built once per format and release)."""
    _need_tools()
    return build(fmt, release=release)


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


@functools.cache
def root_tarball() -> Path:
    """A clean Debian 12 root (mmdebstrap minbase + systemd + python3), made once and kept."""
    _need_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(ROOT_INCLUDE.encode()).hexdigest()[:12]
    tarball = CACHE / f"root-{key}.tar"
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # another test run may be making it right now
        if not tarball.exists():
            partial = tarball.with_suffix(".partial.tar")
            subprocess.run(
                ["mmdebstrap", "--variant=minbase", f"--include={ROOT_INCLUDE}", "bookworm",
                 str(partial), _mirror()],
                check=True, timeout=900, capture_output=True,
            )
            partial.rename(tarball)
    return tarball


def fresh_root(dest: Path) -> Path:
    """Unpack the clean root into ``dest`` (a new directory)."""
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(dest), "-xf", str(root_tarball())], check=True, timeout=300)
    return dest


def chroot(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, check=False)
    if check:
        assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-2000:])
    return result


def install_deb(root: Path, deb: Path) -> subprocess.CompletedProcess[str]:
    shutil.copy(deb, root / "tmp" / deb.name)
    return chroot(root, "dpkg", "-i", f"/tmp/{deb.name}")


EXPECTED_FILES = [
    "/opt/agentd/bin/agentd",
    "/opt/agentd/bin/python3.11",
    "/opt/agentd/pyvenv.cfg",
    f"/opt/agentd/lib/python3.11/site-packages/agentd-{VERSION}.dist-info/METADATA",
    "/opt/agentd/lib/python3.11/site-packages/agentd/daemon.py",
    "/opt/agentd/lib/python3.11/site-packages/agentd/metrics.py",
    "/opt/agentd/lib/python3.11/site-packages/trio/__init__.py",
    "/opt/agentd/lib/python3.11/site-packages/cryptography/__init__.py",
    "/opt/agentd/lib/python3.11/site-packages/prometheus_client/__init__.py",
    "/usr/bin/agentd",
    "/usr/lib/systemd/system/agentd.service",
    "/usr/lib/systemd/system/agentd.socket",
    "/usr/lib/sysusers.d/agentd.conf",
    "/usr/lib/tmpfiles.d/agentd.conf",
    "/etc/agentd/agentd.toml",
    "/etc/agentd/conf.d",
    "/etc/agentd/templates",
    "/usr/share/doc/agentd/operations.md",
]


def test_deb_lists_files_conffiles_and_dependencies() -> None:
    deb = package("deb")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True,
                             text=True).stdout
    entries = {}
    for line in listing.splitlines():
        fields = line.split()
        name = fields[5].removeprefix(".").rstrip("/")
        entries[name] = (fields[0], fields[1], fields[6:])
    for path in EXPECTED_FILES:
        assert path in entries, path
    assert entries["/usr/bin/agentd"][2] == ["->", "/opt/agentd/bin/agentd"]
    assert entries["/opt/agentd/bin/python3.11"][2] == ["->", "/usr/bin/python3.11"]
    assert entries["/etc/agentd/agentd.toml"][:2] == ("-rw-r-----", "root/root")
    # No staging path, no pip and no stray bytecode of the build machine in the package.
    assert not [n for n in entries if "/pip/" in n or "build/package" in n or ".egg-info" in n]

    info = subprocess.run(["dpkg-deb", "-I", str(deb)], check=True, capture_output=True,
                          text=True).stdout
    assert "Package: agentd" in info
    assert f"Version: {VERSION}-1" in info
    assert "Depends: python3.11, systemd" in info
    for script in ("postinst", "prerm", "postrm"):
        assert f" {script} " in info, script
    control = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], check=True,
                             capture_output=True).stdout
    names = subprocess.run(["tar", "-xO", "./conffiles"], input=control, check=True,
                           capture_output=True).stdout.decode().split()
    assert names == ["/etc/agentd/agentd.toml"]


def test_rpm_lists_files_config_scriptlets_and_requires() -> None:
    rpm = package("rpm")
    files = subprocess.run(["rpm", "-qpl", str(rpm)], check=True, capture_output=True,
                           text=True).stdout.split()
    for path in EXPECTED_FILES:
        assert path in files, path
    config = subprocess.run(["rpm", "-qpc", str(rpm)], check=True, capture_output=True,
                            text=True).stdout.split()
    assert config == ["/etc/agentd/agentd.toml"]
    requires = subprocess.run(["rpm", "-qpR", str(rpm)], check=True, capture_output=True,
                              text=True).stdout.splitlines()
    assert "/usr/bin/python3.11" in requires
    assert "systemd" in requires
    scripts = subprocess.run(["rpm", "-qp", "--scripts", str(rpm)], check=True,
                             capture_output=True, text=True).stdout
    for section in ("postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"):
        assert section in scripts, section
    header = subprocess.run(["rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}",
                             str(rpm)], check=True, capture_output=True, text=True).stdout
    assert header == f"agentd {VERSION} 1 x86_64"


def test_builds_are_reproducible(tmp_path: Path) -> None:
    # Another build directory and output directory, same SOURCE_DATE_EPOCH: the same bytes.
    for fmt in ("deb", "rpm"):
        again = build(fmt, build_dir=tmp_path / "build", out_dir=tmp_path / "dist")
        first = package(fmt)
        assert hashlib.sha256(again.read_bytes()).hexdigest() == \
            hashlib.sha256(first.read_bytes()).hexdigest(), fmt


def test_deb_install_upgrade_keeps_edited_conffile_and_purge_removes_state(
    tmp_path: Path,
) -> None:
    root = fresh_root(tmp_path / "root")
    install_deb(root, package("deb"))

    # The user and group exist, state and log directories too, units enabled but not started.
    passwd = chroot(root, "getent", "passwd", "agentd").stdout
    assert passwd.startswith("agentd:x:") and passwd.rstrip().endswith(":/usr/sbin/nologin")
    assert chroot(root, "getent", "group", "agentd").stdout.startswith("agentd:x:")
    assert oct((root / "var/lib/agentd").stat().st_mode & 0o7777) == "0o700"
    assert (root / "etc/systemd/system/multi-user.target.wants/agentd.service").is_symlink()
    assert (root / "etc/systemd/system/sockets.target.wants/agentd.socket").is_symlink()
    assert chroot(root, "agentd", "--version").stdout.strip().endswith(VERSION)
    # The units as installed: `systemd-analyze verify` has nothing to say about either.
    verify = chroot(root, "systemd-analyze", "verify", "/usr/lib/systemd/system/agentd.service",
                    "/usr/lib/systemd/system/agentd.socket", check=False)
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    # The shipped config is complete enough to be checked (it names files the admin provides).
    check = chroot(root, "agentd", "check-config", "-c", "/etc/agentd/agentd.toml", check=False)
    assert check.returncode == 2 and "role_id" in check.stdout + check.stderr

    # The admin edits the conffile; an upgrade to a higher version keeps the edit.
    conf = root / "etc/agentd/agentd.toml"
    edited = conf.read_text() + "\n# edited by the admin\n"
    conf.write_text(edited)
    (root / "var/lib/agentd/cache.key").write_bytes(os.urandom(32))
    install_deb(root, package("deb", release="2"))
    version = chroot(root, "dpkg-query", "-W", "-f", "${Version}", "agentd").stdout
    assert version == f"{VERSION}-2"
    assert conf.read_text() == edited
    assert not (root / "etc/agentd/agentd.toml.dpkg-dist").exists()

    # Remove keeps state and config; purge removes both.
    chroot(root, "dpkg", "-r", "agentd")
    assert (root / "var/lib/agentd/cache.key").exists()
    assert conf.exists()
    assert not (root / "opt/agentd").exists()
    chroot(root, "dpkg", "-P", "agentd")
    assert not (root / "var/lib/agentd").exists()
    assert not (root / "etc/agentd").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/agentd.service").exists()


def test_rpm_installs_with_scriptlets_into_another_root(tmp_path: Path) -> None:
    root = fresh_root(tmp_path / "root")
    rpm = package("rpm")
    subprocess.run(["rpm", "--root", str(root), "--initdb"], check=True, timeout=60)
    # --nodeps: the Debian root's python3.11 is a dpkg package, unknown to this rpm database.
    result = subprocess.run(["rpm", "-i", "--root", str(root), "--nodeps", str(rpm)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    # %post ran inside the root: user created, state directory made, units per preset.
    assert chroot(root, "getent", "passwd", "agentd").stdout.startswith("agentd:x:")
    assert oct((root / "var/lib/agentd").stat().st_mode & 0o7777) == "0o700"
    assert chroot(root, "agentd", "--version").stdout.strip().endswith(VERSION)
    verify = subprocess.run(["rpm", "-V", "--root", str(root), "--nodeps", "agentd"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert (verify.returncode, verify.stdout) == (0, ""), verify.stdout
    # An erase keeps state (rpm has no purge) and saves an edited config as .rpmsave.
    conf = root / "etc/agentd/agentd.toml"
    conf.write_text(conf.read_text() + "\n# edited\n")
    (root / "var/lib/agentd/cache.key").write_bytes(os.urandom(32))
    erase = subprocess.run(["rpm", "-e", "--root", str(root), "--nodeps", "agentd"],
                           capture_output=True, text=True, timeout=300, check=False)
    assert erase.returncode == 0, erase.stderr
    assert (root / "etc/agentd/agentd.toml.rpmsave").read_text().endswith("# edited\n")
    assert (root / "var/lib/agentd/cache.key").exists()
    assert not (root / "opt/agentd").exists()
    assert not (root / "usr/bin/agentd").is_symlink()
