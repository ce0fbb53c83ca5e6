"""What identifying a peer costs: ``Peer.from_socket`` (with and without a pidfd), the check before
each reply (``still_same_process``), and hashing the executable (cold, then cached).

    .venv/bin/python bench/identity_bench.py [--rounds N]

Needs nothing running: the peer is this process, through a socketpair. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agentd.access import ExeHasher, Peer, pidfd_supported


def per_call(fn: Callable[[], object], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    args = parser.parse_args(argv)
    rows: list[tuple[str, str]] = []
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        def identify(use_pidfd: bool) -> None:
            Peer.from_socket(a, use_pidfd=use_pidfd).close()

        cost = per_call(lambda: identify(False), args.rounds)
        rows.append(("Peer.from_socket, start time", f"{cost:.1f} us"))
        if pidfd_supported():
            cost = per_call(lambda: identify(True), args.rounds)
            rows.append(("Peer.from_socket, pidfd", f"{cost:.1f} us"))
        plain = Peer.from_socket(a, use_pidfd=False)
        rows.append(("still_same_process, start time",
                     f"{per_call(plain.still_same_process, args.rounds * 4):.2f} us"))
        if pidfd_supported():
            with_fd = Peer.from_socket(a)
            rows.append(("still_same_process, pidfd",
                         f"{per_call(with_fd.still_same_process, args.rounds * 4):.2f} us"))
            with_fd.close()
        # Hash a real-sized executable: Debian's python3.11 if there, else this interpreter.
        big = Path("/usr/bin/python3.11")
        program = str(big) if big.is_file() else sys.executable
        child = subprocess.Popen([program, "-c", "import sys; sys.stdin.read()"],
                                 stdin=subprocess.PIPE)
        try:
            target = Peer.from_ids(child.pid, 0, 0)
            hasher = ExeHasher()
            size = os.stat(f"/proc/{child.pid}/exe").st_size
            start = time.perf_counter()
            hasher.digest(target)
            cold = (time.perf_counter() - start) * 1e3
            rows.append((f"exe sha256, cold ({size / 2**20:.1f} MiB: {program})",
                         f"{cold:.2f} ms"))
            cost = per_call(lambda: hasher.digest(target), args.rounds)
            rows.append(("exe sha256, cached", f"{cost:.1f} us"))
        finally:
            child.kill()
            child.wait()
    width = max(len(name) for name, _ in rows)
    print(f"| {'operation'.ljust(width)} | per call |")
    print(f"|{'-' * (width + 2)}|----------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
