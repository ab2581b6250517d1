"""STOW-RS against hostile bodies over real HTTP: a deflate bomb is refused within
max_upload, checked once and off the event loop; malformed part headers are 400."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib

import aiohttp
import pytest
from pydicom.dataset import Dataset

from relay.dicom import status as st
from relay.ops.config import Address
from relay.workstation.dicomweb import part10
from relay.workstation.dicomweb.settings import DicomwebConfig
from tests.workstation.dicomweb.test_server import post, scripted, stow_body

DEFLATED = "1.2.840.10008.1.2.1.99"
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SOP = "1.2.3.4.5.6"
STUDY = "1.2.3.4"
MiB = 1024 * 1024


def _el(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def deflated_instance(pixels: int, study: str = STUDY) -> bytes:
    """A Part 10 file in Deflated Explicit VR LE whose Pixel Data is `pixels` zero bytes
    (a few KB on the wire for many MB inflated)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = (_el(0x00080016, b"UI", SOP_CLASS.encode()) + _el(0x00080018, b"UI", SOP.encode())
            + _el(0x0020000D, b"UI", study.encode()))  # fmt: skip
    out = [c.compress(head)]
    out.append(c.compress(struct.pack("<HHcc", 0x7FE0, 0x0010, b"O", b"B") + b"\0\0"
                          + struct.pack("<I", pixels)))  # fmt: skip
    zero = bytes(MiB)
    for at in range(0, pixels, MiB):
        out.append(c.compress(zero[: min(MiB, pixels - at)]))
    out.append(c.flush())
    return part10.wrap(SOP_CLASS, SOP, DEFLATED, b"".join(out))


def _failures(body: bytes) -> list[int]:
    doc = Dataset.from_json(json.loads(body))
    return [int(x.FailureReason) for x in doc.get("FailedSOPSequence", [])]


async def test_a_deflate_bomb_is_refused_within_max_upload_off_the_loop() -> None:
    """64 MiB of zeros deflate to ~64 KB; max_upload is 4 MiB: the part fails with
    0xA700 (out of resources), nothing is stored, and the event loop is not stalled."""
    config = DicomwebConfig(Address("127.0.0.1", 0), max_upload=4 * MiB)
    async with scripted(config) as (srv, source):
        lag = 0.0

        async def heartbeat() -> None:
            nonlocal lag
            while True:
                t = time.monotonic()
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - t - 0.01)

        beat = asyncio.ensure_future(heartbeat())
        try:
            status, body = await post(f"{srv.url}/studies/{STUDY}",
                                      stow_body([deflated_instance(64 * MiB)]))  # fmt: skip
        finally:
            beat.cancel()
        assert status == 409, body
        assert _failures(body) == [st.STORE_OUT_OF_RESOURCES]
        assert source.stored == []
        assert lag < 0.2


async def test_a_deflated_instance_within_max_upload_is_stored_once_its_study_is_checked() -> None:
    config = DicomwebConfig(Address("127.0.0.1", 0), max_upload=4 * MiB)
    async with scripted(config) as (srv, source):
        status, body = await post(f"{srv.url}/studies/{STUDY}",
                                  stow_body([deflated_instance(MiB)]))  # fmt: skip
        assert status == 200, body
        assert [sop for sop, _ in source.stored] == [SOP]
        status, body = await post(f"{srv.url}/studies/1.2.3.5",
                                  stow_body([deflated_instance(MiB)]))  # fmt: skip
        assert status == 409 and _failures(body) == [0xA900]


@pytest.mark.parametrize(
    "extra",
    ["".join(f"X-H{i}: v\r\n" for i in range(200)), "X-Long: " + "a" * 20000 + "\r\n"],
    ids=["many-header-lines", "long-header-line"],
)
async def test_a_part_with_malformed_headers_is_400(extra: str) -> None:
    async with scripted() as (srv, source):
        body = (f"--stowb\r\nContent-Type: application/dicom\r\n{extra}\r\nDICM\r\n"
                "--stowb--\r\n").encode()  # fmt: skip
        status, answer = await post(f"{srv.url}/studies", body)
        assert status == 400, answer
        assert answer.startswith(b"malformed multipart body") and len(answer) < 400
        assert source.stored == []


async def test_a_body_whose_content_encoding_does_not_decode_is_400() -> None:
    """aiohttp decodes a Content-Encoding as the body is read; one that does not decode
    raised out of the handler: a 500, "Server got itself in trouble"."""
    async with scripted() as (srv, source):
        headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=x',
                   "Content-Encoding": "gzip"}  # fmt: skip
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{srv.url}/studies", data=b"\x1f\x8b not gzip", headers=headers) as r,
        ):
            assert r.status == 400
            assert (await r.read()).startswith(b"malformed request body")
        assert source.stored == [] and srv.service.stow_uploads == 0


@pytest.mark.parametrize("ctype", ["application/dicom+json", "application/dicom+xml",
                                   "application/dicomx"])  # fmt: skip
async def test_parts_of_another_type_than_application_dicom_are_415(ctype: str) -> None:
    """The prefix test took JSON and XML metadata parts (STOW-RS of metadata and bulk
    data, which the relay does not take) for Part 10 files: 409, "cannot understand"."""
    async with scripted() as (srv, source):
        body = f"--stowb\r\nContent-Type: {ctype}\r\n\r\n[{{}}]\r\n--stowb--\r\n".encode()
        status, answer = await post(f"{srv.url}/studies", body)
        assert status == 415, answer
        assert answer.startswith(b"only application/dicom parts") and source.stored == []


async def _expecting(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


def _upload_head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=stowb\r\n'
            f"Content-Length: {length}\r\n{extra}\r\n").encode()  # fmt: skip


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [
        ("/dicom-web/studies", "", b"413"),  # Content-Length over max_upload
        ("/dicom-web/studies/not-a-uid", "", b"400"),
        ("/dicom-web/studies", "Sec-Fetch-Site: cross-site\r\n", b"403"),
    ],
)
async def test_an_upload_refused_from_its_headers_gets_no_100_continue(
    path: str, extra: str, status: bytes
) -> None:
    """aiohttp's default said `100 Continue` to every upload, so curl sent a body of any
    size to be refused (read and discarded by the server for up to 10 s). The refusal
    closes the connection: the client sends no body, and on a connection kept open its
    next request was read as the refused body and never answered."""
    async with scripted(DicomwebConfig(Address("127.0.0.1", 0), max_upload=4 * MiB)) as (srv, _):
        assert srv.address is not None
        length = 10 * 1024 * MiB if status == b"413" else 100
        reader, writer = await _expecting(srv.address.port, _upload_head(path, length, extra))
        try:
            first = await asyncio.wait_for(reader.readline(), 10)
            assert first.startswith(b"HTTP/1.1 " + status), first
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"\r\nconnection: close\r\n" in b"\r\n" + head.lower(), head
        finally:
            writer.close()


async def test_an_upload_that_will_be_taken_gets_100_continue_then_is_stored() -> None:
    body = stow_body([deflated_instance(1024)])
    async with scripted() as (srv, source):
        assert srv.address is not None
        reader, writer = await _expecting(srv.address.port, _upload_head("/dicom-web/studies",
                                                                         len(body)))  # fmt: skip
        try:
            assert await asyncio.wait_for(reader.readline(), 10) == b"HTTP/1.1 100 Continue\r\n"
            assert await asyncio.wait_for(reader.readline(), 10) == b"\r\n"
            writer.write(body)
            answer = await asyncio.wait_for(reader.readline(), 10)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
        finally:
            writer.close()
        assert [sop for sop, _ in source.stored] == [SOP]
