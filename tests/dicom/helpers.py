"""Small DICOM helpers shared by the tests of relay.dicom (pynetdicom peers, odd datasets)."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from relay.dicom import contexts
from relay.dicom.rawds import encode_dataset
from relay_dev.samples import CT_IMAGE_STORAGE, EncodedInstance, make_study

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def _explicit_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def quirky_instance() -> EncodedInstance:
    """A valid CT instance that pydicom would *not* re-encode byte for byte.

    It carries a group length element (pydicom drops those on writing), an
    undefined-length sequence holding an undefined-length item next to a defined-length
    one, and a private block: all legal DICOM that a re-encoding relay would alter.
    """
    base = make_study(1, rows=64, cols=64)[0]
    item_body = _explicit_element(0x0008, 0x0100, b"SH", b"T-D1100 ")
    item_undefined = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item_body
    item_undefined += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    item_defined = struct.pack("<HHI", 0xFFFE, 0xE000, len(item_body)) + item_body
    seq = (
        struct.pack("<HH2sHI", 0x0008, 0x2218, b"SQ", 0, 0xFFFFFFFF)
        + item_undefined
        + item_defined
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    private = _explicit_element(0x0009, 0x0010, b"LO", b"RELAYTEST ")
    private += _explicit_element(0x0009, 0x1001, b"LO", b"quirky")
    data = base.data
    # Elements stay in ascending tag order: group 0008, our sequence, then group 0009.
    cut = _offset_of_group(data, 0x0009)
    group8 = data[:cut] + seq
    group_length = _explicit_element(0x0008, 0x0000, b"UL", struct.pack("<I", len(group8)))
    data = group_length + group8 + private + data[cut:]
    return EncodedInstance(base.sop_class, base.sop_instance, EXPLICIT, data)


def _offset_of_group(data: bytes, group: int) -> int:
    pos = 0
    while pos < len(data):
        g, _e, vr = struct.unpack_from("<HH2s", data, pos)
        if g >= group:
            return pos
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"OD", b"OL", b"UC", b"UR", b"UV"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return pos


def implicit_instance() -> EncodedInstance:
    base = make_study(1, rows=32, cols=32, seed=3)[0]
    from relay.dicom.rawds import decode_dataset

    ds = decode_dataset(base.data, EXPLICIT)
    return EncodedInstance(
        base.sop_class, base.sop_instance, IMPLICIT, encode_dataset(ds, IMPLICIT)
    )


@dataclass
class Captured:
    """What a capturing storage SCP received: raw dataset bytes and transfer syntax."""

    items: list[tuple[str, str, bytes]] = field(default_factory=list)  # (uid, ts, bytes)
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: int = 0x0000

    def by_uid(self) -> dict[str, tuple[str, bytes]]:
        with self.lock:
            return {uid: (ts, data) for uid, ts, data in self.items}


@contextmanager
def capturing_scp(
    ae_title: str = "CAPTURE", syntaxes: list[str] | None = None, *, delay: float = 0.0
) -> Iterator[tuple[Captured, int]]:
    """A pynetdicom storage SCP on 127.0.0.1 that records each dataset's raw bytes;
    `delay` seconds before each answer play a slow destination."""
    captured = Captured()

    def on_store(event: Any) -> int:
        if delay:
            time.sleep(delay)
        with captured.lock:
            captured.items.append(
                (
                    str(event.request.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                    event.request.DataSet.getvalue(),
                )
            )
        return captured.status

    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 0
    for sop in contexts.STORAGE_CLASSES:
        ae.add_supported_context(sop, syntaxes or ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[contexts.NODELAY, (evt.EVT_C_STORE, on_store)],
    )
    assert server is not None
    try:
        yield captured, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def scu(ae_title: str = "TESTSCU", timeout: float = 20) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.maximum_pdu_size = 0
    return ae


def query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


CT = CT_IMAGE_STORAGE
