"""Secret kinds (decision 4): one module per kind behind ``base.Kind``, one table in ``registry``.

- ``base``: the interface a kind implements and the state every kind shares;
- ``kv`` (``kv2``, ``kv1``), ``pki``, ``leased``: the kinds;
- ``registry``: ``KINDS``, the one table everything looks a kind up in, and the config keys each
  kind accepts;
- ``check``: the ``check`` hook; ``runtime``: ``Kinds``, one agent's kinds at work (the refresher
  calls in there).
"""

from agentd.kinds.base import Grant, Kind, KindState, Runtime, human_duration
from agentd.kinds.kv import KV1, KV2
from agentd.kinds.leased import Leased, LeaseRecord, LeaseState
from agentd.kinds.pki import Pki, PkiState, mount_of
from agentd.kinds.registry import CONFIG_KEYS, KIND_ONLY_KEYS, KINDS
from agentd.kinds.runtime import Kinds

__all__ = [
    "CONFIG_KEYS", "KINDS", "KIND_ONLY_KEYS", "KV1", "KV2", "Grant", "Kind", "KindState", "Kinds",
    "LeaseRecord", "LeaseState", "Leased", "Pki", "PkiState", "Runtime", "human_duration",
    "mount_of",
]
