"""Instances coming in from the PACS: checked, then queued for the stream.

A retrieve's C-STORE sub-operations arrive on pynetdicom threads: on the retrieve's own
association for C-GET, at the agent's storage SCP for C-MOVE. Either way an `Intake`
takes them: it checks the dataset, passes over what a resumed retrieve already
delivered, and puts the instance into the operation's bounded channel, blocking while the
channel is full (so the PACS waits for the workstation). Its answer is the C-STORE status
for the PACS.

`MoveReceiver` is the agent's storage SCP for `retrieve: move`. One receiver serves every
concurrent C-MOVE of the agent. Each C-STORE names the C-MOVE it belongs to by its Move
Originator Message ID (the agent gives each operation a unique one); a PACS that leaves it
out is still served when only one C-MOVE is running. Anything else is refused, so a
stray sender cannot inject instances into a viewer's retrieval.

The operation (pacs_ops) creates an intake and registers it here; the intake and the
receiver never call back into the operation: what they share with it are the channel and
two threading events.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from pynetdicom import AE, evt

from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom.bridge import Channel, ChannelClosed
from relay.dicom.codec import MAX_COUNT, DicomProtocolError, Instance, Message, MessageCodec
from relay.dicom.stats import DicomStats
from relay.ops.listening import announce

log = logging.getLogger(__name__)

MAX_SEEN: Final = 32  # SOP classes (and syntaxes) an intake notes for the agent's memory


class Intake:
    """Where one retrieve's instances come in; `on_store` is a pynetdicom C-STORE handler."""

    def __init__(
        self,
        out: Channel[Message],
        codec: MessageCodec,
        stats: DicomStats,
        *,
        stall_timeout: float,
        aborted: threading.Event,
        cancel: threading.Event,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        """`aborted` is set by the operation when the stream is gone, and by us when the
        channel refuses an instance (then `cancel` too, so the operation stops)."""
        self.out = out
        self.codec = codec
        self.stats = stats
        self.stall_timeout = stall_timeout
        self.aborted = aborted
        self.cancel = cancel
        self.skip = skip
        # Sent on, for a second retrieve to pass over; None once more than a retrieve's
        # sub-operations can count (then there is no second retrieve).
        self._delivered: set[str] | None = set()
        # What came, for the agent's StorageMemory (bounded like it: a few UIDs each).
        self._classes: dict[str, None] = {}
        self._syntaxes: dict[str, None] = {}
        self.instances = 0
        self.skipped = 0
        self.malformed = 0

    def on_store(self, event: Any) -> int:
        req = event.request
        return self.deliver(
            str(req.AffectedSOPClassUID),
            str(req.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            req.DataSet.getvalue(),
        )

    def deliver(self, sop_class: str, sop_instance: str, ts: str, data: bytes) -> int:
        """A C-STORE sub-operation from the PACS: check, queue (blocking), answer.

        Blocks while the channel is full, which is what slows the PACS down to the pace of
        the workstation.
        """
        if self.aborted.is_set():
            return st.STORE_OUT_OF_RESOURCES
        if sop_instance in self.skip:
            self.skipped += 1
            return st.SUCCESS  # delivered before the resume: the PACS counts it as done
        try:
            rawds.check_instance(data, ts, sop_class, sop_instance)
        except rawds.MalformedDataset as exc:
            log.warning("malformed instance from the PACS refused: %s", exc)
            self.malformed += 1
            return st.STORE_CANNOT_UNDERSTAND
        msg = Instance(sop_class, sop_instance, ts, data)
        try:
            self.codec.validate(msg)
        except DicomProtocolError as exc:
            log.warning("instance from the PACS not relayable: %s", exc)
            self.malformed += 1
            return st.STORE_OUT_OF_RESOURCES
        try:
            if self.aborted.is_set():
                raise ChannelClosed("aborted")
            self.out.put_sync(msg, self.stall_timeout)
        except (ChannelClosed, TimeoutError):
            self.aborted.set()
            self.cancel.set()
            return st.STORE_OUT_OF_RESOURCES
        self.instances += 1
        if len(self._classes) < MAX_SEEN:
            self._classes.setdefault(sop_class, None)
        if len(self._syntaxes) < MAX_SEEN:
            self._syntaxes.setdefault(ts, None)
        if self._delivered is not None:
            self._delivered.add(sop_instance)
            if len(self._delivered) > MAX_COUNT:
                self._delivered = None
        self.stats.instance_relayed(len(data))
        return st.SUCCESS

    def seen_classes(self) -> list[str]:
        """The SOP classes of the instances sent on, first come first (at most MAX_SEEN)."""
        return list(self._classes)

    def seen_syntaxes(self) -> list[str]:
        """Their transfer syntaxes, likewise."""
        return list(self._syntaxes)

    def pass_over_delivered(self) -> bool:
        """From now on, take what was already sent on as done without sending it again
        (the same retrieve, run a second time); False if that list was not kept."""
        if self._delivered is None:
            return False
        self.skip = self.skip | self._delivered
        return True


class MoveReceiver:
    """A pynetdicom storage SCP whose C-STOREs go to the intake of the C-MOVE that caused them."""

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
        self._routes: dict[int, Intake] = {}
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

    def register(self, msg_id: int, intake: Intake) -> None:
        with self._lock:
            self._routes[msg_id] = intake

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            self._routes.pop(msg_id, None)

    def _route(self, msg_id: Any) -> Intake | None:
        with self._lock:
            if msg_id is not None and msg_id != "":
                return self._routes.get(int(msg_id))
            if len(self._routes) == 1:
                return next(iter(self._routes.values()))
            return None

    def _on_store(self, event: Any) -> int:
        intake = self._route(event.request.MoveOriginatorMessageID)
        if intake is None:
            self.refused += 1
            log.warning("refused a C-STORE that belongs to no running C-MOVE")
            return st.STORE_NOT_AUTHORIZED
        return intake.on_store(event)
