"""One typed read model: what each component's ``statistics()`` returns, and how it is shown.

A component reports a frozen dataclass (trio's ``statistics()`` idiom). A field that is worth a
metric says so where it is declared, with ``metric(help, kind, name=...)``; ``metrics`` then makes
its series from the dataclass and ``agentd status`` shows it with ``as_status``, so a new
counter is one field in one place, not an edit in the component, ``daemon.status``,
``metrics.collect`` and the CLI. Pure: no prometheus, no trio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

GAUGE = "gauge"
COUNTER = "counter"


def metric(help: str, kind: str = GAUGE, *, name: str | None = None,
         default: Any = dataclasses.MISSING) -> Any:
    """A statistics field exported as metric ``name`` (default ``agentd_<component>_<field>``)
    of ``kind`` (gauge or counter; a counter's exposition name ends in ``_total``)."""
    metadata = {"metric": kind, "help": help, "name": name}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def metric_fields(component: str, stats: Any) -> Iterator[tuple[str, str, str, float]]:
    """(name, kind, help, value) for every ``metric`` field of ``stats`` that has a value.
    Booleans are 0/1; None is left out."""
    for f in dataclasses.fields(stats):
        kind = f.metadata.get("metric")
        if kind is None:
            continue
        value = getattr(stats, f.name)
        if value is None:
            continue
        name = f.metadata.get("name") or f"agentd_{component}_{f.name}"
        yield name, kind, f.metadata["help"], float(value)


def as_status(stats: Any) -> dict[str, Any]:
    """The statistics as ``agentd status`` shows them (every field, by its name)."""
    return dataclasses.asdict(stats)
