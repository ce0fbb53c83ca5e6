from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.openbao import DevServer

if TYPE_CHECKING:
    from tests.agentfixture import Seeded

READ_ALL_SECRETS = """
path "secret/*" { capabilities = ["read", "list"] }
path "kv1/*" { capabilities = ["read", "list"] }
"""


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One real OpenBao dev server for the whole test session (KV v2 at secret/, KV v1 at kv1/)."""
    server = DevServer.start(tmp_path_factory.mktemp("bao"))
    try:
        server.enable_kv1()
        server.put_policy("agentd-read", READ_ALL_SECRETS)
        yield server
    finally:
        server.stop()


@pytest.fixture
def approle_files(bao: DevServer, tmp_path: Path) -> tuple[Path, Path]:
    """role_id and secret_id files (0600) for an approle that may read every test secret."""
    role_id, secret_id = bao.approle("agentd", policies=["agentd-read"], token_ttl="1h")
    role_file = tmp_path / "role_id"
    secret_file = tmp_path / "secret_id"
    for path, value in ((role_file, role_id), (secret_file, secret_id)):
        path.write_text(value + "\n")
        path.chmod(0o600)
    return role_file, secret_file


@pytest.fixture
def seeded(bao: DevServer) -> Seeded:
    """This test's own secrets in the session's OpenBao (``tests.agentfixture.seed``)."""
    from tests.agentfixture import seed  # here: conftest does not load the daemon for every test

    return seed(bao)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under /tmp that other uids can traverse (pytest's tmp_path is 0700), for
    tests whose attacker runs as another user. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="agentd-shared-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)
