"""pynetdicom's association server, bound so that no other process can share its port.

pynetdicom's `AssociationServer.server_bind` always sets SO_REUSEADDR. On Linux and
macOS that only lets a restart bind a port whose old connections linger in TIME_WAIT: a
second listener on the port is still refused. On Windows SO_REUSEADDR means more: another
socket may bind the very port in use, silently, and new connections land on either. Two
workstations on one PC (two hospitals' configs, both with the sample's dicom.listen)
would then both start, and a viewer's association meant for one hospital could reach the
other's. So where the OS has SO_EXCLUSIVEADDRUSE (Windows), it is set instead, and a
second bind fails with "cannot listen ... (key dicom.listen)" as it does elsewhere.
(asyncio's servers set SO_REUSEADDR on POSIX only: they need nothing.)
"""

from __future__ import annotations

import socket
import threading
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["ExclusiveAssociationServer", "exclusive_option", "start_exclusive_server"]


def exclusive_option() -> int | None:
    """SO_EXCLUSIVEADDRUSE where the OS has it (Windows), else None."""
    option: int | None = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
    return option


class ExclusiveAssociationServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer that binds with SO_EXCLUSIVEADDRUSE where it exists."""

    def server_bind(self) -> None:
        option = exclusive_option()
        if option is None:  # POSIX: SO_REUSEADDR never admits a second listener
            super().server_bind()
            return
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, option, 1)  # and not SO_REUSEADDR
        if self.ae.network_timeout is not None:  # the rest as pynetdicom's server_bind
            sock.settimeout(self.ae.network_timeout)
        sock.bind(self.server_address)
        self.server_address = sock.getsockname()


def start_exclusive_server(
    ae: AE, address: tuple[str, int], **kwargs: Any
) -> ExclusiveAssociationServer:
    """`ae.start_server(address, block=False, **kwargs)` with an ExclusiveAssociationServer:
    served on a daemon thread, known to the AE (its shutdown() stops it)."""
    server = cast(
        ExclusiveAssociationServer,
        ae.make_server(address, server_class=ExclusiveAssociationServer, **kwargs),
    )
    threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True
    ).start()
    ae._servers.append(server)  # as start_server does: the server's shutdown removes it
    return server
