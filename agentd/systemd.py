"""systemd's notify and socket-activation protocols, written by hand (about 40 lines).

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract
socket); without that variable it does nothing. ``listen_fds()`` returns the sockets systemd passed
with ``LISTEN_FDS``/``LISTEN_PID`` (socket activation), or an empty list.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd. Returns False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds when the watchdog is meant for us, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


def socket_activated() -> bool:
    """Whether systemd passed this process listening sockets (without taking them)."""
    return os.environ.get("LISTEN_PID") == str(os.getpid())


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (empty when not activated)."""
    if not socket_activated():
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
