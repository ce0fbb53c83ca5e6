"""The systemd units as files: offline checks that need no systemd running.

``systemd-analyze verify`` on the installed package (where /usr/bin/agentd exists) is in
tests/test_packages.py; here the unit is scored, parsed and its snippets applied to a scratch root.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
# DESIGN.md decision 11: rendering files for other owners, reading other uids' /proc, commands.
CAPABILITIES = {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH",
                "CAP_SYS_PTRACE", "CAP_KILL"}
MAX_EXPOSURE = 2.5


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing (the systemd package)")
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    """section.Key -> every value, in order (systemd allows repeated keys)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=_MultiDict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    out: dict[str, list[str]] = {}
    for section in parser.sections():
        for key, value in parser.items(section):
            out[f"{section}.{key}"] = value.split("\n") if isinstance(value, str) else value
    return out


class _MultiDict(dict):  # type: ignore[type-arg]
    """Keeps every value of a repeated key (configparser keeps the last one otherwise)."""

    def __setitem__(self, key: str, value: object) -> None:
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def test_security_exposure_at_most_2_5_and_no_private_users(tmp_path: Path) -> None:
    unit = tmp_path / "agentd.service"
    shutil.copy(UNITS / "agentd.service", unit)
    result = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=true",
         f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for agentd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout[-3000:]
    # Never PrivateUsers=: every caller would be "nobody" and the peer checks void.
    assert not [line for line in unit.read_text().splitlines()
                if line.strip().startswith("PrivateUsers")]


def test_service_directives() -> None:
    d = directives(UNITS / "agentd.service")
    expect = {
        "Service.Type": ["notify"], "Service.NotifyAccess": ["main"],
        "Service.Restart": ["on-failure"], "Service.RuntimeDirectory": ["agentd"],
        "Service.RuntimeDirectoryPreserve": ["yes"], "Service.StateDirectory": ["agentd"],
        "Service.StateDirectoryMode": ["0700"], "Service.UMask": ["0077"],
        "Service.ProtectSystem": ["strict"], "Service.NoNewPrivileges": ["yes"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
        "Service.MemoryDenyWriteExecute": ["yes"], "Service.MemorySwapMax": ["0"],
        "Service.PrivateMounts": ["yes"], "Service.ExecStart":
            ["/usr/bin/agentd run -c /etc/agentd/agentd.toml"],
        "Unit.Requires": ["agentd.socket"], "Install.Also": ["agentd.socket"],
    }
    for key, value in expect.items():
        assert d.get(key) == value, key
    assert set(d["Service.CapabilityBoundingSet"][0].split()) == CAPABILITIES
    assert "@system-service" in d["Service.SystemCallFilter"]
    assert "HUP" in d["Service.ExecReload"][0]
    for key in ("WatchdogSec", "MemoryMax", "LimitNOFILE", "ProtectHome", "PrivateTmp",
                "PrivateDevices", "LockPersonality", "RestrictNamespaces", "ProtectClock",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"):
        assert f"Service.{key}" in d, key
    # The cache-key credential and the render drop-in are documented in the unit itself.
    text = (UNITS / "agentd.service").read_text()
    assert "LoadCredentialEncrypted=agentd-cache-key:" in text
    assert "ReadWritePaths=" in text


def test_socket_matches_the_default_socket() -> None:
    d = directives(UNITS / "agentd.socket")
    assert d["Socket.ListenStream"] == ["/run/agentd/agentd.sock"]
    assert d["Socket.SocketMode"] == ["0666"]          # [agent] socket_mode default
    assert d["Install.WantedBy"] == ["sockets.target"]


def test_verify_reports_nothing_but_the_absent_binary(tmp_path: Path) -> None:
    # Outside the package /usr/bin/agentd may be missing: that is the only thing allowed to show.
    for name in ("agentd.service", "agentd.socket"):
        shutil.copy(UNITS / name, tmp_path / name)
    result = subprocess.run(
        [_tool("systemd-analyze"), "verify", "agentd.service", "agentd.socket"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    allowed = "agentd.service: Command /usr/bin/agentd is not executable: No such file"
    assert [line for line in lines if not line.startswith(allowed)] == []
    if Path("/usr/bin/agentd").exists():
        assert lines == []


def test_sysusers_and_tmpfiles_snippets_apply_to_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([_tool("systemd-sysusers"), f"--root={root}",
                    str(UNITS / "agentd.sysusers")], check=True, timeout=60,
                   capture_output=True)
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    assert re.search(r"^agentd:x:\d+:\d+:agentd secrets agent:/var/lib/agentd:/usr/sbin/nologin$",
                     passwd, re.M), passwd
    assert re.search(r"^agentd:x:\d+:", group, re.M)
    subprocess.run([_tool("systemd-tmpfiles"), f"--root={root}", "--create",
                    str(UNITS / "agentd.tmpfiles")], check=True, timeout=60,
                   capture_output=True)
    assert (root / "var/lib/agentd").stat().st_mode & 0o7777 == 0o700
    assert (root / "var/log/agentd").stat().st_mode & 0o7777 == 0o750
