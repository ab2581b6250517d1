"""Altered, dropped, replayed or reordered records fail the session: never altered data."""

from __future__ import annotations

import pytest

from relay.seal.core import PlaintextReceived, SessionFailed

from .helpers import Pkis, duplex, make_pkis
from .records import ATTACKS, RecordCutter, RecordTamper


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> Pkis:
    return make_pkis(tmp_path_factory.mktemp("seal-pki"))


MESSAGES = [bytes([i]) * 3000 for i in range(1, 9)]


@pytest.mark.parametrize("direction", ["to_server", "to_client"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_tampering_fails_the_session_and_delivers_only_a_true_prefix(
    pkis: Pkis, attack: str, direction: str
) -> None:
    d = duplex(pkis)
    d.run()
    tamper = RecordTamper(attack, skip=2 if direction == "to_server" else 3)
    setattr(d, direction, lambda b: [t for t in [tamper(b)] if t])
    sender, events = (
        (d.client, d.server_events) if direction == "to_server" else (d.server, d.client_events)
    )
    for m in MESSAGES:
        if sender.state != "open":  # the receiver's alert reached the sender
            break
        sender.send(m)
        d.run()
    assert tamper.done
    failures = [e for e in events if isinstance(e, SessionFailed)]
    assert [f.reason for f in failures] == ["integrity"], events[-3:]
    received = b"".join(e.data for e in events if isinstance(e, PlaintextReceived))
    sent = b"".join(MESSAGES)
    assert sent.startswith(received) and len(received) < len(sent)


def test_record_cutter_keeps_partial_records() -> None:
    cutter = RecordCutter()
    record = bytes([23, 3, 3, 0, 3]) + b"abc"
    assert cutter.feed(record[:4]) == []
    assert cutter.feed(record[4:] + record[:1]) == [record]
    assert cutter.feed(record[1:]) == [record]
