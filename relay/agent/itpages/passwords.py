"""The local IT admin password file (used where no directory is configured).

One line per admin, never a plaintext password:

    NAME:scrypt$LOG2N$R$P$SALT$HASH      (SALT and HASH in unpadded base64)

scrypt (hashlib, OpenSSL) with N=2^15, r=8, p=1 costs 32 MiB and ~0.1 s per check, so a
stolen file is slow to brute-force; the login rate limit bounds how often the agent pays
that. `relay it-admin passwd --file F --user U` writes an entry (0600, atomically).
The file is read at each login, so a new entry takes effect without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "MAX_FILE_BYTES",
    "PasswordFileError",
    "hash_password",
    "read_admins",
    "set_password",
    "verify_password",
]

LOG2_N: Final = 15
R: Final = 8
P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
MAX_FILE_BYTES: Final = 256 * 1024
MAX_PASSWORD_BYTES: Final = 1024
MIN_PASSWORD_CHARS: Final = 12
_MAXMEM: Final = 64 * 1024 * 1024  # above 128 * r * N = 32 MiB
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_ENTRY_RE: Final = re.compile(
    r"scrypt\$(\d{1,2})\$(\d{1,2})\$(\d{1,2})\$([A-Za-z0-9+/]{1,64})\$([A-Za-z0-9+/]{1,128})"
)


class PasswordFileError(Exception):
    """The password file cannot be used; str() is one line naming the file."""


@dataclass(frozen=True)
class _Entry:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def check_admin_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an admin name (1-64 of letters, digits and . _ @ -, "
            "starting with a letter or digit)"
        )
    return name


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass")[:MAX_PASSWORD_BYTES],
        salt=salt,
        n=1 << log2_n,
        r=r,
        p=p,
        maxmem=_MAXMEM,
        dklen=HASH_BYTES,
    )


def hash_password(password: str, *, log2_n: int = LOG2_N) -> str:
    """The stored form of `password` (a fresh salt each time)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, log2_n, R, P)
    return f"scrypt${log2_n}${R}${P}${_b64(salt)}${_b64(digest)}"


def _parse(text: str) -> _Entry | None:
    m = _ENTRY_RE.fullmatch(text)
    if m is None:
        return None
    log2_n, r, p = int(m[1]), int(m[2]), int(m[3])
    if not (10 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 4):
        return None  # out of what we accept to compute (memory and time bounded)
    return _Entry(log2_n, r, p, _unb64(m[4]), _unb64(m[5]))


# Checked for unknown users too, so that the time does not tell which names exist.
_DUMMY: Final = _Entry(LOG2_N, R, P, b"\x00" * SALT_BYTES, b"\x00" * HASH_BYTES)


def verify_password(stored: str | None, password: str) -> bool:
    """Whether `password` matches the stored form (None: an unknown user, always False,
    after the same work)."""
    entry = _parse(stored) if stored is not None else None
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        return False
    e = entry or _DUMMY
    digest = _scrypt(password, e.salt, e.log2_n, e.r, e.p)
    return entry is not None and hmac.compare_digest(digest, entry.digest)


def read_admins(path: Path) -> dict[str, str]:
    """name -> stored hash. Blank lines and # comments are skipped; anything else that is
    not an entry is an error naming the line (a typo must not silently lock IT out)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO's open() would wait forever
            raise PasswordFileError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PasswordFileError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PasswordFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordFileError(f"{path}: not UTF-8") from None
    admins: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not _NAME_RE.fullmatch(name) or _parse(stored) is None:
            raise PasswordFileError(
                f"{path}:{number}: not an entry (NAME:scrypt$...; "
                "write entries with `relay it-admin passwd`)"
            )
        admins[name] = stored
    return admins


def set_password(path: Path, user: str, password: str, *, log2_n: int = LOG2_N) -> bool:
    """Add or replace `user`'s entry (file 0600, replaced atomically); True if new."""
    check_admin_name(user)
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password must have at most {MAX_PASSWORD_BYTES} bytes")
    admins = read_admins(path) if path.exists() else {}
    new = user not in admins
    admins[user] = hash_password(password, log2_n=log2_n)
    body = "".join(f"{name}:{stored}\n" for name, stored in admins.items())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
            f.write("# IT admins of the relay agent: written by `relay it-admin passwd`\n")
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new
