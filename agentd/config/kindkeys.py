"""What a ``[secrets.NAME]`` table may hold, by secret kind: the kinds and their own keys.

Kept as data in this one place: when ``agentd/kinds/`` gives each kind its ``config_keys``, this
module is what switches to reading them from there (the builder only uses the three names below).
"""

from __future__ import annotations

SECRET_KINDS: tuple[str, ...] = ("kv2", "kv1", "leased", "pki")

SECRET_KEYS: tuple[str, ...] = (          # every key a [secrets.NAME] table may have
    "kind", "path", "refresh", "max_stale", "params", "renew_at", "revoke_previous", "grace",
    "revoke_on_shutdown", "version", "check", "expect_rotation_every",
)

KIND_ONLY: dict[str, tuple[str, ...]] = {   # keys that only some kinds use -> those kinds
    "params": ("pki",),
    "renew_at": ("pki", "leased"),
    "revoke_previous": ("pki",),
    "grace": ("pki", "leased"),
    "revoke_on_shutdown": ("leased",),
    "version": ("kv2",),
}
