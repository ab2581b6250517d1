"""The end-to-end stream codec: markers, zstd round trips, bounded decompression."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.net.bytestream import ByteStream, StreamResetError, pipe
from relay.net.compression import (
    MARKER_RAW,
    MARKER_ZSTD,
    MAX_BLOCK,
    MAX_DECODER_WINDOW,
    MAX_PIECE_OUTPUT,
    CodecStream,
    offers_zstd,
)
from relay.proto import ErrorCode

WAIT = 10.0


async def read_all(stream: ByteStream, size: int = 65536) -> bytes:
    parts = []
    while chunk := await stream.read(size):
        parts.append(chunk)
    return b"".join(parts)


async def send(stream: ByteStream, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await stream.write(chunk)
    await stream.write_eof()


def text_like(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [b"study", b"series", b"patient", b"report", b"<div>", b"</div>", b"\n", b"image"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def test_offers_zstd() -> None:
    assert offers_zstd({"codec": "zstd", "target": "tcp:x"})
    assert not offers_zstd({"target": "tcp:x"})
    assert not offers_zstd({"codec": "gzip"})


@pytest.mark.parametrize(("a_zstd", "b_zstd"), [(True, True), (False, False), (True, False)])
async def test_round_trip_both_directions(a_zstd: bool, b_zstd: bool) -> None:
    left, right = pipe({"codec": "zstd"})
    learned: list[bool] = []
    a = CodecStream(left, a_zstd)
    b = CodecStream(right, b_zstd, on_peer_marker=learned.append)
    up = [text_like(100_000, 1), os.urandom(50_000), b"x", text_like(300_000, 2)]
    down = [text_like(70_000, 3), b"", text_like(1, 4)]
    async with asyncio.timeout(WAIT):
        _, _, got_up, got_down = await asyncio.gather(
            send(a, up), send(b, down), read_all(b), read_all(a)
        )
    assert got_up == b"".join(up)
    assert got_down == b"".join(down)
    assert learned == [a_zstd]  # called exactly once, with the peer's choice
    assert a.peer_zstd is b_zstd and b.peer_zstd is a_zstd
    assert a.stats.raw_out == b.stats.raw_in == len(b"".join(up))
    assert a.stats.wire_out == b.stats.wire_in
    if a_zstd:
        assert a.stats.wire_out < a.stats.raw_out  # text compresses
    else:
        assert a.stats.wire_out == a.stats.raw_out + 1  # the marker


async def test_marker_is_the_first_byte_of_each_direction() -> None:
    left, right = pipe({"codec": "zstd"})
    a = CodecStream(left, True)
    await a.write(b"hello")
    first = await right.read(1)
    assert first == bytes([MARKER_ZSTD])
    rest = await right.read()
    assert rest.startswith(b"\x28\xb5\x2f\xfd")  # one zstd frame follows
    c = CodecStream(right, False)
    await c.write(b"plain")
    assert await left.read() == bytes([MARKER_RAW]) + b"plain"


async def test_every_write_is_readable_before_the_next() -> None:
    """Flush per write: an interactive protocol never waits for a compressor's buffer."""
    left, right = pipe({"codec": "zstd"})
    a, b = CodecStream(left, True), CodecStream(right, True)
    async with asyncio.timeout(WAIT):
        for i in range(20):
            msg = f"request {i}\r\n".encode()
            await a.write(msg)
            assert await b.read() == msg
            await b.write(b"ok " + msg)
            assert await a.read() == b"ok " + msg


async def test_empty_direction_still_sends_its_marker() -> None:
    left, right = pipe({"codec": "zstd"})
    a, b = CodecStream(left, True), CodecStream(right, False)
    await a.write_eof()
    async with asyncio.timeout(WAIT):
        assert await b.read() == b""
    assert b.peer_zstd is True
    assert await b.read() == b""  # stays at EOF


async def test_send_marker_eagerly() -> None:
    left, right = pipe({"codec": "zstd"})
    learned: list[bool] = []
    a = CodecStream(left, True)
    b = CodecStream(right, False, on_peer_marker=learned.append)
    await a.send_marker()
    reader = asyncio.create_task(b.read())
    await asyncio.sleep(0)
    for _ in range(10):
        if learned:
            break
        await asyncio.sleep(0)
    assert learned == [True]  # known before any data
    await a.write(b"data")
    assert await asyncio.wait_for(reader, WAIT) == b"data"


async def test_incompressible_data_costs_little() -> None:
    left, right = pipe({"codec": "zstd"})
    a, b = CodecStream(left, True), CodecStream(right, False)
    data = os.urandom(1_000_000)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    async with asyncio.timeout(WAIT):
        _, got = await asyncio.gather(send(a, chunks), read_all(b))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    overhead = a.stats.wire_out - a.stats.raw_out
    assert 0 < overhead < 0.01 * len(data)


async def test_read_respects_max_bytes() -> None:
    for a_zstd in (True, False):
        left, right = pipe({"codec": "zstd"})
        a, b = CodecStream(left, a_zstd), CodecStream(right, False)
        data = text_like(200_000)
        writer = asyncio.create_task(send(a, [data]))
        parts = []
        async with asyncio.timeout(WAIT):
            while chunk := await b.read(1000):
                assert len(chunk) <= 1000
                parts.append(chunk)
            await writer
        assert b"".join(parts) == data


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    messages=st.lists(st.binary(max_size=3000), max_size=12),
    repeat=st.integers(1, 200),
    cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=20),
    read_size=st.integers(1, 70000),
    level=st.integers(1, 19),
)
def test_any_cutting_of_the_wire_decodes(
    messages: list[bytes], repeat: int, cuts: list[int], read_size: int, level: int
) -> None:
    """The frame scanner survives any split of the compressed bytes."""
    data_chunks = [m * repeat for m in messages]

    async def scenario() -> None:
        left, right = pipe({"codec": "zstd"})
        captured: list[bytes] = []
        # Capture the wire bytes by running the writer against a second pipe.
        wire_left, wire_right = pipe({"codec": "zstd"})
        capture_writer = CodecStream(wire_left, True, level)

        async def capture() -> None:
            captured.append(await read_all(wire_right))

        await asyncio.gather(send(capture_writer, data_chunks), capture())
        wire = captured[0]
        # Replay the same wire bytes cut at arbitrary places.
        pos, i = 0, 0

        async def replay() -> None:
            nonlocal pos, i
            while pos < len(wire):
                step = cuts[i % len(cuts)]
                await left.write(wire[pos : pos + step])
                pos += step
                i += 1
            await left.write_eof()

        b = CodecStream(right, False)
        _, got = await asyncio.gather(replay(), read_all(b, read_size))
        assert got == b"".join(data_chunks)

    asyncio.run(scenario())


# ------------------------------------------------------------------ hostile input


def frame_header(window_descriptor: int = 0x58) -> bytes:
    """A zstd frame header: magic, descriptor (checksum off), window descriptor."""
    return b"\x28\xb5\x2f\xfd" + bytes([0x00, window_descriptor])


def rle_block(size: int, byte: int = 0, last: bool = False) -> bytes:
    header = (size << 3) | (1 << 1) | int(last)
    return header.to_bytes(3, "little") + bytes([byte])


def bomb(blocks: int) -> bytes:
    """`blocks` RLE blocks of 128 KiB: 4 bytes of input each, 32768:1."""
    body = rle_block(MAX_BLOCK) * (blocks - 1) + rle_block(MAX_BLOCK, last=True)
    return bytes([MARKER_ZSTD]) + frame_header() + body


async def test_bomb_decodes_in_bounded_pieces() -> None:
    """256 MiB from 8 KiB of input: delivered at the reader's pace, never all at once."""
    blocks = 2048
    left, right = pipe({"codec": "zstd"})
    reader = CodecStream(right, False)
    # The reference decoder agrees that this is valid zstd.
    payload = bomb(blocks)[1:]
    assert len(zstd.ZstdDecompressor().decompressobj().decompress(payload[: 6 + 4 * 3])) == (
        3 * MAX_BLOCK
    )

    async def attacker() -> None:
        await left.write(bomb(blocks))
        await left.write_eof()

    task = asyncio.create_task(attacker())
    total, peak = 0, 0
    async with asyncio.timeout(60):
        while chunk := await reader.read(65536):
            assert chunk == bytes(len(chunk))
            total += len(chunk)
            peak = max(peak, reader.buffered)
    await task
    assert total == blocks * MAX_BLOCK
    assert peak <= MAX_PIECE_OUTPUT


async def test_piece_output_beyond_the_limit_resets() -> None:
    left, right = pipe({"codec": "zstd"})
    reader = CodecStream(right, False, piece_output_limit=MAX_BLOCK // 2)
    await left.write(bomb(4))
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(reader.read(), WAIT)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(StreamResetError) as peer:
        await asyncio.wait_for(left.read(), WAIT)
    assert peer.value.code == ErrorCode.LIMIT_EXCEEDED  # the sender learns why


@pytest.mark.parametrize(
    "header",
    [
        frame_header(window_descriptor=(31 - 10) << 3),  # 2 GiB window
        frame_header(window_descriptor=(22 - 10) << 3),  # 4 MiB, just over the limit
        # single segment, 8-byte content size of 1 TiB: the window is the content size
        b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + (1 << 40).to_bytes(8, "little"),
    ],
)
async def test_large_window_is_refused(header: bytes) -> None:
    left, right = pipe({"codec": "zstd"})
    reader = CodecStream(right, False)
    await left.write(bytes([MARKER_ZSTD]) + header + rle_block(10, last=True))
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(reader.read(), WAIT)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


async def test_window_at_the_limit_is_accepted() -> None:
    assert MAX_DECODER_WINDOW == 1 << 21
    left, right = pipe({"codec": "zstd"})
    reader = CodecStream(right, False)
    await left.write(bytes([MARKER_ZSTD]) + frame_header((21 - 10) << 3))
    await left.write(rle_block(10, byte=7, last=True))
    await left.write_eof()
    async with asyncio.timeout(WAIT):
        assert await read_all(reader) == bytes([7]) * 10


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes([7]) + b"junk", ErrorCode.PROTOCOL_ERROR),  # unknown marker
        (bytes([MARKER_ZSTD]) + b"not zstd at all", ErrorCode.PROTOCOL_ERROR),
        (bytes([MARKER_ZSTD]) + frame_header() + b"\x07\x00\x00", ErrorCode.PROTOCOL_ERROR),
        (  # a block header claiming more than 128 KiB
            bytes([MARKER_ZSTD]) + frame_header() + ((MAX_BLOCK + 1) << 3).to_bytes(3, "little"),
            ErrorCode.PROTOCOL_ERROR,
        ),
        (  # data after the end of the frame
            bytes([MARKER_ZSTD]) + frame_header() + rle_block(5, last=True) + b"more",
            ErrorCode.PROTOCOL_ERROR,
        ),
        (  # a compressed block of garbage
            bytes([MARKER_ZSTD])
            + frame_header()
            + ((8 << 3) | (2 << 1) | 1).to_bytes(3, "little")
            + b"\xff" * 8,
            ErrorCode.PROTOCOL_ERROR,
        ),
    ],
)
async def test_malformed_input_resets(wire: bytes, code: ErrorCode) -> None:
    left, right = pipe({"codec": "zstd"})
    reader = CodecStream(right, False)
    await left.write(wire)
    await left.write_eof()
    with pytest.raises(StreamResetError) as info:
        async with asyncio.timeout(WAIT):
            await read_all(reader)
    assert info.value.code == code


async def test_truncated_frame_is_not_reported_complete() -> None:
    left, right = pipe({"codec": "zstd"})
    writer = CodecStream(left, True)
    reader = CodecStream(right, False)
    await writer.write(b"complete-looking message")
    await left.write_eof()  # EOF without the frame's end (and checksum)
    assert await asyncio.wait_for(reader.read(), WAIT) == b"complete-looking message"
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(reader.read(), WAIT)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


async def test_corrupted_payload_fails_the_checksum() -> None:
    left, right = pipe({"codec": "zstd"})
    wire_left, wire_right = pipe({"codec": "zstd"})
    writer = CodecStream(wire_left, True)
    data = os.urandom(1000)  # stored as a raw block, so a flipped byte is only caught by xxh64
    await send(writer, [data])
    wire = bytearray(await read_all(wire_right))
    wire[20] ^= 0xFF
    await left.write(bytes(wire))
    await left.write_eof()
    reader = CodecStream(right, False)
    with pytest.raises(StreamResetError) as info:
        async with asyncio.timeout(WAIT):
            await read_all(reader)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


async def test_write_after_eof_and_reset() -> None:
    left, right = pipe({"codec": "zstd"})
    a = CodecStream(left, True)
    await a.write_eof()
    with pytest.raises(StreamResetError):
        await a.write(b"late")
    b = CodecStream(right, False)
    b.reset(ErrorCode.CANCEL)
    with pytest.raises(StreamResetError):
        await b.read()
    assert b.buffered == 0
