"""The agent's storage SCP for `retrieve: move`: where the PACS sends C-MOVE sub-operations.

One receiver serves every concurrent C-MOVE of the agent. Each C-STORE names the C-MOVE it
belongs to by its Move Originator Message ID (the agent gives each operation a unique one);
a PACS that leaves it out is still served when only one C-MOVE is running. Anything else is
refused, so a stray sender cannot inject instances into a viewer's retrieval.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pynetdicom import AE, evt

from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom.pacs_ops import Deliver
from relay.ops.listening import announce

log = logging.getLogger(__name__)


class MoveReceiver:
    """A pynetdicom storage SCP whose C-STOREs are routed to the C-MOVE that caused them."""

    def __init__(
        self,
        ae_title: str,
        listen: tuple[str, int],
        *,
        timeout: float = 30.0,
        stall_timeout: float = 120.0,
        max_associations: int = 32,
    ) -> None:
        rawds.install()
        self.ae_title = ae_title
        self.host, self._port = listen
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.max_associations = max_associations
        self._routes: dict[int, Deliver] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self.refused = 0

    @property
    def port(self) -> int:
        return self._port if self._server is None else int(self._server.server_address[1])

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = 0
        ae.acse_timeout = ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout + self.stall_timeout
        self._server = ae.start_server(
            (self.host, self._port),
            block=False,
            evt_handlers=[contexts.NODELAY, (evt.EVT_C_STORE, self._on_store)],
            contexts=contexts.scp_contexts(
                storage_role_selection=False, preference=contexts.PACS_PREFERENCE
            ),
        )
        announce("move", (self.host, self.port), ae_title=self.ae_title)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def register(self, msg_id: int, deliver: Deliver) -> None:
        with self._lock:
            self._routes[msg_id] = deliver

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            self._routes.pop(msg_id, None)

    def _route(self, msg_id: Any) -> Deliver | None:
        with self._lock:
            if msg_id is not None and msg_id != "":
                return self._routes.get(int(msg_id))
            if len(self._routes) == 1:
                return next(iter(self._routes.values()))
            return None

    def _on_store(self, event: Any) -> int:
        req = event.request
        deliver = self._route(req.MoveOriginatorMessageID)
        if deliver is None:
            self.refused += 1
            log.warning("refused a C-STORE that belongs to no running C-MOVE")
            return st.STORE_NOT_AUTHORIZED
        return deliver(
            str(req.AffectedSOPClassUID),
            str(req.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            req.DataSet.getvalue(),
        )
