"""systemd's sd_notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET.

Written by hand: it is six lines, and a dependency for it would be larger than the code.
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send e.g. "READY=1"; False when not run under systemd (no NOTIFY_SOCKET) or it fails."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    # Best effort, as sd_notify(3): an unreachable socket must not stop serving or a drain.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
