"""The .deb and .rpm: contents and dependencies, reproducibility, and real installs.

Builds with packaging/build.sh (nfpm; wheels for python 3.10-3.13 under /opt/agentd, the venv
made at install) once per test run into a fresh directory, and makes one clean root per Debian
release with mmdebstrap (Debian 12 "bookworm" with python 3.11, Debian 13 "trixie" with 3.13)
that every install test copies (kept under build/package-test/ between runs: about 20-60 s each to
make, then about 1 s to copy). Ubuntu 22.04/24.04 and EL9/EL10 cannot be made here (no mirror):
their python ABIs are checked by resolving the package's wheels for them.
Needs root and the apt packages that .ci/run installs (rpm, mmdebstrap).
tests/test_systemd_nspawn.py boots the same roots with the package installed.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import json
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


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="agentd-pkg-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def build(fmt: str, *, release: str = "1", target: str = "", build_dir: Path | None = None,
          out_dir: Path | None = None) -> Path:
    """Build one package with packaging/build.sh; returns its path."""
    env = dict(os.environ, BUILD_PYTHON=sys.executable, RELEASE=release, SOURCE_DATE_EPOCH=EPOCH,
               TARGET=target,
               BUILD_DIR=str(build_dir or _workdir() / "build"),
               OUT_DIR=str(out_dir or _workdir() / "dist"))
    result = subprocess.run([str(REPO / "packaging" / "build.sh"), fmt], env=env, check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


@functools.cache
def package(fmt: str, release: str = "1", target: str = "") -> Path:
    """The package of this run (built once per format, release and target)."""
    _need_tools()
    return build(fmt, release=release, target=target)


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


SUITES = {"bookworm": "3.11", "trixie": "3.13"}     # Debian 12 and 13, and their python3


@functools.cache
def root_tarball(suite: str = "bookworm") -> Path:
    """A clean Debian root (mmdebstrap minbase + systemd + python3), made once and kept."""
    _need_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(ROOT_INCLUDE.encode()).hexdigest()[:12]
    tarball = CACHE / f"root-{suite}-{key}.tar"
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # another test run may be making it right now
        if not tarball.exists():
            partial = tarball.with_suffix(".partial.tar")
            subprocess.run(
                ["mmdebstrap", "--variant=minbase", f"--include={ROOT_INCLUDE}", suite,
                 str(partial), _mirror()],
                check=True, timeout=900, capture_output=True,
            )
            partial.rename(tarball)
    return tarball


def fresh_root(dest: Path, suite: str = "bookworm") -> Path:
    """Unpack the clean root of ``suite`` into ``dest`` (a new directory)."""
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(dest), "-xf", str(root_tarball(suite))], check=True,
                   timeout=300)
    return dest


def chroot(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, check=False)
    if check:
        assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-2000:])
    return result


def install_deb(root: Path, deb: Path) -> subprocess.CompletedProcess[str]:
    """``apt-get install ./agentd.deb`` inside the root, as an admin would (no network needed:
    every dependency is already in the clean root)."""
    shutil.copy(deb, root / "tmp" / deb.name)
    result = subprocess.run(
        ["chroot", str(root), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
         "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
         f"/tmp/{deb.name}"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


ABIS = ("cp310", "cp311", "cp312", "cp313")        # Ubuntu 22.04, Debian 12, 24.04/EL10, Debian 13

EXPECTED_FILES = [
    "/opt/agentd/libexec/agentd-venv",
    f"/opt/agentd/wheels/agentd-{VERSION}-py3-none-any.whl",
    "/opt/agentd/wheels/pyinotify-0.9.6-py3-none-any.whl",
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


def _wheels(names: list[str]) -> list[str]:
    return sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("/opt/agentd/wheels/"))


def test_deb_lists_files_conffiles_and_dependencies() -> None:
    deb = package("deb")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True,
                             text=True).stdout
    entries = {}
    for line in listing.splitlines():
        fields = line.split()
        name = fields[5].removeprefix(".").rstrip("/")
        entries[name] = (fields[0], fields[1], fields[6:])
    for path in [*EXPECTED_FILES, "/usr/share/doc/agentd/copyright",
                 "/usr/share/doc/agentd/changelog.Debian.gz"]:
        assert path in entries, path
    assert entries["/usr/bin/agentd"][2] == ["->", "/opt/agentd/venv/bin/agentd"]
    assert entries["/etc/agentd/agentd.toml"][:2] == ("-rw-r-----", "root/root")
    assert entries["/opt/agentd/libexec/agentd-venv"][:2] == ("-rwxr-xr-x", "root/root")
    wheels = _wheels(list(entries))
    for abi in ABIS:     # the binary dependencies for every python the package supports
        for dist in ("msgpack", "markupsafe", "cffi"):
            assert any(w.startswith(f"{dist}-") and f"-{abi}-" in w for w in wheels), (dist, abi)
    # Nothing built for this machine only: no venv, no bytecode, no staging path.
    assert not [n for n in entries if n.startswith("/opt/agentd/venv") or n.endswith(".pyc")
                or "build/package" in n or ".egg-info" in n]

    info = subprocess.run(["dpkg-deb", "-I", str(deb)], check=True, capture_output=True,
                          text=True).stdout
    assert "Package: agentd" in info
    assert f"Version: {VERSION}-1" in info
    assert "Depends: python3 (>= 3.10), python3 (<< 3.14), systemd" in info
    assert "localhost" not in info
    assert "Maintainer: agentd developers <" in info
    for script in ("postinst", "prerm", "postrm"):
        assert f" {script} " in info, script
    control = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], check=True,
                             capture_output=True).stdout
    names = subprocess.run(["tar", "-xO", "./conffiles"], input=control, check=True,
                           capture_output=True).stdout.decode().split()
    assert names == ["/etc/agentd/agentd.toml"]


@pytest.mark.parametrize(("target", "requires", "pythons"), [
    ("el9", ["(python3.12 or python3.11)", "systemd"], ["3.11", "3.12"]),
    ("el10", ["python3 >= 3.12", "python3 < 3.14", "systemd"], ["3.12", "3.13"]),
])
def test_rpm_lists_files_config_scriptlets_and_requires(
    target: str, requires: list[str], pythons: list[str], tmp_path: Path
) -> None:
    rpm = package("rpm", target=target)
    assert rpm.name == f"agentd-{VERSION}-1.{target}.x86_64.rpm"
    files = subprocess.run(["rpm", "-qpl", str(rpm)], check=True, capture_output=True,
                           text=True).stdout.split()
    for path in [*EXPECTED_FILES, "/usr/share/licenses/agentd/LICENSE"]:
        assert path in files, path
    config = subprocess.run(["rpm", "-qpc", str(rpm)], check=True, capture_output=True,
                            text=True).stdout.split()
    assert config == ["/etc/agentd/agentd.toml"]
    listed = subprocess.run(["rpm", "-qpR", str(rpm)], check=True, capture_output=True,
                            text=True).stdout.splitlines()
    for dep in requires:
        assert dep in listed, (dep, listed)
    scripts = subprocess.run(["rpm", "-qp", "--scripts", str(rpm)], check=True,
                             capture_output=True, text=True).stdout
    for section in ("postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"):
        assert section in scripts, section
    header = subprocess.run(["rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH} "
                             "%{URL} %{LICENSE}", str(rpm)],
                            check=True, capture_output=True, text=True).stdout
    assert header.startswith(f"agentd {VERSION} 1.{target} x86_64 https://")
    assert "localhost" not in header and header.endswith(" MPL-2.0")
    # The pythons this target's Requires admit can install agentd from the package's wheels.
    unpacked = tmp_path / "rpm"
    unpacked.mkdir()
    with rpm.open("rb") as packed:
        archive = subprocess.run(["rpm2archive", "-"], stdin=packed, check=True,
                                 capture_output=True).stdout
    subprocess.run(["tar", "-xz"], input=archive, cwd=unpacked, check=True)
    for py in pythons:
        _resolves(unpacked / "opt/agentd/wheels", py, tmp_path / f"dry-{py}")


def _resolves(wheels: Path, python: str, target: Path) -> None:
    """pip, offline, resolves agentd and its dependencies for ``python`` from ``wheels``."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--no-index", "--find-links", str(wheels), "--only-binary=:all:",
         "--implementation", "cp", "--python-version", python,
         "--platform", "manylinux_2_34_x86_64", "--platform", "manylinux2014_x86_64",
         "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64",
         "--target", str(target), "--report", "-", "--quiet", "agentd"],
        env=dict(os.environ, PIP_CONFIG_FILE="/dev/null", PIP_FIND_LINKS=""),
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (python, result.stderr[-2000:])
    report = json.loads(result.stdout)
    names = {item["metadata"]["name"].lower() for item in report["install"]}
    # (pip evaluates environment markers with its own interpreter here: what 3.10 alone needs,
    # exceptiongroup and tomli, is checked by the real install below where a 3.10 exists.)
    assert {"agentd", "trio", "cryptography", "msgpack", "jinja2", "h11"} <= names, names


def _interpreter(version: str) -> Path | None:
    for candidate in (Path(f"/usr/bin/python{version}"),
                      *sorted(Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python3"))):
        if candidate.exists():
            return candidate
    return None


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_deb_carries_what_each_supported_python_needs(python: str, tmp_path: Path) -> None:
    """Ubuntu 22.04 (3.10) and 24.04 (3.12) cannot be booted here: their ABIs are checked by
    resolving the package's own wheels for them, offline, as the postinst will."""
    data = tmp_path / "deb"
    subprocess.run(["dpkg-deb", "-x", str(package("deb")), str(data)], check=True)
    _resolves(data / "opt/agentd/wheels", python, tmp_path / "dry")
    interpreter = _interpreter(python)
    if interpreter is None:
        return      # resolved above; no such interpreter on this machine to install with
    # The package's own venv builder, with that interpreter, offline, into a scratch prefix.
    result = subprocess.run(
        [str(data / "opt/agentd/libexec/agentd-venv")],
        env={"PATH": "/usr/bin:/bin", "AGENTD_PREFIX": str(data / "opt/agentd"),
             "AGENTD_PYTHON": str(interpreter)},
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    version = subprocess.run([str(data / "opt/agentd/venv/bin/agentd"), "--version"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert version.startswith(f"agentd {VERSION} (Python {python}."), version
    site = next((data / "opt/agentd/venv/lib").glob("python3.*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert ("exceptiongroup" in installed) == (python == "3.10"), installed


def test_builds_are_reproducible(tmp_path: Path) -> None:
    # Another build directory and output directory, same SOURCE_DATE_EPOCH: the same bytes.
    for fmt in ("deb", "rpm"):
        again = build(fmt, build_dir=tmp_path / "build", out_dir=tmp_path / "dist")
        first = package(fmt)
        assert hashlib.sha256(again.read_bytes()).hexdigest() == \
            hashlib.sha256(first.read_bytes()).hexdigest(), fmt


@pytest.mark.parametrize("suite", list(SUITES))
def test_deb_install_upgrade_keeps_edited_conffile_and_purge_removes_state(
    suite: str, tmp_path: Path,
) -> None:
    root = fresh_root(tmp_path / "root", suite)
    install_deb(root, package("deb"))

    # The venv was built at install with this release's python3.
    version = chroot(root, "agentd", "--version").stdout.strip()
    assert version.startswith(f"agentd {VERSION} (Python {SUITES[suite]}."), version
    assert version.endswith("/opt/agentd/venv/bin/python)")
    # The user and group exist, state and log directories too, units enabled but not started.
    passwd = chroot(root, "getent", "passwd", "agentd").stdout
    assert passwd.startswith("agentd:x:") and passwd.rstrip().endswith(":/usr/sbin/nologin")
    assert chroot(root, "getent", "group", "agentd").stdout.startswith("agentd:x:")
    assert oct((root / "var/lib/agentd").stat().st_mode & 0o7777) == "0o700"
    assert (root / "etc/systemd/system/multi-user.target.wants/agentd.service").is_symlink()
    assert (root / "etc/systemd/system/sockets.target.wants/agentd.socket").is_symlink()
    # The units as installed: `systemd-analyze verify` has nothing to say about either.
    verify = chroot(root, "systemd-analyze", "verify", "/usr/lib/systemd/system/agentd.service",
                    "/usr/lib/systemd/system/agentd.socket", check=False)
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    # The shipped config is complete enough to be checked (it names files the admin provides).
    check = chroot(root, "agentd", "check-config", "-c", "/etc/agentd/agentd.toml", check=False)
    assert check.returncode == 2 and "role_id" in check.stdout + check.stderr

    # The admin edits the conffile; an upgrade to a higher version keeps the edit and rebuilds
    # the venv (a new inode for its python).
    conf = root / "etc/agentd/agentd.toml"
    edited = conf.read_text() + "\n# edited by the admin\n"
    conf.write_text(edited)
    (root / "var/lib/agentd/cache.key").write_bytes(os.urandom(32))
    before = (root / "opt/agentd/venv/pyvenv.cfg").stat().st_ino
    install_deb(root, package("deb", release="2"))
    installed = chroot(root, "dpkg-query", "-W", "-f", "${Version}", "agentd").stdout
    assert installed == f"{VERSION}-2"
    assert conf.read_text() == edited
    assert not (root / "etc/agentd/agentd.toml.dpkg-dist").exists()
    assert (root / "opt/agentd/venv/pyvenv.cfg").stat().st_ino != before
    assert not (root / "opt/agentd/venv.new").exists()
    assert not (root / "opt/agentd/venv.old").exists()
    assert chroot(root, "agentd", "--version").stdout.startswith(f"agentd {VERSION} ")

    # Remove keeps state and config and drops the venv; purge removes state and config too.
    chroot(root, "dpkg", "-r", "agentd")
    assert (root / "var/lib/agentd/cache.key").exists()
    assert conf.exists()
    assert not (root / "opt/agentd").exists()
    chroot(root, "dpkg", "-P", "agentd")
    assert not (root / "var/lib/agentd").exists()
    assert not (root / "etc/agentd").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/agentd.service").exists()


def test_install_fails_clearly_without_a_supported_python(tmp_path: Path) -> None:
    """A host whose python3 is outside 3.10-3.13 gets a one-line reason, and no half install."""
    root = fresh_root(tmp_path / "root")
    shutil.copy(package("deb"), root / "tmp" / "agentd.deb")
    result = subprocess.run(
        ["chroot", str(root), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
         "AGENTD_PYTHON=/bin/false", "dpkg", "-i", "/tmp/agentd.deb"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert result.returncode != 0
    assert "agentd-venv: no python 3.10 to 3.13 found" in result.stderr
    assert not (root / "opt/agentd/venv").exists()


def test_rpm_installs_with_scriptlets_into_another_root(tmp_path: Path) -> None:
    root = fresh_root(tmp_path / "root")
    rpm = package("rpm")
    subprocess.run(["rpm", "--root", str(root), "--initdb"], check=True, timeout=60)
    # --nodeps: the Debian root's python3 is a dpkg package, unknown to this rpm database.
    result = subprocess.run(["rpm", "-i", "--root", str(root), "--nodeps", str(rpm)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    # %post ran inside the root: venv built, user created, state directory made.
    assert chroot(root, "getent", "passwd", "agentd").stdout.startswith("agentd:x:")
    assert oct((root / "var/lib/agentd").stat().st_mode & 0o7777) == "0o700"
    assert chroot(root, "agentd", "--version").stdout.startswith(f"agentd {VERSION} (Python 3.")
    verify = subprocess.run(["rpm", "-V", "--root", str(root), "--nodeps", "agentd"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert (verify.returncode, verify.stdout) == (0, ""), verify.stdout
    # An erase keeps state (rpm has no purge), saves an edited config as .rpmsave and drops the
    # venv it built.
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
