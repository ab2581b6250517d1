"""Instances without their pixels (`dicom-content: headers`): the agent's stripping keeps
every byte of the PACS's but the top-level Pixel Data value, and the agent applies it
only when the stream asks for it (the real agent over an in-memory stream, embedded
PACS)."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from relay.dicom import headers_only, rawds
from relay.dicom.agent import DicomAgent
from relay.dicom.codec import Instance
from relay.dicom.headers_only import (
    find_pixel_data,
    pixel_data_length,
    strip_instance,
    strip_pixel_data,
)
from relay.dicom.rawds import encode_dataset
from relay.net.bytestream import pipe
from relay.ops.config import Address
from relay.wire import DICOM_CONTENT_HEADERS, HEADER_DICOM_CONTENT
from relay_dev.pacs import EmbeddedPacs

from .test_agent import CT, CT_STUDY, Workstation, final_of, pacs, retrieve, target

__all__ = ["pacs"]  # the fixture, shared with test_agent

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def image(*, pixels: bytes | None = b"\x01\x02" * 64, icon: bool = False) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_CLASS
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "Test^Headers"
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if icon:
        item = Dataset()
        item.Rows, item.Columns, item.BitsAllocated = 2, 2, 8
        item.SamplesPerPixel = 1
        item.PhotometricInterpretation = "MONOCHROME2"
        item.PixelData = b"\x07\x08\x09\x0a"
        ds.IconImageSequence = Sequence([item])
    if pixels is not None:
        ds.PixelData = pixels
    return ds


def check_stripped(full: bytes, ts: str) -> bytes:
    """Strip, then check: identical before and after the Pixel Data value, length 0."""
    implicit, little, _ = rawds.ts_encoding(ts)
    span = find_pixel_data(full, implicit, little)
    assert span is not None
    out = strip_pixel_data(full, ts)
    head = span.length_at - span.start
    assert out[: span.length_at] == full[: span.length_at]  # the PACS's bytes, VR included
    assert out[span.length_at : span.length_at + span.length_size] == bytes(span.length_size)
    assert out[span.length_at + span.length_size :] == full[span.end :]
    assert len(out) == len(full) - (span.end - span.start) + head + span.length_size
    rawds.check_dataset(out, ts)
    assert pixel_data_length(out, ts) == 0
    return out


def same_but_pixels(full: bytes, stripped: bytes, ts: str) -> None:
    a, b = rawds.decode_dataset(full, ts), rawds.decode_dataset(stripped, ts)
    assert [e.tag for e in a] == [e.tag for e in b]
    for elem in a:
        if elem.tag != 0x7FE00010:
            assert b[elem.tag] == elem
    assert b.PixelData in (b"", None)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                ExplicitVRBigEndian])  # fmt: skip
def test_native_pixel_data_is_emptied_and_nothing_else_changes(ts: str) -> None:
    full = encode_dataset(image(), ts)
    assert pixel_data_length(full, ts) == 128
    stripped = check_stripped(full, ts)
    same_but_pixels(full, stripped, ts)


def test_elements_after_the_pixel_data_are_kept() -> None:
    ds = image()
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 10)  # Data Set Trailing Padding
    full = encode_dataset(ds)
    stripped = check_stripped(full, ExplicitVRLittleEndian)
    assert stripped.endswith(full[-(12 + 10) :])
    same_but_pixels(full, stripped, ExplicitVRLittleEndian)


def test_encapsulated_pixel_data_of_undefined_length_becomes_an_empty_value() -> None:
    ds = image(pixels=encapsulate([b"\xff\x4f" + b"x" * 300, b"\xff\x4f" + b"y" * 30]))
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    full = encode_dataset(ds)  # explicit VR LE bytes; the syntax names the encapsulation
    ts = JPEG2000Lossless
    assert pixel_data_length(full, ts) == -1
    stripped = check_stripped(full, ts)
    span = find_pixel_data(stripped, False, True)
    assert (
        span is not None
        and not span.undefined
        and stripped[span.start + 4 : span.start + 6] == b"OB"
    )


def test_no_pixel_data_leaves_the_bytes_alone() -> None:
    full = encode_dataset(image(pixels=None))
    assert find_pixel_data(full, False, True) is None
    assert strip_pixel_data(full, ExplicitVRLittleEndian) is full
    assert pixel_data_length(full, ExplicitVRLittleEndian) == 0


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_pixel_data_in_a_sequence_item_is_not_cut(ts: str, undefined: bool) -> None:
    ds = image(icon=True)
    if undefined:  # undefined-length sequence and items, as many PACSs write them
        ds["IconImageSequence"].is_undefined_length = True
        for item in ds.IconImageSequence:
            item.is_undefined_length_sequence_item = True
    full = encode_dataset(ds, ts)
    if undefined:
        assert b"\xfe\xff\x0d\xe0" in full  # an item delimiter: the case is there
    stripped = check_stripped(full, ts)
    assert b"\x07\x08\x09\x0a" in stripped  # the icon's pixels stay
    same_but_pixels(full, stripped, ts)
    icon_only = encode_dataset(image(pixels=None, icon=True), ts)
    assert strip_pixel_data(icon_only, ts) is icon_only  # nothing at the top level: as is


def test_a_deflated_dataset_is_stripped_inside() -> None:
    inner = encode_dataset(image())
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    full = packer.compress(inner) + packer.flush()
    out = strip_pixel_data(full, DeflatedExplicitVRLittleEndian)
    assert pixel_data_length(out, DeflatedExplicitVRLittleEndian) == 0
    assert rawds.inflate(out, 1 << 20) == strip_pixel_data(inner, ExplicitVRLittleEndian)


def test_malformed_bytes_go_unchanged_and_show_as_unstripped() -> None:
    full = encode_dataset(image())
    cut = full[:-10]  # the Pixel Data runs past the end
    msg = Instance(CT_CLASS, "1.2.3.4", ExplicitVRLittleEndian, cut)
    assert strip_instance(msg) is msg
    with pytest.raises(rawds.MalformedDataset):
        pixel_data_length(cut, ExplicitVRLittleEndian)
    good = Instance(CT_CLASS, "1.2.3.4", ExplicitVRLittleEndian, full)
    assert pixel_data_length(strip_instance(good).dataset, ExplicitVRLittleEndian) == 0


def test_a_short_vr_header_is_handled() -> None:
    # (0008,0005) with a 2-byte length field before the pixel data, big endian too
    full = encode_dataset(image(), ExplicitVRBigEndian)
    span = find_pixel_data(full, False, False)
    assert span is not None
    assert struct.unpack(">I", full[span.length_at : span.length_at + 4])[0] == 128
    assert headers_only.PIXEL_DATA == 0x7FE00010


# -- the agent ---------------------------------------------------------------------------


@pytest.mark.parametrize("retrieve_by", ["get", "move"])
async def test_the_agent_sends_headers_only_when_the_stream_asks(
    pacs: EmbeddedPacs, retrieve_by: str
) -> None:
    """Same PACS retrieve, counts and final; each instance the PACS's bytes without the
    pixels. Without the header (the default) the instances are whole."""
    kw: dict[str, object] = {"retrieve": retrieve_by}
    if retrieve_by == "move":
        kw.update(move_ae_title="RELAYMOVE", move_listen=Address("127.0.0.1", 0))
    agent = DicomAgent(target(pacs, **kw))
    await agent.start()
    if agent.move_receiver is not None:
        pacs.destinations["RELAYMOVE"] = ("127.0.0.1", agent.move_receiver.port)
    try:
        for headers, whole in (({HEADER_DICOM_CONTENT: DICOM_CONTENT_HEADERS}, False),
                               ({}, True)):  # fmt: skip
            a, b = pipe(headers)
            server = asyncio.create_task(agent.serve(b))
            ws = Workstation(a)
            await ws.send(retrieve(StudyInstanceUID=CT_STUDY))
            msgs = await ws.all()
            summary = await asyncio.wait_for(server, 20)
            final = final_of(msgs)
            assert (final.status, final.completed, final.failed) == (0, len(CT), 0)
            assert summary.instances == len(CT)
            got = {m.sop_instance: m for m in msgs if isinstance(m, Instance)}
            assert set(got) == {i.sop_instance for i in CT}
            for inst in CT:
                sent = got[inst.sop_instance].dataset
                if whole:
                    assert sent == inst.data
                else:
                    assert sent == strip_pixel_data(inst.data, inst.transfer_syntax)
                    assert len(sent) < len(inst.data) // 4
                    assert pixel_data_length(sent, inst.transfer_syntax) == 0
    finally:
        await agent.stop()
