"""Fuzz target for the frame decoder and `Connection.receive_data`.

Run with atheris (not a project dependency; ``pip install atheris`` first)::

    .venv/bin/python tests/fuzz/fuzz_frames.py -max_total_time=300 [corpus_dir]

Without atheris, pass files to replay them (e.g. a crash file atheris wrote)::

    .venv/bin/python tests/fuzz/fuzz_frames.py crash-1234...

The same `check_input` runs under Hypothesis in tests/proto/test_fuzz_decoder.py, so
`make test` exercises it on every run.

Input layout: byte 0 picks the mode (decoder alone; a core fed raw bytes; a core fed
a valid SETTINGS first; client or server), byte 1 the chunk size for the split
comparison, and the rest is what the peer sends.
"""

from __future__ import annotations

import sys
from pathlib import Path

from relay.proto import frames as fr
from relay.proto.errors import ProtocolError
from relay.proto.events import ConnectionTerminated, Event
from relay.proto.mux import Connection, LinkSettings

SETTINGS = LinkSettings(
    stream_window=64 * 1024, link_window=128 * 1024, max_frame=fr.MIN_MAX_FRAME, max_streams=8
)
PEER_SETTINGS = fr.encode_settings({})


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def _decode(data: bytes, size: int) -> tuple[list[fr.Frame], int | None, int]:
    """Frames, error code (None if none) and bytes left buffered, feeding `size` at a time."""
    decoder = fr.FrameDecoder(fr.MIN_MAX_FRAME)
    frames: list[fr.Frame] = []
    try:
        for chunk in _chunks(data, size):
            frames.extend(decoder.feed(chunk))
    except ProtocolError as exc:
        return frames, exc.code, decoder.buffered
    return frames, None, decoder.buffered


def check_decoder(data: bytes, size: int) -> None:
    """Only ProtocolError; same frames whatever the split; frames re-encode to the input."""
    whole = _decode(data, max(1, len(data)))
    assert _decode(data, size)[:2] == whole[:2]
    frames, error, buffered = whole
    encoded = b"".join(fr.encode(f.type, f.flags, f.stream_id, f.payload) for f in frames)
    assert data.startswith(encoded)
    assert all(len(f.payload) <= fr.MIN_MAX_FRAME for f in frames)
    if error is None:
        assert buffered == len(data) - len(encoded)
        assert buffered < fr.HEADER_SIZE + fr.MIN_MAX_FRAME


def _run_core(
    data: bytes, size: int, *, client: bool, prefix: bytes
) -> tuple[list[Event], bytes, Connection]:
    conn = Connection(client=client, settings=SETTINGS, now=0.0)
    events: list[Event] = []
    out = [conn.data_to_send()]
    if prefix:
        assert conn.receive_data(prefix, 0.0) == []
    for chunk in _chunks(data, size):
        got = conn.receive_data(chunk, 1.0)
        assert isinstance(got, list) and all(isinstance(e, Event) for e in got)
        if events and isinstance(events[-1], ConnectionTerminated):
            assert got == [], "events after ConnectionTerminated"
        events.extend(got)
        out.append(conn.data_to_send())
    return events, b"".join(out), conn


def check_core(data: bytes, size: int, *, client: bool, prefix: bytes) -> None:
    """Never raises; terminates at most once, last; same events and bytes whatever the split;
    its own output is always well-formed frames that a default peer accepts."""
    events, out, conn = _run_core(data, size, client=client, prefix=prefix)
    whole_events, whole_out, _ = _run_core(data, max(1, len(data)), client=client, prefix=prefix)
    assert events == whole_events
    assert out == whole_out
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(ends) <= 1 and (not ends or events[-1] is ends[0])
    assert (conn.terminated is not None) == bool(ends)
    decoder = fr.FrameDecoder(fr.MIN_MAX_FRAME)
    frames = list(decoder.feed(out))
    assert decoder.buffered == 0 and frames[0].type == fr.FrameType.SETTINGS
    # The application side must be safe to use whatever came in.
    for sid in range(1, 12):
        if conn.is_open(sid):
            conn.acknowledge_received_data(sid, 1 << 20)
            credit = conn.send_credit(sid)
            if credit:
                conn.send_data(sid, b"x" * min(credit, 100), end_stream=True)
    conn.handle_timer(1e6)
    conn.receive_eof()
    assert conn.terminated is not None
    list(fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(conn.data_to_send()))


def check_input(data: bytes) -> None:
    """The fuzz target: raises (AssertionError or anything uncaught) only on a bug."""
    mode = data[0] % 5 if data else 0
    size = 1 + (data[1] if len(data) > 1 else 0) % 32
    body = data[2:]
    if mode == 0:
        check_decoder(body, size)
    else:
        check_core(
            body,
            size,
            client=mode % 2 == 1,
            prefix=PEER_SETTINGS if mode >= 3 else b"",
        )


def test_one_input(data: bytes) -> None:
    check_input(data)


def main() -> int:
    try:
        import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        paths = [Path(p) for p in sys.argv[1:] if not p.startswith("-")]
        if not paths:
            print("atheris is not installed: pip install atheris, or pass files to replay")
            return 2
        for path in paths:
            check_input(path.read_bytes())
            print(f"{path}: ok")
        return 0
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
