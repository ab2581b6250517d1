"""Two `Connection`s wired together in memory, with an independent model of the credit.

The tests must not trust the core's own counters, so every byte a side emits is decoded
here with `FrameDecoder` and checked against a `CreditModel` built only from frames on
the wire: the receiver's SETTINGS and WINDOW_UPDATEs as *delivered* to the sender, and
the DATA the sender emitted. Delivery is explicit (`deliver(side, n)` moves a prefix of
the pending bytes), so tests choose how the byte streams are split and interleaved.

Sides are numbered: 0 is the client (dialled, odd stream ids), 1 the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.proto import frames as fr
from relay.proto.errors import ErrorCode, ProtocolError
from relay.proto.events import ConnectionTerminated, Event
from relay.proto.frames import Flags, Frame, FrameType, Setting
from relay.proto.mux import Connection, LinkSettings

CLIENT = 0
SERVER = 1


class ModelViolation(AssertionError):
    """A side broke the protocol as seen on the wire (credit, frame size, well-formedness)."""


@dataclass
class CreditModel:
    """Credit of one direction (sender -> receiver), from decoded wire frames only.

    Before the receiver's SETTINGS reach the sender, the sender may assume the protocol
    defaults; afterwards the announced windows. Grants count only once delivered.
    """

    stream_window: int = fr.DEFAULT_STREAM_WINDOW
    link_window: int = fr.DEFAULT_LINK_WINDOW
    max_frame: int = fr.DEFAULT_MAX_FRAME
    settings_seen: bool = False
    stream_grants: dict[int, int] = field(default_factory=dict)
    stream_spent: dict[int, int] = field(default_factory=dict)
    link_grants: int = 0
    link_spent: int = 0
    data_frames: int = 0
    # Extra window the receiver gave a stream on purpose (Connection.grow_window): the
    # test that grows a stream says so here, and the over-grant check allows that much.
    stream_extra: dict[int, int] = field(default_factory=dict)

    def stream_credit(self, stream_id: int) -> int:
        return (
            self.stream_window
            + self.stream_grants.get(stream_id, 0)
            - self.stream_spent.get(stream_id, 0)
        )

    def link_credit(self) -> int:
        return self.link_window + self.link_grants - self.link_spent

    def on_sent(self, frame: Frame) -> None:
        """A frame the sender emitted: it must fit what the sender knew at that moment."""
        if len(frame.payload) > self.max_frame:
            raise ModelViolation(
                f"frame type {frame.type} of {len(frame.payload)} bytes exceeds the "
                f"receiver's max_frame {self.max_frame}"
            )
        if frame.type != FrameType.DATA:
            return
        size = len(frame.payload)
        self.data_frames += 1
        sid = frame.stream_id
        self.stream_spent[sid] = self.stream_spent.get(sid, 0) + size
        self.link_spent += size
        if self.stream_credit(sid) < 0:
            raise ModelViolation(f"stream {sid}: sent {-self.stream_credit(sid)} beyond credit")
        if self.link_credit() < 0:
            raise ModelViolation(f"link: sent {-self.link_credit()} bytes beyond credit")

    def on_delivered_to_sender(self, frame: Frame) -> None:
        """A frame from the receiver reached the sender: settings and grants now count."""
        if frame.type == FrameType.SETTINGS:
            values = fr.decode_settings(frame.payload)
            self.stream_window = values.get(Setting.STREAM_WINDOW, fr.DEFAULT_STREAM_WINDOW)
            self.link_window = values.get(Setting.LINK_WINDOW, fr.DEFAULT_LINK_WINDOW)
            self.max_frame = values.get(Setting.MAX_FRAME, fr.DEFAULT_MAX_FRAME)
            self.settings_seen = True
        elif frame.type == FrameType.WINDOW_UPDATE:
            increment = fr.decode_u32(frame.payload, "WINDOW_UPDATE")
            if frame.stream_id == 0:
                self.link_grants += increment
                if self.link_credit() > self.link_window:
                    raise ModelViolation(
                        f"link over-granted: credit {self.link_credit()} > {self.link_window}"
                    )
            else:
                sid = frame.stream_id
                self.stream_grants[sid] = self.stream_grants.get(sid, 0) + increment
                allowed = self.stream_window + self.stream_extra.get(sid, 0)
                if self.stream_credit(sid) > allowed:
                    raise ModelViolation(
                        f"stream {sid} over-granted: credit {self.stream_credit(sid)} > {allowed}"
                    )


@dataclass
class Pipe:
    """Bytes one side emitted and the other has not received yet."""

    pending: bytearray = field(default_factory=bytearray)
    emitted: list[Frame] = field(default_factory=list)
    emit_decoder: fr.FrameDecoder = field(default_factory=lambda: fr.FrameDecoder(fr.MAX_MAX_FRAME))
    deliver_decoder: fr.FrameDecoder = field(
        default_factory=lambda: fr.FrameDecoder(fr.MAX_MAX_FRAME)
    )


class Link:
    """A client and a server `Connection` joined by two in-memory pipes.

    Every output is flushed into its pipe after each call made through the link, and
    checked against the credit model at that moment. Events are returned to the caller.
    """

    def __init__(
        self,
        client: LinkSettings | None = None,
        server: LinkSettings | None = None,
        *,
        now: float = 0.0,
        keep_frames: bool = True,
    ) -> None:
        self.now = now
        self.keep_frames = keep_frames
        self.conns = (
            Connection(client=True, settings=client, now=now),
            Connection(client=False, settings=server, now=now),
        )
        self.pipes = (Pipe(), Pipe())  # pipes[i] carries side i's bytes to side 1 - i
        self.credit = (CreditModel(), CreditModel())  # credit[i]: direction i -> 1 - i
        self.flush()

    @property
    def client(self) -> Connection:
        return self.conns[CLIENT]

    @property
    def server(self) -> Connection:
        return self.conns[SERVER]

    def pending(self, side: int) -> int:
        """Bytes emitted by `side` that the other side has not received yet."""
        return len(self.pipes[side].pending)

    def flush(self) -> None:
        """Move both sides' output into their pipes, checking it against the model."""
        for side, conn in enumerate(self.conns):
            out = conn.data_to_send()
            if out:
                self._emit(side, out)

    def _emit(self, side: int, data: bytes) -> None:
        pipe = self.pipes[side]
        pipe.pending += data
        try:
            frames = list(pipe.emit_decoder.feed(data))
        except ProtocolError as exc:
            raise ModelViolation(f"side {side} emitted an undecodable frame: {exc}") from exc
        for frame in frames:
            self.credit[side].on_sent(frame)
            if self.keep_frames:
                pipe.emitted.append(frame)

    def deliver(self, side: int, size: int | None = None) -> list[Event]:
        """Deliver the first `size` pending bytes from `side` (all if None) to its peer."""
        pipe = self.pipes[side]
        if size is None:
            size = len(pipe.pending)
        chunk = bytes(pipe.pending[:size])
        del pipe.pending[:size]
        for frame in pipe.deliver_decoder.feed(chunk):
            self.credit[1 - side].on_delivered_to_sender(frame)
        events = self.conns[1 - side].receive_data(chunk, self.now)
        self.flush()
        return events

    def exchange(self, rounds: int = 100) -> tuple[list[Event], list[Event]]:
        """Deliver everything both ways until both pipes are empty. Events per side."""
        got: tuple[list[Event], list[Event]] = ([], [])
        for _ in range(rounds):
            if not self.pending(CLIENT) and not self.pending(SERVER):
                return got
            for side in (CLIENT, SERVER):
                if self.pending(side):
                    got[1 - side].extend(self.deliver(side))
        raise AssertionError("the two sides never went quiet")

    def tick(self, dt: float) -> tuple[list[Event], list[Event]]:
        """Advance the clock and call handle_timer on both sides."""
        self.now += dt
        events = (self.client.handle_timer(self.now), self.server.handle_timer(self.now))
        self.flush()
        return events

    def sent_frames(self, side: int, ftype: int | None = None) -> list[Frame]:
        """Frames emitted by `side` so far (of one type if given)."""
        return [f for f in self.pipes[side].emitted if ftype is None or f.type == ftype]

    def expected_send_credit(self, side: int, stream_id: int) -> int:
        """What the model says `side` may send on the stream right now."""
        model = self.credit[side]
        return min(model.stream_credit(stream_id), model.link_credit())


# ---------------------------------------------------------------------- raw frames


def settings(**values: int) -> bytes:
    """A SETTINGS frame; keys are Setting names in lower case (stream_window=...)."""
    return fr.encode_settings({Setting[k.upper()]: v for k, v in values.items()})


def data(stream_id: int, payload: bytes, *, fin: bool = False) -> bytes:
    return fr.encode(FrameType.DATA, Flags.FIN if fin else 0, stream_id, payload)


def open_frame(stream_id: int, headers: Mapping[str, str] | None = None) -> bytes:
    return fr.encode(FrameType.OPEN, 0, stream_id, fr.encode_headers(headers or {"t": "x"}))


def window_update(stream_id: int, increment: int) -> bytes:
    return fr.encode_u32(FrameType.WINDOW_UPDATE, stream_id, increment)


def reset(stream_id: int, code: int) -> bytes:
    return fr.encode_u32(FrameType.RESET, stream_id, code)


def ping(payload: bytes = b"\0" * 8, *, ack: bool = False) -> bytes:
    return fr.encode(FrameType.PING, Flags.ACK if ack else 0, 0, payload)


def raw_peer(
    *, client: bool = False, local: LinkSettings | None = None, peer_settings: bytes | None = None
) -> Connection:
    """A Connection that has already received the peer's SETTINGS (defaults if None)."""
    conn = Connection(client=client, settings=local, now=0.0)
    events = conn.receive_data(settings() if peer_settings is None else peer_settings, 0.0)
    assert events == [], events
    conn.data_to_send()
    return conn


def terminated(events: list[Event]) -> ConnectionTerminated | None:
    """The ConnectionTerminated event, which must be the last one, or None."""
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(ends) <= 1, events
    if ends:
        assert events[-1] is ends[0], events
        return ends[0]
    return None


def assert_terminated(conn: Connection, events: list[Event], code: ErrorCode) -> None:
    """The link closed locally with `code`, and told the peer so in a GOAWAY."""
    end = terminated(events)
    assert end is not None, f"expected termination with {code.name}, got {events}"
    assert (end.code, end.remote) == (code, False), end
    assert conn.terminated == end
    frames = list(fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(conn.data_to_send()))
    goaways = [fr.decode_goaway(f.payload) for f in frames if f.type == FrameType.GOAWAY]
    assert [g[1] for g in goaways] == [code], frames


def decode_all(data: bytes) -> list[Frame]:
    """Every frame in `data`, which must be exactly a sequence of whole frames."""
    decoder = fr.FrameDecoder(fr.MAX_MAX_FRAME)
    frames = list(decoder.feed(data))
    assert decoder.buffered == 0
    return frames
