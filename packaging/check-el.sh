#!/usr/bin/env bash
# Check an agentd .rpm on a real EL9/EL10 machine (as root; dnf reaches the distribution's
# repositories): install with dnf (which resolves Requires: python3.11/3.12 or python3), check that
# the venv was built with a supported python, start the unit, and remove the package again.
#
#   packaging/check-el.sh dist/agentd-0.1.0-1.el9.x86_64.rpm
set -euo pipefail

rpm_file="$(realpath "${1:?usage: $0 agentd-VERSION-RELEASE.elN.x86_64.rpm}")"
installed_before="$(rpm -q agentd >/dev/null 2>&1 && echo yes || echo no)"
[[ "${installed_before}" == no ]] || { echo "agentd is already installed: refusing" >&2; exit 2; }

dnf install -y "${rpm_file}"
version="$(agentd --version)"
echo "installed: ${version}"
[[ "${version}" == *"(Python 3.1"[0-3]* ]] || { echo "unexpected python: ${version}" >&2; exit 1; }
rpm -V agentd
systemd-analyze verify /usr/lib/systemd/system/agentd.service /usr/lib/systemd/system/agentd.socket
agentd check-config -c /etc/agentd/agentd.toml || true   # names the files the admin provides
dnf remove -y agentd
[[ ! -e /opt/agentd/venv ]] || { echo "the venv was left behind" >&2; exit 1; }
echo "ok: ${rpm_file}"
