"""What counts as a DICOM UID, in one place: two checks for two jobs.

`is_uid` is what the relay passes on: digits and dots, at most 64 characters. PACSs in
the field hold UIDs that break the standard's finer rules (a component with a leading
zero, an empty one), and a viewer must still reach those studies, so anything we only
carry is checked this loosely. `is_conformant_uid` is the standard's form (PS3.5 §9.1,
without its leading-zero rule): where we choose UIDs to act on by themselves (a study
list typed at the CLI, the storage classes a survey will propose), a typo should be
refused rather than sent to the PACS.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_UID", "is_conformant_uid", "is_uid"]

MAX_UID: Final = 64
_UID_CHARS: Final = frozenset("0123456789.")
_CONFORMANT: Final = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: object) -> bool:
    """Digits and dots, 1 to 64 characters: a UID the relay may carry."""
    return isinstance(value, str) and 0 < len(value) <= MAX_UID and set(value) <= _UID_CHARS


def is_conformant_uid(value: object) -> bool:
    """Digits in dot-separated parts, at most 64 characters: a UID as DICOM writes one."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_UID
        and _CONFORMANT.fullmatch(value) is not None
    )
