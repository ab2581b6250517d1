"""`relay it-admin passwd --file F --user U`: add or change a local IT admin's password.

The password is asked twice on the terminal (getpass), or read from one line of stdin
with `--password-stdin` (scripts): stdin's bytes, decoded by their byte order mark and
refused if garbled, as `relay enroll` reads a password (relay.ops.secretinput: a password
piped from PowerShell or a Windows file arrives as UTF-16 or with a BOM). Only its scrypt
hash is written (relay.agent.itpages.passwords). Exit 0 done, 2 a user error as one line
on stderr.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from relay.agent.itpages.passwords import MAX_PASSWORD_BYTES, PasswordFileError, set_password
from relay.ops.secretinput import Lines, SecretInputError, read_secret_line

__all__ = ["passwd"]


def _fail(message: object) -> int:
    print(f"relay it-admin passwd: {message}", file=sys.stderr)
    return 2


def passwd(path: Path, user: str, *, stdin: Lines | None = None) -> int:
    """`stdin`: a SecretReader over stdin's bytes (--password-stdin); None asks twice."""
    if stdin is not None:
        try:
            password = read_secret_line(stdin, "stdin", MAX_PASSWORD_BYTES)
        except SecretInputError as exc:
            return _fail(f"{exc}; nothing written")
    else:
        try:
            password = getpass.getpass(f"new IT admin password for {user}: ")
            if getpass.getpass("again: ") != password:
                return _fail("the passwords differ; nothing written")
        except EOFError:
            return _fail("no password given (use --password-stdin for scripts)")
    try:
        new = set_password(path, user, password)
    except (PasswordFileError, ValueError) as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(f"{path}: cannot write ({exc.strerror})")
    print(f"{'added' if new else 'changed'} IT admin {user!r} in {path}")
    return 0
