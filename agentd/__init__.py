"""agentd: a per-host secrets agent for OpenBao and Vault."""

__version__ = "0.1.0"
