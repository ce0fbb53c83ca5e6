#!/usr/bin/env bash
# System packages the test suite uses, installed only when missing (root + apt-get only):
#   systemd-container, mmdebstrap  tests/test_creds_nspawn.py, tests/test_systemd_nspawn.py
#                                  (a real systemd booted in a container from a clean Debian root)
#   rpm                            tests/test_packages.py (rpm -qp, rpm --root)
#   postgresql                     tests/test_leased.py (OpenBao's database secrets engine)
#   curl                           tests/test_http_agent.py (curl --unix-socket against the HTTP face)
# Called by `make test`, so a newcomer's `make test` and CI's `.ci/run` install the same things.
set -euo pipefail

missing=()
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v rpm >/dev/null || missing+=(rpm)
command -v curl >/dev/null || missing+=(curl)
if ! command -v pg_ctl >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
    missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
    echo "system-deps: the tests that need them will fail or skip" >&2
    exit 0
fi
echo "system-deps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
