"""agentd.fsafe: trusted files and directories, checked component by component on open fds.

Each hostile layout is made for real: directories and files owned by another uid (nobody), world
writable directories, symlinks swapped in by that uid.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentd import fsafe
from agentd.errors import UnsafePath

NOBODY = 65534


@pytest.fixture
def root(shared_tmp: Path) -> Path:
    return shared_tmp

def _file(path: Path, text: str = "x", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_reads_a_root_owned_file(root: Path) -> None:
    assert fsafe.read_text(_file(root / "conf" / "a.toml", "hello")) == "hello"


def test_refuses_a_symlink_as_the_file(root: Path) -> None:
    target = _file(root / "real.toml", "secret-ish")
    (root / "link.toml").symlink_to(target)
    with pytest.raises(UnsafePath, match="is a symlink"):
        fsafe.read_file(root / "link.toml")


def test_refuses_a_file_in_a_world_writable_directory(root: Path) -> None:
    f = _file(root / "open" / "t.j2")
    os.chmod(root / "open", 0o777)
    with pytest.raises(UnsafePath, match=r"open: directory is writable by others \(mode 0777\)"):
        fsafe.read_file(f)


def test_refuses_a_writable_ancestor_not_only_the_parent(root: Path) -> None:
    f = _file(root / "a" / "b" / "c" / "t.j2")
    os.chmod(root / "a", 0o757)
    with pytest.raises(UnsafePath, match=r"/a: directory is writable by others"):
        fsafe.read_file(f)


def test_refuses_a_directory_owned_by_another_user(root: Path) -> None:
    f = _file(root / "theirs" / "t.j2")
    os.chown(root / "theirs", NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
        fsafe.read_file(f)


def test_refuses_a_file_owned_by_another_user(root: Path) -> None:
    f = _file(root / "t.j2")
    os.chown(f, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"is owned by uid {NOBODY}"):
        fsafe.read_file(f)


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_refuses_a_file_writable_by_others(root: Path, mode: int) -> None:
    f = _file(root / "t.j2", mode=mode)
    os.chown(f, 0, 100)                 # group write by a group that is not root's
    with pytest.raises(UnsafePath, match="writable by group or others"):
        fsafe.read_file(f)


def test_a_credential_must_not_be_readable_by_others(root: Path) -> None:
    f = _file(root / "secret_id", mode=0o644)
    assert fsafe.read_file(f) == b"x"               # fine as a non-secret file
    with pytest.raises(UnsafePath, match=r"readable by others \(mode 0644\)"):
        fsafe.read_file(f, secret=True)
    os.chmod(f, 0o640)
    os.chown(f, 0, 100)
    with pytest.raises(UnsafePath, match="readable by group 100"):
        fsafe.read_file(f, secret=True)
    os.chmod(f, 0o600)
    assert fsafe.read_file(f, secret=True) == b"x"


def test_the_attack_a_symlinked_directory_swapped_in_by_another_user(root: Path) -> None:
    """Issue 13 item 1/6: nobody owns a directory on the way and swaps it for a symlink."""
    _file(root / "private" / "shadow", "root-only", mode=0o600)
    os.chmod(root / "private", 0o700)
    drop = root / "drop"
    drop.mkdir()
    os.chown(drop, NOBODY, NOBODY)
    pid = os.fork()
    if pid == 0:                                    # the attacker, as nobody
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            (drop / "templates").symlink_to(root / "private")
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (drop / "templates" / "shadow").read_text() == "root-only"   # the path works...
    with pytest.raises(UnsafePath, match=f"drop: directory is owned by uid {NOBODY}"):
        fsafe.read_file(drop / "templates" / "shadow")                  # ...but is refused


def test_follows_a_symlink_that_root_placed_in_a_trusted_directory(root: Path) -> None:
    _file(root / "usr" / "etc" / "agentd.toml", "ok")
    (root / "etc").symlink_to("usr/etc")                    # relative, like merged /usr
    (root / "abs").symlink_to(root / "usr")                 # absolute
    assert fsafe.read_file(root / "etc" / "agentd.toml") == b"ok"
    assert fsafe.read_file(root / "abs" / "etc" / "agentd.toml") == b"ok"
    (root / "usr" / "up").symlink_to("../usr/etc")
    assert fsafe.read_file(root / "usr" / "up" / "agentd.toml") == b"ok"


def test_symlink_loops_are_refused(root: Path) -> None:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(UnsafePath, match="too many levels"):
        fsafe.read_file(root / "a" / "x")


def test_sticky_root_directories_are_fine_on_the_way_but_not_as_the_last(root: Path) -> None:
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    f = _file(sticky / "mine" / "t.j2", "ok")
    os.chmod(sticky / "mine", 0o755)
    assert fsafe.read_file(f) == b"ok"
    with pytest.raises(UnsafePath, match=r"tmp: directory is writable by others \(mode 1777\)"):
        fsafe.read_file(_file(sticky / "t.j2"))
    with pytest.raises(UnsafePath, match="writable by others"):
        os.close(fsafe.open_dir(sticky))


def test_missing_and_wrong_types(root: Path) -> None:
    with pytest.raises(UnsafePath, match="No such file"):
        fsafe.read_file(root / "nope" / "x")
    with pytest.raises(UnsafePath, match="No such file"):
        fsafe.read_file(root / "x")
    (root / "d").mkdir()
    with pytest.raises(UnsafePath, match="not a regular file"):
        fsafe.read_file(root / "d")
    f = _file(root / "f")
    with pytest.raises(UnsafePath, match=r"(?i)not a directory"):
        fsafe.read_file(f / "x")
    with pytest.raises(UnsafePath, match="not an absolute path"):
        fsafe.read_file(Path("relative/x"))


def test_size_limit(root: Path) -> None:
    f = _file(root / "big", "y" * 100)
    with pytest.raises(UnsafePath, match="larger than 10 bytes"):
        fsafe.read_file(f, limit=10)


def test_open_dir_gives_a_usable_directory_fd(root: Path) -> None:
    _file(root / "d" / "f", "z")
    fd = fsafe.open_dir(root / "d")
    try:
        assert os.listdir(fd) == ["f"]
        os.fsync(fd)
    finally:
        os.close(fd)


def test_the_error_never_holds_the_content(root: Path) -> None:
    marker = "MARKER-fsafe-8c1f0e"
    f = _file(root / "secret_id", marker, mode=0o644)
    with pytest.raises(UnsafePath) as info:
        fsafe.read_file(f, secret=True)
    assert marker not in str(info.value)


def test_follow_takes_a_bundle_style_link_through_the_same_checks(root: Path) -> None:
    """cert auth's files kept current by the agent's own bundle: key.pem -> ..data/key.pem."""
    version = root / "identity" / "..2026_01"
    _file(version / "key.pem", "KEY", mode=0o600)
    (root / "identity" / "..data").symlink_to("..2026_01")
    (root / "identity" / "key.pem").symlink_to("..data/key.pem")
    link = root / "identity" / "key.pem"
    with pytest.raises(UnsafePath, match="is a symlink"):
        fsafe.read_file(link, secret=True)
    assert fsafe.read_file(link, secret=True, follow=True) == b"KEY"
    # a link into a directory another user owns is refused all the same
    theirs = root / "theirs"
    _file(theirs / "key.pem", "THEIRS", mode=0o600)
    os.chown(theirs, NOBODY, NOBODY)
    (root / "identity" / "other.pem").symlink_to(theirs / "key.pem")
    with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
        fsafe.read_file(root / "identity" / "other.pem", follow=True)
    (root / "identity" / "loop").symlink_to("loop")
    with pytest.raises(UnsafePath, match="too many levels"):
        fsafe.read_file(root / "identity" / "loop", follow=True)


def test_a_sticky_directory_is_fine_above_a_directory_checked_by_itself(root: Path) -> None:
    """A config directory right inside /tmp (the demo's): /tmp leads to it, nothing more."""
    sticky = root / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with pytest.raises(UnsafePath, match="writable by others"):
        os.close(fsafe.open_dir(sticky))
    os.close(fsafe.open_dir(sticky, above=True))


def test_check_config_accepts_a_config_directory_inside_a_sticky_one(root: Path) -> None:
    from agentd import config as config_mod
    sticky = root / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    work = sticky / "agentd-demo"
    work.mkdir(mode=0o700)
    token = _file(work / "token", "t", mode=0o600)
    main = _file(work / "agentd.toml", f"""
[upstream]
addresses = ["http://127.0.0.1:1"]
[upstream.auth]
method = "token_file"
token_file = "{token}"
[secrets.db]
kind = "kv2"
path = "secret/data/db"
""")
    assert config_mod.load(main).files == (main,)


def test_a_dotdot_that_ends_in_a_sticky_directory_is_held_to_the_last_rule(root: Path) -> None:
    sticky = root / "tmp"
    (sticky / "x").mkdir(parents=True)
    sticky.chmod(0o1777)
    with pytest.raises(UnsafePath, match="writable by others"):
        os.close(fsafe.open_dir(f"{sticky}/x/.."))
    os.close(fsafe.open_dir(f"{sticky}/x/..", above=True))
