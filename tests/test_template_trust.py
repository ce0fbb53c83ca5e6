"""A template's source is code that reads secrets: who can change it decides what it reveals.

Issue 13 item 1, run for real: a running agent against the real OpenBao renders a template from
a ``source`` file; then the file (or the directory it lives in) is put within reach of another
user (nobody), who swaps it for a symlink to a root-only file or for a template naming secrets
it never named. The agent refuses to render either (the last good file stays, the error is in
``status``), and ``check-config`` refuses such a layout up front.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from agentd import config as config_mod
from agentd.errors import ConfigError
from tests.agentfixture import running_agent, seed, socket_dir, write_config
from tests.openbao import DevServer
from tests.support import until

NOBODY = 65534


@pytest.fixture
def base(shared_tmp: Path) -> Path:
    return shared_tmp

def _as_nobody(action: object) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()  # type: ignore[operator]
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _template(source: Path, dest: Path, extra: str = "") -> str:
    return f"""
[[template]]
source = "{source}"
destination = "{dest}"
mode = "0600"
{extra}
"""


async def test_a_source_swapped_by_another_user_is_not_rendered(
    bao: DevServer, approle_files: tuple[Path, Path], base: Path, tmp_path: Path
) -> None:
    seeded = seed(bao)
    templates = base / "templates"
    templates.mkdir()
    source = templates / "db.tmpl"
    source.write_text("pw={{ secret('db').password }}\n")
    private = base / "private"
    private.mkdir(mode=0o700)
    (private / "shadow").write_text("ROOT-ONLY-MARKER\n")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "db.conf"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=_template(source, dest))
    with trio.fail_after(60):
        async with running_agent(cfg) as ra:
            assert dest.read_text() == f"pw={seeded.markers['db']}\n"
            good = dest.read_text()
            # An operator mistake puts the directory within nobody's reach; nobody swaps the
            # source for a symlink to a root-only file, and touches it to make the agent look.
            os.chown(templates, NOBODY, NOBODY)

            def swap() -> None:
                os.unlink(source)
                os.symlink(private / "shadow", source)

            _as_nobody(swap)
            ra.agent.renderer.notify_path(source)
            await until(lambda: "owned by uid 65534" in str(
                ra.agent.status()["templates"][str(dest)].get("last_error")))
            assert dest.read_text() == good                     # the last good file stays
            assert "ROOT-ONLY-MARKER" not in dest.read_text()
    # check-config says so before anything runs
    with pytest.raises(ConfigError) as info:
        config_mod.load(cfg)
    assert any(f"{templates}: directory is owned by uid {NOBODY}" in p
               for p in info.value.problems), info.value.problems


async def test_a_source_edited_to_name_another_secret_waits_for_a_reload(
    bao: DevServer, approle_files: tuple[Path, Path], base: Path, tmp_path: Path
) -> None:
    seeded = seed(bao)
    source = base / "db.tmpl"
    source.write_text("pw={{ secret('db').password }}\n")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "db.conf"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=_template(source, dest))
    with trio.fail_after(60):
        async with running_agent(cfg) as ra:
            good = dest.read_text()
            source.write_text("pw={{ secret('db').password }} {{ secret('other').value }}\n")
            ra.agent.renderer.notify_path(source)
            await until(lambda: "did not name when the config was loaded" in str(
                ra.agent.status()["templates"][str(dest)].get("last_error")))
            assert dest.read_text() == good
            assert seeded.markers["other"] not in dest.read_text()
            # the admin accepts it with a reload
            assert ra.agent.reload()
            await until(lambda: seeded.markers["other"] in (dest.read_text()))


async def test_an_allow_list_bounds_a_template_even_across_reloads(
    bao: DevServer, approle_files: tuple[Path, Path], base: Path, tmp_path: Path
) -> None:
    seeded = seed(bao)
    source = base / "db.tmpl"
    source.write_text("pw={{ secret('db').password }}\n")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "db.conf"
    cfg = write_config(tmp_path, bao, approle_files, seeded, sock=socket_dir() / "a.sock",
                       extra=_template(source, dest, 'allow = ["db"]'))
    with trio.fail_after(60):
        async with running_agent(cfg) as ra:
            source.write_text("{{ secret('other').value }}\n")
            ra.agent.renderer.notify_path(source)
            await until(lambda: "outside its allow list" in str(
                ra.agent.status()["templates"][str(dest)].get("last_error")))
            assert seeded.markers["other"] not in dest.read_text()
    with pytest.raises(ConfigError) as info:
        config_mod.load(cfg)
    assert any("names secret 'other', which the template's allow list does not include" in p
               for p in info.value.problems), info.value.problems


def test_check_config_refuses_unsafe_sources_and_credentials(base: Path) -> None:
    """Issue 13 item 13: the operator mistakes, each as a file:line problem."""
    open_dir = base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    src = open_dir / "t.tmpl"
    src.write_text("x\n")
    real = base / "real.tmpl"
    real.write_text("y\n")
    link = base / "link.tmpl"
    link.symlink_to(real)
    role = base / "role_id"
    role.write_text("r\n")
    secret = base / "secret_id"
    secret.write_text("s\n")
    secret.chmod(0o640)
    os.chown(secret, 0, 100)                       # readable by a group that is not root's
    main = base / "agentd.toml"
    main.write_text(f"""
[upstream]
addresses = ["http://127.0.0.1:1"]
[upstream.auth]
method = "approle"
role_id_file = "{role}"
secret_id_file = "{secret}"

[secrets.db]
kind = "kv2"
path = "secret/data/db"

[[template]]
source = "{src}"
destination = "{base}/out1"

[[template]]
source = "{link}"
destination = "{base}/out2"
""")
    with pytest.raises(ConfigError) as info:
        config_mod.load(main)
    text = "\n".join(info.value.problems)
    assert f"secret_id_file: {secret} is readable by group 100 (mode 0640)" in text
    assert f"template[0].source: {open_dir}: directory is writable by others (mode 0777)" in text
    assert f"template[1].source: {link} is a symlink: name the file itself" in text
