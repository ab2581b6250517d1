"""The local IT admin password file (used where no directory is configured).

One line per admin, never a plaintext password:

    NAME:scrypt$LOG2N$R$P$SALT$HASH      (SALT and HASH in unpadded base64)

New entries use scrypt (hashlib, OpenSSL) with N=2^17, r=8, p=1, OWASP's minimum: 128
MiB and ~0.3-0.9 s per check, so a stolen file is slow to brute-force; the login rate
limit bounds how often the agent pays that, and auth.MAX_CONCURRENT_HASHES how many run
at once. Each entry names its own parameters, so entries written with N=2^15 (before
2026-12) still verify; `relay it-admin passwd` again rewrites one with the current
ones. An entry whose check would take more than MAX_HASH_MEMORY is refused when the
file is read (hashlib's maxmem would fail it at each login). `relay it-admin passwd
--file F --user U` writes an entry (0600, atomically). The file is read at each login,
so a new entry takes effect without a restart.
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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_HASH_MEMORY",
    "PasswordFileError",
    "dummy_like",
    "hash_password",
    "read_admins",
    "set_password",
    "verify_password",
]

#: scrypt cost of new entries: N = 2^LOG2_N, r = R, p = P (OWASP: N=2^17, r=8, p=1).
LOG2_N: Final = 17
R: Final = 8
P: Final = 1
#: Most memory one check may take (scrypt's 128 * r * N bytes): the cost of new entries;
#: an entry asking for more is refused when the file is read. At most
#: auth.MAX_CONCURRENT_HASHES checks run at once (2: 256 MiB).
MAX_HASH_MEMORY: Final = 128 * R * (1 << LOG2_N)
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
MAX_FILE_BYTES: Final = 256 * 1024
MAX_PASSWORD_BYTES: Final = 1024
MIN_PASSWORD_CHARS: Final = 12
#: hashlib's maxmem: OpenSSL also counts 128 * r * (p + 2) bytes beyond 128 * r * N.
_MAXMEM: Final = MAX_HASH_MEMORY + 1024 * 1024
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


def hash_password(password: str, *, log2_n: int | None = None) -> str:
    """The stored form of `password` (a fresh salt each time); `log2_n` None: LOG2_N."""
    log2_n = LOG2_N if log2_n is None else log2_n
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
    if 128 * r * (1 << log2_n) > MAX_HASH_MEMORY:
        return None  # hashlib would refuse it (maxmem) at every login
    return _Entry(log2_n, r, p, _unb64(m[4]), _unb64(m[5]))


def _cost(params: tuple[int, int, int]) -> int:
    """scrypt's work for (log2 N, r, p): proportional to r * N * p."""
    log2_n, r, p = params
    return (r * p) << log2_n


def dummy_like(stored: Iterable[str]) -> str:
    """A stored form no password matches, with the parameters most of `stored` have (a
    tie: the costliest; none: the current ones). An unknown user's password is checked
    against it, so that the time does not tell which names exist: a fixed dummy at the
    current N=2^17 would take 4 times as long as the check of an entry written with
    N=2^15 (and the tests' N=2^10 entries were checked against a 2^15 dummy)."""
    counts = Counter(
        (e.log2_n, e.r, e.p) for e in map(_parse, stored) if e is not None
    ).most_common()
    log2_n, r, p = (LOG2_N, R, P)
    if counts:
        top = counts[0][1]
        log2_n, r, p = max((k for k, n in counts if n == top), key=_cost)
    zeros = _b64(b"\x00" * SALT_BYTES), _b64(b"\x00" * HASH_BYTES)
    return f"scrypt${log2_n}${r}${p}${zeros[0]}${zeros[1]}"


def verify_password(stored: str | None, password: str, *, dummy: str | None = None) -> bool:
    """Whether `password` matches the stored form. None (an unknown user) is always
    False, after the same work as a check of `dummy` (`dummy_like` the file's entries;
    None: the current parameters)."""
    entry = _parse(stored) if stored is not None else None
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        return False
    e = entry or _parse(dummy or dummy_like(()))
    assert e is not None  # dummy_like writes what _parse reads
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
                f"{path}:{number}: not an entry (NAME:scrypt$LOG2N$R$P$SALT$HASH, at most "
                f"{MAX_HASH_MEMORY >> 20} MiB a check; write entries with `relay it-admin passwd`)"
            )
        admins[name] = stored
    return admins


def set_password(path: Path, user: str, password: str, *, log2_n: int | None = None) -> bool:
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
