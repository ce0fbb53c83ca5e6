"""The one table of secret kinds: ``kind = "NAME"`` -> its ``Kind`` (see ``base``).

``CONFIG_KEYS`` is what each kind accepts among the keys that only some kinds use, and
``KIND_ONLY_KEYS`` those keys with the kinds that use each (the config loader's "not used by kind"
check). This module imports ``agentd.config`` (through the kinds), so the config loader reads it
with a function-level import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from agentd.config import SecretConfig
from agentd.kinds.base import Kind
from agentd.kinds.kv import KV1, KV2
from agentd.kinds.leased import Leased
from agentd.kinds.pki import Pki

KINDS: Mapping[str, Kind[Any]] = MappingProxyType({
    kind.name: kind for kind in (KV2(), KV1(), Leased(), Pki())
})

CONFIG_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    name: kind.config_keys for name, kind in KINDS.items()
})

KIND_ONLY_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType({   # in SecretConfig's order
    f.name: tuple(name for name, keys in CONFIG_KEYS.items() if f.name in keys)
    for f in fields(SecretConfig)
    if any(f.name in keys for keys in CONFIG_KEYS.values())
})
