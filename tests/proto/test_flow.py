"""Send and receive windows (relay.proto.flow): spending, granting, batching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.proto.flow import ReceiveWindow, SendWindow
from relay.proto.frames import MAX_WINDOW


def test_send_window_refuses_to_go_negative() -> None:
    window = SendWindow(10)
    window.spend(10)
    assert window.credit == 0
    with pytest.raises(ValueError):
        window.spend(1)
    assert window.credit == 0


def test_send_window_refuses_overflow_and_keeps_its_credit() -> None:
    window = SendWindow(MAX_WINDOW - 5)
    assert window.grant(5)
    assert window.credit == MAX_WINDOW
    assert not window.grant(1)
    assert window.credit == MAX_WINDOW


def test_receive_window_refuses_more_than_available() -> None:
    window = ReceiveWindow.of(100)
    assert window.receive(60)
    assert not window.receive(41)
    assert window.available == 40
    assert window.receive(40)


def test_consume_batches_until_a_quarter_of_the_window() -> None:
    """Few WINDOW_UPDATEs: credit comes back once a quarter of the window is consumed."""
    window = ReceiveWindow.of(1000)
    assert window.receive(1000)
    assert window.consume(249) == 0
    assert window.available == 0
    assert window.consume(1) == 250
    assert (window.available, window.pending) == (250, 0)
    assert window.consume(10) == 0
    assert window.flush() == 10
    assert window.available == 260


@given(st.integers(1, 10_000), st.lists(st.tuples(st.booleans(), st.integers(0, 5000))))
def test_receive_window_conserves_credit(size: int, ops: list[tuple[bool, int]]) -> None:
    """available + unconsumed + pending always equals the window: nothing lost or made."""
    window = ReceiveWindow.of(size)
    unconsumed = 0
    for is_receive, amount in ops:
        before = window.available
        if is_receive:
            accepted = window.receive(amount)
            assert accepted == (amount <= before)
            if accepted:
                unconsumed += amount
            else:
                assert window.available == before
        else:
            n = min(amount, unconsumed)
            unconsumed -= n
            granted = window.consume(n)
            assert window.available == before + granted
        assert window.available + unconsumed + window.pending == size
        assert 0 <= window.pending < max(1, size // 4)
