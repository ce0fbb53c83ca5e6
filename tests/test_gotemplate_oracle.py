"""Differential test: the real OpenBao Agent is the oracle for agentd's Go template engine.

One ``bao agent`` run (token_file auto-auth, ``exit_after_auth``) renders every template of
``tests/fixtures/gotemplate/*.tmpl`` against the session's dev server; agentd's engine renders
the same templates from the same secrets, read over the dev server's HTTP API with the root
token and decoded with ``gotemplate.decode_json`` (numbers keep their JSON text). Every output
must be byte-identical. ``*.delim.tmpl`` use ``[[``/``]]`` as delimiters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agentd import gotemplate
from tests.openbao import DevServer, bao_binary

CORPUS = Path(__file__).parent / "fixtures" / "gotemplate"
TEMPLATES = sorted(CORPUS.glob("*.tmpl"))
ERROR_TEMPLATES = sorted((CORPUS / "errors").glob("*.tmpl"))
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ENV_VAR = "GOTMPL_ORACLE_VAR"
ENV_VALUE = "env <value> & more"

# Raw JSON bodies so that number literals reach OpenBao (and back) exactly as written.
APP = r"""{"data": {
  "username": "admin", "password": "p<a>s&s\"w'ord\\", "port": 5432, "ratio": 0.25,
  "big": 12345678901234567890, "exp": 1.5e+300, "neg": -17, "trailing": 1.50, "zero": 0,
  "enabled": true, "disabled": false, "empty": "", "nothing": null,
  "unicode": "h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c \ud83d\ude00",
  "list": ["h1", "h2", "h3"], "list2": ["zz", "h3"],
  "mixedlist": [1, "a", null, true, 2.5, {"k": "v"}],
  "nested": {"b": {"c": 1, "d": [true, false]}, "a": "x", "z": [1, 2]},
  "emptymap": {}, "emptylist": [], "multiline": "line1\nline2\n",
  "html": "<script>alert('x') && \"y\"</script>=", "b64": "aGVsbG8gd29ybGQ=",
  "csv": " a, b ,c ", "json": "{\"k\": [1, 2.5, \"v\"], \"n\": null}", "num_str": "42",
  "float_str": "3.14159", "bool_str": "true", "spaces": "  padded \t ",
  "mixed": "Hello World foo-bar", "my-key": "dash", "d\u00e4t\u00e4": "unicode key",
  "zws": "a\u200bb\u00a0c\u00ad", "control": "tab\tnl\ncr\rbell\u0007 \u2028"
}}"""
# Numbers written with text Python would not give back (decision 14). OpenBao itself stores a
# written number as Go's float64 and answers it in Go's JSON (1e3 -> 1000, 1.50 -> 1.5, a big
# integer -> 1.2345678901234568e+29); what still differs from Python's repr is what the agent
# must keep: -0 (of -0.0 and -0), 1e-7 (Python: 1e-07), 0.00001 (Python: 1e-05). 1e400 is
# refused by OpenBao (400).
NUMBERS = r"""{"data": {
  "thousand": 1e3, "trailing": 1.50, "tenth": 0.10, "hundred": 1E+2, "negzero": -0.0,
  "pi": 3.141592653589793238462643, "big": 123456789012345678901234567890,
  "negbig": -123456789012345678901234567890, "minus_zero": -0, "one": 1.0, "small": 1e-7,
  "tiny": 0.00001, "micro": 0.000123, "negsmall": -2.5e-8, "e20": 1e20, "e21": 1e21,
  "port": 5432, "ratio": 0.25, "list": [1e3, 0.10, 2, -0.0, 1e-7], "nested": {"x": 1.50}
}}"""
DB_V1 = r"""{"data": {"host": "old.internal", "user": "app"}}"""
DB_V2 = r"""{"data": {"host": "db.internal", "user": "app"}}"""
LEGACY = r"""{"key": "v1value", "count": 7, "tags": ["x", "y"], "m": {"k": "v"}}"""
OTHER = r"""{"a": "b"}"""
KEYS = r"""{"data": {"B": 1, "a": 2, "_x": 3, "10": 4, "9": 5, "\u00e9": 6, "Z": 7, "aa": 8,
  "": 9, "a b": 10, "\ud83d\ude00": 11, "\u00ff": 12, "-": 13}}"""


def _raw(server: DevServer, method: str, path: str, body: str | None = None) -> bytes:
    req = urllib.request.Request(
        f"{server.address}/v1/{path}", data=None if body is None else body.encode(),
        method=method)
    req.add_header("X-Vault-Token", server.token)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def _seed(server: DevServer) -> None:
    server.enable_kv1()
    _raw(server, "POST", "secret/data/gotmpl/app", APP)
    _raw(server, "POST", "secret/data/gotmpl/db", DB_V1)
    _raw(server, "POST", "secret/data/gotmpl/db", DB_V2)
    _raw(server, "POST", "kv1/gotmpl/legacy", LEGACY)
    _raw(server, "POST", "kv1/gotmpl/other", OTHER)
    _raw(server, "POST", "secret/data/gotmpl/keys", KEYS)
    _raw(server, "POST", "secret/data/gotmpl/numbers", NUMBERS)
    try:
        _raw(server, "POST", "sys/mounts/gotmpl-pki", '{"type": "pki"}')
    except urllib.error.HTTPError as exc:
        if exc.code != 400:  # already mounted
            raise
    _raw(server, "POST", "gotmpl-pki/root/generate/internal",
         '{"common_name": "gotmpl-ca", "ttl": "24h", "key_type": "ec"}')
    _raw(server, "POST", "gotmpl-pki/roles/web",
         '{"allowed_domains": "example.com", "allow_subdomains": true, "max_ttl": "1h",'
         ' "key_type": "ec"}')


def _hcl_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_agent(server: DevServer, work: Path, templates: list[Path]
              ) -> tuple[subprocess.CompletedProcess[bytes], dict[str, bytes]]:
    """Run ``bao agent`` once (auth, render every template once, exit); return its outputs."""
    work.mkdir(parents=True, exist_ok=True)
    token = work / "token"
    token.write_text(server.token)
    out_dir = work / "out"
    out_dir.mkdir()
    stanzas = []
    for tmpl in templates:
        delims = ""
        if tmpl.name.endswith(".delim.tmpl"):
            delims = 'left_delimiter = "[["\n  right_delimiter = "]]"\n'
        strict = "true" if tmpl.name.endswith(".strict.tmpl") else "false"
        stanzas.append(
            "template {\n"
            f"  source = {_hcl_string(str(tmpl))}\n"
            f"  destination = {_hcl_string(str(out_dir / tmpl.name))}\n"
            f"  error_on_missing_key = {strict}\n  {delims}"
            "}\n"
        )
    config = work / "agent.hcl"
    config.write_text(
        f'vault {{\n  address = "{server.address}"\n}}\n'
        "auto_auth {\n  method \"token_file\" {\n    config = {\n"
        f"      token_file_path = {_hcl_string(str(token))}\n    }}\n  }}\n}}\n"
        "exit_after_auth = true\n"
        "template_config {\n  exit_on_retry_failure = true\n}\n" + "".join(stanzas)
    )
    env = dict(os.environ, HOME=str(work), BAO_LOG_LEVEL="warn", **{ENV_VAR: ENV_VALUE})
    for name in ("BAO_ADDR", "VAULT_ADDR", "BAO_TOKEN", "VAULT_TOKEN", "GOTMPL_ORACLE_UNSET"):
        env.pop(name, None)
    proc = subprocess.run(
        [bao_binary(), "agent", f"-config={config}"], env=env, capture_output=True,
        timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    return proc, {p.name: p.read_bytes() for p in out_dir.iterdir()}


@pytest.fixture(scope="module")
def oracle(bao: DevServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Run the OpenBao Agent once over the whole corpus; return {template name: output}."""
    _seed(bao)
    proc, outputs = run_agent(bao, tmp_path_factory.mktemp("oracle"), TEMPLATES)
    if proc.returncode != 0 or len(outputs) != len(TEMPLATES):
        log = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
        pytest.fail(f"bao agent exited {proc.returncode}, rendered {len(outputs)} of "
                    f"{len(TEMPLATES)}:\n{log}")
    return outputs


def _lookup(server: DevServer) -> Any:
    mounts_v2 = ("secret/",)

    def lookup(path: str, kv: Mapping[str, str]) -> Any:
        if "/issue/" in path:  # pki/issue: a write with the template's k=v arguments
            return gotemplate.decode_json(_raw(server, "POST", path, json.dumps(dict(kv))))
        assert not kv
        if path.startswith(mounts_v2) and not path.startswith(("secret/data/",
                                                                "secret/metadata/")):
            path = "secret/data/" + path[len("secret/"):]
        method = "LIST" if path.endswith("/") else "GET"
        try:
            return gotemplate.decode_json(_raw(server, method, path))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    return lookup


@pytest.mark.parametrize("tmpl", TEMPLATES, ids=[t.name for t in TEMPLATES])
def test_matches_openbao_agent(tmpl: Path, oracle: dict[str, bytes], bao: DevServer) -> None:
    delims = ("[[", "]]") if tmpl.name.endswith(".delim.tmpl") else ("{{", "}}")
    parsed = gotemplate.parse(
        tmpl.read_bytes().decode(), name=tmpl.name, left_delim=delims[0], right_delim=delims[1],
        env_allow={ENV_VAR, "GOTMPL_ORACLE_UNSET"}, missing_key="zero",
    )
    ours = parsed.execute(_lookup(bao), max_output=1 << 20, env={ENV_VAR: ENV_VALUE}).encode()
    theirs = oracle[tmpl.name]
    if ".uuid." in tmpl.name:  # request ids differ between two reads: mask them on both sides
        ours, theirs = (UUID.sub(b"<uuid>", x) for x in (ours, theirs))
    assert ours == theirs


def _parse_and_run(tmpl: Path, server: DevServer) -> str:
    return gotemplate.parse(
        tmpl.read_bytes().decode(), name=tmpl.name, env_allow={ENV_VAR, "GOTMPL_ORACLE_UNSET"},
        missing_key="error" if tmpl.name.endswith(".strict.tmpl") else "zero",
    ).execute(_lookup(server), max_output=1 << 20, env={ENV_VAR: ENV_VALUE})


@pytest.fixture(scope="module")
def refusals(oracle: dict[str, bytes], bao: DevServer, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[int, int]]:
    """Each refused template needs an agent of its own (the first failure stops an agent): run
    them four at a time; return {name: (exit code, files written)}."""
    work = tmp_path_factory.mktemp("refusals")

    def one(tmpl: Path) -> tuple[str, tuple[int, int]]:
        proc, outputs = run_agent(bao, work / tmpl.stem, [tmpl])
        return tmpl.name, (proc.returncode, len(outputs))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, ERROR_TEMPLATES))


@pytest.mark.parametrize("tmpl", ERROR_TEMPLATES, ids=[t.name for t in ERROR_TEMPLATES])
def test_fails_where_openbao_agent_fails(tmpl: Path, refusals: dict[str, tuple[int, int]],
                                         bao: DevServer) -> None:
    """Go refuses these (at parse or execution): the agent exits 1 without the file; so do we."""
    returncode, written = refusals[tmpl.name]
    assert returncode != 0
    assert written == 0
    with pytest.raises(gotemplate.GoTemplateError) as info:
        _parse_and_run(tmpl, bao)
    for value in ("admin", "5432", "p<a>s", "h1", "db.internal", "aGVsbG8"):
        assert value not in str(info.value)


def test_corpus_is_large_enough() -> None:
    assert len(TEMPLATES) >= 60


