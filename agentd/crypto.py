"""Sealing, process hardening and key files (decision 6). The only importer of ``cryptography``.

Theory of operation: every cache entry is sealed with AES-256-GCM by a ``Sealer`` that holds one
key (a per-process random key for the in-memory cache, a key file or systemd credential for the
on-disk snapshot). A sealed blob is ``nonce (12 random bytes) || ciphertext || tag``; the caller
passes associated data (for the cache: the entry's name and version) that must match on opening,
so a blob cannot be replayed under another name or version. Anything that fails authentication
raises ``CryptoError`` with a message that never contains data.

What this protects: a heap read (core dump, swap, a stray debug print, a snapshot file copied off
the host) shows ciphertext only. What it does not: an attacker who can read the whole process
memory also finds the key. Python cannot wipe ``bytes`` objects, so plaintext lives only as long
as the caller keeps a reference; ``harden_process()`` keeps the kernel from writing it to a core
file and keeps other same-uid processes from ptracing the agent.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import itertools
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentd import fsafe
from agentd.errors import CryptoError, UnsafePath
from agentd.hardening import PR_GET_DUMPABLE as PR_GET_DUMPABLE
from agentd.hardening import PR_SET_DUMPABLE as PR_SET_DUMPABLE
from agentd.hardening import harden_process as harden_process
from agentd.render.files import create_file

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_FINGERPRINT_LABEL = b"agentd fingerprint v1"



class Sealer:
    """AES-256-GCM with one key. Holds no plaintext; ``repr()`` shows no key.

    Raises:
        CryptoError: from the constructor when the key is not 32 bytes, from ``open()`` when a
            blob fails authentication or is too short to be one.
    """

    __slots__ = ("_aead", "_fingerprint_key")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise CryptoError(f"a sealing key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        # A separate key for fingerprints, so a digest never reveals anything about the sealing
        # key and the raw key need not be kept beside the AEAD object.
        self._fingerprint_key = hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).digest()

    @classmethod
    def generate(cls) -> Sealer:
        """A sealer with a fresh random key (the per-process cache key)."""
        return cls(os.urandom(KEY_BYTES))

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext``; bind it to ``associated_data``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def open(self, blob: bytes, associated_data: bytes) -> bytes:
        """Return the plaintext of ``blob`` sealed with ``associated_data``.

        Raises:
            CryptoError: the blob is too short, was altered, or was sealed with another key or
                other associated data.
        """
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise CryptoError("sealed data is truncated")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
        except InvalidTag:
            raise CryptoError("sealed data failed authentication") from None

    def fingerprint(self, data: bytes) -> bytes:
        """A keyed digest (HMAC-SHA256) of ``data``: equal data, equal digests, under this key.

        Lets the cache tell whether a value changed without keeping the plaintext; without the
        key a digest cannot be used to confirm a guessed value.
        """
        return hmac.new(self._fingerprint_key, data, hashlib.sha256).digest()


def load_or_create_key(path: Path) -> bytes:
    """Return the 32-byte key in ``path``, creating it (mode 0600) on first use.

    A missing parent directory is created with mode 0700. A new key is written to a temporary
    file (O_CREAT|O_EXCL|O_NOFOLLOW, 0600), synced, and then hard-linked into place, so a crash
    never leaves a short key file behind and two starters racing end up with the same key.

    Raises:
        CryptoError: naming the path (never the key) when the file is a symlink, not a regular
            file, of the wrong size, accessible by group or others, owned by another user than
            root or this process, or cannot be read or created.
    """
    for _ in range(3):
        try:
            return _read_key(path)
        except FileNotFoundError:
            pass
        _create_key(path)
    raise CryptoError(f"{path}: key file keeps disappearing")


def _read_key(path: Path) -> bytes:
    if path.parent.exists():    # else it is made below, 0700 (and read on the next turn)
        try:
            os.close(fsafe.open_dir(path.parent))
        except UnsafePath as exc:
            raise CryptoError(f"{path}: key file's directory: {exc}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CryptoError(f"{path}: key file is a symlink; refusing it") from None
        raise CryptoError(f"{path}: cannot open key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CryptoError(f"{path}: key file is not a regular file")
        if st.st_mode & 0o077:
            raise CryptoError(
                f"{path}: key file has mode {stat.S_IMODE(st.st_mode):04o};"
                " it must not be accessible by group or others (use 0600)"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise CryptoError(f"{path}: key file is owned by uid {st.st_uid}")
        if st.st_size != KEY_BYTES:
            raise CryptoError(
                f"{path}: key file holds {st.st_size} bytes; it must hold {KEY_BYTES} raw bytes"
            )
        key = os.read(fd, KEY_BYTES + 1)
    except OSError as exc:
        raise CryptoError(f"{path}: cannot read key file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise CryptoError(f"{path}: key file changed while it was read")
    return key


def _create_key(path: Path) -> None:
    parent = path.parent
    try:
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
            os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
        # A hard link, not a rename: if another starter won the race, its key is the one to use.
        create_file(path, os.urandom(KEY_BYTES), mode=0o600)
    except OSError as exc:
        raise CryptoError(f"{path}: cannot create key file: {exc.strerror}") from None
    log.info("created a new cache key file %s", path)


# --- X.509 (kind = "pki") --------------------------------------------------------------------

CLOCK_SKEW = 300.0   # seconds of clock difference allowed between this host and the upstream


@dataclass(frozen=True)
class CertificateInfo:
    """What the agent needs to know about a verified certificate (never the key)."""

    serial: str           # colon-separated lowercase hex, as OpenBao prints it
    not_before: float     # unix time
    not_after: float      # unix time
    subject: str


def _load_cert(pem: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"{what} is not a PEM certificate") from exc


def _serial_text(number: int) -> str:
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return ":".join(f"{b:02x}" for b in raw)


def check_certificate(
    certificate: str,
    private_key: str,
    issuing_ca: str,
    ca_chain: list[str] | tuple[str, ...] = (),
    *,
    now: float,
    skew: float = CLOCK_SKEW,
) -> CertificateInfo:
    """Verify an issued key pair before it may replace the one being served (decision 4).

    Checks that the private key belongs to the certificate, that the certificate was signed by
    ``issuing_ca`` and every element of ``ca_chain`` by the next one (the chain verifies up to
    the issuing CA), and that the validity window covers ``now`` give or take ``skew`` seconds.

    Raises:
        CryptoError: saying which check failed (never with key material in it).
    """
    cert = _load_cert(certificate, "certificate")
    issuer = _load_cert(issuing_ca, "issuing_ca")
    try:
        key = serialization.load_pem_private_key(private_key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoError("private_key is not an unencrypted PEM private key") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CryptoError("private_key does not match the certificate")
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CryptoError("certificate is not signed by issuing_ca") from exc
    chain = [_load_cert(pem, "ca_chain element") for pem in ca_chain]
    if chain and chain[0] != issuer:
        raise CryptoError("ca_chain does not start with issuing_ca")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CryptoError("ca_chain does not verify (an element is not signed by the next)") \
                from exc
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    if now + skew < not_before:
        raise CryptoError(f"certificate is not valid yet (not before {not_before:.0f})")
    if now - skew > not_after:
        raise CryptoError(f"certificate has expired (not after {not_after:.0f})")
    return CertificateInfo(
        serial=_serial_text(cert.serial_number),
        not_before=not_before,
        not_after=not_after,
        subject=cert.subject.rfc4514_string(),
    )
