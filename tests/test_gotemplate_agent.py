"""Go templates (engine = "go") rendered by a running agent against the real OpenBao.

consul-template's dialect reads secrets by upstream path; the agent resolves each path to the
declared secret with that path (decision 3), renders in the sandboxed worker, and rewrites the
file when a secret rotates. The engine's own byte-for-byte agreement with the OpenBao Agent is
tests/test_gotemplate_oracle.py's; this is the wiring.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from agentd.client import AsyncClient
from agentd.jsonnum import literal_text
from tests.agentfixture import call, running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer
from tests.support import until
from tests.test_gotemplate_oracle import CORPUS, NUMBERS, _raw, run_agent
from tests.test_http_agent import http_get


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


def _data_text(body: bytes) -> bytes:
    """The bytes of ``data.data`` in a kv2 reply (an object of numbers: no braces in strings)."""
    start = body.index(b'"data":{"data":') + len(b'"data":{"data":')
    depth = 0
    for end in range(start, len(body)):
        depth += {ord("{"): 1, ord("}"): -1}.get(body[end], 0)
        if depth == 0:
            return body[start:end + 1]
    raise AssertionError("no data.data object")


async def test_numbers_reach_each_consumer_as_it_expects_them(
    bao: DevServer, approle_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Decision 14, through the whole pipeline (upstream reply, sealed cache, render worker):
    a Go template renders the numbers of a secret byte for byte as the real OpenBao Agent
    renders the same template; the HTTP face answers them with OpenBao's own text; Jinja2 and
    v1 ``get`` get Python's numbers."""
    seeded = seed(bao)
    p = seeded.prefix
    path = f"secret/data/{p}/numbers"
    _raw(bao, "POST", path, NUMBERS)        # raw JSON: the numbers' text as written
    upstream = _raw(bao, "GET", path)
    plain = json.loads(upstream)["data"]["data"]
    text = (CORPUS / "93-json-number-texts.tmpl").read_text().replace(
        "secret/data/gotmpl/numbers", path)
    assert path in text
    source = tmp_path / "numbers.tmpl"
    source.write_text(text)
    with trio.fail_after(120):
        proc, theirs = await trio.to_thread.run_sync(
            run_agent, bao, tmp_path / "openbao-agent", [source])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]

    out = tmp_path / "out"
    out.mkdir()
    go_dest, jinja_dest = out / "numbers.conf", out / "numbers.jinja.conf"
    fields = ("thousand", "small", "tiny", "minus_zero", "negzero", "big")
    jinja = " ".join(f"{{{{ secret('numbers').{f} }}}}" for f in fields)
    extra = f"""
[secrets.numbers]
kind = "kv2"
path = "{path}"

[[template]]
destination = "{go_dest}"
engine = "go"
source = "{source}"

[[template]]
destination = "{jinja_dest}"
contents = "{jinja}"
"""
    sock = socket_dir() / "a.sock"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=sock, extra=extra)
    with trio.fail_after(60):
        async with running_agent(cfg):
            await until(lambda: read(go_dest) is not None and read(jinja_dest) is not None)
            assert go_dest.read_bytes() == theirs[source.name]
            assert jinja_dest.read_text() == " ".join(str(plain[f]) for f in fields)
            got = await call(sock, "get", name="numbers")
            assert got["data"] == plain
            assert all(type(got["data"][k]) is type(v) for k, v in plain.items())
            status, _, body = await http_get(sock, f"/v1/{path}")
            assert status == 200
            assert _data_text(body) == _data_text(upstream)
            # v1 get with exact: the texts (what `agentd render --dry-run` renders with)
            async with AsyncClient.connect(sock) as client:
                exact = (await client.get("numbers", exact=True))["data"]
                small = await client.get("numbers", "small", exact=True)
            assert exact == plain
            assert (literal_text(exact["minus_zero"]), literal_text(exact["small"]),
                    literal_text(exact["tiny"]), literal_text(small["data"])) == (
                "-0", "1e-7", "0.00001", "1e-7")
            assert literal_text(exact["port"]) is None and exact["port"] == 5432
            # so the dry run renders the Go template as the agent did: nothing to change
            dry = await trio.run_process(
                [sys.executable, "-m", "agentd", "render", "--dry-run", "-c", str(cfg),
                 "--socket", str(sock)], capture_stdout=True, capture_stderr=True, check=False)
            dry_text = dry.stdout.decode()
            assert f"unchanged {go_dest}" in dry_text, dry_text + dry.stderr.decode()
            assert "0 file(s) would change, 0 error(s), 2 unchanged" in dry_text
    # what the pipeline had to keep (Python's repr differs): -0, 1e-7, 0.00001
    theirs_text = theirs[source.name].decode()
    assert " -0 " in theirs_text and " 1e-7 " in theirs_text and " 0.00001 " in theirs_text
