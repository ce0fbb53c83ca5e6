"""Process hardening (decision 6): no core dumps, no ptrace by same-uid processes.

Pure standard library (``ctypes``, ``resource``) so that the sandboxed render worker can harden
itself without importing ``cryptography``; ``agentd.crypto`` re-exports ``harden_process``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger("agentd.crypto")

# <linux/prctl.h>
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """Make this process non-dumpable and turn core dumps off (decision 6).

    ``PR_SET_DUMPABLE 0`` also keeps processes of the same uid (without CAP_SYS_PTRACE) from
    attaching to the agent or reading its ``/proc/PID/mem``. Failures are logged, never raised:
    a kernel without prctl must not keep the agent from starting.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
        prctl.restype = ctypes.c_int
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong]
        if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(err))
    except (OSError, AttributeError) as exc:
        log.warning("prctl(PR_SET_DUMPABLE, 0) unavailable: %s", exc)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("setrlimit(RLIMIT_CORE, 0) failed: %s", exc)
