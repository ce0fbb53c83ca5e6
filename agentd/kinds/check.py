"""The ``check`` hook of every kind: a program that validates a new value before it goes live.

The value goes as JSON into a 0600 temp file named by ``$AGENTD_SECRET_FILE`` (removed after);
the program's exit status 0 accepts it, anything else (or a timeout, or a program that cannot
run) raises ``CheckFailed`` and the old value stays served.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from agentd.cache import thaw
from agentd.errors import CheckFailed

if TYPE_CHECKING:
    from agentd.config import SecretConfig

CHECK_TIMEOUT = 30.0


async def run_check(secret: SecretConfig, data: Mapping[str, Any]) -> None:
    """Run ``secret.check`` on ``data``. Raises CheckFailed; a no-op (one checkpoint) without
    a check."""
    if not secret.check:
        await trio.lowlevel.checkpoint()
        return
    fd, path = tempfile.mkstemp(prefix="agentd-check-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(thaw(data), handle)
        env = dict(os.environ, AGENTD_SECRET_FILE=path, AGENTD_SECRET_NAME=secret.name)
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                result = await trio.run_process(
                    list(secret.check), env=env, check=False,
                    stdin=b"", capture_stdout=True, capture_stderr=True,
                )
        except trio.TooSlowError:
            raise CheckFailed(f"{secret.name}: check timed out") from None
        except OSError as exc:
            raise CheckFailed(f"{secret.name}: check cannot run: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if result.returncode != 0:
        raise CheckFailed(f"{secret.name}: check exited with status {result.returncode}; "
                          "keeping the previous value")
