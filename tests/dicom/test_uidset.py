"""A retrieve's UIDs as keyed digests: the same answers as a set of strings, in 16 bytes
a UID, and a key no one outside the process knows (relay.dicom.uidset)."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import pytest

from relay.dicom.codec import MAX_COUNT
from relay.dicom.uidset import DIGEST_SIZE, UidSet, uid_digest


def uids(n: int, start: int = 0) -> list[str]:
    """`n` distinct UIDs of the full 64 characters (the costliest as strings)."""
    return [f"1.2.826.0.1.3680043.8.498.{i:038d}" for i in range(start, start + n)]


def test_it_answers_as_a_set_of_the_uids_would() -> None:
    have = uids(1000)
    s = UidSet.of(have + have[:10])  # repeats are kept once
    assert len(s) == 1000
    assert all(u in s for u in have)
    assert not any(u in s for u in uids(1000, start=1000))
    assert "1.2.3" not in UidSet() and len(UidSet()) == 0
    assert 42 not in s  # not a UID at all
    assert str(len(have)) in repr(s) and have[0] not in repr(s)


def test_a_set_joined_with_noted_digests_holds_both() -> None:
    first, then = uids(300), uids(200, start=300)
    noted = bytearray()
    for u in then + then[:5]:
        noted += uid_digest(u)
    joined = UidSet.of(first).with_digests(noted)
    assert len(joined) == 500 and all(u in joined for u in first + then)
    assert uids(1, start=500)[0] not in joined
    with pytest.raises(ValueError, match="16 bytes"):
        joined.with_digests(b"\0" * (DIGEST_SIZE + 1))
    with pytest.raises(ValueError, match="16 bytes"):
        UidSet([b"short"])


def test_a_uid_that_is_no_uid_is_still_noted_and_found() -> None:
    odd = ["1.2.\udcff", "é.1", ""]  # a PACS's UID is not checked before it is noted
    s = UidSet.of(odd)
    assert len(s) == 3 and all(u in s for u in odd)


def test_a_full_skip_list_holds_16_bytes_a_uid() -> None:
    """65,535 UIDs: the set's whole allocation over its UIDs (a frozenset of the strings
    held 153 bytes a UID, 10 MiB)."""
    have = uids(MAX_COUNT)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        s = UidSet.of(have)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(s) == MAX_COUNT and s.nbytes == MAX_COUNT * DIGEST_SIZE
    assert held / MAX_COUNT < DIGEST_SIZE + 1, held


_DIGEST = "from relay.dicom.uidset import uid_digest; print(uid_digest('1.2.3').hex())"


def test_each_process_draws_its_own_key() -> None:
    """The digests are keyed by a random key drawn at start: another process's differ, so
    a device cannot work out UIDs whose digests collide."""
    runs = {
        subprocess.run(
            [sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(runs) == 2 and uid_digest("1.2.3").hex() not in runs
    assert all(len(bytes.fromhex(d)) == DIGEST_SIZE for d in runs)
