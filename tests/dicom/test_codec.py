"""The DICOM stream codec: round trips, compression policy, and every limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import threading

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

from relay.dicom.codec import (
    FLAG_ZSTD,
    VERSION,
    Cancel,
    DicomLimits,
    DicomProtocolError,
    ErrorMessage,
    FinalResponse,
    IdentifierTooLarge,
    Instance,
    Message,
    MessageCodec,
    MessageType,
    Pending,
    Request,
    is_precompressed,
    read_message,
    read_payload,
    write_message,
)
from relay.dicom.stats import DicomCounters
from relay.net.bytestream import StreamResetError, pipe

EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

uids = s.from_regex(r"[12]\.[0-9]{1,8}(\.[0-9]{1,10}){1,5}", fullmatch=True).filter(
    lambda u: len(u) <= 64  # PS3.5 9.1: at most 64 characters
)
counts = s.none() | s.integers(0, 0xFFFF)
texts = s.text(max_size=200)
datasets = s.binary(max_size=2048) | s.builds(
    lambda n, b: b * n, s.integers(0, 400), s.binary(min_size=1, max_size=8)
)
aes = s.text(alphabet=s.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16)

requests = s.one_of(
    s.builds(Request, op=s.just("echo"), calling_ae=aes),
    s.builds(
        Request,
        op=s.sampled_from(["find", "retrieve"]),
        root=s.sampled_from(["patient", "study"]),
        transfer_syntax=uids,
        dataset=datasets,
        priority=s.integers(0, 2),
        calling_ae=aes,
    ),
    s.builds(
        Request,
        op=s.just("store"),
        transfer_syntax=uids,
        dataset=datasets,
        sop_class=uids,
        sop_instance=uids,
        priority=s.integers(0, 2),
        move_originator_ae=aes,
        move_originator_id=s.none() | s.integers(0, 0xFFFF),
        calling_ae=aes,
    ),
)
messages: s.SearchStrategy[Message] = s.one_of(
    requests,
    s.builds(
        Pending,
        remaining=counts,
        completed=counts,
        failed=counts,
        warning=counts,
        transfer_syntax=s.just("") | uids,
        dataset=datasets,
        sop_classes=s.lists(uids, max_size=5).map(tuple),
        transfer_syntaxes=s.lists(uids, max_size=5).map(tuple),
        estimate=s.booleans(),
        status=s.sampled_from([0xFF00, 0xFF01]),
    ),
    s.builds(Instance, sop_class=uids, sop_instance=uids, transfer_syntax=uids, dataset=datasets),
    s.builds(
        FinalResponse,
        status=s.integers(0, 0xFFFF),
        comment=texts,
        remaining=counts,
        completed=counts,
        failed=counts,
        warning=counts,
        failed_instances=s.lists(uids, max_size=5).map(tuple),
    ),
    s.just(Cancel()),
    s.builds(ErrorMessage, reason=texts),
)


@given(messages)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_every_message_round_trips(msg: Message) -> None:
    codec = MessageCodec()
    frame = codec.encode(msg)
    assert codec.decode_frame(frame) == msg


@given(s.lists(messages, min_size=1, max_size=8), s.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_messages_round_trip_over_a_stream_in_any_chunking(msgs: list[Message], limit: int) -> None:
    async def run() -> list[Message | None]:
        a, b = pipe(limit=limit)
        codec = MessageCodec()

        async def send() -> None:
            for m in msgs:
                await write_message(a, codec, m)
            await a.write_eof()

        sender = asyncio.create_task(send())
        got: list[Message | None] = []
        while (m := await read_message(b, codec)) is not None:
            got.append(m)
        await sender
        return got

    assert asyncio.run(run()) == msgs


@given(s.binary(max_size=300))
@settings(max_examples=500)
def test_garbage_payloads_are_refused_cleanly(payload: bytes) -> None:
    codec = MessageCodec()
    with contextlib.suppress(DicomProtocolError):
        codec.decode(payload)


@given(messages, s.data())
@settings(max_examples=200)
def test_truncated_or_corrupted_frames_never_crash(msg: Message, data: s.DataObject) -> None:
    codec = MessageCodec()
    frame = bytearray(codec.encode(msg))
    cut = data.draw(s.integers(0, len(frame) - 1))
    with pytest.raises(DicomProtocolError):
        codec.decode_frame(bytes(frame[:cut]))
    pos = data.draw(s.integers(4, len(frame) - 1))
    frame[pos] ^= data.draw(s.integers(1, 255))
    with contextlib.suppress(DicomProtocolError):
        codec.decode_frame(bytes(frame))


def _instance(data: bytes, ts: str = EXPLICIT) -> Instance:
    return Instance("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ts, data)


def test_uncompressed_syntax_is_compressed_and_counted() -> None:
    stats = DicomCounters()
    codec = MessageCodec(stats=stats)
    data = bytes(range(256)) * 400
    frame = codec.encode(_instance(data))
    assert frame[6] & FLAG_ZSTD
    assert len(frame) < len(data) / 10
    assert codec.counters.sent_raw > len(data) > codec.counters.sent_wire == len(frame)
    assert stats.raw_bytes["out"] == codec.counters.sent_raw
    assert stats.wire_bytes["out"] == len(frame)
    other = MessageCodec()
    assert other.decode_frame(frame) == _instance(data)
    assert other.counters.received_raw == codec.counters.sent_raw
    assert other.counters.received_wire == len(frame)


@pytest.mark.parametrize(
    "ts",
    [
        JPEG_BASELINE,
        "1.2.840.10008.1.2.4.70",  # JPEG lossless
        "1.2.840.10008.1.2.4.80",  # JPEG-LS
        "1.2.840.10008.1.2.4.90",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K
        "1.2.840.10008.1.2.4.100",  # MPEG-2
        "1.2.840.10008.1.2.4.107",  # HEVC
        "1.2.840.10008.1.2.5",  # RLE
        "1.2.840.10008.1.2.1.99",  # deflate
    ],
)
def test_compressed_syntaxes_are_not_recompressed(ts: str) -> None:
    assert is_precompressed(ts)
    data = b"\x00" * 100_000  # would shrink enormously, but must not be touched
    frame = MessageCodec().encode(_instance(data, ts))
    assert not frame[6] & FLAG_ZSTD
    assert frame.endswith(data)


def test_data_that_does_not_shrink_goes_as_is() -> None:
    noise = os.urandom(4096)
    frame = MessageCodec().encode(_instance(noise))
    assert not frame[6] & FLAG_ZSTD
    assert frame.endswith(noise)


def test_uncompressed_syntaxes_are_not_precompressed() -> None:
    for ts in ("1.2.840.10008.1.2", EXPLICIT, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.98"):
        assert not is_precompressed(ts)


# -- limits ---------------------------------------------------------------------------


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        DicomLimits(max_header=70_000)
    with pytest.raises(ValueError):
        DicomLimits(queue_depth=0)
    with pytest.raises(ValueError):
        DicomLimits(max_message=0)


def test_oversized_dataset_is_refused_on_both_sides() -> None:
    small = MessageCodec(DicomLimits(max_dataset=1000))
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        small.encode(_instance(b"x" * 1001))
    frame = MessageCodec().encode(_instance(bytes(range(256)) * 8))  # 2048 bytes raw
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        small.decode_frame(frame)


def test_oversized_message_is_refused_on_both_sides() -> None:
    small = MessageCodec(DicomLimits(max_message=500))
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        small.encode(_instance(bytes(range(256)) * 2, JPEG_BASELINE))
    frame = MessageCodec().encode(_instance(bytes(range(256)) * 2, JPEG_BASELINE))
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        small.decode_frame(frame)


def test_zstd_bomb_is_refused_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * 5_000_000)
    header = json.dumps({"cls": "1.2", "iuid": "1.3", "ts": EXPLICIT}).encode()
    payload = struct.pack(">BBBH", VERSION, MessageType.INSTANCE, FLAG_ZSTD, len(header))
    payload += header + bomb
    codec = MessageCodec(DicomLimits(max_dataset=1_000_000))
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        codec.decode(payload)


def test_zstd_frame_without_size_is_refused() -> None:
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 1000)
    header = json.dumps({"cls": "1.2", "iuid": "1.3", "ts": EXPLICIT}).encode()
    payload = struct.pack(">BBBH", VERSION, MessageType.INSTANCE, FLAG_ZSTD, len(header))
    with pytest.raises(DicomProtocolError, match="content size"):
        MessageCodec().decode(payload + header + packed)


def test_oversized_header_is_refused_on_both_sides() -> None:
    codec = MessageCodec(DicomLimits(max_header=100))
    with pytest.raises(DicomProtocolError, match="header"):
        codec.encode(FinalResponse(0, comment="x" * 200))
    frame = MessageCodec().encode(FinalResponse(0, comment="x" * 200))
    with pytest.raises(DicomProtocolError, match="header"):
        codec.decode_frame(frame)


def test_lists_and_texts_are_bounded() -> None:
    codec = MessageCodec(DicomLimits(max_list=3, max_text=10))
    with pytest.raises(DicomProtocolError):
        codec.encode(FinalResponse(0xB000, failed_instances=("1.2",) * 4))
    with pytest.raises(DicomProtocolError):
        codec.encode(ErrorMessage("y" * 11))
    big = MessageCodec()
    with pytest.raises(DicomProtocolError):
        codec.decode_frame(big.encode(FinalResponse(0xB000, failed_instances=("1.2",) * 4)))
    with pytest.raises(DicomProtocolError):
        codec.decode_frame(big.encode(ErrorMessage("y" * 11)))


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (Request(op="find", root="", transfer_syntax=EXPLICIT), "root"),
        (Request(op="store", transfer_syntax=EXPLICIT, sop_class="1.2"), "sop_instance"),
        (Request(op="echo", calling_ae="X" * 17), "calling_ae"),
        (Instance("not a uid", "1.2", EXPLICIT, b""), "sop_class"),
        (FinalResponse(0x10000), "status"),
        (Pending(remaining=70_000), "count"),
        (Request(op="echo", priority=3), "priority"),
    ],
)
def test_invalid_messages_are_not_encoded(msg: Message, why: str) -> None:
    with pytest.raises((DicomProtocolError, ValueError), match=why):
        MessageCodec().encode(msg)


def _payload(
    mtype: int, header: object, body: bytes = b"", flags: int = 0, version: int = VERSION
) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack(">BBBH", version, mtype, flags, len(h)) + h + body


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_payload(MessageType.CANCEL, {}, version=2), "version"),
        (_payload(MessageType.CANCEL, {}, flags=0x80), "flags"),
        (_payload(99, {}), "unknown message type"),
        (_payload(MessageType.CANCEL, []), "not a JSON object"),
        (_payload(MessageType.CANCEL, {}, body=b"x"), "with a body"),
        (_payload(MessageType.FINAL, {}), "without status"),
        (_payload(MessageType.FINAL, {"status": "0"}), "status"),
        (_payload(MessageType.FINAL, {"status": True}), "status"),
        (_payload(MessageType.REQUEST, {"op": "delete"}), "unknown operation"),
        (_payload(MessageType.PENDING, {"rem": -1}), "rem"),
        (_payload(MessageType.PENDING, {"classes": "1.2"}), "classes"),
        (_payload(MessageType.PENDING, {"status": 0}), "pending status"),
        (_payload(MessageType.PENDING, {"status": 0xFE00}), "pending status"),
        (struct.pack(">BBBH", VERSION, MessageType.CANCEL, 0, 50) + b"{}", "past the end"),
        (struct.pack(">BBBH", VERSION, MessageType.CANCEL, 0, 2) + b"\xff\xfe", "bad header"),
        (b"\x01\x05", "shorter than its header"),
    ],
)
def test_malformed_payloads_name_the_problem(payload: bytes, why: str) -> None:
    with pytest.raises(DicomProtocolError, match=why):
        MessageCodec().decode(payload)


# -- stream helpers --------------------------------------------------------------------


async def test_clean_end_of_stream_reads_as_none() -> None:
    a, b = pipe()
    await a.write_eof()
    assert await read_payload(b, MessageCodec()) is None


async def test_stream_ending_inside_a_message_is_an_error() -> None:
    a, b = pipe()
    frame = MessageCodec().encode(FinalResponse(0, "done"))
    await a.write(frame[:-3])
    await a.write_eof()
    with pytest.raises(DicomProtocolError, match="stream ended"):
        await read_payload(b, MessageCodec())
    a, b = pipe()
    await a.write(frame[:2])
    await a.write_eof()
    with pytest.raises(DicomProtocolError, match="length prefix"):
        await read_payload(b, MessageCodec())


async def test_oversized_prefix_is_refused_before_the_body_is_read() -> None:
    a, b = pipe()
    await a.write(struct.pack(">I", 10_000_000))  # no body follows: must not wait for it
    codec = MessageCodec(DicomLimits(max_message=1_000_000))
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        await asyncio.wait_for(read_payload(b, codec), 5)


async def test_reset_passes_through() -> None:
    a, b = pipe()
    a.reset(3)
    with pytest.raises(StreamResetError):
        await read_message(b, MessageCodec())


def test_zstd_body_must_be_exactly_one_whole_frame() -> None:
    codec = MessageCodec()
    frame = codec.encode(_instance(b"a" * 1000))
    assert frame[6] & FLAG_ZSTD
    trailing = frame[4:] + zstandard.ZstdCompressor().compress(b"b" * 10)
    with pytest.raises(DicomProtocolError, match="one frame"):
        codec.decode(trailing)
    with pytest.raises(DicomProtocolError):
        codec.decode(frame[4:-5])


def test_validate_checks_without_compressing() -> None:
    codec = MessageCodec(DicomLimits(max_dataset=100))
    codec.validate(_instance(b"x" * 100))
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        codec.validate(_instance(b"x" * 101))
    with pytest.raises(DicomProtocolError, match="sop_instance"):
        codec.validate(Instance("1.2", "1.2.3 ", EXPLICIT, b""))
    assert codec.counters.sent_wire == 0


@pytest.mark.parametrize(
    ("mtype", "header", "why"),
    [
        (MessageType.CANCEL, {}, "with a body"),
        (MessageType.FINAL, {"status": 0}, "with a body"),
        (MessageType.ERROR, {"reason": "x"}, "with a body"),
        (MessageType.SKIP, {"n": 1}, "exceeds limit"),
        (MessageType.REQUEST, {"op": "find", "root": "study", "ts": EXPLICIT}, "identifier of"),
        (MessageType.REQUEST, {"op": "retrieve", "root": "study", "ts": EXPLICIT}, "identifier"),
    ],
)
def test_a_zstd_body_is_bounded_by_its_message_type_before_decompressing(
    monkeypatch: pytest.MonkeyPatch, mtype: MessageType, header: dict[str, object], why: str
) -> None:
    """The type says how big a body may be (none for a Cancel, a Final or an Error; a
    skip list's UIDs for a Skip): a zstd frame claiming more is refused undecompressed,
    so a device cannot make the agent inflate a dataset-sized body it would then drop."""

    def decompressing(*_args: object) -> None:
        raise AssertionError("decompressed")

    monkeypatch.setattr(MessageCodec, "_decompressor", decompressing)
    packed = zstandard.ZstdCompressor().compress(b"1" * 10_000_000)
    with pytest.raises(DicomProtocolError, match=why):
        MessageCodec().decode(_payload(mtype, header, packed, flags=FLAG_ZSTD))


async def test_an_unexpected_message_is_refused_from_its_fixed_header() -> None:
    """A reader that knows what may come (the agent: a Request first, then only a
    Cancel) refuses anything else once the type is read, before the body arrives."""
    a, b = pipe()
    await a.write(struct.pack(">I", 100_000_000) + struct.pack(">BBBH", VERSION, 1, 0, 2))
    with pytest.raises(DicomProtocolError, match="REQUEST"):
        await asyncio.wait_for(read_message(b, MessageCodec(), expect=(MessageType.CANCEL,)), 5)
    a, b = pipe()
    await write_message(a, MessageCodec(), Cancel())
    got = await read_message(b, MessageCodec(), expect=(MessageType.CANCEL,))
    assert got == Cancel()


async def test_a_big_body_is_decoded_off_the_loop_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`offload`: a body that inflates to a MiB or more (an upload) is decompressed on a
    worker thread, not on the loop every stream shares."""
    threads: list[int] = []
    decode = MessageCodec.decode

    def recording(self: MessageCodec, payload: bytes | bytearray | memoryview) -> Message:
        threads.append(threading.get_ident())
        return decode(self, payload)

    monkeypatch.setattr(MessageCodec, "decode", recording)
    codec = MessageCodec()
    upload = Request(op="store", transfer_syntax=EXPLICIT, sop_class="1.2", sop_instance="1.3",
                     dataset=bytes(2 << 20))  # fmt: skip
    for msg in (upload, Cancel()):
        a, b = pipe()
        await write_message(a, codec, msg)
        assert await read_message(b, codec, offload=True) == msg
    assert threads[0] != threading.get_ident() and threads[1] == threading.get_ident()


@pytest.mark.parametrize("zstd", [False, True])
def test_an_identifier_is_bounded_by_max_identifier_and_an_upload_by_max_dataset(
    zstd: bool,
) -> None:
    """A find's or retrieve's body is an identifier (a few KiB from a real viewer): it
    has its own limit, far below a stored instance's."""
    codec = MessageCodec(DicomLimits(max_identifier=1000))
    body = b"\x00" * 1001
    packed = zstandard.ZstdCompressor().compress(body) if zstd else body
    flags = FLAG_ZSTD if zstd else 0
    find = {"op": "find", "root": "study", "ts": EXPLICIT}
    with pytest.raises(IdentifierTooLarge, match="identifier of 1001 bytes exceeds limit 1000"):
        codec.decode(_payload(MessageType.REQUEST, find, packed, flags))
    store = {"op": "store", "ts": EXPLICIT, "cls": "1.2", "iuid": "1.2.3"}
    msg = codec.decode(_payload(MessageType.REQUEST, store, packed, flags))
    assert isinstance(msg, Request) and msg.dataset == body


async def test_a_big_identifier_is_refused_from_the_request_header_before_its_body() -> None:
    """`read_payload` would otherwise allocate and wait for the whole announced body."""
    a, b = pipe()
    header = json.dumps({"op": "retrieve", "root": "study", "ts": EXPLICIT}).encode()
    length = 5 + len(header) + (200 << 20)
    await a.write(struct.pack(">IBBBH", length, VERSION, MessageType.REQUEST, 0, len(header)))
    await a.write(header)  # no body, no end of stream
    async with asyncio.timeout(5):
        with pytest.raises(IdentifierTooLarge, match="exceeds limit 131072"):
            await read_payload(b, MessageCodec())


def _header(payload: bytes) -> dict[str, object]:
    """The JSON header of an encoded message (length prefix included)."""
    hlen = struct.unpack_from(">H", payload, 4 + 3)[0]
    header: dict[str, object] = json.loads(payload[4 + 5 : 4 + 5 + hlen])
    return header


def test_a_pending_s_warning_status_travels_and_older_peers_are_unaffected() -> None:
    """A C-FIND match's 0xFF01 (optional keys the PACS did not support) reached the
    viewer as 0xFF00: PENDING had no status. It is an optional header key: written only
    for 0xFF01, so a plain PENDING is what an older workstation always read; one from
    an older agent (no key) is 0xFF00; and an older workstation ignores the key, as
    this codec ignores every key it does not know."""
    codec = MessageCodec()
    warned = Pending(transfer_syntax=EXPLICIT, dataset=b"\x08\x00", status=0xFF01)
    assert _header(codec.encode(warned))["status"] == 0xFF01
    assert codec.decode(codec.encode(warned)[4:]) == warned
    plain = Pending(transfer_syntax=EXPLICIT, dataset=b"\x08\x00")
    assert "status" not in _header(codec.encode(plain))
    older = _payload(MessageType.PENDING, {"ts": EXPLICIT, "rem": 2})
    assert codec.decode(older) == Pending(remaining=2, transfer_syntax=EXPLICIT)
    newer = _payload(MessageType.PENDING, {"ts": EXPLICIT, "status": 0xFF01, "later": [1]})
    assert codec.decode(newer) == Pending(transfer_syntax=EXPLICIT, status=0xFF01)
    with pytest.raises(DicomProtocolError, match="pending status"):
        codec.encode(Pending(status=0xC000))
