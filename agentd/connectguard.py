"""The connect guard (decision 13): the kernel refuses a storming uid's connects to agentd.

In a connect storm agentd refuses the storming uid's connections itself, at the cost of a kernel
accept and close each (about 8 µs): two processes connecting in a loop keep the agent busy all
the time, so a read by anyone else waits for a CPU slice behind the refusals. The guard moves
the refusing into the kernel, into the storming process's own ``connect()``: a cgroup BPF
program on ``BPF_CGROUP_UNIX_CONNECT`` (Linux 6.7 and later), attached at the root of the cgroup
v2 hierarchy, fails with ``EPERM`` a connect to a path that starts with the main socket's path
(so also its private sockets, ``<socket>.d/...``) by a process whose real uid is in a map the
agent fills. The agent then never sees the storm; it blocks a uid when it refused
``STORM_REFUSALS`` of its connects within one second, and lifts the block once the kernel has
refused fewer than the uid's connect rate in every second of ``STORM_HOLD`` (``Blocks``).

What it is not: an access control. It matches the path a client passes, not the socket that
path reaches, so a client that names the socket another way (a relative path, a hard link,
``/proc/self/root/...``) passes it and meets the agent's own refusals, as without the guard.
It is matched against the real uid, and the agent's refusals against the effective one
(``SO_PEERCRED``): a set-uid storm is refused by the agent alone. uid 0 is never blocked.

The program is a few dozen instructions written here (no compiler, no libbpf): it reads the
address through the kfuncs ``bpf_cast_to_kern_ctx`` and ``bpf_rdonly_cast``, whose BTF ids, like
the offsets in ``struct bpf_sock_addr_kern``, come from the running kernel's
``/sys/kernel/btf/vmlinux``.

Lifetime: the program hangs on one link, an ``O_CLOEXEC`` descriptor of the agent's. Closing it
(``ConnectGuard.close``), or the agent's exit however it ends, detaches the program; nothing is
pinned, so a killed agent leaves no block behind.

Privileges: loading needs ``CAP_BPF`` and ``CAP_PERFMON`` (the program reads kernel memory
through BTF), attaching ``CAP_NET_ADMIN``; updating the map needs none. ``drop_privileges``
gives all three up for good (and ``CAP_SYS_ADMIN``, which could load programs too, and
``CAP_SETPCAP``, which the dropping takes) once the guard is loaded or not, before anything is
served: the running agent holds the capabilities it held before the guard existed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import math
import os
import platform
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from agentd.errors import GuardUnavailable

log = logging.getLogger("agentd.connectguard")

# The bpf() system call's number by machine (not in Python's os module).
SYS_BPF: Final = {"x86_64": 321, "aarch64": 280}
# <linux/bpf.h>: commands, types and helpers (stable ABI numbers)
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD, BPF_LINK_CREATE = 4, 5, 28
BPF_MAP_TYPE_HASH: Final = 1
BPF_PROG_TYPE_CGROUP_SOCK_ADDR: Final = 18
BPF_CGROUP_UNIX_CONNECT: Final = 49
BPF_FUNC_map_lookup_elem: Final = 1
BPF_FUNC_get_current_uid_gid: Final = 15
_ATTR_SIZE: Final = 128         # union bpf_attr, zero-padded past what each command reads
# <linux/capability.h>
CAP_SETPCAP, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 8, 12, 21, 38, 39
# <linux/prctl.h>
PR_CAPBSET_READ, PR_CAPBSET_DROP = 23, 24
_CAPABILITY_VERSION_3: Final = 0x20080522

MAX_BLOCKED: Final = 1024       # uids blocked at once (the map's size)
MAX_PREFIX: Final = 107         # sun_path holds 108 bytes with its NUL
_SUN_PATH: Final = 2            # offsetof(struct sockaddr_un, sun_path)
VMLINUX_BTF: Final = Path("/sys/kernel/btf/vmlinux")
LICENSE: Final = b"Dual MPL/GPL"    # kfuncs are for GPL-compatible programs; agentd is MPL-2.0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _bpf(cmd: int, attr: bytearray) -> int:
    """``bpf(cmd, attr)``; raises ``OSError`` with the call's errno."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"no bpf() system call number for {platform.machine()}")
    buffer = (ctypes.c_char * len(attr)).from_buffer(attr)
    result = int(_libc().syscall(number, cmd, buffer, len(attr)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


# --- what the program needs from the kernel's BTF ----------------------------------------------

_BTF_KIND_STRUCT, _BTF_KIND_FUNC = 4, 12
# bytes that follow a btf_type's 12, by kind, for vlen members (<linux/btf.h>)
_BTF_TAIL: Final = {1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8),
                    7: (0, 0), 8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0),
                    13: (0, 8), 14: (4, 0), 15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0),
                    19: (0, 12)}


@dataclass(frozen=True)
class KernelTypes:
    """BTF ids of the two kfuncs and ``struct sockaddr_un``, and where ``bpf_sock_addr_kern``
    keeps the address and its length: all of this kernel's own, not ABI."""

    cast_to_kern_ctx: int
    rdonly_cast: int
    sockaddr_un: int
    uaddr: int          # offset of bpf_sock_addr_kern.uaddr
    uaddrlen: int       # offset of bpf_sock_addr_kern.uaddrlen


def read_kernel_types(path: Path = VMLINUX_BTF) -> KernelTypes:
    """Find ``KernelTypes`` in a vmlinux BTF file (a walk over all its types, about 0.1 s).

    Raises:
        GuardUnavailable: no BTF, or a kernel without the kfuncs or the connect hook's context.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GuardUnavailable(f"cannot read the kernel's BTF ({path}): {exc.strerror}") from exc
    magic, _version, _flags, header, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", data, 0)
    if magic != 0xEB9F:
        raise GuardUnavailable(f"{path} is not BTF")
    strings = header + str_off

    def name_at(offset: int) -> bytes:
        return data[strings + offset:data.index(b"\0", strings + offset)]

    wanted = {(_BTF_KIND_FUNC, b"bpf_cast_to_kern_ctx"), (_BTF_KIND_FUNC, b"bpf_rdonly_cast"),
              (_BTF_KIND_STRUCT, b"sockaddr_un"), (_BTF_KIND_STRUCT, b"bpf_sock_addr_kern")}
    ids: dict[bytes, int] = {}
    offsets: dict[bytes, int] = {}
    position, end, type_id = header + type_off, header + type_off + type_len, 1
    while position < end and len(ids) < len(wanted):
        name_off, info, _size = struct.unpack_from("<III", data, position)
        kind, members = (info >> 24) & 0x1F, info & 0xFFFF
        fixed, each = _BTF_TAIL.get(kind, (None, 0))
        if fixed is None:
            raise GuardUnavailable(f"{path}: a BTF kind this agent does not know ({kind})")
        if name_off and (kind, name := name_at(name_off)) in wanted and name not in ids:
            ids[name] = type_id
            if name == b"bpf_sock_addr_kern":
                for index in range(members):
                    member_name, _type, bits = struct.unpack_from(
                        "<III", data, position + 12 + 12 * index)
                    offsets[name_at(member_name)] = (bits & 0xFFFFFF) // 8
        position += 12 + fixed + each * members
        type_id += 1
    missing = sorted(name.decode() for _kind, name in wanted if name not in ids)
    if missing or not {b"uaddr", b"uaddrlen"} <= offsets.keys():
        lacks = ", ".join(missing) or "bpf_sock_addr_kern.uaddr"
        raise GuardUnavailable(f"the kernel lacks {lacks} (the connect guard needs Linux 6.7)")
    return KernelTypes(ids[b"bpf_cast_to_kern_ctx"], ids[b"bpf_rdonly_cast"], ids[b"sockaddr_un"],
                       offsets[b"uaddr"], offsets[b"uaddrlen"])


# --- the program ---------------------------------------------------------------------------------

# instruction classes and fields (<linux/bpf_common.h>, <linux/bpf.h>)
_LDX_W, _LDX_H, _LDX_B, _LDX_DW = 0x61, 0x69, 0x71, 0x79
_STX_W, _ATOMIC_ADD_DW = 0x63, 0xDB
_MOV64_K, _MOV64_X, _ADD64_K, _LD_IMM64 = 0xB7, 0xBF, 0x07, 0x18
_JEQ_K, _JNE_X, _JLT_K, _JNE32_K = 0x15, 0x5D, 0xA5, 0x56
_JA, _CALL, _EXIT = 0x05, 0x85, 0x95
_PSEUDO_MAP_FD, _PSEUDO_KFUNC_CALL = 1, 2
_LOAD_BY_SIZE: Final = {8: _LDX_DW, 4: _LDX_W, 2: _LDX_H, 1: _LDX_B}


class _Assembler:
    """eBPF instructions with forward jumps to named labels."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, int, int | str, int]] = []
        self._labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self._code.append((code, dst, src, off, imm))

    def jump(self, code: int, dst: int, to: str, *, src: int = 0, imm: int = 0) -> None:
        self._code.append((code, dst, src, to, imm))

    def load64(self, dst: int, value: int, *, src: int = 0) -> None:
        """``dst = value`` (two instructions); ``src = _PSEUDO_MAP_FD`` makes ``value`` a map."""
        self._code.append((_LD_IMM64, dst, src, 0, value & 0xFFFFFFFF))
        self._code.append((0, 0, 0, 0, value >> 32))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (code, dst, src, off, imm) in enumerate(self._code):
            if isinstance(off, str):
                off = self._labels[off] - index - 1
            out += struct.pack("<BBhi", code, (src << 4) | dst, off,
                               imm - (1 << 32) if imm >= 1 << 31 else imm)
        return bytes(out)


def program(prefixes: Iterable[bytes], blocked_map: int, types: KernelTypes) -> bytes:
    """The ``connect_unix`` program: ``EPERM`` (return 0) for a connect to a path that starts
    with one of ``prefixes`` by a process whose real uid is a key of ``blocked_map`` (whose
    value, the count of connects refused, it adds one to); any other connect goes on (1).

    r6 is the address (``struct sockaddr_un``, read-only), r7 its length."""
    asm = _Assembler()
    asm.op(_CALL, src=_PSEUDO_KFUNC_CALL, imm=types.cast_to_kern_ctx)     # r0 = kernel context
    asm.op(_LDX_W, 7, 0, types.uaddrlen)
    asm.op(_LDX_DW, 1, 0, types.uaddr)
    asm.op(_MOV64_K, 2, imm=types.sockaddr_un)
    asm.op(_CALL, src=_PSEUDO_KFUNC_CALL, imm=types.rdonly_cast)
    asm.op(_MOV64_X, 6, 0)
    for number, prefix in enumerate(prefixes):
        miss = f"prefix{number + 1}"
        asm.jump(_JLT_K, 7, miss, imm=_SUN_PATH + len(prefix))
        at = 0
        while at < len(prefix):
            size = next(size for size in (8, 4, 2, 1) if len(prefix) - at >= size)
            chunk = int.from_bytes(prefix[at:at + size], "little")
            asm.op(_LOAD_BY_SIZE[size], 3, 6, _SUN_PATH + at)
            if size == 8:
                asm.load64(4, chunk)
                asm.jump(_JNE_X, 3, miss, src=4)
            else:
                asm.jump(_JNE32_K, 3, miss, imm=chunk)
            at += size
        asm.jump(_JA, 0, "ours")
        asm.label(miss)                     # the last one's is "no prefix matched"
    asm.label("allow")
    asm.op(_MOV64_K, 0, imm=1)
    asm.op(_EXIT)
    asm.label("ours")
    asm.op(_CALL, imm=BPF_FUNC_get_current_uid_gid)
    asm.op(_STX_W, 10, 0, -4)               # the key: the low half, the real uid
    asm.load64(1, blocked_map, src=_PSEUDO_MAP_FD)
    asm.op(_MOV64_X, 2, 10)
    asm.op(_ADD64_K, 2, imm=-4)
    asm.op(_CALL, imm=BPF_FUNC_map_lookup_elem)
    asm.jump(_JEQ_K, 0, "allow", imm=0)
    asm.op(_MOV64_K, 1, imm=1)
    asm.op(_ATOMIC_ADD_DW, 0, 1, 0)         # lock *(u64 *)(r0 + 0) += 1
    asm.op(_MOV64_K, 0, imm=0)
    asm.op(_EXIT)
    return asm.assemble()


# --- the mechanism -------------------------------------------------------------------------------


def cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified`` on a
    hybrid host): its root is where a program sees every process.

    Raises:
        GuardUnavailable: no cgroup v2 mount.
    """
    with contextlib.suppress(OSError):
        for line in mountinfo.read_text().splitlines():
            fields, _, tail = line.partition(" - ")
            if tail.split(" ", 1)[0] == "cgroup2":
                return Path(fields.split(" ")[4].replace("\\040", " "))
    raise GuardUnavailable("no cgroup v2 hierarchy is mounted")


def _step(what: str, cmd: int, attr: bytearray,
          verifier: Callable[[], str] | None = None) -> int:
    """``_bpf(cmd, attr)``, its failure told as ``GuardUnavailable`` starting with ``what``
    (with the verifier's last line, if it said anything)."""
    try:
        return _bpf(cmd, attr)
    except OSError as exc:
        said = (verifier() if verifier is not None else "").strip().splitlines()
        hint = (" (loading the connect guard needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"
                if exc.errno == errno.EPERM else "")
        detail = f": {said[-1]}" if said else ""
        raise GuardUnavailable(f"{what}: {exc.strerror}{detail}{hint}") from exc


def _attr(layout: str, *values: int | bytes) -> bytearray:
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into(layout, attr, 0, *values)
    return attr


class ConnectGuard:
    """The loaded program, its map of blocked uids, and the link that attaches it.

    Get one with ``ConnectGuard.load(prefixes)``; ``close()`` detaches the program (so does
    the agent's exit). The methods are sync and quick (one ``bpf()`` call each, a few µs).
    """

    def __init__(self, blocked_map: int, link: int, prefixes: tuple[bytes, ...]) -> None:
        self._map = blocked_map
        self._link = link
        self.prefixes = prefixes

    @classmethod
    def load(cls, prefixes: Iterable[str | os.PathLike[str]], *,
             cgroup: Path | None = None) -> ConnectGuard:
        """Load the program for sockets whose paths start with one of ``prefixes`` and attach
        it at the root of the cgroup v2 hierarchy (or at ``cgroup``).

        Raises:
            GuardUnavailable: why not, in one line (kernel too old, no privileges, no cgroup v2,
                a path too long for ``sun_path``).
        """
        encoded = tuple(dict.fromkeys(os.fsencode(path) for path in prefixes))
        if not encoded or any(not 0 < len(path) <= MAX_PREFIX for path in encoded):
            raise GuardUnavailable(f"socket paths must be 1 to {MAX_PREFIX} bytes")
        types = read_kernel_types()
        where = cgroup if cgroup is not None else cgroup2_root()
        fds: list[int] = []
        try:
            fds.append(_step("cannot create the map", BPF_MAP_CREATE, _attr(
                "<IIIII8x16s", BPF_MAP_TYPE_HASH, _UID.size, _COUNT.size, MAX_BLOCKED, 0,
                b"agentd_blocked")))
            code = program(encoded, fds[0], types)
            instructions = ctypes.create_string_buffer(code, len(code))
            license_ = ctypes.create_string_buffer(LICENSE)
            verifier_log = ctypes.create_string_buffer(4096)
            attr = _attr("<IIQQIIQ", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, len(code) // 8,
                         ctypes.addressof(instructions), ctypes.addressof(license_), 1,
                         len(verifier_log), ctypes.addressof(verifier_log))
            attr[48:48 + 13] = b"agentd_guard\0"
            struct.pack_into("<I", attr, 68, BPF_CGROUP_UNIX_CONNECT)   # expected_attach_type
            fds.append(_step("the kernel refused the program", BPF_PROG_LOAD, attr,
                             lambda: verifier_log.value.decode(errors="replace")))
            directory = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                link = _step(f"cannot attach the program at {where}", BPF_LINK_CREATE,
                             _attr("<IIII", fds[1], directory, BPF_CGROUP_UNIX_CONNECT, 0))
            finally:
                os.close(directory)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(fds[1])        # the link holds the program
        return cls(fds[0], link, encoded)

    def block(self, uid: int) -> None:
        """Have the kernel refuse ``uid``'s connects; its count starts at 0 (kept if blocked).

        Raises:
            OSError: the map is full (``E2BIG``) or closed.
        """
        key, value = _UID.pack(uid), _COUNT.pack(0)
        self._call(BPF_MAP_UPDATE_ELEM, key, value, flags=_BPF_NOEXIST, missing_ok=True)

    def unblock(self, uid: int) -> None:
        """Let ``uid`` connect again (nothing if it was not blocked)."""
        self._call(BPF_MAP_DELETE_ELEM, _UID.pack(uid), None, missing_ok=True)

    def refused(self) -> dict[int, int]:
        """Each blocked uid and how many of its connects the kernel has refused."""
        counts: dict[int, int] = {}
        key: bytes | None = None
        for _ in range(MAX_BLOCKED + 1):
            following = ctypes.create_string_buffer(_UID.size)
            if not self._call(BPF_MAP_GET_NEXT_KEY, key, following, missing_ok=True):
                break
            key = following.raw
            value = ctypes.create_string_buffer(_COUNT.size)
            if self._call(BPF_MAP_LOOKUP_ELEM, key, value, missing_ok=True):
                counts[_UID.unpack(key)[0]] = _COUNT.unpack(value.raw)[0]
        return counts

    def close(self) -> None:
        """Detach the program and free the map. Idempotent."""
        for fd in (self._link, self._map):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._link = self._map = -1

    def _call(self, cmd: int, key: bytes | None, value: bytes | ctypes.Array[ctypes.c_char] | None,
              *, flags: int = 0, missing_ok: bool = False) -> bool:
        """One map command; False if ``missing_ok`` and the key was not (or already) there."""
        key_buffer = None if key is None else ctypes.create_string_buffer(key, len(key))
        if isinstance(value, bytes):
            value = ctypes.create_string_buffer(value, len(value))
        attr = _attr("<I4xQQQ", self._map,
                     0 if key_buffer is None else ctypes.addressof(key_buffer),
                     0 if value is None else ctypes.addressof(value), flags)
        try:
            _bpf(cmd, attr)
        except OSError as exc:
            if missing_ok and exc.errno in (errno.ENOENT, errno.EEXIST):
                return False
            raise
        return True


_UID: Final = struct.Struct("<I")
_COUNT: Final = struct.Struct("<Q")
_BPF_NOEXIST: Final = 1


def drop_privileges() -> None:
    """Give up, for good, the capabilities the guard needs to load and attach and nothing
    after: ``CAP_BPF``, ``CAP_PERFMON``, ``CAP_NET_ADMIN``, and ``CAP_SYS_ADMIN``, which stands
    for all three (the packaged unit never grants it; agentd uses it for nothing). They leave
    the bounding set first (``PR_CAPBSET_DROP``, so no command agentd runs as root gets them
    back), then ``CAP_SETPCAP``, which that takes, and all five leave the effective and
    permitted sets. Failures are logged, never raised: a process that never had them has
    nothing to drop."""
    libc = _libc()
    for capability in (*_GUARD_CAPABILITIES, CAP_SETPCAP):
        if libc.prctl(PR_CAPBSET_READ, capability, 0, 0, 0) == 1 and libc.prctl(
                PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            log.warning("cannot drop a capability from the bounding set",
                        extra={"capability": capability,
                               "error": os.strerror(ctypes.get_errno())})
    header = _CAP_HEADER.pack(_CAPABILITY_VERSION_3, 0)
    data = ctypes.create_string_buffer(_CAP_DATA.size)
    if libc.capget(header, data) != 0:
        log.warning("capget failed", extra={"error": os.strerror(ctypes.get_errno())})
        return
    words = list(_CAP_DATA.unpack(data.raw))    # effective, permitted, inheritable; twice
    for capability in (*_GUARD_CAPABILITIES, CAP_SETPCAP):
        half, bit = divmod(capability, 32)
        for slot in (0, 1):
            words[3 * half + slot] &= ~(1 << bit) & 0xFFFFFFFF
    if libc.capset(header, _CAP_DATA.pack(*words)) != 0:
        log.warning("capset failed", extra={"error": os.strerror(ctypes.get_errno())})


_GUARD_CAPABILITIES: Final = (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF)
_CAP_HEADER: Final = struct.Struct("<Ii")
_CAP_DATA: Final = struct.Struct("<6I")


# --- the policy ----------------------------------------------------------------------------------


@dataclass
class Blocks:
    """Which uids the kernel refuses (the policy; ``ConnectGuard`` is the mechanism).

    A uid is blocked when the agent has refused ``threshold`` of its connects within one second
    (``refused``), and unblocked by ``run`` once the kernel has refused fewer than the uid's
    connect rate in each second of the last ``hold`` seconds. uid 0 is never blocked: root can
    get past any of this, and systemd, which fetches credentials as root, must not be refused.
    Without a guard it does nothing.
    """

    guard: ConnectGuard | None
    threshold: int
    hold: float
    kernel_refused: int = 0         # connects the kernel refused, all uids (a counter)
    _windows: dict[int, tuple[float, int]] = field(default_factory=dict)
    _blocked: dict[int, tuple[int, float]] = field(default_factory=dict)   # uid: (count, until)
    _full_logged: bool = False

    @property
    def blocked(self) -> int:
        return len(self._blocked)

    def refused(self, uid: int, now: float) -> None:
        """The agent refused a connect by ``uid`` (over its connect rate or a cap)."""
        if self.guard is None or uid == 0 or uid in self._blocked:
            return
        start, count = self._windows.get(uid, (-math.inf, 0))
        if now - start >= 1.0:
            start, count = now, 0
        count += 1
        if count < self.threshold:
            self._windows[uid] = (start, count)
            return
        self._windows.pop(uid, None)
        try:
            self.guard.block(uid)
        except OSError as exc:
            if not self._full_logged:
                self._full_logged = True
                log.warning("connect guard: cannot block a uid; the agent refuses it alone",
                            extra={"uid": uid, "error": exc.strerror})
            return
        self._blocked[uid] = (0, now + self.hold)
        log.warning("connect storm: the kernel refuses this uid's connects to agentd",
                    extra={"uid": uid})

    async def run(self, rate: Callable[[], int], *, interval: float = 1.0) -> None:
        """Every ``interval``, read the kernel's counts and lift the blocks that have gone
        quiet; ``rate()`` is the per-uid connect rate (a reload may change it). Until
        cancelled; then lifts every block (the guard stays loaded)."""
        if self.guard is None:
            return
        try:
            while True:
                await trio.sleep(interval)
                self.check(trio.current_time(), rate() * interval)
        finally:
            for uid in list(self._blocked):
                with contextlib.suppress(OSError):
                    self.guard.unblock(uid)
            self._blocked.clear()

    def check(self, now: float, allowed: float) -> None:
        """One look at the kernel's counts: a blocked uid refused more than ``allowed`` times
        since the last look stays blocked ``hold`` longer; one whose time is up is unblocked."""
        self._windows = {uid: window for uid, window in self._windows.items()
                         if now - window[0] < 1.0}
        if self.guard is None or not self._blocked:
            return
        counts = self.guard.refused()
        for uid, (seen, until) in list(self._blocked.items()):
            count = counts.get(uid, seen)
            self.kernel_refused += count - seen
            if count - seen > allowed:
                until = now + self.hold
            if now < until:
                self._blocked[uid] = (count, until)
                continue
            self.guard.unblock(uid)
            del self._blocked[uid]
            log.info("connect storm over: this uid may connect again", extra={"uid": uid})


def open_guard(mode: str, socket: Path) -> ConnectGuard | None:
    """The guard for the main socket at ``socket`` as ``[agent] connect_guard`` says: ``off``,
    none; ``auto``, one if this host can load it (else None, logged once); ``on``, one or an
    error. The path is matched as configured and, if a symlink leads there, as resolved.
    Gives up the privileges to load it either way (``drop_privileges``).

    Raises:
        GuardUnavailable: ``on``, and the guard cannot be loaded here.
    """
    try:
        if mode == "off":
            return None
        try:
            guard = ConnectGuard.load([socket, os.path.realpath(socket)])
        except GuardUnavailable as exc:
            if mode == "on":
                raise GuardUnavailable(f'connect_guard = "on", but {exc}') from exc
            log.info("connect guard not loaded: connect storms are refused by the agent alone",
                     extra={"reason": str(exc)})
            return None
        log.info("connect guard loaded: connect storms are refused in the kernel",
                 extra={"socket": str(socket)})
        return guard
    finally:
        drop_privileges()
