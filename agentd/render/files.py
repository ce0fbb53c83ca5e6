"""Atomic file writes and bundle swaps: the one implementation (render, snapshot, metrics, keys).

Theory of operation:

- **Atomic write** (``write_file``, ``write_files``, ``replace_file``): every step relative to an
  open directory fd. A random temp name (``.NAME.agentd-tmp-*``) is created with
  O_EXCL|O_NOFOLLOW and mode 0600, fchown'd and fchmod'ed to the final owner and mode before any
  byte is written, written, fsynced, renamed over the destination, and the directory fsynced.
  ``create_file`` is the same with a hard link instead of the rename, for files that must never
  be replaced (a key file: two starters racing end up with the same key).
- For templates (``write_file``/``write_files``) identical output with the right mode and owner
  is not rewritten, and a destination that is a symlink, or a directory writable by anyone but
  root or the agent (``check_dir``), is refused; failures are ``RenderError`` with a hint.
  ``replace_file``/``create_file`` raise the ``OSError`` for their callers to translate.
- **Bundles** (``write_bundle``) use Kubernetes' AtomicWriter layout: files go into a fresh
  ``..<version>`` directory, ``..data`` is a symlink to it, each file name is a symlink to
  ``..data/<name>``; one rename of ``..data`` swaps the whole set, and the old version directory
  is removed (``remove_version``) by the caller after its grace period.

Leftover temp files, a stray ``..data_tmp`` and unreferenced version directories are removed by
``clean_temps``/``clean_bundle``. Everything here is sync and blocking (call it through
``trio.to_thread``) and imports neither trio nor the config, so the snapshot, the metrics
textfile and the key file use it cheaply.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets as secrets_mod
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentd import fsafe
from agentd.errors import RenderError, UnsafePath

log = logging.getLogger("agentd.render")

TMP_MARK = ".agentd-tmp-"
DATA = "..data"
DATA_TMP = "..data_tmp"
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_temp(dir_fd: int, name: str) -> tuple[str, int]:
    """A new temp file beside ``name`` (O_EXCL|O_NOFOLLOW, 0600): (its name, an open fd)."""
    tmp = f".{name}{TMP_MARK}{secrets_mod.token_hex(8)}"
    return tmp, os.open(tmp, _TEMP_FLAGS, 0o600, dir_fd=dir_fd)


def _fill(fd: int, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Final owner and mode first, then every byte of ``data`` (not yet synced)."""
    os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _put(dir_fd: int, name: str, data: bytes, mode: int, uid: int | None, gid: int | None,
         *, replace: bool) -> bool:
    """One file, unbatched: temp, fill, fsync, rename (or link when not ``replace``), fsync the
    directory. False when ``replace`` is off and ``name`` exists. Raises OSError; no temp stays."""
    uid, gid = owner_ids(uid, gid)
    tmp, fd = _open_temp(dir_fd, name)
    try:
        try:
            _fill(fd, data, mode, uid, gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            created = True
        else:
            try:
                os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                created = True
            except FileExistsError:
                created = False
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)
    return created


def _in_dir(path: Path, data: bytes, mode: int, *, replace: bool, gid: int | None = None) -> bool:
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _put(dir_fd, path.name, data, mode, None, gid, replace=replace)
    finally:
        os.close(dir_fd)


def replace_file(path: Path, data: bytes, *, mode: int = 0o600, gid: int | None = None) -> None:
    """Atomically make ``path`` hold ``data`` (owned by this process and group ``gid``, default
    this process's, ``mode``), replacing whatever name was there (a symlink is replaced, never
    written through).

    Raises:
        OSError: from any step (a missing directory, a full disk); ``path`` is as it was and no
            temp file is left.
    """
    _in_dir(path, data, mode, replace=True, gid=gid)


def create_file(path: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist (hard link of a synced temp
    file, so it never exists half written). False: another file was there first (untouched).

    Raises:
        OSError: from any step; no temp file is left.
    """
    return _in_dir(path, data, mode, replace=False)


def os_error(where: str, what: str, exc: OSError) -> RenderError:
    """``exc`` as a RenderError naming ``where`` and ``what`` failed, with a hint for the usual
    causes (a read-only or full file system, permissions)."""
    reason = exc.strerror or str(exc)
    hint = ""
    if exc.errno == errno.EROFS:
        hint = (" (under systemd, ProtectSystem=strict makes it read-only: add the directory to "
                "ReadWritePaths= in a drop-in)")
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = " (check the directory's permissions, or ReadWritePaths= under systemd)"
    elif exc.errno == errno.ENOSPC:
        hint = " (the file system is full)"
    return RenderError(f"{where}: {what}: {reason}{hint}")


def open_dir(path: Path) -> int:
    """Open a destination directory for ``write_file``/``write_bundle``; the caller closes the fd.

    The path is resolved from ``/`` one component at a time with ``O_NOFOLLOW`` (``fsafe``), and
    every directory on the way must be one only root or the agent can change (a sticky,
    root-owned one such as ``/tmp`` on the way is fine, not as the last): another user who can
    swap a directory on the way for a symlink would otherwise choose where agentd writes
    (issue 13 item 6).

    Raises:
        RenderError: naming the directory and why.
    """
    try:
        return fsafe.open_dir(path)
    except UnsafePath as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and exc.reason == (cause.strerror or str(cause)):
            raise os_error(str(path), "cannot open the directory", cause) from exc
        raise RenderError(f"{exc.path}: {exc.reason}: refusing to write there") from exc


def check_dir(dir_fd: int, where: str) -> None:
    """Refuse a directory that someone other than root or the agent could write to."""
    st = os.fstat(dir_fd)
    owners = {0, os.geteuid()}
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in owners:
        raise RenderError(f"{where}: directory is owned by uid {st.st_uid} (not root or the "
                          "agent): refusing to write there")
    if mode & 0o002 or (mode & 0o020 and st.st_gid not in {0, os.getegid()}):
        raise RenderError(f"{where}: directory is writable by others (mode {mode:04o}): "
                          "refusing to write there")


def owner_ids(uid: int | None, gid: int | None) -> tuple[int, int]:
    """The owner a file gets: the configured uid/gid, else this process's."""
    return (os.geteuid() if uid is None else uid, os.getegid() if gid is None else gid)


def _same_file(dir_fd: int, name: str, data: bytes, mode: int, uid: int, gid: int) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
        return False
    if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (mode, uid, gid):
        return False
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(len(data) + 1) == data
    finally:
        os.close(fd)


def _keep_backup(dir_fd: int, name: str) -> None:
    """Make ``name.bak`` the current inode of ``name``: link under a temp name, rename over."""
    link = f".{name}.bak{TMP_MARK}{secrets_mod.token_hex(8)}"
    os.link(name, link, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    try:
        os.rename(link, f"{name}.bak", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(link, dir_fd=dir_fd)
        raise


def write_file(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600,
               uid: int | None = None, gid: int | None = None, where: str = "",
               backup: bool = False) -> bool:
    """Atomically make ``name`` in ``dir_fd`` hold ``data`` with ``mode``/``uid``/``gid``.

    With ``backup``, the file being replaced is kept as ``name.bak``: a hard link to the old
    inode, so the backup has exactly the old file's owner and mode and is never copied through
    a moment with other permissions. Returns False when the file already was exactly that
    (nothing touched). Raises ``RenderError`` (the destination is kept as it was) on any failure.
    """
    result = write_files([FileWrite(dir_fd, name, data, mode=mode, uid=uid, gid=gid,
                                    where=where, backup=backup)])[0]
    if isinstance(result, RenderError):
        raise result
    return result


@dataclass
class FileWrite:
    """One file for ``write_files``: ``name`` in the open directory ``dir_fd``."""

    dir_fd: int
    name: str
    data: bytes = field(repr=False)
    mode: int = 0o600
    uid: int | None = None
    gid: int | None = None
    where: str = ""
    backup: bool = False
    tmp: str | None = None          # the staged temp file, while there is one
    fd: int | None = None

    @property
    def label(self) -> str:
        """How errors name the file."""
        return self.where or self.name


def _stage(w: FileWrite) -> bool:
    """Checks, then the temp file with its final owner and mode before any byte, written but
    not yet synced (``w.fd`` open). False: the destination already is exactly that."""
    where = w.label
    uid, gid = owner_ids(w.uid, w.gid)
    try:
        st: os.stat_result | None = os.stat(w.name, dir_fd=w.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise os_error(where, "cannot stat the destination", exc) from exc
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise RenderError(f"{where}: the destination is a symlink: refusing to write through it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RenderError(f"{where}: the destination is not a regular file")
    try:
        if st is not None and _same_file(w.dir_fd, w.name, w.data, w.mode, uid, gid):
            return False
    except OSError as exc:
        raise os_error(where, "cannot read the destination", exc) from exc
    w.backup = w.backup and st is not None
    try:
        w.tmp, w.fd = _open_temp(w.dir_fd, w.name)
    except OSError as exc:
        raise os_error(where, "cannot create a temp file", exc) from exc
    try:
        _fill(w.fd, w.data, w.mode, uid, gid)
    except OSError as exc:
        _discard(w)
        raise os_error(where, "cannot write", exc) from exc
    return True


def _discard(w: FileWrite) -> None:
    """Close and remove a staged temp file (after a failure)."""
    if w.fd is not None:
        with contextlib.suppress(OSError):
            os.close(w.fd)
        w.fd = None
    if w.tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(w.tmp, dir_fd=w.dir_fd)
        w.tmp = None


def write_files(writes: list[FileWrite]) -> list[bool | RenderError]:
    """``write_file`` for many files at once, with the same guarantees for each, in phases:
    stage every temp file (owner and mode set before any byte), fsync each, rename each over
    its destination, then fsync each directory once.

    The order is what makes a batch cheap: the first fsync commits the filesystem journal with
    every staged file in it, so the others find little left to do, and a directory holding a
    hundred renamed files is synced once. Every file is still durable before its rename, and
    every rename before the call returns. Per file: True (written), False (already exactly
    that, untouched) or the ``RenderError`` that kept its destination as it was.
    """
    results: list[bool | RenderError] = [False] * len(writes)
    staged: list[int] = []
    for i, w in enumerate(writes):
        try:
            if _stage(w):
                staged.append(i)
        except RenderError as exc:
            results[i] = exc
    synced: list[int] = []
    for i in staged:
        w = writes[i]
        assert w.fd is not None
        try:
            os.fsync(w.fd)
            os.close(w.fd)
            w.fd = None
        except OSError as exc:
            _discard(w)
            results[i] = os_error(w.label, "cannot write", exc)
            continue
        synced.append(i)
    renamed: dict[int, list[int]] = {}
    for i in synced:
        w = writes[i]
        assert w.tmp is not None
        try:
            if w.backup:
                _keep_backup(w.dir_fd, w.name)
            os.rename(w.tmp, w.name, src_dir_fd=w.dir_fd, dst_dir_fd=w.dir_fd)
        except OSError as exc:
            _discard(w)
            results[i] = os_error(w.label, "cannot write", exc)
            continue
        w.tmp = None
        results[i] = True
        renamed.setdefault(w.dir_fd, []).append(i)
    for dir_fd, done in renamed.items():
        try:
            os.fsync(dir_fd)
        except OSError as exc:
            for i in done:
                results[i] = os_error(writes[i].label, "cannot fsync the directory", exc)
    return results


def clean_temps(dir_fd: int) -> list[str]:
    """Remove temp files left by an interrupted write (and a stray ``..data_tmp``)."""
    removed = []
    for name in os.listdir(dir_fd):
        if TMP_MARK in name or name == DATA_TMP:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
    return removed


def _readlink(name: str, dir_fd: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except (FileNotFoundError, OSError):
        return None


def _replace_symlink(dir_fd: int, target: str, name: str) -> None:
    tmp = f".{name}{TMP_MARK}{secrets_mod.token_hex(8)}"
    os.symlink(target, tmp, dir_fd=dir_fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def bundle_current(dir_fd: int, files: Mapping[str, bytes], modes: Mapping[str, int],
                   uid: int, gid: int) -> bool:
    """True when the live set already holds exactly ``files`` and every name links to it."""
    current = _readlink(DATA, dir_fd)
    if current is None or not current.startswith(".."):
        return False
    try:
        vfd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if sorted(os.listdir(vfd)) != sorted(files):
            return False
        for name, data in files.items():
            if not _same_file(vfd, name, data, modes[name], uid, gid):
                return False
            if _readlink(name, dir_fd) != f"{DATA}/{name}":
                return False
        return True
    finally:
        os.close(vfd)


def write_bundle(dir_fd: int, files: Mapping[str, bytes], *, modes: Mapping[str, int],
                 uid: int | None = None, gid: int | None = None, where: str = "") -> str | None:
    """Make ``files`` live together in the AtomicWriter layout.

    Returns None when nothing changed, else the name of the previous version directory (``""``
    if there was none), which the caller removes after the grace period.
    """
    uid, gid = owner_ids(uid, gid)
    try:
        if bundle_current(dir_fd, files, modes, uid, gid):
            return None
        old = _readlink(DATA, dir_fd)
        version = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets_mod.token_hex(6)}"
        os.mkdir(version, 0o755, dir_fd=dir_fd)
        vfd = os.open(version, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
        try:
            os.fchmod(vfd, 0o755)
            for name, data in files.items():
                write_file(vfd, name, data, mode=modes[name], uid=uid, gid=gid,
                           where=f"{where}/{name}")
        finally:
            os.close(vfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DATA_TMP, dir_fd=dir_fd)
        os.symlink(version, DATA_TMP, dir_fd=dir_fd)
        os.rename(DATA_TMP, DATA, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)   # the one swap
        for name in files:
            link = f"{DATA}/{name}"
            if _readlink(name, dir_fd) != link:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        raise RenderError(f"{where}/{name}: is a directory")
                except FileNotFoundError:
                    pass
                _replace_symlink(dir_fd, link, name)
        for name in os.listdir(dir_fd):
            target = _readlink(name, dir_fd)
            if (not name.startswith("..") and name not in files and target is not None
                    and target.startswith(f"{DATA}/")):
                os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise os_error(where, "cannot write the bundle", exc) from exc
    return old or ""


def remove_version(dir_fd: int, version: str) -> None:
    """Remove an old version directory unless it is live again."""
    if version and version.startswith("..") and version not in (DATA, DATA_TMP) \
            and _readlink(DATA, dir_fd) != version:
        _remove_dir(dir_fd, version)


def _remove_dir(dir_fd: int, name: str) -> None:
    """Remove a version directory (plain files only) relative to ``dir_fd``; errors ignored."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return
    try:
        for entry in os.listdir(fd):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=dir_fd)


def clean_bundle(dir_fd: int) -> list[str]:
    """At start: temps, ``..data_tmp``, and version directories that ``..data`` does not name."""
    removed = clean_temps(dir_fd)
    live = _readlink(DATA, dir_fd)
    for name in os.listdir(dir_fd):
        if name.startswith("..") and name not in (DATA, DATA_TMP, live):
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    _remove_dir(dir_fd, name)
                    removed.append(name)
    return removed


def remove_names(directory: Path, names: Iterable[str]) -> None:
    """Delete ``names`` (missing ones are fine) in ``directory`` and fsync it; for
    ``on_revoke = "remove"``. Errors are logged, never raised."""
    try:
        fd = open_dir(directory)
    except (OSError, RenderError) as exc:
        log.error("cannot open the directory to remove a revoked file",
                  extra={"target": str(directory), "error": str(exc)})
        return
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
        os.fsync(fd)
    except OSError as exc:
        log.error("cannot remove a revoked file", extra={"target": str(directory),
                                                         "error": str(exc)})
    finally:
        os.close(fd)


def file_fingerprint(path: Path) -> tuple[int, ...] | None:
    """A cheap lstat fingerprint of one file (drift detection); None when it cannot be read."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)


def bundle_fingerprint(directory: Path, names: Iterable[str]) -> tuple[int, ...] | None:
    """The same for a bundle: the live version, each name's link and each live file's lstat."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            live = _readlink(DATA, fd) or ""
            parts: list[int] = [hash(live)]
            for name in sorted(names):
                parts.append(hash(_readlink(name, fd)))
                st = os.stat(f"{live}/{name}", dir_fd=fd, follow_symlinks=False)
                parts += [st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size]
            return tuple(parts)
        finally:
            os.close(fd)
    except OSError:
        return None
