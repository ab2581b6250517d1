"""The two UID checks: what the relay carries, and what it chooses to act on."""

from __future__ import annotations

import pytest

from relay.dicom.uids import MAX_UID, is_conformant_uid, is_uid


@pytest.mark.parametrize(
    ("value", "carried", "conformant"),
    [
        ("1.2.840.10008.1.2", True, True),
        ("1.2.840.0123", True, True),  # a leading zero: common in the field, carried
        ("1..2", True, False),  # an empty component: carried, never typed
        (".1.2", True, False),
        ("1.2.", True, False),
        ("1" * MAX_UID, True, True),
        ("1" * (MAX_UID + 1), False, False),
        ("", False, False),
        ("1.2.3a", False, False),
        ("1.2 ", False, False),  # padding is stripped before, never part of a UID
        (12, False, False),
    ],
)
def test_carried_and_conformant_uids(value: object, carried: bool, conformant: bool) -> None:
    assert (is_uid(value), is_conformant_uid(value)) == (carried, conformant)
