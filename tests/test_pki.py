"""kind = "pki": certificates issued by a real OpenBao PKI mount, verified and re-issued."""

from __future__ import annotations

import os
import time
import urllib.error
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agentd.crypto import check_certificate
from agentd.errors import CryptoError, Unavailable
from agentd.kinds import mount_of
from tests.agentfixture import running_agent
from tests.kindsupport import approle_with_policy, call, unique, write_config
from tests.openbao import DevServer

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def enable_pki(bao: DevServer) -> str:
    """A fresh PKI mount (unique path) with a root CA and a role "web" for *.example.test."""
    mount = unique("pki")
    bao.api("POST", f"sys/mounts/{mount}", {"type": "pki", "config": {"max_lease_ttl": "87600h"}})
    bao.api("POST", f"{mount}/root/generate/internal", {"common_name": "agentd test root",
                                                         "ttl": "87600h"})
    bao.api("POST", f"{mount}/roles/web", {"allowed_domains": ["example.test"],
                                           "allow_subdomains": True, "max_ttl": "1h"})
    return mount


def pki_policy(mount: str) -> str:
    return f'path "{mount}/issue/web" {{ capabilities = ["create", "update"] }}\n' \
           f'path "{mount}/revoke" {{ capabilities = ["create", "update"] }}\n'


def assert_pair(data: Mapping[str, object], root_pem: str) -> x509.Certificate:
    """The key matches the certificate and the certificate is signed by the root (independently
    of agentd's own check)."""
    cert = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
    key = serialization.load_pem_private_key(str(data["private_key"]).encode(), password=None)
    assert key.public_key().public_bytes(*SPKI) == cert.public_key().public_bytes(*SPKI)
    root = x509.load_pem_x509_certificate(root_pem.encode())
    cert.verify_directly_issued_by(root)
    assert data["issuing_ca"] == root_pem
    return cert


def secrets_toml(mount: str, *, ttl: str, extra: str = "") -> str:
    return f"""
[secrets.web-tls]
kind = "pki"
path = "{mount}/issue/web"
params = {{ common_name = "a.example.test", ttl = "{ttl}" }}
{extra}
"""


def revoked_serials(bao: DevServer, mount: str) -> list[str]:
    try:
        return list(bao.api("LIST", f"{mount}/certs/revoked")["data"]["keys"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:      # none revoked yet
            return []
        raise


def root_pem(bao: DevServer, mount: str) -> str:
    return str(bao.api("GET", f"{mount}/cert/ca")["data"]["certificate"])


@pytest.mark.slow
async def test_short_lived_certificate_is_reissued_and_always_a_valid_pair(
    bao: DevServer, tmp_path: Path
) -> None:
    mount = enable_pki(bao)
    approle = approle_with_policy(bao, tmp_path, pki_policy(mount))
    path = write_config(tmp_path, bao, approle, secrets_toml(mount, ttl="6s"))
    root = root_pem(bao, mount)
    serials: list[str] = []
    async with running_agent(path) as running:
        with trio.fail_after(40):
            while len(serials) < 4:
                reply = await call(running.socket, "get", name="web-tls")
                cert = assert_pair(reply["data"], root)
                assert reply["expires_at"] == cert.not_valid_after_utc.timestamp()
                assert reply["expires_at"] > time.time() - 1
                serial = str(reply["data"]["serial_number"])
                if not serials or serials[-1] != serial:
                    serials.append(serial)
                await trio.sleep(0.3)
            status = await call(running.socket, "status")
    assert len(set(serials)) == 4           # re-issued, each a fresh serial
    secret = status["secrets"]["web-tls"]
    assert secret["kind"] == "pki"
    assert secret["serial"] in serials
    assert secret["expires_at"] > 0
    assert "BEGIN" not in running.log_text()   # no key or certificate in the logs


@pytest.mark.slow
async def test_failing_reissue_keeps_the_old_pair_until_expiry_then_unavailable(
    bao: DevServer, tmp_path: Path
) -> None:
    mount = enable_pki(bao)
    name = unique("pki-pol")
    bao.put_policy(name, pki_policy(mount))
    role_id, secret_id = bao.approle(name, policies=[name], token_ttl="1h")
    role_file, secret_file = tmp_path / "role", tmp_path / "secret"
    role_file.write_text(role_id)
    secret_file.write_text(secret_id)
    secret_file.chmod(0o600)
    path = write_config(tmp_path, bao, (role_file, secret_file), secrets_toml(mount, ttl="5s"))
    root = root_pem(bao, mount)
    async with running_agent(path) as running:
        with trio.fail_after(30):
            first = await call(running.socket, "get", name="web-tls")
            assert_pair(first["data"], root)
            # The policy loses the issue path: every re-issue is now refused (403).
            bao.put_policy(name, 'path "sys/nothing" { capabilities = ["read"] }')
            expires = first["expires_at"]
            while time.time() < expires - 0.5:
                reply = await call(running.socket, "get", name="web-tls")
                assert reply["data"]["serial_number"] == first["data"]["serial_number"]
                await trio.sleep(0.3)
            while True:
                try:
                    await call(running.socket, "get", name="web-tls")
                except Unavailable:
                    break
                await trio.sleep(0.2)
            status = await call(running.socket, "status")
            assert status["secrets"]["web-tls"]["failures"] > 0
            # The policy comes back: a new pair is issued and served again.
            bao.put_policy(name, pki_policy(mount))
            while True:
                try:
                    reply = await call(running.socket, "get", name="web-tls")
                except Unavailable:
                    await trio.sleep(0.2)
                    continue
                assert reply["data"]["serial_number"] != first["data"]["serial_number"]
                assert_pair(reply["data"], root)
                break


async def test_revoke_previous_revokes_the_replaced_serial(
    bao: DevServer, tmp_path: Path
) -> None:
    mount = enable_pki(bao)
    approle = approle_with_policy(bao, tmp_path, pki_policy(mount))
    extra = 'revoke_previous = true\ngrace = "200ms"'
    path = write_config(tmp_path, bao, approle, secrets_toml(mount, ttl="10m", extra=extra))
    async with running_agent(path) as running:
        with trio.fail_after(20):
            first = await call(running.socket, "get", name="web-tls")
            old = first["data"]["serial_number"]
            await call(running.socket, "refresh", name="web-tls")     # an admin re-issue
            new = (await call(running.socket, "get", name="web-tls"))["data"]["serial_number"]
            assert new != old
            while old not in await trio.to_thread.run_sync(revoked_serials, bao, mount):
                await trio.sleep(0.1)
            assert new not in await trio.to_thread.run_sync(revoked_serials, bao, mount)


def test_check_certificate_refuses_a_foreign_key_and_a_foreign_issuer(bao: DevServer) -> None:
    mount = enable_pki(bao)
    other = enable_pki(bao)
    one = bao.api("POST", f"{mount}/issue/web", {"common_name": "a.example.test", "ttl": "1h"})
    two = bao.api("POST", f"{other}/issue/web", {"common_name": "b.example.test", "ttl": "1h"})
    d1, d2 = one["data"], two["data"]
    now = time.time()
    info = check_certificate(d1["certificate"], d1["private_key"], d1["issuing_ca"],
                             d1["ca_chain"], now=now)
    assert info.serial == d1["serial_number"]
    assert info.not_after == pytest.approx(float(d1["expiration"]))
    with pytest.raises(CryptoError, match="does not match the certificate") as caught:
        check_certificate(d1["certificate"], d2["private_key"], d1["issuing_ca"], now=now)
    assert "PRIVATE" not in str(caught.value)
    with pytest.raises(CryptoError, match="not signed by issuing_ca"):
        check_certificate(d1["certificate"], d1["private_key"], d2["issuing_ca"], now=now)
    with pytest.raises(CryptoError, match="ca_chain does not start"):
        check_certificate(d1["certificate"], d1["private_key"], d1["issuing_ca"],
                          d2["ca_chain"], now=now)
    with pytest.raises(CryptoError, match="expired"):
        check_certificate(d1["certificate"], d1["private_key"], d1["issuing_ca"],
                          now=now + 7200)
    with pytest.raises(CryptoError, match="not valid yet"):
        check_certificate(d1["certificate"], d1["private_key"], d1["issuing_ca"],
                          now=now - 3600)
    # A few minutes of skew are allowed either way.
    check_certificate(d1["certificate"], d1["private_key"], d1["issuing_ca"], now=now + 3700)
    with pytest.raises(CryptoError, match="not a PEM certificate"):
        check_certificate("garbage", d1["private_key"], d1["issuing_ca"], now=now)


def test_mount_of_issue_paths() -> None:
    assert mount_of("pki/issue/web") == "pki"
    assert mount_of("team/a/pki/issue/web") == "team/a/pki"
    assert mount_of("pki_int/sign/web") == "pki_int"


@pytest.mark.slow
async def test_bundle_always_holds_a_matching_pair_across_reissues(
    bao: DevServer, tmp_path: Path
) -> None:
    mount = enable_pki(bao)
    approle = approle_with_policy(bao, tmp_path, pki_policy(mount))
    tls = tmp_path / "tls"
    bundle = f"""
[[bundle]]
directory = "{tls}"
files."cert.pem" = "{{{{ secret('web-tls').certificate }}}}"
files."key.pem" = "{{{{ secret('web-tls').private_key }}}}"
files."ca.pem" = "{{{{ secret('web-tls').issuing_ca }}}}"
"""
    path = write_config(tmp_path, bao, approle, secrets_toml(mount, ttl="6s"), extra=bundle)
    root = root_pem(bao, mount)
    serials: list[int] = []
    same = 0
    async with running_agent(path) as running:
        with trio.fail_after(40):
            while len(serials) < 3:
                if not (tls / "..data").is_symlink():     # the first render is on its way
                    await trio.sleep(0.1)
                    continue
                # A reader resolves ..data once and reads the set it points to.
                version_dir = tls / os.readlink(tls / "..data")
                data = {
                    "certificate": (version_dir / "cert.pem").read_text(),
                    "private_key": (version_dir / "key.pem").read_text(),
                    "issuing_ca": (version_dir / "ca.pem").read_text(),
                }
                cert = assert_pair(data, root)
                assert (tls / "cert.pem").resolve().parent.name.startswith("..")
                if not serials or serials[-1] != cert.serial_number:
                    serials.append(cert.serial_number)
                    reply = (await call(running.socket, "get", name="web-tls"))["data"]
                    if reply["certificate"] == data["certificate"]:
                        # The socket hands out the same pair as the files.
                        assert reply["private_key"] == data["private_key"]
                        same += 1
                    assert oct((version_dir / "key.pem").stat().st_mode & 0o777) == "0o600"
                await trio.sleep(0.2)
    assert len(set(serials)) == 3
    assert same >= 1
