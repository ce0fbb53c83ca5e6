"""`agentd --help` and `agentd COMMAND --help` read like a man page: description, examples, exit
status, environment, files. Runs the installed console script, as an operator would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

AGENTD = str(Path(sys.executable).with_name("agentd"))
COMMANDS = ["run", "check-config", "get", "list", "status", "ping", "exec", "migrate"]


def help_text(*argv: str) -> str:
    result = subprocess.run([AGENTD, *argv, "--help"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_top_level_help_names_every_command_and_the_common_sections() -> None:
    text = help_text()
    for command in [*COMMANDS, "demo"]:
        assert command in text
    for section in ("exit status:", "environment:", "files:", "see also:"):
        assert section in text, section
    assert "AGENTD_SOCKET" in text and "/etc/agentd/agentd.toml" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_a_manual(command: str) -> None:
    text = help_text(command)
    assert text.startswith(f"usage: agentd {command}")
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 5, description      # a sentence, not a stub
    for section in ("examples:", f"agentd {command}", "exit status:", "files:"):
        assert section in text, (command, section)
