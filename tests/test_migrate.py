"""`agentd migrate AGENT.hcl`: OpenBao/Vault Agent configs in, agentd TOML out.

The corpus in tests/fixtures/migrate/ holds realistic agent configs (approle with kv2/kv1/pki
templates, token_file, cert, jwt, every template option, template_config, exec/env_template with
listener/cache/api_proxy) and broken or unsupported ones. Each good one must translate (exit 0),
parse as TOML and load with ``agentd.config.load`` (which parses each Go template with agentd's
engine and resolves its secret paths through the catalog). Bad ones exit
2 with every problem named at FILE:LINE and nothing on stdout. ``--upstream`` asks the real
OpenBao dev server for mount types; the real ``bao agent`` is the oracle for how HCL heredocs and
the default file mode come out.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from agentd import config as config_mod
from agentd import migrate
from agentd.migrate import translate
from tests.openbao import DevServer, bao_binary

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

AGENTD = str(Path(sys.executable).with_name("agentd"))
CORPUS = Path(__file__).parent / "fixtures" / "migrate"
GOOD = ["approle.hcl", "token_file.hcl", "cert.hcl", "jwt.hcl", "template_options.hcl",
        "exec_env.hcl"]


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("BAO_ADDR", "VAULT_ADDR", "BAO_TOKEN", "VAULT_TOKEN")}
    environ.update(env or {})
    return subprocess.run([AGENTD, "migrate", *argv], capture_output=True, text=True,
                          timeout=60, check=False, env=environ)


def load(text: str, tmp_path: Path) -> config_mod.Config:
    """Load the TOML as agentd does (the Go templates parsed, their paths resolved through the
    catalog), without looking at the filesystem: the fixtures name files of another host."""
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return config_mod.load(path, check_permissions=False)


@pytest.mark.parametrize("name", GOOD)
def test_good_configs_translate_parse_and_load(name: str, tmp_path: Path) -> None:
    result = run(str(CORPUS / name))
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    hcl = (CORPUS / name).read_text()
    assert len(data.get("template", [])) == hcl.count("\ntemplate {")
    for template in data.get("template", []):
        assert template["engine"] == "go"
    config = load(result.stdout, tmp_path)
    assert config.upstream.addresses and config.upstream.auth.method
    # the notes: no policy invented (deny by default), inferred kinds flagged
    assert "no [[policy]] generated" in result.stderr
    assert "# [[policy]]" in result.stdout
    assert "error" not in result.stderr.lower().replace("error_on_missing_key", "")


def test_approle_with_kv2_kv1_and_pki(tmp_path: Path) -> None:
    result = run(str(CORPUS / "approle.hcl"))
    assert result.returncode == 0, result.stderr
    config = load(result.stdout, tmp_path)
    auth = config.upstream.auth
    assert auth.method == "approle"
    assert str(auth.role_id_file) == "/etc/openbao-agent/role_id"
    assert str(auth.secret_id_file) == "/etc/openbao-agent/secret_id"
    assert str(config.upstream.ca_file) == "/etc/openbao-agent/ca.pem"
    assert config.upstream.addresses == ("https://bao.example.internal:8200",)
    secrets = {name: (s.kind, s.path) for name, s in config.secrets.items()}
    assert secrets == {
        "secret-app-db": ("kv2", "secret/data/app/db"),
        "kv1-app-legacy": ("kv1", "kv1/app/legacy"),
        "pki-issue-web": ("pki", "pki/issue/web"),
    }
    assert dict(config.secrets["pki-issue-web"].params) == {
        "common_name": "web.example.internal", "ttl": "24h",
        "alt_names": "www.example.internal"}
    assert config.secrets["secret-app-db"].refresh == 600.0   # static_secret_render_interval
    # without --upstream every kind is flagged as inferred, in the TOML and on stderr
    assert result.stdout.count("INFERRED, check it") == 3
    assert "inferred from the path" in result.stderr
    db, legacy, tls = config.templates
    assert db.source == CORPUS / "templates" / "db.ctmpl"
    assert db.mode == 0o640 and db.command == ("systemctl", "reload", "app.service")
    assert legacy.mode == 0o600
    assert tls.contents is not None and tls.contents.endswith("{{ end }}\n")
    assert "exit_on_retry_failure" in result.stdout          # a comment on agentd's behaviour
    assert "fails closed" in result.stdout


def test_auth_methods(tmp_path: Path) -> None:
    token = load(run(str(CORPUS / "token_file.hcl")).stdout, tmp_path).upstream.auth
    assert token.method == "token_file"
    assert str(token.token_file) == "/etc/openbao-agent/token"
    cert = load(run(str(CORPUS / "cert.hcl")).stdout, tmp_path).upstream.auth
    assert (cert.method, cert.mount, cert.role) == ("cert", "host-cert", "web-hosts")
    assert (str(cert.cert_file), str(cert.key_file)) == ("/etc/pki/host.crt", "/etc/pki/host.key")
    jwt = load(run(str(CORPUS / "jwt.hcl")).stdout, tmp_path)
    assert (jwt.upstream.auth.method, jwt.upstream.auth.role) == ("jwt", "host")
    assert str(jwt.upstream.auth.jwt_file) == "/run/secrets/host.jwt"
    assert jwt.secrets["database-creds-app"].kind == "leased"
    (template,) = jwt.templates
    assert template.command == ("/usr/bin/systemctl", "try-reload-or-restart", "app.service")
    assert template.command_timeout == 45.0


def test_template_options(tmp_path: Path) -> None:
    result = run(str(CORPUS / "template_options.hcl"))
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    first, second, third = data["template"]
    assert (first["left_delimiter"], first["right_delimiter"]) == ("[[", "]]")
    assert first["error_on_missing_key"] is True
    assert first["backup"] is True
    assert (first["mode"], first["owner"], first["group"]) == ("0440", 0, "0")
    assert first["wait"] == {"min": "2s", "max": "10s"}
    assert first["contents"] == ('[[ with secret "secret/data/app/config" ]]'
                                 '[[ .Data.data.token ]][[ end ]]\n{{ literal braces }}\n')
    # a shell string stays a shell command, explicitly, with a comment saying why
    assert second["command"] == ["/bin/sh", "-c",
                                 "test -f /run/app.pid && kill -HUP $(cat /run/app.pid)"]
    assert "never uses a shell by itself" in result.stdout
    assert second["command_timeout"] == "1m"
    assert second["error_on_missing_key"] is False
    assert second["mode"] == "0644" and third["mode"] == "0644"   # the agent's default
    assert third["env"] == ["HOSTNAME"]                  # the variables its env reads
    config = load(result.stdout, tmp_path)
    assert config.agent.log_level == "warning"
    assert config.secrets["secret-app-config"].refresh == 300.0
    assert config.secrets["secret-app-plain"].kind == "kv1"
    assert config.templates[0].backup and config.templates[0].wait.max == 10.0


def test_exec_env_template_listener_cache(tmp_path: Path) -> None:
    result = run(str(CORPUS / "exec_env.hcl"))
    assert result.returncode == 0, result.stderr
    assert ("agentd exec --restart-on-change --env DB_PASSWORD=secret-app-db.password -- "
            "/usr/bin/app --serve") in result.stdout
    assert "BAO_AGENT_ADDR=unix:///run/agentd/agentd.sock" in result.stdout
    assert "api_proxy (exec_env.hcl:22)" in result.stdout
    assert "cache (exec_env.hcl:18)" in result.stdout
    config = load(result.stdout, tmp_path)
    assert set(config.secrets) == {"secret-app-db"}       # env_template's secret is declared


def test_unsupported_stanzas_exit_2_with_every_problem_located() -> None:
    path = CORPUS / "unsupported.hcl"
    result = run(str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    expected = [
        (3, "vault.tls_skip_verify"),
        (7, 'auto_auth.method "kubernetes"'),
        (13, "auto_auth.sink"),
        (21, "template[0]: plugin"),
        (28, "template[1]: secret"),
        (29, 'template[1]: secrets "secret/metadata/app/"'),
        (34, "telemetry_typo"),
    ]
    for line, what in expected:
        assert any(text.startswith(f"{path}:{line}: {what}: ") for text in lines), \
            (line, what, result.stderr)
    assert "7 problem(s); no configuration written" in result.stderr


def test_broken_hcl_names_the_line(tmp_path: Path) -> None:
    result = run(str(CORPUS / "broken.hcl"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"{CORPUS / 'broken.hcl'}:9: HCL syntax error: ")
    bad = tmp_path / "bad.hcl"
    bad.write_text('vault {\n  address = "x"\n}\ntemplate {\n  perms = = 1\n}\n')
    result = run(str(bad))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"{bad}:5: HCL syntax error: "), result.stderr


def test_missing_file_and_unreadable_source(tmp_path: Path) -> None:
    result = run(str(tmp_path / "nope.hcl"))
    assert (result.returncode, result.stdout) == (2, "")
    assert f"{tmp_path / 'nope.hcl'}:0: file: " in result.stderr
    hcl = tmp_path / "agent.hcl"
    hcl.write_text((CORPUS / "token_file.hcl").read_text() +
                   'template {\n  source = "missing.ctmpl"\n  destination = "/x"\n}\n')
    result = run(str(hcl))
    assert (result.returncode, result.stdout) == (2, "")
    assert f"{hcl}:18: template[1].source: cannot read {tmp_path / 'missing.ctmpl'}" \
        in result.stderr


def test_other_unsupported_inputs(tmp_path: Path) -> None:
    hcl = tmp_path / "agent.hcl"
    hcl.write_text(
        'vault {\n  address = "https://b:8200"\n  ca_path = "/etc/ssl/certs"\n}\n'   # 1-4
        'auto_auth {\n  method "aws" {\n    config = { type = "iam" }\n  }\n}\n'      # 5-9
        'template {\n  contents = "{{ with secret \\"transit/encrypt/k\\" \\"plaintext=eA==\\" }}'
        '{{ end }}{{ file \\"/etc/passwd\\" }}"\n  destination = "/x"\n'           # 10-12
        '  sandbox_path = "/x"\n  foo = 1\n}\n'                                        # 13-15
        'template {\n  contents = "{{ pkiCert \\"pki/issue/a\\" \\"common_name=a\\" }}'
        '{{ pkiCert \\"pki/issue/a\\" \\"common_name=b\\" }}"\n  destination = "/y"\n}\n')
    result = run(str(hcl))
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    for line, what in [(3, "vault.ca_path"), (6, 'auto_auth.method "aws"'),
                       (11, 'template[0]: secret "transit/encrypt/k"'),
                       (11, "template[0]: file"), (14, "template[0].foo"),
                       (17, 'template[1]: pkiCert "pki/issue/a"')]:
        assert f"{hcl}:{line}: {what}: " in result.stderr, (line, what, result.stderr)


def test_templates_agentds_engine_refuses(tmp_path: Path) -> None:
    """Each template is parsed by agentd's Go engine: a function it lacks or a syntax error is
    a problem at the template's line (in the HCL for contents, in the file for a source)."""
    source = tmp_path / "bad.ctmpl"
    source.write_text("ok\n\n{{ if }}\n")
    hcl = tmp_path / "agent.hcl"
    hcl.write_text(
        (CORPUS / "token_file.hcl").read_text() +                                   # 1-16
        'template {\n  contents = <<EOT\nline\n{{ regexReplaceAll "a" "b" "c" }}\nEOT\n'
        '  destination = "/a"\n}\n'                                                 # 17-23
        f'template {{\n  source = "{source}"\n  destination = "/b"\n}}\n')
    result = run(str(hcl))
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert f"{hcl}:20: template[1]: agentd's Go engine cannot take it: " in result.stderr
    assert "regexReplaceAll" in result.stderr
    assert f"{source}:3: template[2]: agentd's Go engine cannot take it: " in result.stderr


def test_block_forms_and_odd_commands(tmp_path: Path) -> None:
    """`config { }` as a block, a method named by `type`, client_timeout, a quote-unbalanced
    command (left to the shell), a one-element command list with spaces (a shell string)."""
    hcl = tmp_path / "agent.hcl"
    hcl.write_text(
        'vault {\n  address = "https://b:8200"\n  client_timeout = "30s"\n}\n'
        'auto_auth {\n  method {\n    type = "approle"\n    mount_path = "auth/ar"\n'
        '    config {\n      role_id_file_path = "/r"\n      secret_id_file_path = "/s"\n'
        '    }\n  }\n}\n'
        'template {\n  contents = "x"\n  destination = "/a"\n  command = "echo don\'t"\n}\n'
        'template {\n  contents = "y"\n  destination = "/b"\n'
        '  command = ["pkill -HUP app"]\n}\n')
    result = migrate.migrate(hcl)
    assert result.toml is not None, result.problems
    config = load(result.toml, tmp_path)
    assert config.upstream.timeout == 30.0
    assert (config.upstream.auth.method, config.upstream.auth.mount) == ("approle", "ar")
    assert str(config.upstream.auth.secret_id_file) == "/s"
    assert config.templates[0].command == ("/bin/sh", "-c", "echo don't")
    assert config.templates[1].command == ("pkill", "-HUP", "app")


def test_output_file(tmp_path: Path) -> None:
    out = tmp_path / "agentd.toml"
    result = run(str(CORPUS / "jwt.hcl"), "-o", str(out))
    assert (result.returncode, result.stdout) == (0, "")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    tomllib.loads(out.read_text())
    bad = tmp_path / "bad.toml"
    assert run(str(CORPUS / "unsupported.hcl"), "-o", str(bad)).returncode == 2
    assert not bad.exists()


def test_upstream_needs_a_token() -> None:
    result = run(str(CORPUS / "jwt.hcl"), "--upstream", "http://127.0.0.1:1")
    assert result.returncode == 2 and "needs a token" in result.stderr


def test_unreachable_upstream_is_a_runtime_failure() -> None:
    result = run(str(CORPUS / "jwt.hcl"), "--upstream", "http://127.0.0.1:1",
                 env={"BAO_TOKEN": "t"})
    assert (result.returncode, result.stdout) == (1, "")
    assert "cannot ask http://127.0.0.1:1" in result.stderr


def _mount(bao: DevServer, path: str, version: str) -> None:
    try:
        bao.api("POST", f"sys/mounts/{path}", {"type": "kv", "options": {"version": version}})
    except urllib.error.HTTPError as exc:
        if exc.code != 400:        # mounted already (another run in this session)
            raise


def _upstream_hcl(bao: DevServer, tmp_path: Path, *, shorthand: bool) -> Path:
    _mount(bao, "migrate-v1", "1")
    _mount(bao, "migrate-v2", "2")
    hcl = tmp_path / "agent.hcl"
    two = "migrate-v2/app/two" if shorthand else "migrate-v2/data/app/two"
    hcl.write_text(
        f'vault {{\n  address = "{bao.address}"\n}}\n'
        'auto_auth {\n  method "token_file" {\n    config = { token_file_path = "/t" }\n  }\n}\n'
        'template {\n  contents = <<EOT\n'
        '{{ with secret "migrate-v1/app/one" }}{{ .Data.x }}{{ end }}\n'
        f'{{{{ with secret "{two}" }}}}{{{{ .Data.data.x }}}}{{{{ end }}}}\n'
        '{{ with secret "migrate-v2/data/app/three" }}{{ .Data.data.x }}{{ end }}\n'
        '{{ with secret "migrate-v1/data/four" }}{{ .Data.x }}{{ end }}\n'
        'EOT\n  destination = "/etc/x"\n}\n')
    return hcl


def test_upstream_decides_kv1_and_kv2(bao: DevServer, tmp_path: Path) -> None:
    hcl = _upstream_hcl(bao, tmp_path, shorthand=True)
    token = tmp_path / "token"
    token.write_text(bao.token + "\n")
    result = run(str(hcl), "--upstream", bao.address, "--token-file", str(token))
    assert result.returncode == 0, result.stderr
    kinds = {s["path"]: s["kind"] for s in tomllib.loads(result.stdout)["secrets"].values()}
    assert kinds == {
        "migrate-v1/app/one": "kv1",
        "migrate-v2/data/app/two": "kv2",        # consul-template's KV v2 path shim, made explicit
        "migrate-v2/data/app/three": "kv2",
        "migrate-v1/data/four": "kv1",           # "data/" in a KV v1 mount is just a name
    }
    assert "INFERRED" not in result.stdout
    assert "the upstream says migrate-v2/ is a kv mount (version 2)" in result.stdout
    assert "migrate-v2/app/two is KV v2 data at migrate-v2/data/app/two" in result.stderr
    # the token can come from the environment as well; the names do not depend on --upstream
    again = run(str(hcl), "--upstream", bao.address, env={"BAO_TOKEN": bao.token})
    assert again.stdout == result.stdout
    offline = tomllib.loads(run(str(hcl)).stdout)
    assert set(offline["secrets"]) == set(tomllib.loads(result.stdout)["secrets"])
    # written with data/, the same secrets load as they are
    explicit = _upstream_hcl(bao, tmp_path, shorthand=False)
    result = run(str(explicit), "--upstream", bao.address, env={"BAO_TOKEN": bao.token})
    config = load(result.stdout, tmp_path)
    assert {s.path: s.kind for s in config.secrets.values()} == kinds


def test_kv2_shorthand_paths_load(bao: DevServer, tmp_path: Path) -> None:
    hcl = _upstream_hcl(bao, tmp_path, shorthand=True)
    result = run(str(hcl), "--upstream", bao.address, env={"BAO_TOKEN": bao.token})
    assert result.returncode == 0, result.stderr
    load(result.stdout, tmp_path)


def test_upstream_without_permission_falls_back_to_inference(bao: DevServer,
                                                              tmp_path: Path) -> None:
    bao.put_policy("migrate-nothing", 'path "nothing/*" { capabilities = ["read"] }')
    weak = bao.create_token(policies=["migrate-nothing"])
    result = run(str(CORPUS / "token_file.hcl"), "--upstream", bao.address,
                 env={"BAO_TOKEN": weak})
    assert result.returncode == 0, result.stderr
    assert "INFERRED" in result.stdout and "the upstream answered 403" in result.stderr


# --- the real OpenBao Agent as the oracle for HCL strings and the default mode ------------------


def test_heredocs_and_default_mode_match_the_openbao_agent(bao: DevServer,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    token = tmp_path / "token"
    token.write_text(bao.token)
    bodies = {
        "plain": '<<EOT\nline one\n  indented "x"\n\nEOT',
        "trim": '<<-EOT\n    four\n      six\n    EOT',
        "trim_uneven": '<<-EOT\n    four\n  two\n    EOT',
        "quoted": '"a\\tb\\n${x} $${y} %{z}\\u00e9\\n"',
        "no_newline": '"\\"no newline\\" at the end"',
        "empty_lines": '<<EOT\n\n\nEOT',
        "shellish": '"${HOME:-/root} %{ if x }"',
        "heredoc_directives": '<<EOT\n%{ for x in y }${x}%{ endfor } # not a comment\nEOT',
    }
    stanzas = "".join(
        f'template {{\n  contents = {body}\n  destination = "{out / name}"\n}}\n'
        for name, body in bodies.items())
    hcl = tmp_path / "agent.hcl"
    hcl.write_text(
        f'vault {{\n  address = "{bao.address}"\n}}\n'
        f'auto_auth {{\n  method "token_file" {{\n    config = {{\n'
        f'      token_file_path = "{token}"\n    }}\n  }}\n}}\n'
        'exit_after_auth = true\n' + stanzas)
    env = {k: v for k, v in os.environ.items()
           if k not in ("BAO_ADDR", "VAULT_ADDR", "BAO_TOKEN", "VAULT_TOKEN")}
    agent = subprocess.run([bao_binary(), "agent", f"-config={hcl}"], capture_output=True,
                           timeout=120, stdin=subprocess.DEVNULL, check=False,
                           env=dict(env, HOME=str(tmp_path), BAO_LOG_LEVEL="warn"))
    rendered = {p.name: p for p in out.iterdir()}
    assert agent.returncode == 0 and len(rendered) == len(bodies), agent.stderr[-3000:]
    result = migrate.migrate(hcl)
    assert result.toml is not None, result.problems
    templates: list[dict[str, Any]] = tomllib.loads(result.toml)["template"]
    for name, template in zip(bodies, templates, strict=True):
        assert template["contents"].encode() == rendered[name].read_bytes(), name
        assert int(template["mode"], 8) == stat.S_IMODE(rendered[name].stat().st_mode), name


def test_docs_side_by_side_is_what_migrate_prints(tmp_path: Path) -> None:
    """docs/migration.md's example: its TOML is exactly the output for its HCL."""
    doc = (Path(__file__).parent.parent / "docs" / "migration.md").read_text()
    section = doc.split("## Side by side", 1)[1]
    hcl = re.search(r"```hcl\n(.*?)```", section, re.S)
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    assert hcl and toml
    path = tmp_path / "agent.hcl"
    path.write_text(hcl.group(1))
    result = run(str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == toml.group(1)
    load(result.stdout, tmp_path)


AGENT_HCL = """\
vault {{
  address = "{address}"
}}

auto_auth {{
  method "token_file" {{
    config = {{
      token_file_path = "{token}"
    }}
  }}
}}

exit_after_auth = true

template_config {{
  exit_on_retry_failure = true
}}

template {{
  contents    = <<EOT
{{{{ with secret "secret/data/{p}/db" -}}}}
host={{{{ .Data.data.host }}}} port={{{{ .Data.data.port }}}}
{{{{ range $k, $v := .Data.data }}}}{{{{ $k }}}}={{{{ $v }}}};{{{{ end }}}}
{{{{ printf "%q %5.2f" .Data.data.password .Data.data.ratio }}}}
{{{{- end }}}}
EOT
  destination = "{out}/db.conf"
  perms       = "0640"
}}

template {{
  source      = "{source}"
  destination = "{out}/legacy.env"
}}

template {{
  contents = "{{{{ with secret \\"secret/data/{p}/db\\" }}}}{{{{ .Data.data.nope }}}}{{{{ end }}}}"
  destination          = "{out}/missing.txt"
  error_on_missing_key = false
  perms                = "0600"
}}

template {{
  contents        = "[[ with secret \\"kv1/{p}/legacy\\" ]][[ .Data.tags ]] {{{{ x }}}}[[ end ]]"
  destination     = "{out}/delims.txt"
  left_delimiter  = "[["
  right_delimiter = "]]"
}}
"""


async def test_migrated_config_renders_what_the_openbao_agent_renders(
    bao: DevServer, tmp_path: Path
) -> None:
    """The issue's differential, end to end: the real OpenBao Agent renders an HCL config's
    templates; `agentd migrate` translates the same HCL and a running agentd renders them: the
    same bytes and the same modes."""
    import secrets as random_names

    import trio

    from tests.agentfixture import running_agent, socket_dir
    from tests.support import until

    p = f"migrate-{random_names.token_hex(4)}"
    bao.kv_put(f"{p}/db", {"host": "db.internal", "port": 5432, "ratio": 0.25,
                           "password": "p<a>ss\"w", "user": "app"})
    bao.api("POST", f"kv1/{p}/legacy", {"api_key": "k-123", "tags": ["x", "y"]})
    token = tmp_path / "token"
    token.write_text(bao.token)
    token.chmod(0o600)
    source = tmp_path / "legacy.ctmpl"
    source.write_text(f'{{{{ with secret "kv1/{p}/legacy" }}}}API_KEY={{{{ .Data.api_key }}}}\n'
                      f'TAGS={{{{ range .Data.tags }}}}{{{{ . }}}},{{{{ end }}}}\n'
                      f'{{{{ toJSON .Data }}}}{{{{ end }}}}\n')
    outputs = {}
    for who in ("bao", "agentd"):
        out = tmp_path / who
        out.mkdir()
        outputs[who] = out
        (tmp_path / f"{who}.hcl").write_text(AGENT_HCL.format(
            address=bao.address, token=token, p=p, out=out, source=source))
    env = {k: v for k, v in os.environ.items()
           if k not in ("BAO_ADDR", "VAULT_ADDR", "BAO_TOKEN", "VAULT_TOKEN")}
    agent = subprocess.run([bao_binary(), "agent", f"-config={tmp_path / 'bao.hcl'}"],
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                           check=False, env=dict(env, HOME=str(tmp_path), BAO_LOG_LEVEL="warn"))
    expected = {f.name: f for f in outputs["bao"].iterdir()}
    assert agent.returncode == 0 and len(expected) == 4, agent.stderr[-3000:]

    result = run(str(tmp_path / "agentd.hcl"))
    assert result.returncode == 0, result.stderr
    config = tmp_path / "agentd.toml"
    config.write_text(
        f'[agent]\nsocket = "{socket_dir() / "a.sock"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[audit]\npath = "{tmp_path / "audit.jsonl"}"\n' + result.stdout)
    with trio.fail_after(60):
        async with running_agent(config):
            await until(lambda: len(list(outputs["agentd"].iterdir())) == len(expected))
    for name, theirs in expected.items():
        ours = outputs["agentd"] / name
        assert ours.read_bytes() == theirs.read_bytes(), name
        assert stat.S_IMODE(ours.stat().st_mode) == stat.S_IMODE(theirs.stat().st_mode), name


# --- units ----------------------------------------------------------------------------------------


def test_secret_names_are_valid_stable_and_unique() -> None:
    taken: dict[str, str] = {}
    name = migrate.secret_name("secret/data/App/DB.conf", taken)
    assert name == "secret-app-db-conf"
    assert migrate.secret_name("secret/App/DB.conf", taken) == name     # kv2's data/ dropped
    taken[name] = "secret/data/App/DB.conf"
    other = migrate.secret_name("secret/app/db-conf", taken)            # a clash: hashed
    assert other != name and other.startswith("secret-app-db-conf-")
    assert migrate.secret_name("secret/app/db-conf", taken) == other    # stable
    long = migrate.secret_name("secret/data/" + "x" * 200, {})
    assert len(long) <= 63 and re.fullmatch(config_mod.SECRET_NAME_PATTERN, long)
    assert re.fullmatch(config_mod.SECRET_NAME_PATTERN, migrate.secret_name("_/_/_", {}))


def test_scan_template_finds_calls_with_lines() -> None:
    text = ('a {{ secret "p/one" }}\n{{- with secret `p/two` "k=v" -}}\n'
            '{{ define "secret" }}{{ end }}{{ .secret }}{{ $secret := 1 }}\n'
            '{{ /* secret "p/comment" */ }}{{ "secret \\"p/str\\"" }}\n'
            '{{ env "HOME" }}{{ plugin "x" }}{{ secret (print "p") }}'
            '{{ pkiCert "pki/issue/a" $cn }}{{ (secret "p/three").Data }}')
    calls = migrate.scan_template(text)
    assert [(c.function, c.args, c.line, c.literal) for c in calls] == [
        ("secret", ("p/one",), 1, True),
        ("secret", ("p/two", "k=v"), 2, True),
        ("env", ("HOME",), 5, True),
        ("plugin", (), 5, True),
        ("secret", (), 5, False),
        ("pkiCert", ("pki/issue/a",), 5, False),
        ("secret", ("p/three",), 5, True),
    ]
    assert [c.line for c in migrate.scan_template("[[ secret \"a/b\" ]] {{ secret }}", "[[",
                                                  "]]")] == [1]


def test_parse_keeps_lines_and_hcl1_strings() -> None:
    root = migrate.parse_hcl('a = 1\n\nb "x" "y" {\n  c = <<EOT\nz\nEOT\n  d = { e = 2 }\n}\n'
                             'perms = 0640\n')
    assert root.line_of("a") == 1 and root.line_of("perms") == 9
    (block,) = root.blocks
    assert (block.type, block.labels, block.line) == ("b", ("x", "y"), 3)
    assert block.get("c") == "z\n" and block.line_of("c") == 4
    assert block.children("d")[0].get("e") == 2
    assert translate._mode(root.get("perms")) == "0640"
