"""docs/configuration.md is checked against config/agentd.reference.toml: every key the
reference sets (and every optional key it shows commented out) is documented."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def reference_keys() -> set[str]:
    text = (ROOT / "config" / "agentd.reference.toml").read_text()
    keys: set[str] = set()

    def walk(table: object) -> None:
        if isinstance(table, dict):
            for key, value in table.items():
                keys.add(key)
                if key not in ("files", "modes", "params"):   # their keys are data, not config
                    walk(value)
        elif isinstance(table, list):
            for item in table:
                walk(item)

    data = tomllib.loads(text)
    for section, body in data.items():
        if section == "secrets" and isinstance(body, dict):
            for secret in body.values():   # secret names are examples, their keys are not
                walk(secret)
        else:
            walk(body)
    # optional keys shown commented out: "# key = value"
    keys |= set(re.findall(r"^# ([a-z_]+) = ", text, flags=re.MULTILINE))
    sections = set(data) - {"secrets"}
    return (keys - set(data["secrets"])) | sections


def test_every_reference_key_is_documented() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    keys = reference_keys()
    assert len(keys) > 40          # the walk found the reference's keys
    # `key`, `section.key`, `key = ...` or [key]
    missing = sorted(k for k in keys if not re.search(rf"[`.]{k}`|`{k} =|\[{k}\]", docs))
    assert not missing, f"docs/configuration.md does not document: {missing}"
