"""Instances coming in from the PACS: checked, then queued for the stream.

A retrieve's C-STORE sub-operations arrive on pynetdicom threads: on the retrieve's own
association for C-GET, at the agent's storage SCP for C-MOVE. Either way an `Intake`
takes them: it checks the dataset, passes over what a resumed retrieve already
delivered, and puts the instance into the operation's bounded channel, blocking while the
channel is full (so the PACS waits for the workstation). Its answer is the C-STORE status
for the PACS. An intake told what its retrieve asked for (`limit_to`) and how many
sub-operations the PACS announced (`announce`) refuses instances outside those.

`MoveReceiver` is the agent's storage SCP for `retrieve: move`. One receiver serves every
concurrent C-MOVE of the agent. Whoever can reach that port could otherwise put another
patient's instances into a viewer's retrieval, so it takes C-STOREs from the PACS only:

- a TCP connection from an address that is not the PACS's (`MoveSenders`) is closed
  before a byte is read: it takes no association slot and no memory;
- the association must name the PACS's AE title as calling AE and ours as called AE;
- each C-STORE must carry a Move Originator AE title (ours, or the PACS's own, which
  pynetdicom-based SCPs send) and the Move Originator Message ID of a running C-MOVE of
  ours. Message IDs are random (contexts.next_message_id), and a C-STORE without one is
  refused even when only one C-MOVE is running: PS3.7 9.1.1.1 requires it of C-MOVE
  sub-operations, and a PACS that leaves it out can use `retrieve: get`;
- the PACS's PDUs are bounded by the maximum length we announce (MOVE_MAX_PDU), and one
  C-STORE's bytes by the agent's max_dataset: past either the connection is closed while
  the data is arriving, not after it has all been gathered in memory.

Its own tables are bounded too: the C-MOVEs it routes at once (MAX_MOVES; one more is
refused 0xA702 before its request reaches the PACS), and its warnings about what others
send (strangers, unrouted C-STOREs, cut associations: `relay.ops.loglimit`, per kind), so
a host that keeps connecting cannot fill the agent's log.

The operation (pacs_ops) creates an intake and registers it here; the intake and the
receiver never call back into the operation: what they share with it are the channel and
two threading events.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom.bridge import Channel, ChannelClosed
from relay.dicom.codec import (
    MAX_COUNT,
    DicomLimits,
    DicomProtocolError,
    Instance,
    Message,
    MessageCodec,
)
from relay.dicom.ending import OpenAssociations
from relay.dicom.exclusive import ExclusiveAssociationServer
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.stats import DicomStats
from relay.dicom.uidset import DIGEST_SIZE, UidSet, uid_digest
from relay.ops.listening import announce
from relay.ops.loglimit import LogLimiter

log = logging.getLogger(__name__)

MAX_SEEN: Final = 32  # SOP classes (and syntaxes) an intake notes for the agent's memory
# The status for an instance the retrieve did not ask for, or one beyond the number of
# sub-operations the PACS announced: "Error: cannot understand" (PS3.4 B.2.3 allows
# 0xCxxx), and not delivered. Not "out of resources": sending it again cannot succeed.
STORE_NOT_REQUESTED: Final = 0xC0F1

# The largest P-DATA PDU the storage SCP accepts (the Maximum Length it announces), which
# is what pynetdicom reads into memory at once. 0 (unlimited) let one PDU carry a whole
# dataset of any size from anyone. Measured over loopback (a 40-instance, 20 MiB C-MOVE
# through the agent): 44 MiB/s unlimited, 40 at 256 KiB, 42 at 64 KiB, 36 at 16 KiB; the
# differences are within the run-to-run noise above 64 KiB.
MOVE_MAX_PDU: Final = 256 * 1024
PDU_SLACK: Final = 64 * 1024  # over MOVE_MAX_PDU: senders that count headers in, and A-ASSOCIATE
MESSAGE_SLACK: Final = 64 * 1024  # a C-STORE's command and headers beyond max_dataset
#: C-MOVEs routed at once (Move Originator Message IDs held). The agent's
#: pacs.max_operations allows at most 1,024 operations in all (relay.agent.config
#: MAX_PACS_OPERATIONS), so this is never reached through the dispatcher; it bounds the
#: table, and the IDs contexts.next_message_id must avoid (of 65,535), whoever registers.
MAX_MOVES: Final = 1024
# How often the storage SCP may look the PACS's host names up again, when an address it
# does not know connects (the PACS moved, or did not resolve when the agent started).
RESOLVE_INTERVAL: Final = 60.0
# The elements an intake reads from each instance to check it against the retrieve's keys.
_SCOPE_CAPTURE: Final = {
    0x00080005: "charset",  # Specific Character Set: how the Patient ID's bytes read
    0x00080016: "sop_class",
    0x00080018: "sop_instance",
    0x00100020: "patient",
    0x0020000D: "study",
    0x0020000E: "series",
}
_LEVEL_KEYS: Final = (  # the unique keys down to each Query/Retrieve Level (PS3.4 C.6)
    ("PATIENT", "PatientID", "patient"),
    ("STUDY", "StudyInstanceUID", "study"),
    ("SERIES", "SeriesInstanceUID", "series"),
    ("IMAGE", "SOPInstanceUID", "sop_instance"),
)
_LEVELS: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class RetrieveScope:
    """The unique keys a retrieve asked for: an instance that does not match is refused.

    Only the keys down to the request's level count (a STUDY retrieve: PatientID if given,
    and StudyInstanceUID), each a set since a key may list several values."""

    keys: Mapping[str, frozenset[str]]

    @classmethod
    def of(cls, identifier: Dataset) -> RetrieveScope:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        depth = _LEVELS.index(level) if level in _LEVELS else len(_LEVELS) - 1
        keys: dict[str, frozenset[str]] = {}
        for _, keyword, name in _LEVEL_KEYS[: depth + 1]:
            values = _values(identifier.get(keyword))
            if values:
                keys[name] = values
        return cls(keys)

    def admits(self, seen: Mapping[str, str]) -> bool:
        """Whether an instance whose elements are `seen` is what was asked for."""
        return all(self._matches(name, allowed, seen) for name, allowed in self.keys.items())

    @staticmethod
    def _matches(name: str, allowed: frozenset[str], seen: Mapping[str, str]) -> bool:
        value = seen.get(name, "").strip()
        if value in allowed:
            return True
        # A Patient ID (LO) outside ASCII: the identifier's is text, decoded in its own
        # character set; the instance's was read as UTF-8. Compare the identifier's as
        # the instance's character set writes it, read the same way.
        charset = seen.get("charset", "")
        return any(_as_read(a, charset) == value for a in allowed if not a.isascii())


@functools.lru_cache(maxsize=64)  # once per retrieve's key and study, not per instance
def _as_read(text: str, charset: str) -> str | None:
    """`text` as `rawds` captures it from an instance in `charset` (Specific Character
    Set): encoded there, then read as UTF-8 (None if that character set cannot hold it)."""
    try:
        encodings = convert_encodings([t.strip() for t in charset.split("\\")] or [""])
        data = encode_string(text, encodings)
    except (LookupError, ValueError):
        return None
    return data.strip(b"\x00 ").decode("utf-8", "replace").strip()


def _values(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    items = [value] if isinstance(value, str) else list(value)
    return frozenset(str(v).strip() for v in items if str(v).strip())


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
        skip: UidSet | None = None,
    ) -> None:
        """`aborted` is set by the operation when the stream is gone, and by us when the
        channel refuses an instance (then `cancel` too, so the operation stops). `skip`:
        the UIDs a resumed retrieve passes over (the device's skip list)."""
        self.out = out
        self.codec = codec
        self.stats = stats
        self.stall_timeout = stall_timeout
        self.aborted = aborted
        self.cancel = cancel
        self.skip = skip if skip is not None else UidSet()
        # The digests of what was sent on (uidset.py), for a second retrieve to pass over;
        # None once they and the skip list together are more than a retrieve's
        # sub-operations can count (then there is no second retrieve). An honest skip list
        # and the instances delivered after it are different instances of one retrieve,
        # so together at most MAX_COUNT: one retrieve holds at most MAX_COUNT digests.
        self._delivered: bytearray | None = bytearray()
        # What came, for the agent's StorageMemory (bounded like it: a few UIDs each).
        self._classes: dict[str, None] = {}
        self._syntaxes: dict[str, None] = {}
        self.instances = 0
        self.skipped = 0
        self.malformed = 0
        self.unrequested = 0  # refused: outside the retrieve's keys or its announced count
        # What the running retrieve asked for, and the sub-operations the PACS announced
        # for it (limit_to, announce); None: not told, nothing to check against.
        self.scope: RetrieveScope | None = None
        self.announced: int | None = None
        self._arrived = 0  # C-STOREs that came for the running retrieve, refused ones too

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
        self._arrived += 1
        if self.announced is not None and self._arrived > self.announced:
            self.unrequested += 1
            log.warning("refused a C-STORE beyond the %d the PACS announced", self.announced)
            return STORE_NOT_REQUESTED
        if sop_instance in self.skip:
            self.skipped += 1
            return st.SUCCESS  # delivered before the resume: the PACS counts it as done
        try:
            seen = rawds.check_instance(data, ts, sop_class, sop_instance, capture=_SCOPE_CAPTURE)
        except rawds.MalformedDataset as exc:
            log.warning("malformed instance from the PACS refused: %s", exc)
            self.malformed += 1
            return st.STORE_CANNOT_UNDERSTAND
        if self.scope is not None and not self.scope.admits(seen):
            self.unrequested += 1
            # Not the UIDs: they name a patient's images, and this reaches the log.
            log.warning("refused an instance the retrieve did not ask for")
            return STORE_NOT_REQUESTED
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
            self._delivered += uid_digest(sop_instance)
            if len(self.skip) + len(self._delivered) // DIGEST_SIZE > MAX_COUNT:
                self._delivered = None
        self.stats.instance_relayed(len(data))
        return st.SUCCESS

    def limit_to(self, identifier: Dataset) -> None:
        """A retrieve with this identifier starts: deliver only instances that match its
        keys (and, once `announce`d, no more than the PACS said it would send)."""
        self.scope = RetrieveScope.of(identifier)
        self.announced = None
        self._arrived = 0

    def announce(self, total: int) -> None:
        """The PACS's first count of sub-operations for the running retrieve (remaining +
        completed + failed + warning): C-STOREs past it are refused."""
        if self.announced is None and total >= 0:
            self.announced = total

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
        self.skip = self.skip.with_digests(self._delivered)
        self._delivered = bytearray()  # in the skip list now, and counted there
        return True


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class MoveSenders:
    """The addresses and AE titles that may send C-STOREs to the storage SCP: the PACS's.

    `hosts` are host names, addresses or networks (CIDR). Names are looked up when the
    receiver starts, and again (at most every RESOLVE_INTERVAL) when an address it does
    not know connects, so a PACS that moves, or did not resolve at start, is found."""

    def __init__(
        self,
        hosts: Iterable[str],
        ae_titles: Iterable[str],
        originators: Iterable[str] = (),
        *,
        resolve_interval: float = RESOLVE_INTERVAL,
    ) -> None:
        self.names: list[str] = []
        self.networks: list[_Network] = []
        for host in hosts:
            try:
                self.networks.append(ipaddress.ip_network(host.strip(), strict=False))
            except ValueError:
                self.names.append(host.strip())
        self.ae_titles = frozenset(t.strip() for t in ae_titles if t.strip())
        # Move Originator AE titles taken: ours, and the senders' own (pynetdicom's C-MOVE
        # SCP sends its own AE title there rather than the C-MOVE requestor's).
        self.originators = frozenset(t.strip() for t in originators if t.strip()) | self.ae_titles
        self.resolve_interval = resolve_interval
        self._resolved: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset()
        self._resolved_at: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_pacs(cls, pacs: PacsTarget) -> MoveSenders:
        """The PACS of the agent's `pacs:` section: `move_senders` and
        `move_sender_ae_titles` if set, else its host and AE title."""
        return cls(
            pacs.move_senders or (pacs.host,),
            pacs.move_sender_ae_titles or (pacs.ae_title,),
            (pacs.calling_ae_title,),
        )

    @classmethod
    def loopback(cls) -> MoveSenders:
        """Any AE on this machine only: what a receiver not told its PACS accepts."""
        return cls(("127.0.0.0/8", "::1"), ())

    def admits(self, address: str) -> bool:
        """Whether a connection from `address` may go on to associate."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
        if any(ip in net for net in self.networks):
            return True
        return ip in self._lookup(force=False) or ip in self._lookup(force=True)

    def _lookup(self, *, force: bool) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        with self._lock:
            now = time.monotonic()
            due = self._resolved_at is None or (
                force and now - self._resolved_at >= self.resolve_interval
            )
            if self.names and due:
                self._resolved_at = now
                self._resolved = frozenset(a for name in self.names for a in _resolve(name))
            return self._resolved


def _resolve(name: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of `name`; none (and a warning) if it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("C-MOVE sender %s does not resolve: %s", name, exc)
        return []
    out = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        out.append(ip)
    return out


class MoveRoutesFull(Exception):
    """MAX_MOVES C-MOVEs are routed already: this one cannot be (0xA702, try later)."""


class _GuardedSocket(socket.socket):
    """An accepted connection whose PDUs are bounded as they arrive.

    pynetdicom reads a PDU header (6 bytes: type, reserved, length) and then the whole
    length it names into memory, whatever Maximum Length we announced. This socket reads
    no further than one PDU at a time and, once a header names more than `max_pdu`
    bytes, or `refuse()` was called, reads nothing more: pynetdicom sees the connection
    closed and aborts the association."""

    def __init__(self, raw: socket.socket, max_pdu: int, on_oversized: Callable[[], None]) -> None:
        timeout = raw.gettimeout()
        super().__init__(raw.family, raw.type, raw.proto, fileno=raw.detach())
        self.settimeout(timeout)
        self.max_pdu = max_pdu
        self._on_oversized = on_oversized
        self.message_bytes = 0  # PDV bytes of the DIMSE message being received
        self.refused = False
        self._header = b""
        self._body_left = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.refused:
            return b""
        if self._body_left:
            data = super().recv(min(bufsize, self._body_left), flags)
            self._body_left -= len(data)
            return data
        data = super().recv(min(bufsize, 6 - len(self._header)), flags)
        self._header += data
        if len(self._header) == 6:
            self._body_left = int.from_bytes(self._header[2:6], "big")
            self._header = b""
            if self._body_left > self.max_pdu:
                self._on_oversized()
                self.refuse()
        return data

    def refuse(self) -> None:
        """Read nothing more: the association ends as if the peer had closed it."""
        self.refused = True
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RD)


class _MoveServer(ExclusiveAssociationServer):
    """pynetdicom's server, closing connections from other hosts than the senders before
    they are read or take a thread, and guarding the PDUs of the others."""

    senders: MoveSenders
    max_pdu: int
    on_stranger: Any
    on_oversized_pdu: Callable[[], None]

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        raw, address = super().get_request()
        return _GuardedSocket(raw, self.max_pdu, self.on_oversized_pdu), address

    def shutdown(self) -> None:
        """Stop serving and close (the AE did not start this server: nothing to tell it)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        if self.senders.admits(host):
            return True
        self.on_stranger()
        return False


class MoveReceiver:
    """A pynetdicom storage SCP whose C-STOREs go to the intake of the C-MOVE that caused
    them, taken from the PACS (`senders`) only.

    `senders` None (a receiver not told its PACS) admits connections from this machine
    only: the agent passes MoveSenders.for_pacs(pacs)."""

    def __init__(
        self,
        ae_title: str,
        listen: tuple[str, int],
        *,
        timeout: float = 30.0,
        stall_timeout: float = 120.0,
        max_associations: int = 32,
        senders: MoveSenders | None = None,
        max_dataset: int = DicomLimits.max_dataset,
        max_pdu: int = MOVE_MAX_PDU,
        max_moves: int = MAX_MOVES,
    ) -> None:
        if not 1 <= max_moves <= MAX_MOVES:
            raise ValueError(f"max_moves must be 1-{MAX_MOVES}")
        rawds.install()
        self.ae_title = ae_title
        self.host, self._port = listen
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.max_associations = max_associations
        self.senders = senders if senders is not None else MoveSenders.loopback()
        self.max_message = max_dataset + MESSAGE_SLACK
        self.max_pdu = max_pdu
        self.max_moves = max_moves
        self._routes: dict[int, Intake] = {}
        self._lock = threading.Lock()
        self._log_limit = LogLimiter()  # per kind of warning (strangers, unrouted, cut)
        self._log_lock = threading.Lock()  # warnings come from the server's and DUL threads
        self._server: Any = None
        self.associations = OpenAssociations()  # the PACS's, ended at stop
        self.refused = 0  # C-STOREs refused: no running C-MOVE of ours, or not from its PACS
        self.strangers = 0  # connections closed unread: not from the PACS
        self.oversized = 0  # associations cut: a PDU or a C-STORE over the limits

    @property
    def port(self) -> int:
        return self._port if self._server is None else int(self._server.server_address[1])

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu
        ae.require_called_aet = True
        ae.require_calling_aet = sorted(self.senders.ae_titles)  # empty: any
        ae.acse_timeout = ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout + self.stall_timeout
        server = cast(
            _MoveServer,
            ae.make_server(
                (self.host, self._port),
                evt_handlers=[
                    contexts.NODELAY,
                    (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_PDU_RECV, self._on_pdu),
                    *self.associations.handlers(),
                ],
                contexts=contexts.scp_contexts(
                    storage_role_selection=False, preference=contexts.PACS_PREFERENCE
                ),
                server_class=_MoveServer,
            ),
        )
        server.senders = self.senders
        server.max_pdu = self.max_pdu + PDU_SLACK if self.max_pdu else 0xFFFFFFFF  # 0: none
        server.on_stranger = self._on_stranger
        server.on_oversized_pdu = self._on_oversized_pdu
        threading.Thread(target=server.serve_forever, name="move-receiver", daemon=True).start()
        self._server = server
        announce("move", (self.host, self.port), ae_title=self.ae_title)

    def stop(self) -> None:
        """Stop listening, then end the PACS's associations still open (aborted, and cut
        if the PACS does not close them: their threads would hold the agent's exit)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.associations.end_all()

    def counts(self) -> dict[str, int]:
        """What others sent that the receiver turned away, by kind (the agent's
        `relay_pacs_move_receiver_refused_total`)."""
        return {"store": self.refused, "stranger": self.strangers, "oversized": self.oversized}

    def register(self, msg_id: int, intake: Intake) -> None:
        """C-STOREs naming `msg_id` as their Move Originator Message ID go to `intake`.
        Raises MoveRoutesFull when `max_moves` C-MOVEs are routed already."""
        with self._lock:
            if msg_id in self._routes:  # next_message_id holds it: cannot happen
                raise ValueError(f"C-MOVE message ID {msg_id} is in use")
            if len(self._routes) >= self.max_moves:
                raise MoveRoutesFull(f"{self.max_moves} C-MOVEs are running already")
            contexts.hold_message_id(msg_id)
            self._routes[msg_id] = intake

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            if self._routes.pop(msg_id, None) is not None:
                contexts.release_message_id(msg_id)

    def _route(self, request: Any) -> Intake | None:
        """The intake a C-STORE belongs to: its originator is us, and its Move Originator
        Message ID that of a running C-MOVE. No guess for one that names none."""
        originator = str(request.MoveOriginatorApplicationEntityTitle or "").strip()
        msg_id = request.MoveOriginatorMessageID
        if originator not in self.senders.originators and self.senders.ae_titles:
            return None
        if msg_id is None or msg_id == "":
            return None
        with self._lock:
            return self._routes.get(int(msg_id))

    def _on_store(self, event: Any) -> int:
        intake = self._route(event.request)
        if intake is None:
            self.refused += 1
            self._warn("unrouted", "refused a C-STORE that belongs to no running C-MOVE of ours")
            return st.STORE_NOT_AUTHORIZED
        return intake.on_store(event)

    def _on_stranger(self) -> None:
        self.strangers += 1
        self._warn(
            "stranger", "closed a connection to the C-MOVE storage SCP from a host not the PACS"
        )

    def _on_oversized_pdu(self) -> None:
        """A PDU header over the maximum length: the socket reads no more of it (cut),
        counted with the C-STOREs cut over max_dataset."""
        self.oversized += 1
        self._warn("pdu", "C-MOVE storage peer sent a PDU over the maximum length: closed")

    def _warn(self, kind: str, message: str) -> None:
        """A warning about what another host sent, limited per kind (the counters count
        every one): 20 at once, then one per 10 s saying how many were held back."""
        with self._log_lock:
            held = self._log_limit.allow(kind, time.monotonic())
        if held is not None:
            log.warning(message, extra={"suppressed": held} if held else None)

    def _on_pdu(self, event: Any) -> None:
        """Count the bytes of the C-STORE being received; past max_dataset (and slack), cut
        the association now rather than when pynetdicom has gathered it all."""
        items = getattr(event.pdu, "presentation_data_value_items", None)
        guard = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if not items or not isinstance(guard, _GuardedSocket):
            return
        for item in items:
            pdv = item.presentation_data_value
            guard.message_bytes += len(pdv) - 1
            if guard.message_bytes > self.max_message:
                self.oversized += 1
                self._warn(
                    "oversized",
                    f"C-STORE at the C-MOVE storage SCP over {self.max_message} bytes: cut",
                )
                guard.refuse()
                return
            if pdv[0] & 0x02 and not pdv[0] & 0x01:  # the last fragment of a dataset
                guard.message_bytes = 0
