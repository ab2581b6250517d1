"""Presentation contexts, query models, message IDs and socket options shared by every
pynetdicom AE here.

An association requestor may propose at most 128 presentation contexts, and an acceptor
picks one transfer syntax per context, so an instance can only travel unchanged if a
context for its exact (SOP class, transfer syntax) pair was proposed. `storage_proposals()`
spends the 128 slots on what the relay knows will come (the agent's survey of the study),
one transfer syntax per context, before falling back to common classes and syntaxes.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from relay.ops import logs

# Message IDs are random: the C-STORE sub-operations of a C-MOVE name the C-MOVE by its
# Message ID, and the agent's storage SCP routes them by it, so a sequential counter would
# let a sender guess the ID of a running retrieve. DIMSE IDs are 16 bits (1..65535), so a
# guess still hits 1 in 65535: the storage SCP's sender check (relay.dicom.intake) is the
# protection, the random ID only keeps one from being predictable.
RECENT_IDS: Final = 1024  # IDs handed out lately, not given again until this many more are
_recent: collections.deque[int] = collections.deque(maxlen=RECENT_IDS)
_held: set[int] = set()  # IDs that a running C-MOVE holds (MoveReceiver.register)
_ids_lock = threading.Lock()
_random = secrets.SystemRandom()


def next_message_id() -> int:
    """A message ID unpredictable to other hosts and unique across concurrent operations:
    none handed out in the last RECENT_IDS, none a running C-MOVE holds."""
    with _ids_lock:
        taken = set(_recent) | _held
        while True:
            msg_id = _random.randint(1, 0xFFFF)
            if msg_id not in taken:
                _recent.append(msg_id)
                return msg_id


def hold_message_id(msg_id: int) -> bool:
    """Keep `msg_id` from being handed out while its C-MOVE runs; False if held already."""
    with _ids_lock:
        if msg_id in _held:
            return False
        _held.add(msg_id)
        return True


def release_message_id(msg_id: int) -> None:
    """The C-MOVE that held `msg_id` is over."""
    with _ids_lock:
        _held.discard(msg_id)


MAX_CONTEXTS: Final = 128  # PS3.8: presentation context IDs are odd numbers 1..255

MODELS: Final[dict[tuple[str, str], str]] = {
    ("patient", "find"): PatientRootQueryRetrieveInformationModelFind,
    ("patient", "get"): PatientRootQueryRetrieveInformationModelGet,
    ("patient", "move"): PatientRootQueryRetrieveInformationModelMove,
    ("study", "find"): StudyRootQueryRetrieveInformationModelFind,
    ("study", "get"): StudyRootQueryRetrieveInformationModelGet,
    ("study", "move"): StudyRootQueryRetrieveInformationModelMove,
}
_MODEL_KEYS: Final = {uid: key for key, uid in MODELS.items()}


def model_key(model_uid: str) -> tuple[str, str] | None:
    """(root, operation) for a Patient Root or Study Root Q/R SOP class UID."""
    return _MODEL_KEYS.get(str(model_uid))


STORAGE_CLASSES: Final[tuple[str, ...]] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)

# What a radiology PACS mostly holds, most common first: the fallback when the agent could
# not survey the study before retrieving it.
COMMON_STORAGE: Final[tuple[str, ...]] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography - For Presentation
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # NM Image
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
)

UNCOMPRESSED: Final[tuple[str, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

# Transfer syntaxes proposed in their own context, in order of how often PACS store them.
_PROPOSAL_ORDER: Final[tuple[str, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    JPEG2000,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

ALL_TS: Final[tuple[str, ...]] = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES)

_LOSSLESS_COMPRESSED: Final = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
)

# pynetdicom, as association acceptor, takes the first of *its* transfer syntaxes that the
# requestor proposed, so the order of a supported context is a preference.
#
# Towards viewers: uncompressed first. pynetdicom can convert between uncompressed
# syntaxes, never out of a compressed one, so an uncompressed context can take any
# uncompressed instance (byte-identical when the syntax matches, the common case), while a
# compressed context can only take instances already in exactly that syntax.
VIEWER_PREFERENCE: Final[tuple[str, ...]] = (
    *UNCOMPRESSED,
    *(ts for ts in ALL_TS if ts not in UNCOMPRESSED),
)
# Towards the PACS (the C-MOVE receiver): lossless compressed first, since a PACS offers a
# compressed syntax when it holds the instance that way (its bytes, and fewer of them);
# then uncompressed; lossy syntaxes last, so that we never ask for a lossy version of an
# instance the PACS also offers losslessly.
PACS_PREFERENCE: Final[tuple[str, ...]] = (
    *_LOSSLESS_COMPRESSED,
    *UNCOMPRESSED,
    *(ts for ts in ALL_TS if ts not in _LOSSLESS_COMPRESSED and ts not in UNCOMPRESSED),
)


def storage_proposals(
    sop_classes: Sequence[str],
    transfer_syntaxes: Sequence[str] = (),
    *,
    budget: int = MAX_CONTEXTS,
) -> list[PresentationContext]:
    """Up to `budget` storage contexts, one transfer syntax each.

    The SOP classes come first in the order given (the survey's, then the common ones),
    and for each round the next transfer syntax: the announced ones first, then explicit
    and implicit little endian, then the compressed syntaxes PACS use most. A round that
    does not fit whole is cut, so every class gets its most likely syntaxes first.
    """
    classes = _unique(sop_classes) or list(COMMON_STORAGE)
    syntaxes = _unique([*transfer_syntaxes, *_PROPOSAL_ORDER])
    out: list[PresentationContext] = []
    for ts in syntaxes:
        for sop in classes:
            if len(out) >= budget:
                return out
            out.append(supported(sop, [ts]))  # cheap to copy: pynetdicom copies each
    return out


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item:
            seen.setdefault(str(item), None)
    return list(seen)


class SharedContext(PresentationContext):
    """A presentation context that pynetdicom can copy cheaply.

    pynetdicom deep-copies an acceptor's supported contexts for every association; for all
    storage classes with every transfer syntax that took 0.24 s per association here
    (8,000 UID objects). It deep-copies a requestor's proposed contexts too: 127 storage
    contexts cost several ms of every C-GET's association. UIDs are immutable, so a copy
    only needs its own list of them.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContext:
        new = copy.copy(self)
        new._transfer_syntax = list(self._transfer_syntax)
        return new


def supported(
    abstract_syntax: str,
    transfer_syntaxes: Sequence[str] = ALL_TS,
    *,
    scu_role: bool | None = None,
    scp_role: bool | None = None,
) -> PresentationContext:
    """A context we accept (the roles are those an acceptor allows) or propose."""
    cx = SharedContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(transfer_syntaxes)
    cx.scu_role = scu_role
    cx.scp_role = scp_role
    return cx


def scp_contexts(
    *,
    storage_role_selection: bool,
    extra: Sequence[str] = (),
    preference: Sequence[str] = VIEWER_PREFERENCE,
) -> list[Any]:
    """What our SCPs accept: Verification, `extra` (Q/R models), and every storage class
    with every transfer syntax, in order of `preference`.

    With `storage_role_selection`, a peer may propose the SCP role for storage (a C-GET
    SCU receiving sub-operations), as PS3.7 role selection allows.
    """
    out = [supported(str(Verification)), *(supported(uid) for uid in extra)]
    scp_role, scu_role = (True, False) if storage_role_selection else (None, None)
    out += [
        supported(sop, preference, scp_role=scp_role, scu_role=scu_role) for sop in STORAGE_CLASSES
    ]
    return out


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY, or some DICOM stacks stall ~40 ms a message."""
    sock = getattr(getattr(event.assoc, "dul", None), "socket", None)
    raw = getattr(sock, "socket", None)
    if isinstance(raw, socket.socket):
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY: Final = (evt.EVT_CONN_OPEN, set_nodelay)


def bounded_stalls(seconds: float) -> tuple[Any, Callable[[Any], None]]:
    """An EVT_CONN_OPEN handler: a peer that stops in the middle of a PDU, or stops
    taking what we send, for `seconds` ends the connection (PS3.8 Evt17). pynetdicom
    leaves the sockets of established associations without a timeout (it reads a PDU
    only once select says one is coming, so silence between PDUs is unaffected), and its
    connection thread, not a daemon, would wait in that recv or send for ever."""

    def bound(event: Any) -> None:
        sock = getattr(getattr(event.assoc, "dul", None), "socket", None)
        raw = getattr(sock, "socket", None)
        if isinstance(raw, socket.socket):
            with contextlib.suppress(OSError):
                raw.settimeout(seconds)

    return (evt.EVT_CONN_OPEN, bound)


def parse_address(value: str | tuple[str, int], what: str = "address") -> tuple[str, int]:
    """(host, port) from "host:port" or a pair; IPv6 as "[::1]:104"."""
    if isinstance(value, tuple):
        host, port = value
    else:
        text = value.strip()
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"{what} must be host:port, not {value!r}")
        port = int(port_text)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    if not host or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be host:port, not {value!r}")
    return host, int(port)


# UIDs whose checks are remembered (prepare_pynetdicom: pynetdicom's validator and pydicom's
# UID.is_valid, an LRU each): a C-GET's contexts are about 2000.
MAX_REMEMBERED_UIDS: Final = 4096


def prepare_pynetdicom() -> None:
    """At the start of a DICOM end: each UID checked once (below), and pynetdicom's
    standard log handlers only where its log shows them (relay.ops.logs)."""
    _check_uids_once()
    logs.pynetdicom_handlers_follow_level()


def _check_uids_once() -> None:
    """Check each UID once, not four times: the A-ASSOCIATE-RQ of a viewer that proposes
    every storage class (getscu: 17 KB, 120 contexts) creates some 2000 UIDs, each checked
    by pydicom's regular expressions when made and again by pynetdicom; that was 9 of the
    21 ms our node took to accept it, before any request could start.

    For the processes that speak DICOM (workstation, agent), once at start: pydicom's
    reading validation (warnings only, by default) is off, as the relay passes datasets on
    byte for byte and checks what it relies on itself (relay.dicom.rawds); pynetdicom's
    UID check is memoized (pure: the same UID gets the same answer; bounded), and so is
    pydicom's `UID.is_valid`, which pynetdicom asks again of every UID it sets (1,575
    times for getscu's request: decoding it took 5.8 ms with the first memo, 3.4 with
    both; medians of 200, interleaved)."""
    import pydicom.config
    from pynetdicom import _config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    check = _config.VALIDATORS["UI"]
    if not hasattr(check, "cache_info"):
        _config.VALIDATORS["UI"] = functools.lru_cache(maxsize=MAX_REMEMBERED_UIDS)(check)
    # Not a documented hook: the property is wrapped (pydicom's own getter, so the same
    # answers), and left as it is if a pydicom release changes its shape.
    is_valid = UID.__dict__.get("is_valid")
    getter = is_valid.fget if isinstance(is_valid, property) else None
    if getter is not None and not hasattr(getter, "cache_info"):
        remembered = functools.lru_cache(maxsize=MAX_REMEMBERED_UIDS)(getter)
        setattr(UID, "is_valid", property(remembered))  # noqa: B010 - a property, replaced
