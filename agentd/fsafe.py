"""Opening the files and directories agentd trusts (decision 8; docs/security.md, "Files").

Theory of operation: a file whose content decides what agentd does (the config and conf.d, a
template's source, role_id/secret_id/token files, CA and client key files, the cache key) is only
as trustworthy as the least trusted user who could have changed it *or any directory on the way
to it*: whoever can write a directory can swap its entries, including for a symlink. So a path is
resolved here one component at a time from ``/``, each directory opened relative to the one
before it with ``O_NOFOLLOW`` and checked on the open fd:

- every directory on the way is owned by root or the agent's user, and nobody else can write it
  (group write is tolerated for group root or the agent's group), except a sticky directory
  owned by root (``/tmp``): there others may create entries but cannot replace ours;
- a symlink met on the way is followed only because the directory holding it passed that check,
  so it was placed by root or the agent (merged ``/usr``, ``/var/run``); at most ``MAX_HOPS``;
- the last directory (the one a file is read from or written into) must not be writable by
  others at all: sticky is not enough there;
- the file itself is opened with ``O_NOFOLLOW`` (a symlink is refused), must be a regular file
  owned by root or the agent's user and not writable by group or others; a credential (secret
  file) must not be readable by others, nor by a group other than root's or the agent's.

Every check runs on file descriptors, so nothing can change between the check and the use. The
caller re-reads through here every time (at load, at each login, at each render), so a file
swapped after start is refused then too, and the caller keeps its last good version.

Error handling: every refusal is an ``UnsafePath`` (an ``AgentdError``) whose message names the
path and the reason, never the content; callers translate it to their own error type.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from agentd.errors import UnsafePath

MAX_HOPS = 40                   # symlinks followed while resolving one path (as the kernel)
MAX_FILE_BYTES = 4 << 20        # a config, template or credential file larger than this is refused

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def default_owners() -> frozenset[int]:
    """Root and the user agentd runs as."""
    return frozenset({0, os.geteuid()})


def _groups() -> frozenset[int]:
    return frozenset({0, os.getegid()})


def _check_dir(st: os.stat_result, shown: str, owners: Iterable[int], *, last: bool) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in owners:
        raise UnsafePath(shown, f"directory is owned by uid {st.st_uid}, not root or the agent's "
                         "user: anyone who owns it can swap what is inside")
    sticky_root = bool(mode & stat.S_ISVTX) and st.st_uid == 0
    others_write = bool(mode & 0o002) or (bool(mode & 0o020) and st.st_gid not in _groups())
    if others_write and (last or not sticky_root):
        raise UnsafePath(shown, f"directory is writable by others (mode {mode:04o}): chmod go-w")


def _components(path: PurePosixPath) -> list[str]:
    if not path.is_absolute():
        raise UnsafePath(str(path), "not an absolute path")
    return [p for p in path.parts[1:] if p not in ("", ".")]


def open_dir(
    path: str | os.PathLike[str], *, owners: Iterable[int] | None = None, above: bool = False
) -> int:
    """Open the directory ``path`` after checking it and every directory above it.

    ``above``: ``path`` is only on the way to what is trusted (the parent of a directory that
    is checked by itself), so a sticky root-owned ``path`` (``/tmp``) is fine, as on the way.

    Returns an ``O_RDONLY | O_DIRECTORY`` fd of the resolved directory; the caller closes it.

    Raises:
        UnsafePath: a directory on the way is missing, not a directory, or changeable by users
            other than root and the agent's user; or the symlinks on the way loop.
    """
    owner_set = frozenset(owners) if owners is not None else default_owners()
    pending = _components(PurePosixPath(os.fspath(path)))
    shown = PurePosixPath("/")
    fd = os.open("/", _DIR_FLAGS)
    hops = 0
    try:
        _check_dir(os.fstat(fd), "/", owner_set, last=not pending and not above)
        while pending:
            name = pending.pop(0)
            if name == "..":
                # Only reached through a symlink's text (a config path is normalised by the
                # caller); the parent was checked on the way down already.
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd, shown = parent, shown.parent
                if not pending:     # it is the last directory now: held to the last's rule
                    _check_dir(os.fstat(fd), str(shown), owner_set, last=not above)
                continue
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(str(shown / name), exc.strerror or str(exc)) from exc
                target = _symlink(name, fd, str(shown / name))
                hops += 1
                if hops > MAX_HOPS:
                    raise UnsafePath(str(path), "too many levels of symbolic links") from exc
                # A relative target resolves from the symlink's own directory (fd), an
                # absolute one from the root again; either way every step is checked.
                pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
                if target.startswith("/"):
                    os.close(fd)
                    fd, shown = os.open("/", _DIR_FLAGS), PurePosixPath("/")
                continue
            os.close(fd)
            fd, shown = child, shown / name
            _check_dir(os.fstat(fd), str(shown), owner_set, last=not pending and not above)
        # An O_PATH fd cannot be fsynced or listed: hand the caller a real one.
        real = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        raise UnsafePath(str(shown), exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)
    return real


def _symlink(name: str, dir_fd: int, shown: str) -> str:
    """The text of the symlink ``name`` in ``dir_fd``; UnsafePath when it is something else."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise UnsafePath(shown, "not a directory") from exc
        raise UnsafePath(shown, exc.strerror or str(exc)) from exc


def read_file(
    path: str | os.PathLike[str],
    *,
    secret: bool = False,
    owners: Iterable[int] | None = None,
    limit: int = MAX_FILE_BYTES,
    follow: bool = False,
    _hops: int = 0,
) -> bytes:
    """Read a file agentd trusts as code or credentials, after checking it and its directories.

    Args:
        path: an absolute path.
        secret: the file holds a credential (secret_id, token, key): it must not be readable by
            others, nor by a group other than root's or the agent's.
        owners: uids that may own the file and the directories (default: root and the agent).
        limit: largest size accepted.
        follow: the file itself may be a symlink, followed (through the same checks) because
            the directory holding it is trusted: for files agentd's own bundles keep current
            (``cert.pem -> ..data/cert.pem``, the client certificate of ``cert`` auth). Off, a
            symlink is refused.

    Raises:
        UnsafePath: the file is missing, a symlink, not a regular file, too large, or it or a
            directory above it can be changed by someone other than root or the agent's user.
    """
    owner_set = frozenset(owners) if owners is not None else default_owners()
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise UnsafePath(str(p), "not a file name")
    dir_fd = open_dir(p.parent, owners=owner_set)
    try:
        try:
            fd = os.open(p.name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise UnsafePath(str(p), exc.strerror or str(exc)) from exc
            if not follow:
                raise UnsafePath(str(p), "is a symlink: name the file itself") from exc
            if _hops >= MAX_HOPS:
                raise UnsafePath(str(p), "too many levels of symbolic links") from exc
            target = p.parent / _symlink(p.name, dir_fd, str(p))
            fd = -1
    finally:
        os.close(dir_fd)
    if fd == -1:
        return read_file(target, secret=secret, owners=owner_set, limit=limit,
                         follow=True, _hops=_hops + 1)
    try:
        st = os.fstat(fd)
        check_file(st, str(p), secret=secret, owners=owner_set)
        if st.st_size > limit:
            raise UnsafePath(str(p), f"is larger than {limit} bytes")
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 16):
            total += len(chunk)
            if total > limit:
                raise UnsafePath(str(p), f"is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise UnsafePath(str(p), exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)


def check_file(
    st: os.stat_result, shown: str, *, secret: bool = False, owners: Iterable[int] | None = None
) -> None:
    """The checks ``read_file`` makes on an open file's ``fstat``; UnsafePath if one fails."""
    owner_set = frozenset(owners) if owners is not None else default_owners()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(shown, "is not a regular file")
    if st.st_uid not in owner_set:
        raise UnsafePath(shown, f"is owned by uid {st.st_uid}: must be owned by root or the "
                         "agent's user")
    if mode & 0o022:
        raise UnsafePath(shown, f"is writable by group or others (mode {mode:04o}): chmod go-w")
    if secret and mode & 0o004:
        raise UnsafePath(shown, f"is readable by others (mode {mode:04o}): chmod o-r")
    if secret and mode & 0o040 and st.st_gid not in _groups():
        raise UnsafePath(shown, f"is readable by group {st.st_gid} (mode {mode:04o}): a "
                         "credential is for root or the agent only: chmod g-r")


def read_text(path: str | os.PathLike[str], **kwargs: object) -> str:
    """``read_file`` decoded as UTF-8; UnsafePath when it is not UTF-8."""
    data = read_file(path, **kwargs)  # type: ignore[arg-type]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafePath(str(path), "is not UTF-8 text") from exc
