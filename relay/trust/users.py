"""Directory user names, as enrollment codes, the registry and certificates carry them.

A narrow rule (letters, digits, `.`, `_`, `-`, `@`; 1-64 characters, starting with a
letter or digit) that fits uid and sAMAccountName values in practice, holds nothing
that means something in an LDAP filter or DN, and prints safely on one line.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_USERNAME", "USERNAME_RULE", "check_username"]

MAX_USERNAME: Final = 64
_USERNAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
USERNAME_RULE: Final = (
    "1-64 characters: letters, digits, '.', '_', '-', '@', starting with a letter or digit"
)


def check_username(value: object) -> str:
    """The user name, or ValueError naming the rule (one line)."""
    if not isinstance(value, str) or not _USERNAME_RE.fullmatch(value):
        shown = repr(value)[:40] if isinstance(value, str) else type(value).__name__
        raise ValueError(f"not a valid user name ({USERNAME_RULE}): {shown}")
    return value
