"""systemd's notify protocol, for a unit with `Type=notify` (README, Operations).

`run` says READY=1 once it has connected, checked the schema and loaded its tables (so
`systemctl start` returns when the branch really replicates, and a config error fails the
start), feeds the watchdog from its main loop when the unit sets WatchdogSec=, and says
STOPPING=1 on its way out.  Without NOTIFY_SOCKET (not under systemd) every call is a no-op.
The protocol is one datagram per message on a unix socket: no library needed.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):                     # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as e:                            # systemd gone: never a reason to stop replicating
        log.debug("systemd notify failed: %s", e)


class Watchdog:
    """Feeds systemd's watchdog at half its interval, when the unit asks for one."""

    def __init__(self):
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self.last = 0.0

    def feed(self) -> None:
        if self.every is not None and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            notify("WATCHDOG=1")
