"""Read-only values and back: ``freeze`` (dicts -> MappingProxyType, lists -> tuples) and ``thaw``.

The cache hands out frozen data, the render worker freezes what a template may read, and both
thaw it again to pack, render or print. Pure standard library: the sandboxed render worker
imports it without the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


def freeze(value: Any) -> Any:
    """``value`` with every dict made a read-only mapping and every list a tuple (deep)."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A read-only value from the cache as plain dicts and lists (to pack, render or print)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value
