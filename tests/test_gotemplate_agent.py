"""Go templates (engine = "go") rendered by a running agent against the real OpenBao.

consul-template's dialect reads secrets by upstream path; the agent resolves each path to the
declared secret with that path (decision 3), renders in the sandboxed worker, and rewrites the
file when a secret rotates. The engine's own byte-for-byte agreement with the OpenBao Agent is
tests/test_gotemplate_oracle.py's; this is the wiring.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from tests.agentfixture import running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer
from tests.support import until


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


async def test_a_go_template_renders_by_path_and_follows_rotation(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    seeded = seed(bao)
    p = seeded.prefix
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "app.conf"
    text = (f'{{{{ with secret "secret/data/{p}/db" }}}}user={{{{ .Data.data.username }}}}\n'
            f'pw={{{{ .Data.data.password }}}}\nv={{{{ .Data.metadata.version }}}}{{{{ end }}}}\n'
            f'token={{{{ (secret "kv1/{p}/api").Data.token }}}}\n'
            f'short={{{{ (secret "secret/{p}/other").Data.data.value }}}}\n'
            f'{{{{ range $k, $v := (secret "secret/data/{p}/db").Data.data }}}}'
            f'{{{{ $k }}}};{{{{ end }}}}\n')
    extra = f"""
[[template]]
destination = "{dest}"
engine = "go"
contents = {json.dumps(text)}
"""
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=extra)
    with trio.fail_after(60):
        async with running_agent(cfg):
            assert dest.read_text() == (
                f"user=app\npw={seeded.markers['db']}\nv=1\n"
                f"token={seeded.markers['api']}\nshort={seeded.markers['other']}\n"
                "password;username;\n")
            bao.kv_put(f"{p}/db", {"username": "app", "password": "rotated-MARKER"})
            await until(lambda: "pw=rotated-MARKER\nv=2\n" in (read(dest) or ""))


async def test_a_missing_key_fails_closed_and_keeps_the_last_file(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """consul-template prints <no value>; agentd fails closed unless error_on_missing_key is
    false (then it prints what the OpenBao Agent prints)."""
    seeded = seed(bao)
    p = seeded.prefix
    out = tmp_path / "out"
    out.mkdir()
    strict, lenient = out / "strict.conf", out / "lenient.conf"
    body = f'{{{{ with secret "secret/data/{p}/db" }}}}{{{{ .Data.data.nope }}}}{{{{ end }}}}'
    extra = f"""
[[template]]
destination = "{strict}"
engine = "go"
contents = '{body}'

[[template]]
destination = "{lenient}"
engine = "go"
error_on_missing_key = false
contents = '{body}'
"""
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=extra)
    with trio.fail_after(60):
        async with running_agent(cfg) as ra:
            await until(lambda: read(lenient) is not None)
            assert lenient.read_text() == "<no value>"
            await until(lambda: ra.agent.status()["templates"][str(strict)].get("last_error"))
            error = ra.agent.status()["templates"][str(strict)]["last_error"]
            assert "nope" in error and seeded.markers["db"] not in error
            assert not strict.exists()
