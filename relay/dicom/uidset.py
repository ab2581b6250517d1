"""SOP Instance UIDs held as keyed digests: a retrieve's skip list and what it delivered.

A resumed retrieve's skip list comes from the device (up to `DicomLimits.max_skip`,
65,535 UIDs of up to 64 characters) and a retrieve's delivered UIDs from the PACS (as
many). As Python strings in a set they cost ~150 bytes a UID, ~10 MiB a set, and one
device may run 32 retrieves at once. Here a UID is 16 bytes: its BLAKE2b digest, keyed
with a random key drawn once per process, in one sorted bytes object searched by bisection.

Why a digest may stand for the UID: a UID found in the set is taken as already delivered
(the PACS's instance is passed over), so a collision would drop an instance the viewer
does not have. The key and the digests never leave the process, so nobody outside can
search for a collision or craft UIDs that collide; by chance alone, n instances checked
against a set of m collide with probability below n * m / 2**128 (2**-96 for 65,535 each).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["DIGEST_SIZE", "UidSet", "uid_digest"]

DIGEST_SIZE: Final = 16  # bytes of a UID's digest: 128 bits (see the module's docstring)
_KEYED: Final = hashlib.blake2b(digest_size=DIGEST_SIZE, key=os.urandom(32))


def uid_digest(uid: str) -> bytes:
    """`uid`'s keyed digest. Any text is taken (a PACS's UID is not checked before it is
    noted): `surrogatepass` makes the encoding total and one-to-one."""
    h = _KEYED.copy()
    h.update(uid.encode("utf-8", "surrogatepass"))
    return h.digest()


class UidSet:
    """A frozen set of UIDs, `DIGEST_SIZE` bytes each (`uid in s`, `len(s)`).

    Built once (`of`, `with_digests`): adding one UID would move half the array, and
    nothing needs that: the skip list comes whole, and the delivered UIDs are noted as
    plain digests (`Intake`) and joined to the set only when a retrieve runs again."""

    __slots__ = ("_rows",)

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        """A set of these digests (each `DIGEST_SIZE` bytes; repeats are kept once)."""
        ordered = sorted(digests)
        if any(len(d) != DIGEST_SIZE for d in ordered):
            raise ValueError(f"a UID digest is {DIGEST_SIZE} bytes")
        self._rows = b"".join(d for d, _ in itertools.groupby(ordered))

    @classmethod
    def of(cls, uids: Iterable[str]) -> UidSet:
        """The set of these UIDs. ~1 us a UID: run 65,535 of them off the event loop."""
        return cls(uid_digest(u) for u in uids)

    def with_digests(self, digests: bytes | bytearray) -> UidSet:
        """A new set: this one and the UIDs whose digests are concatenated in `digests`."""
        if len(digests) % DIGEST_SIZE:
            raise ValueError(f"a UID digest is {DIGEST_SIZE} bytes")
        more = (bytes(digests[i : i + DIGEST_SIZE]) for i in range(0, len(digests), DIGEST_SIZE))
        return UidSet(itertools.chain(self._digests(), more))

    @property
    def nbytes(self) -> int:
        """What the set's digests take (the object itself adds a few dozen bytes)."""
        return len(self._rows)

    def __len__(self) -> int:
        return len(self._rows) // DIGEST_SIZE

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, str) or not self._rows:
            return False
        wanted = uid_digest(uid)
        i = bisect.bisect_left(range(len(self)), wanted, key=self._row)
        return i < len(self) and self._row(i) == wanted

    def __repr__(self) -> str:
        return f"UidSet({len(self)} UIDs)"  # never the digests: they stand for UIDs

    def _row(self, i: int) -> bytes:
        return self._rows[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]

    def _digests(self) -> Iterator[bytes]:
        return (self._row(i) for i in range(len(self)))
