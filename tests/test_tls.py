"""The agent's own transport and identity: TLS to `bao server -dev-tls` (ca_file,
tls_server_name, TLS >= 1.2), and the `cert` and `jwt` auth methods against real OpenBao."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agentd import config as config_mod
from agentd.config import UpstreamConfig
from agentd.errors import ConfigError, RequestError, TransientError
from agentd.upstream import Upstream, tls_context
from tests.agentfixture import running_agent
from tests.kindsupport import call, unique, write_config
from tests.openbao import DevServer, bao_binary, free_port

ROOT = "agentd-tls-root"


@dataclass
class TlsServer:
    """``bao server -dev-tls``: OpenBao writes its own CA into ``certdir``."""

    port: int
    proc: subprocess.Popen[bytes]
    certdir: Path

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.certdir / "vault-ca.pem"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.address}/v1/{path}", data=data, method=method)
        req.add_header("X-Vault-Token", ROOT)
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    workdir = tmp_path_factory.mktemp("bao-tls")
    certdir = workdir / "certs"
    certdir.mkdir()
    port = free_port()
    with open(workdir / "bao.log", "wb") as log:
        proc = subprocess.Popen(
            [bao_binary(), "server", "-dev-tls", f"-dev-tls-cert-dir={certdir}",
             f"-dev-root-token-id={ROOT}", f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, HOME=str(workdir)), start_new_session=True,
        )
    server = TlsServer(port=port, proc=proc, certdir=certdir)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (workdir / "bao.log").read_text()[-2000:]
            try:
                if server.ca_file.exists() and server.api("GET", "sys/health")["initialized"]:
                    break
            except (OSError, ValueError, ssl.SSLError):
                pass
            assert time.monotonic() < deadline, "bao -dev-tls did not come up"
            time.sleep(0.05)
        server.api("POST", "sys/auth/approle", {"type": "approle"})
        server.api("PUT", "sys/policies/acl/read", {"policy": 'path "secret/*" '
                                                    '{ capabilities = ["read"] }'})
        server.api("POST", "secret/data/tls/db", {"data": {"password": "over-tls"}})
        yield server
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def approle_files(server: TlsServer, tmp_path: Path) -> tuple[Path, Path]:
    role = unique("tls")
    server.api("POST", f"auth/approle/role/{role}", {"token_policies": ["read"]})
    role_id = server.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
    secret_id = server.api("POST", f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
    files = (tmp_path / "role_id", tmp_path / "secret_id")
    for file, value in zip(files, (role_id, secret_id), strict=True):
        file.write_text(value)
        file.chmod(0o600)
    return files


SECRETS = """
[secrets.db]
kind = "kv2"
path = "secret/data/tls/db"
"""


async def test_agent_works_over_tls_with_ca_file(tls_bao: TlsServer, tmp_path: Path) -> None:
    fake = DevServer(port=tls_bao.port, proc=tls_bao.proc, log_path=tmp_path)
    path = write_config(tmp_path, fake, approle_files(tls_bao, tmp_path), SECRETS,
                        address=tls_bao.address, upstream_extra=f'ca_file = "{tls_bao.ca_file}"')
    async with running_agent(path) as running:
        with trio.fail_after(10):
            reply = await call(running.socket, "get", name="db")
    assert reply["data"] == {"password": "over-tls"}


async def test_tls_connections_are_kept_alive(tls_bao: TlsServer) -> None:
    up = Upstream(UpstreamConfig(addresses=(tls_bao.address,), ca_file=tls_bao.ca_file,
                                 timeout=5.0))
    try:
        with trio.fail_after(20):
            for _ in range(10):
                assert (await up.request("GET", "sys/health"))["initialized"] is True
    finally:
        await up.aclose()
    assert up._transport.connects == 1      # one handshake, not ten


async def test_tls_is_verified_without_a_way_to_skip_it(tls_bao: TlsServer) -> None:
    with trio.fail_after(20):
        # No ca_file: the system CAs do not know OpenBao's own dev CA.
        up = Upstream(UpstreamConfig(addresses=(tls_bao.address,), timeout=5.0))
        try:
            with pytest.raises(TransientError, match="cannot connect"):
                await up.request("GET", "sys/health")
        finally:
            await up.aclose()
        # tls_server_name: the certificate is checked for that name, not the address.
        for name, ok in (("localhost", True), ("bao.wrong.example", False)):
            cfg = UpstreamConfig(addresses=(tls_bao.address,), ca_file=tls_bao.ca_file,
                                 tls_server_name=name, timeout=5.0)
            up = Upstream(cfg)
            try:
                if ok:
                    assert (await up.request("GET", "sys/health"))["initialized"] is True
                else:
                    with pytest.raises(TransientError, match="cannot connect"):
                        await up.request("GET", "sys/health")
            finally:
                await up.aclose()
    context = tls_context(UpstreamConfig(addresses=(tls_bao.address,), ca_file=tls_bao.ca_file))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert "skip" not in " ".join(UpstreamConfig.__dataclass_fields__)
    assert "insecure" not in " ".join(UpstreamConfig.__dataclass_fields__)


def issue_client_cert(server: TlsServer, mount: str, cn: str) -> dict[str, Any]:
    reply = server.api("POST", f"{mount}/issue/host", {"common_name": cn, "ttl": "1h"})
    return dict(reply["data"])


async def test_cert_auth_logs_in_with_a_pki_certificate_and_after_its_renewal(
    tls_bao: TlsServer, tmp_path: Path
) -> None:
    mount = unique("pki")
    tls_bao.api("POST", f"sys/mounts/{mount}", {"type": "pki",
                                                 "config": {"max_lease_ttl": "87600h"}})
    ca = tls_bao.api("POST", f"{mount}/root/generate/internal",
                     {"common_name": "hosts", "ttl": "87600h"})["data"]["certificate"]
    tls_bao.api("POST", f"{mount}/roles/host", {"allowed_domains": ["hosts.test"],
                                                "allow_subdomains": True, "max_ttl": "2h"})
    auth_mount = unique("cert")
    tls_bao.api("POST", f"sys/auth/{auth_mount}", {"type": "cert"})
    policy = unique("host-pol")
    tls_bao.api("PUT", f"sys/policies/acl/{policy}", {"policy": (
        'path "secret/*" { capabilities = ["read"] }\n'
        f'path "{mount}/issue/host" {{ capabilities = ["create", "update"] }}\n')})
    tls_bao.api("POST", f"auth/{auth_mount}/certs/host",
                {"certificate": ca, "token_policies": [policy], "token_ttl": "1h"})
    first = issue_client_cert(tls_bao, mount, "h1.hosts.test")
    # Provisioned once (first boot); from then on the agent's own bundle keeps them renewed.
    identity = tmp_path / "identity"
    identity.mkdir(mode=0o700)
    cert_file, key_file = identity / "cert.pem", identity / "key.pem"
    cert_file.write_text(first["certificate"])
    key_file.write_text(first["private_key"])
    key_file.chmod(0o600)
    fake = DevServer(port=tls_bao.port, proc=tls_bao.proc, log_path=tmp_path)
    secrets = SECRETS + f"""
[secrets.host-id]
kind = "pki"
path = "{mount}/issue/host"
params = {{ common_name = "h1.hosts.test", ttl = "1h" }}
"""
    bundle = f"""
[[bundle]]
directory = "{identity}"
files."cert.pem" = "{{{{ secret('host-id').certificate }}}}"
files."key.pem" = "{{{{ secret('host-id').private_key }}}}"
"""
    path = write_config(tmp_path, fake, (tmp_path / "unused", tmp_path / "unused2"), secrets,
                        address=tls_bao.address, extra=bundle,
                        upstream_extra=f'ca_file = "{tls_bao.ca_file}"')
    text = path.read_text()
    start = text.index("[upstream.auth]")
    end = text.index("[audit]")
    path.write_text(text[:start] + f"""[upstream.auth]
method = "cert"
mount = "{auth_mount}"
role = "host"
cert_file = "{cert_file}"
key_file = "{key_file}"

""" + text[end:])
    async with running_agent(path) as running:
        with trio.fail_after(20):
            assert (await call(running.socket, "get", name="db"))["data"] == {
                "password": "over-tls"}
            # The agent issues (renews) the host's identity and its bundle swaps it into the
            # login files; the next login presents the renewed certificate.
            renewed = (await call(running.socket, "get", name="host-id"))["data"]
            assert renewed["serial_number"] != first["serial_number"]
            while cert_file.read_text() != renewed["certificate"]:
                await trio.sleep(0.05)
            assert key_file.read_text() == renewed["private_key"]
            assert cert_file.is_symlink()
            logins = running.agent.auth.statistics().logins
            token = running.agent.auth.token()
            assert token is not None
            # The current token dies: the agent must log in again, with the renewed certificate.
            tls_bao.api("POST", "auth/token/revoke", {"token": token})
            while running.agent.auth.statistics().logins == logins:
                with contextlib.suppress(RequestError):    # refused with the dead token
                    await call(running.socket, "refresh", name="db")
                await trio.sleep(0.1)
            new_token = running.agent.auth.token()
            assert new_token is not None and new_token != token
            meta = tls_bao.api("POST", "auth/token/lookup", {"token": new_token})["data"]["meta"]
            # The new login presented the renewed certificate (OpenBao records its serial).
            assert int(meta["serial_number"]) == int(renewed["serial_number"].replace(":", ""), 16)
            reply = await call(running.socket, "refresh", name="db")
            assert reply["version"] == 1
    assert "PRIVATE KEY" not in running.log_text()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    signature = key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64url(signature)}"


async def test_jwt_auth_logs_in_with_a_token_signed_by_our_key(
    bao: DevServer, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    mount = unique("jwt")
    bao.api("POST", f"sys/auth/{mount}", {"type": "jwt"})
    bao.api("POST", f"auth/{mount}/config", {"jwt_validation_pubkeys": [public],
                                            "bound_issuer": "agentd-tests"})
    bao.api("POST", f"auth/{mount}/role/host", {
        "role_type": "jwt", "user_claim": "sub", "bound_audiences": ["agentd"],
        "token_policies": ["agentd-read"], "token_ttl": "1h",
    })
    prefix = unique("jwt")
    bao.kv_put(f"{prefix}/db", {"password": "via-jwt"})
    now = int(time.time())
    jwt_file = tmp_path / "host.jwt"
    jwt_file.write_text(sign_jwt(key, {"sub": "host-1", "aud": "agentd", "iss": "agentd-tests",
                                       "iat": now, "nbf": now - 5, "exp": now + 600}))
    jwt_file.chmod(0o600)
    path = write_config(tmp_path, bao, (tmp_path / "x", tmp_path / "y"), f"""
[secrets.db]
kind = "kv2"
path = "secret/data/{prefix}/db"
""")
    text = path.read_text()
    start, end = text.index("[upstream.auth]"), text.index("[audit]")
    path.write_text(text[:start] + f"""[upstream.auth]
method = "jwt"
mount = "{mount}"
role = "host"
jwt_file = "{jwt_file}"

""" + text[end:])
    async with running_agent(path) as running:
        with trio.fail_after(10):
            reply = await call(running.socket, "get", name="db")
    assert reply["data"] == {"password": "via-jwt"}
    assert running.agent.auth.statistics().method == "jwt"
    assert jwt_file.read_text().split(".")[2] not in running.log_text()
    # A JWT signed by another key is refused.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = sign_jwt(other, {"sub": "host-1", "aud": "agentd", "iss": "agentd-tests",
                              "iat": now, "exp": now + 600})
    with pytest.raises(urllib.error.HTTPError, match="HTTP Error 400"):
        bao.api("POST", f"auth/{mount}/login", {"role": "host", "jwt": forged})


@pytest.mark.parametrize(("auth", "problems"), [
    ('method = "jwt"', ["upstream.auth.jwt_file: required", "upstream.auth.role: required"]),
    ('method = "cert"', ["upstream.auth.cert_file: required", "upstream.auth.key_file: required"]),
    ('method = "approle"\nrole_id_file = "/r"\nsecret_id_file = "/s"\nrole = "x"',
     ["upstream.auth.role: not used by method 'approle'"]),
])
def test_cert_and_jwt_config_needs_their_files(
    tmp_path: Path, auth: str, problems: list[str]
) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(f'[upstream]\naddresses = ["https://bao:8200"]\ntls_server_name = "bao"\n'
                    f"[upstream.auth]\n{auth}\n")
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path, check_permissions=False)
    found = [p.split(": ", 1)[1] for p in caught.value.problems]
    assert found == problems
