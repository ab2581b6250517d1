"""`relay it-admin passwd --file F --user U`: add or change a local IT admin's password.

The password is asked twice on the terminal (getpass), or read from one line of stdin
with `--password-stdin` (scripts); only its scrypt hash is written (relay.agent.itpages
.passwords). Exit 0 done, 2 a user error as one line on stderr.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TextIO

from relay.agent.itpages.passwords import PasswordFileError, set_password

__all__ = ["passwd"]


def _fail(message: object) -> int:
    print(f"relay it-admin passwd: {message}", file=sys.stderr)
    return 2


def passwd(path: Path, user: str, *, stdin: TextIO | None = None) -> int:
    if stdin is not None:
        password = stdin.readline().rstrip("\r\n")
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
