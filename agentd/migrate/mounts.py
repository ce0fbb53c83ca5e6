"""``--upstream``: which mount holds a path, asked of ``sys/internal/ui/mounts/<path>``."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass


class UpstreamLookupError(Exception):
    """The upstream named with --upstream could not be asked at all (exit 1)."""


@dataclass(frozen=True)
class Mount:
    path: str                                 # "secret/"
    type: str                                 # "kv", "pki", "database", ...
    version: str                              # KV: "1" or "2"; "" otherwise


class MountLookup:
    """``GET /v1/sys/internal/ui/mounts/<path>`` on the upstream, once per path."""

    def __init__(self, address: str, token: str, *, ca_file: str | None = None,
                 namespace: str | None = None, timeout: float = 10.0) -> None:
        self.address = address.rstrip("/")
        self.token = token
        self.namespace = namespace
        self.timeout = timeout
        self.context: ssl.SSLContext | None = None
        if self.address.startswith("https://"):
            self.context = ssl.create_default_context(cafile=ca_file)
        self.cache: dict[str, Mount | str] = {}

    def __call__(self, path: str) -> Mount | str:
        """The mount holding ``path``, or why the upstream did not say."""
        if path not in self.cache:
            self.cache[path] = self._ask(path)
        return self.cache[path]

    def _ask(self, path: str) -> Mount | str:
        url = f"{self.address}/v1/sys/internal/ui/mounts/{urllib.parse.quote(path)}"
        request = urllib.request.Request(  # noqa: S310 (http/https: the --upstream address)
            url, headers={"X-Vault-Token": self.token})
        if self.namespace:
            request.add_header("X-Vault-Namespace", self.namespace)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,  # noqa: S310 (http/s only)
                                        context=self.context) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return f"the upstream answered {exc.code} for sys/internal/ui/mounts/{path}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UpstreamLookupError(f"cannot ask {self.address}: {reason}") from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("path"), str):
            return f"the upstream's reply for sys/internal/ui/mounts/{path} names no mount"
        options = data.get("options") if isinstance(data.get("options"), dict) else {}
        version = str((options or {}).get("version") or "")
        return Mount(data["path"], str(data.get("type", "")), version)
