"""Two cores against each other under any interleaving (Hypothesis stateful testing).

The machine plays both applications: it opens streams from both sides, writes chunks of
any size up to the credit, half-closes, resets, acknowledges arbitrary amounts, sends
control messages, advances the clock (pings), and delivers arbitrary prefixes of each
direction's pending bytes, so frames are cut anywhere. After every step it checks:

* bytes arrive in order and exactly once: what a side received on a stream is always a
  prefix of what the other side sent; StreamEnded comes only after all of it;
* the core's notion of which streams are open matches the applications' view;
* `send_credit()` equals the credit computed by the harness's `CreditModel` from the
  frames on the wire alone, and no DATA ever exceeds that model (checked on emission);
* no unexpected event: no ConnectionTerminated, no reset the peer did not ask for.

At the end everything is delivered and read, every stream is closed, and streams that
were not reset carried exactly what was sent. Then a probe stream per direction forces
out the receiver's batched link credit, and the sender's link credit, per the wire
model, must be back to the full link window: nothing was lost to streams that closed or
were reset with data unread.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relay.proto.errors import ErrorCode, FlowControlError, StreamStateError
from relay.proto.events import (
    ControlReceived,
    CreditAvailable,
    DataReceived,
    Event,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from relay.proto.mux import LinkSettings
from tests.proto.harness import CLIENT, SERVER, Link

# Small, unequal windows so that credit runs out often and a mix-up of the two
# directions' numbers shows. Keepalive pings happen; the timeout never does.
CLIENT_SETTINGS = LinkSettings(
    stream_window=64 * 1024,
    link_window=128 * 1024,
    max_frame=16 * 1024,
    max_streams=2,
    keepalive_interval=5.0,
    keepalive_timeout=1e9,
)
SERVER_SETTINGS = LinkSettings(
    stream_window=80 * 1024,
    link_window=256 * 1024,
    max_frame=20 * 1024,
    max_streams=4,
    keepalive_interval=5.0,
    keepalive_timeout=1e9,
)
PATTERN = random.Random(20240601).randbytes(1 << 20)
MAX_CHUNK = 96 * 1024
RESET_CODES = st.sampled_from(
    [ErrorCode.CANCEL, ErrorCode.CONNECT_FAILED, ErrorCode.NO_ERROR, 0xFFFFFFFF, 0x1234]
)
SIDE = st.sampled_from([CLIENT, SERVER])


@dataclass
class StreamRecord:
    """Both applications' view of one stream. Lists are indexed by side."""

    sid: int
    opener: int
    headers: dict[str, str]
    known: list[bool] = field(default_factory=lambda: [False, False])
    sent: list[bytearray] = field(default_factory=lambda: [bytearray(), bytearray()])
    received: list[bytearray] = field(default_factory=lambda: [bytearray(), bytearray()])
    fin_sent: list[bool] = field(default_factory=lambda: [False, False])
    ended: list[bool] = field(default_factory=lambda: [False, False])
    gone: list[bool] = field(default_factory=lambda: [False, False])
    reset_code: list[int | None] = field(default_factory=lambda: [None, None])
    refused: bool = False
    unread: list[int] = field(default_factory=lambda: [0, 0])

    def sendable(self, side: int) -> bool:
        return self.known[side] and not self.fin_sent[side] and not self.gone[side]

    def open_in_core(self, side: int) -> bool:
        """Whether the core of `side` should still hold the stream."""
        closed_both_ways = self.fin_sent[side] and self.ended[side]
        return self.known[side] and not self.gone[side] and not closed_both_ways

    @property
    def was_reset(self) -> bool:
        return self.refused or any(code is not None for code in self.reset_code)


class TwoCores(RuleBasedStateMachine):
    """Two applications driving a client and a server core over in-memory pipes."""

    def __init__(self) -> None:
        super().__init__()
        self.link = Link(CLIENT_SETTINGS, SERVER_SETTINGS, keep_frames=False)
        self.streams: dict[int, StreamRecord] = {}
        self.controls: tuple[deque[tuple[str, bytes]], deque[tuple[str, bytes]]] = (
            deque(),
            deque(),
        )
        self.pongs = [0, 0]

    # ------------------------------------------------------------------ helpers

    def _on_events(self, side: int, events: list[Event]) -> None:
        """Check what `side`'s application is told against what the other side did."""
        peer = 1 - side
        for event in events:
            match event:
                case StreamOpened(stream_id=sid, headers=headers):
                    record = self.streams[sid]
                    assert record.opener == peer and not record.known[side], event
                    assert dict(headers) == record.headers
                    record.known[side] = True
                case DataReceived(stream_id=sid, data=data):
                    record = self.streams[sid]
                    assert record.known[side] and not record.gone[side], event
                    assert not record.ended[side], "data after StreamEnded"
                    assert data, "empty DataReceived"
                    got = record.received[side]
                    start = len(got)
                    got += data
                    assert record.sent[peer][start : len(got)] == data, "out of order or dup"
                    record.unread[side] += len(data)
                case StreamEnded(stream_id=sid):
                    record = self.streams[sid]
                    assert record.known[side] and not record.gone[side], event
                    assert not record.ended[side], "StreamEnded twice"
                    assert record.fin_sent[peer], "StreamEnded the peer never sent"
                    assert record.received[side] == record.sent[peer], "ended early"
                    record.ended[side] = True
                case StreamReset(stream_id=sid, code=code, remote=remote):
                    record = self.streams[sid]
                    assert remote, f"the core detected an error: {event}"
                    assert record.known[side] and not record.gone[side], event
                    if record.reset_code[peer] is not None:
                        assert code == record.reset_code[peer], event
                    else:  # opened before the peer's SETTINGS said how many it takes
                        assert code == ErrorCode.REFUSED_STREAM, event
                        assert record.opener == side and not record.known[peer], event
                        record.refused = True
                    record.gone[side] = True
                    record.unread[side] = 0  # discarded: the core returns the credit
                case ControlReceived(kind=kind, body=body):
                    assert self.controls[peer].popleft() == (kind, body)
                case PongReceived(rtt=rtt):
                    assert rtt >= 0
                    self.pongs[side] += 1
                case CreditAvailable(stream_id=sid):
                    assert sid == 0 or sid in self.streams
                case _:
                    raise AssertionError(f"unexpected event on side {side}: {event}")

    def _streams_of(self, side: int, *, sendable: bool = False) -> list[int]:
        return sorted(
            sid
            for sid, r in self.streams.items()
            if (r.sendable(side) if sendable else r.known[side])
        )

    def _payload(self, side: int, record: StreamRecord, size: int) -> bytes:
        start = (record.sid * 7919 + side * 104729 + len(record.sent[side])) % (
            len(PATTERN) - MAX_CHUNK
        )
        return PATTERN[start : start + size]

    def _send(self, side: int, sid: int, size: int, fin: bool) -> None:
        record = self.streams[sid]
        payload = self._payload(side, record, size)
        self.link.conns[side].send_data(sid, payload, end_stream=fin)
        record.sent[side] += payload
        record.fin_sent[side] = fin
        self.link.flush()

    def _open(self, side: int, headers: dict[str, str]) -> int:
        sid = self.link.conns[side].open_stream(headers)
        assert sid % 2 == (1 if side == CLIENT else 0)
        assert sid not in self.streams
        record = StreamRecord(sid, side, dict(headers))
        record.known[side] = True
        self.streams[sid] = record
        self.link.flush()
        return sid

    def _deliver(self, side: int, size: int | None = None) -> None:
        self._on_events(1 - side, self.link.deliver(side, size))

    def _read_everything(self, side: int) -> None:
        for sid in self._streams_of(side):
            record = self.streams[sid]
            if record.unread[side]:
                self.link.conns[side].acknowledge_received_data(sid, record.unread[side])
                record.unread[side] = 0
        self.link.flush()

    # ------------------------------------------------------------------ rules

    @initialize(deliver_settings=st.booleans())
    def start(self, deliver_settings: bool) -> None:
        """Either side may act before the peer's SETTINGS arrive, or after."""
        if deliver_settings:
            self._deliver(CLIENT)
            self._deliver(SERVER)

    @rule(
        side=SIDE,
        headers=st.dictionaries(st.sampled_from(["t", "codec", "x-y"]), st.text()),
        count=st.integers(1, 4),
    )
    def open_streams(self, side: int, headers: dict[str, str], count: int) -> None:
        """Open a few at once: before the peer's SETTINGS, some may be refused."""
        conn = self.link.conns[side]
        for _ in range(count):
            if conn.can_open_stream():
                self._open(side, headers)
                continue
            try:
                conn.open_stream(headers)
            except StreamStateError:
                pass
            else:
                raise AssertionError("open_stream beyond can_open_stream()")

    @rule(side=SIDE, data=st.data(), fin=st.booleans())
    def send_data(self, side: int, data: st.DataObject, fin: bool) -> None:
        candidates = self._streams_of(side, sendable=True)
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates), label="stream")
        credit = self.link.conns[side].send_credit(sid)
        size = data.draw(st.integers(0, min(credit, MAX_CHUNK)), label="size")
        self._send(side, sid, size, fin)

    @rule(side=SIDE, data=st.data())
    def send_beyond_credit(self, side: int, data: st.DataObject) -> None:
        candidates = self._streams_of(side, sendable=True)
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates), label="stream")
        conn = self.link.conns[side]
        credit = conn.send_credit(sid)
        if credit >= len(PATTERN):
            return
        try:
            conn.send_data(sid, PATTERN[: credit + 1])
        except FlowControlError:
            pass
        else:
            raise AssertionError("send_data beyond send_credit() was accepted")
        assert conn.data_to_send() == b""
        assert conn.send_credit(sid) == credit

    @rule(side=SIDE, data=st.data())
    def end_stream(self, side: int, data: st.DataObject) -> None:
        candidates = self._streams_of(side, sendable=True)
        if candidates:
            self._send(side, data.draw(st.sampled_from(candidates), label="stream"), 0, True)

    @rule(side=SIDE, data=st.data(), code=RESET_CODES)
    def reset_stream(self, side: int, data: st.DataObject, code: int) -> None:
        # Only streams still open in the core: resetting one closed both ways loses its
        # unread credit (see test_mux.test_reset_after_graceful_close_returns_...).
        candidates = [s for s in self._streams_of(side) if self.streams[s].open_in_core(side)]
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates), label="stream")
        record = self.streams[sid]
        self.link.conns[side].reset_stream(sid, code)
        record.gone[side] = True
        record.reset_code[side] = code
        record.unread[side] = 0
        self.link.flush()

    @rule(side=SIDE, data=st.data())
    def acknowledge(self, side: int, data: st.DataObject) -> None:
        """Read any amount, even more than buffered or on closed and reset streams."""
        candidates = self._streams_of(side)
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates), label="stream")
        record = self.streams[sid]
        amount = data.draw(st.integers(0, record.unread[side] + 100), label="amount")
        self.link.conns[side].acknowledge_received_data(sid, amount)
        if not record.gone[side]:
            record.unread[side] -= min(amount, record.unread[side])
        self.link.flush()

    @rule(side=SIDE, data=st.data())
    def deliver(self, side: int, data: st.DataObject) -> None:
        """Deliver a prefix of what is in flight, cut anywhere, even mid-header."""
        pending = self.link.pending(side)
        self._deliver(side, data.draw(st.integers(0, pending), label="bytes"))

    @rule(side=SIDE)
    def deliver_all(self, side: int) -> None:
        self._deliver(side)

    @rule(dt=st.floats(0.0, 8.0))
    def tick(self, dt: float) -> None:
        events = self.link.tick(dt)
        for side in (CLIENT, SERVER):
            self._on_events(side, events[side])

    @rule(
        side=SIDE,
        kind=st.sampled_from(["revoke", "renew", "enroll.v2"]),
        body=st.binary(max_size=64),
    )
    def control(self, side: int, kind: str, body: bytes) -> None:
        self.link.conns[side].send_control(kind, body)
        self.controls[side].append((kind, body))
        self.link.flush()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def core_agrees_with_the_applications(self) -> None:
        for side, conn in enumerate(self.link.conns):
            assert conn.terminated is None, conn.terminated
            expected_open = 0
            for sid, record in self.streams.items():
                should = record.open_in_core(side)
                assert conn.is_open(sid) == should, (side, sid, record)
                expected_open += should
            assert conn.open_streams == expected_open

    @invariant()
    def send_credit_matches_the_wire(self) -> None:
        for side, conn in enumerate(self.link.conns):
            for sid in self._streams_of(side, sendable=True):
                assert conn.send_credit(sid) == self.link.expected_send_credit(side, sid), (
                    side,
                    sid,
                )

    # ------------------------------------------------------------------ the end

    def _quiesce(self) -> None:
        """Deliver everything, read everything, close every stream; until nothing moves."""
        for _ in range(200):
            for side in (CLIENT, SERVER):
                self._read_everything(side)
                for sid in self._streams_of(side, sendable=True):
                    self._send(side, sid, 0, True)
            if not self.link.pending(CLIENT) and not self.link.pending(SERVER):
                return
            for side in (CLIENT, SERVER):
                self._deliver(side)
        raise AssertionError("the link never went quiet")

    def teardown(self) -> None:
        self._quiesce()
        self.core_agrees_with_the_applications()
        for side in (CLIENT, SERVER):
            assert not self.controls[side], "control message lost"
            assert self.link.conns[side].open_streams == 0
        for record in self.streams.values():
            for side in (CLIENT, SERVER):
                peer = 1 - side
                if record.was_reset:
                    assert record.sent[peer].startswith(record.received[side])
                else:
                    assert record.received[side] == record.sent[peer], record.sid
                    assert record.ended[side] and record.fin_sent[peer]
        for sender in (CLIENT, SERVER):
            self._probe_link_credit(sender)

    def _probe_link_credit(self, sender: int) -> None:
        """Push the receiver's batched link credit out, then expect the full window."""
        receiver = 1 - sender
        window = self.link.conns[receiver].settings.link_window
        assert self.link.credit[sender].link_credit() > window - window // 4
        sid = self._open(sender, {"t": "probe"})
        self._send(sender, sid, window // 4, True)
        self._quiesce()
        assert self.link.credit[sender].link_credit() == window, (
            f"side {sender} lost {window - self.link.credit[sender].link_credit()} bytes "
            "of link credit"
        )


TwoCores.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_two_cores = TwoCores.TestCase
