"""relay_pacs_move_receiver_refused_total: what the agent's C-MOVE storage SCP turned
away, read from a real receiver (relay.dicom.intake.MoveReceiver) at scrape time."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry

from relay.agent.move_metrics import MoveReceiverMetrics
from relay.dicom import status as st
from relay.dicom.intake import MoveReceiver, MoveSenders
from tests.dicom.test_intake import MOVE_AE, OTHER, PACS_AE, store

NAME = "relay_pacs_move_receiver_refused_total"


def test_refused_stores_and_strangers_are_counted_by_kind() -> None:
    receiver = MoveReceiver(
        MOVE_AE, ("127.0.0.1", 0), timeout=5, senders=MoveSenders(["127.0.0.1"], [PACS_AE])
    )
    registry = CollectorRegistry()
    registry.register(MoveReceiverMetrics(receiver.counts))
    receiver.start()
    try:
        assert registry.get_sample_value(NAME, {"kind": "store"}) == 0
        for _ in range(2):  # from the PACS, but for no C-MOVE of ours
            assert store(receiver.port, OTHER) == st.STORE_NOT_AUTHORIZED
        with socket.create_connection(
            ("127.0.0.1", receiver.port), timeout=5, source_address=("127.0.0.2", 0)
        ) as conn:
            assert conn.recv(1) == b""  # not the PACS's host: closed unread
    finally:
        receiver.stop()
    assert registry.get_sample_value(NAME, {"kind": "store"}) == 2
    assert registry.get_sample_value(NAME, {"kind": "stranger"}) == 1
    assert registry.get_sample_value(NAME, {"kind": "oversized"}) == 0
