"""``kv2`` and ``kv1``: a read of a KV secret, polled every ``refresh`` (+-10%).

A kv2 ``version = N`` pin reads ``?version=N`` (the refresher drops the cached value when a pin is
added or removed, so the cache's "never go back a version" rule does not hide the pinned one). A
KV v2 version that is deleted or destroyed is ``UpstreamDeleted`` saying so (evidence at once; a
plain 404 is confirmed by a second request first, see ``refresh``). The ``check``
program runs only on a value that is not yet live.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from agentd.errors import PermanentError, UpstreamDeleted
from agentd.kinds.base import Grant, Kind, KindState, Runtime, human_duration
from agentd.upstream import SecretValue

if TYPE_CHECKING:
    from agentd.config import SecretConfig
    from agentd.upstream import Upstream


def _check_kv2(path: str, status: int, body: Any) -> None:
    """A KV v2 reply (any status: a deleted version comes as a 404 with its metadata)."""
    data = body.get("data") if isinstance(body, dict) else None
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if isinstance(metadata, dict) and status in (200, 404):
        version = metadata.get("version")
        if metadata.get("destroyed"):
            raise UpstreamDeleted(f"GET {path}: version {version} destroyed", status=status)
        if metadata.get("deletion_time"):
            raise UpstreamDeleted(f"GET {path}: version {version} deleted", status=status)
    if status >= 300 or not isinstance(body, dict):
        return                       # the upstream client maps it
    if not isinstance(data, dict):
        raise PermanentError(f"GET {path}: reply has no data object")
    values = data.get("data")
    if values is None:
        raise UpstreamDeleted(f"GET {path}: no data (deleted)", status=status)
    if not isinstance(values, dict) or not isinstance(metadata, dict):
        raise PermanentError(f"GET {path}: reply is not a KV v2 secret")
    version = metadata.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PermanentError(f"GET {path}: reply has no KV v2 version")


def _check_kv1(path: str, status: int, body: Any) -> None:
    if status < 300 and isinstance(body, dict) and not isinstance(body.get("data"), dict):
        raise PermanentError(f"GET {path}: reply has no data object")


class KV1(Kind[KindState]):
    """A KV v1 secret (or any plain read without a version)."""

    name: ClassVar[str] = "kv1"
    State = KindState

    async def read(self, upstream: Upstream, path: str) -> SecretValue:
        """Read ``path``; the reply is checked inside the request (so a bad one counts as an
        upstream error)."""
        reply = await upstream.request("GET", path, check=partial(_check_kv1, path))
        return SecretValue(data=reply["data"], version=None)

    def path(self, secret: SecretConfig) -> str:
        return secret.path

    async def fetch(self, rt: Runtime, secret: SecretConfig, state: KindState, *,
                    token: str | None, token_expires_at: float | None) -> SecretValue:
        value = await self.read(rt.upstream, self.path(secret))
        if secret.check:
            history = state.fingerprints
            if not history or history[-1] != rt.fingerprint(value.data):
                await rt.check(secret, value.data)     # only a value not yet live
        return value

    def restored_current(self, secret: SecretConfig, state: KindState, now: float, *,
                         fetched_at: float) -> bool:
        """Younger than its ``refresh``: as current as it would be had the agent not restarted
        (its first poll is at ``fetched_at`` + ``refresh``, decision 12). Older, it is stale
        until that poll: the value has not been checked for longer than the host asked for."""
        return now < fetched_at + secret.refresh

    def schedule(self, secret: SecretConfig) -> str:
        return f"poll every {human_duration(secret.refresh)} (+-10%)"

    def grants(self, secret: SecretConfig) -> Iterable[Grant]:
        return [Grant(secret.path, ("read",), f"secret {secret.name} ({self.name})")]


class KV2(KV1):
    """A KV v2 secret (``secret/data/...``), optionally pinned to a ``version``."""

    name: ClassVar[str] = "kv2"
    config_keys: ClassVar[tuple[str, ...]] = ("version",)

    async def read(self, upstream: Upstream, path: str) -> SecretValue:
        reply = await upstream.request("GET", path, check=partial(_check_kv2, path))
        data = reply["data"]
        return SecretValue(data=data["data"], version=data["metadata"]["version"])

    def path(self, secret: SecretConfig) -> str:
        if secret.version is None:
            return secret.path
        sep = "&" if "?" in secret.path else "?"
        return f"{secret.path}{sep}version={secret.version}"

    def status(self, secret: SecretConfig, state: KindState) -> dict[str, Any]:
        return {} if secret.version is None else {"pinned": secret.version}
