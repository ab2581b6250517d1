"""Where a role really listens: one structured log line per bound address.

A listen address may ask for port 0 ("any free port"). The kernel then picks the port,
and the line `{"event": "listening", "what": "metrics", "address": "127.0.0.1:41234"}`
is how an operator, `relay demo` or a test harness learns it, without binding a port,
releasing it and hoping that nobody takes it before the role binds it again. The line is
written at any `log_level`: it is one line per listener, at start-up.
"""

from __future__ import annotations

import logging
from typing import Final

from relay.ops.config import Address

__all__ = ["EVENT", "announce"]

EVENT: Final = "listening"

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
