"""POSIX access ACLs in the kernel's xattr form (``system.posix_acl_access``), written whole.

Two users: the private sockets (``agentd.private``: one uid or group may connect) and the
connect guard (``agentd.connectguard``: a storming uid may not look the sockets up). Pure
standard library; nothing here reads an ACL back.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import Final

XATTR: Final = "system.posix_acl_access"
# <linux/posix_acl_xattr.h>: a version, then (tag, perm, id) entries sorted by tag, then id
_VERSION: Final = struct.Struct("<I")
_ENTRY: Final = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID: Final = 0xFFFFFFFF
NONE, RW = 0, 6                 # permission bits: none; read and write

Entry = tuple[int, int, int]    # (tag, perm, id)


def encode(entries: Iterable[Entry]) -> bytes:
    """The xattr value of an ACL of ``entries`` (in any order)."""
    return _VERSION.pack(2) + b"".join(_ENTRY.pack(*entry) for entry in sorted(entries))


def from_mode(mode: int, named: Iterable[Entry] = ()) -> list[Entry]:
    """The entries of a file whose permission bits are ``mode``, plus ``named`` user or group
    entries and, if there are any, the mask they need: the union of the group class's
    permissions, as ``setfacl`` computes it (the file's group bits then show the mask)."""
    group = mode >> 3 & 7
    entries = [(USER_OBJ, mode >> 6 & 7, NO_ID), (GROUP_OBJ, group, NO_ID),
               (OTHER, mode & 7, NO_ID)]
    extra = list(named)
    if extra:
        mask = group
        for _tag, perm, _id in extra:
            mask |= perm
        entries += [*extra, (MASK, mask, NO_ID)]
    return entries


def write(target: int | str | os.PathLike[str], entries: Iterable[Entry]) -> None:
    """Set the access ACL of ``target`` (a descriptor, or a path not followed if a symlink).

    Raises:
        OSError: ``EOPNOTSUPP`` where the file system has no ACLs; ``EPERM`` if not the owner.
    """
    if isinstance(target, int):
        os.setxattr(target, XATTR, encode(entries))
    else:
        os.setxattr(target, XATTR, encode(entries), follow_symlinks=False)
