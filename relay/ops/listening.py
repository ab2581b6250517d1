"""Where a role really listens: one structured log line per bound address, and sockets
handed over by a supervisor.

A listen address may ask for port 0 ("any free port"). The kernel then picks the port,
and the line `{"event": "listening", "what": "metrics", "address": "127.0.0.1:41234"}`
is how an operator, `relay demo` or a test harness learns it, without binding a port,
releasing it and hoping nobody takes it before the role binds it again. The line is
written at any `log_level`: it is one line per listener, at start-up.

A supervisor may also bind the socket itself and hand it over, as systemd socket
activation does (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`; the descriptors start at
3). The port then outlives the process: a restarted role gets the same socket back, and
clients that connect meanwhile wait in its backlog instead of being refused.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

from relay.ops.config import Address

__all__ = ["EVENT", "announce", "inherited_socket"]

EVENT: Final = "listening"
FIRST_FD: Final = 3  # SD_LISTEN_FDS_START
MAX_FDS: Final = 64  # more than any role listens on; a larger LISTEN_FDS is ignored

log = logging.getLogger("relay.listening")
log.setLevel(logging.INFO)  # its own level: announced even when the role logs warnings only


def announce(what: str, bound: Address | tuple[str, int], **extra: str) -> Address:
    """Log where listener `what` ("gateway", "metrics", "dicom", "forward"...) is bound.

    `bound` is the address the socket really has (getsockname), not the configured one.
    `extra` adds identifiers such as the forwarded service's name.
    """
    address = bound if isinstance(bound, Address) else Address(str(bound[0]), int(bound[1]))
    log.info(EVENT, extra={"event": EVENT, "what": what, "address": str(address), **extra})
    return address


def inherited_socket(
    name: str, environ: Mapping[str, str] | None = None, pid: int | None = None
) -> socket.socket | None:
    """The TCP socket named `name` that our supervisor handed over, or None.

    Follows sd_listen_fds(3): it counts only if LISTEN_PID is this process (a variable
    inherited by accident from a parent is ignored). The socket is returned listening and
    non-blocking; it may arrive bound only, and listen() is then called here.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for index in range(min(count, MAX_FDS)):
        if index < len(names) and names[index] == name:
            sock = socket.socket(fileno=FIRST_FD + index)
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                sock.detach()
                raise ValueError(f"the handed-over socket {name!r} is not a TCP socket")
            sock.listen(1024)
            sock.setblocking(False)
            return sock
    return None
