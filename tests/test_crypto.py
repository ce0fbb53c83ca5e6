from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.crypto import KEY_BYTES, Sealer, load_or_create_key
from agentd.errors import CryptoError

AD = b"db\x00v3"


def test_round_trip() -> None:
    sealer = Sealer.generate()
    blob = sealer.seal(b"hunter2", AD)
    assert b"hunter2" not in blob
    assert sealer.open(blob, AD) == b"hunter2"


def test_nonce_is_random() -> None:
    sealer = Sealer.generate()
    assert sealer.seal(b"x", AD) != sealer.seal(b"x", AD)


def test_wrong_associated_data_fails() -> None:
    sealer = Sealer.generate()
    blob = sealer.seal(b"hunter2", AD)
    with pytest.raises(CryptoError) as info:
        sealer.open(blob, b"db\x00v4")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("index", [0, 12, -1])
def test_flipped_bit_fails(index: int) -> None:
    sealer = Sealer.generate()
    blob = bytearray(sealer.seal(b"hunter2", AD))
    blob[index] ^= 0x01
    with pytest.raises(CryptoError):
        sealer.open(bytes(blob), AD)


def test_other_key_fails() -> None:
    blob = Sealer.generate().seal(b"hunter2", AD)
    with pytest.raises(CryptoError):
        Sealer.generate().open(blob, AD)


def test_short_blob_fails() -> None:
    with pytest.raises(CryptoError, match="truncated"):
        Sealer.generate().open(b"\x00" * 27, AD)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_wrong_key_size(size: int) -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        Sealer(b"k" * size)


def test_repr_hides_key() -> None:
    key = b"K" * KEY_BYTES
    sealer = Sealer(key)
    assert "KKKK" not in repr(sealer)
    assert not hasattr(sealer, "__dict__")  # no stray attributes holding key or plaintext


def test_fingerprint_is_keyed_and_stable() -> None:
    a, b = Sealer.generate(), Sealer.generate()
    assert a.fingerprint(b"v") == a.fingerprint(b"v")
    assert a.fingerprint(b"v") != a.fingerprint(b"w")
    assert a.fingerprint(b"v") != b.fingerprint(b"v")


HARDEN_CHECK = """
import ctypes, ctypes.util, resource
from agentd.crypto import PR_GET_DUMPABLE, harden_process
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
before = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
harden_process()
after = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
print(before, after, *resource.getrlimit(resource.RLIMIT_CORE))
"""


def test_harden_process_in_subprocess() -> None:
    out = subprocess.run([sys.executable, "-c", HARDEN_CHECK], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == ["1", "0", "0", "0"]


def test_load_or_create_key_creates_0600_and_reuses(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cache.key"
    key = load_or_create_key(path)
    assert len(key) == KEY_BYTES
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    assert load_or_create_key(path) == key
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.key"]  # no temp file left


def test_load_or_create_key_keeps_existing_dir_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    load_or_create_key(tmp_path / "cache.key")
    assert os.stat(tmp_path).st_mode & 0o777 == 0o755


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_load_or_create_key_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "cache.key"
    key = load_or_create_key(path)
    path.chmod(mode)
    with pytest.raises(CryptoError) as info:
        load_or_create_key(path)
    assert str(path) in str(info.value)
    assert f"{mode:04o}" in str(info.value)
    assert key.hex() not in str(info.value)


def test_load_or_create_key_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create_key(real)
    link = tmp_path / "cache.key"
    link.symlink_to(real)
    with pytest.raises(CryptoError, match="symlink") as info:
        load_or_create_key(link)
    assert str(link) in str(info.value)


def test_load_or_create_key_refuses_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "cache.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CryptoError, match="symlink"):
        load_or_create_key(link)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_load_or_create_key_refuses_wrong_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "cache.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"k" * size)
    os.close(fd)
    with pytest.raises(CryptoError, match=f"{size} bytes") as info:
        load_or_create_key(path)
    assert str(path) in str(info.value)


def test_load_or_create_key_refuses_directory(tmp_path: Path) -> None:
    path = tmp_path / "cache.key"
    path.mkdir(mode=0o700)
    with pytest.raises(CryptoError, match=str(path)):
        load_or_create_key(path)
