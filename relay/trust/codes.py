"""One-time enrollment codes: one copy-pasteable string that carries all a PC needs.

    DMZR1-<base32, no padding>

The base32 payload is a compact binary record (version 1):

    version:u8 = 1
    token_id: 8 bytes          the registry key (shown as 16 hex digits)
    secret: 20 bytes           160 random bits; the agent stores only hash_secret()
    ca_sha256: 32 bytes        the pin: SHA-256 of the site CA certificate (DER)
    site: u8 length + ASCII    routes the attempt at the gateway
    device: u8 length + ASCII  the device name the code is bound to
    gateway: u8 length + ASCII "host:port" ("[v6]:port") the PC dials
    user: u8 length + ASCII    version 2 only: the directory user the code is for
    check: 4 bytes             SHA-256 of everything above, truncated

Version 2 is version 1 plus the directory user (`relay token create --user`, an agent
with `directory:`): it tells `relay enroll` to ask for that user's directory password
before it dials, and shows whose it is. Codes without a user stay version 1, which
older PCs read.

Base32 survives e-mail, chat and being read out over the phone (no case or 0/O
ambiguity that matters, no '+/'), and the checksum turns a paste that lost a few
characters into a clear "copy it again" instead of a confusing refusal by the agent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

from relay.ops.config import Address, parse_address
from relay.trust.identity import check_name
from relay.trust.users import check_username

__all__ = [
    "CODE_PREFIX",
    "MAX_CODE_CHARS",
    "SECRET_BYTES",
    "TOKEN_ID_BYTES",
    "CodeError",
    "EnrollmentCode",
    "check_token_id",
    "decode_secret",
    "encode_secret",
    "hash_secret",
    "new_secret",
    "new_token_id",
    "parse_code",
    "secret_matches",
]

CODE_PREFIX: Final = "DMZR1-"
VERSION: Final = 1
VERSION_WITH_USER: Final = 2
TOKEN_ID_BYTES: Final = 8
SECRET_BYTES: Final = 20
FINGERPRINT_BYTES: Final = 32
CHECK_BYTES: Final = 4
MAX_FIELD: Final = 255  # u8-length text fields
#: Longest code accepted from a user (the longest valid one is about 1,000 characters).
MAX_CODE_CHARS: Final = 2048
_TOKEN_ID_RE: Final = re.compile(r"[0-9a-f]{16}")
_FINGERPRINT_RE: Final = re.compile(r"[0-9a-f]{64}")
_HASH_DOMAIN: Final = b"dmzrelay enrollment token v1\x00"


class CodeError(ValueError):
    """An enrollment code cannot be used; str() is one line for the user."""


def new_token_id() -> str:
    """A fresh random token id: 16 lowercase hex digits."""
    return secrets.token_hex(TOKEN_ID_BYTES)


def new_secret() -> bytes:
    """A fresh secret of SECRET_BYTES random bytes (160 bits)."""
    return secrets.token_bytes(SECRET_BYTES)


def hash_secret(token_id: str, secret: bytes) -> bytes:
    """What the registry stores instead of the secret.

    A plain SHA-256 suffices: the secret has 160 bits of entropy, so there is nothing to
    brute-force, and a slow hash would only add CPU an attacker can make us spend.
    """
    return hashlib.sha256(_HASH_DOMAIN + token_id.encode("ascii") + b"\x00" + secret).digest()


def secret_matches(token_id: str, secret: bytes, stored_hash: bytes) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(hash_secret(token_id, secret), stored_hash)


def encode_secret(secret: bytes) -> str:
    """The secret as URL-safe base64 without padding (how the PC sends it)."""
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")


def decode_secret(text: str) -> bytes:
    """Inverse of encode_secret; CodeError if it is not a secret of the right size."""
    if not isinstance(text, str) or len(text) > 64 or not text.isascii():
        raise CodeError("malformed secret")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CodeError("malformed secret") from None
    if len(raw) != SECRET_BYTES:
        raise CodeError("malformed secret")
    return raw


def check_token_id(token_id: object) -> str:
    """`token_id` if it has the shape of one; CodeError otherwise."""
    if not isinstance(token_id, str) or not _TOKEN_ID_RE.fullmatch(token_id):
        raise CodeError("malformed token id")
    return token_id


@dataclass(frozen=True)
class EnrollmentCode:
    """What an enrollment code carries. Construction validates every field."""

    gateway: Address
    ca_fingerprint: str  # lowercase hex SHA-256 of the CA certificate's DER
    site: str
    device: str
    token_id: str
    secret: bytes
    user: str | None = None  # the directory user (version 2)

    def __post_init__(self) -> None:
        if self.user is not None:
            try:
                check_username(self.user)
            except ValueError as exc:
                raise CodeError(str(exc)) from None
        if not _FINGERPRINT_RE.fullmatch(self.ca_fingerprint):
            raise CodeError("the CA fingerprint must be 64 lowercase hex digits")
        try:
            check_name(self.site, "site name")
            check_name(self.device, "device name")
        except ValueError as exc:
            raise CodeError(str(exc)) from None
        check_token_id(self.token_id)
        if len(self.secret) != SECRET_BYTES:
            raise CodeError(f"the secret must be {SECRET_BYTES} bytes")
        if len(str(self.gateway).encode("ascii", "replace")) > MAX_FIELD:
            raise CodeError("the gateway address is too long")

    def encode(self) -> str:
        """The code as the user sees it: DMZR1-BASE32."""
        parts = [
            bytes([VERSION if self.user is None else VERSION_WITH_USER]),
            bytes.fromhex(self.token_id),
            self.secret,
            bytes.fromhex(self.ca_fingerprint),
        ]
        texts = [self.site, self.device, str(self.gateway)]
        if self.user is not None:
            texts.append(self.user)
        for text in texts:
            raw = text.encode("ascii")
            parts.append(bytes([len(raw)]) + raw)
        record = b"".join(parts)
        record += hashlib.sha256(record).digest()[:CHECK_BYTES]
        return CODE_PREFIX + base64.b32encode(record).decode("ascii").rstrip("=")


def _take_text(record: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos >= len(record):
        raise CodeError("the enrollment code is incomplete: copy it again in full")
    size = record[pos]
    pos += 1
    raw = record[pos : pos + size]
    if len(raw) != size:
        raise CodeError("the enrollment code is incomplete: copy it again in full")
    try:
        return raw.decode("ascii"), pos + size
    except UnicodeDecodeError:
        raise CodeError(f"the enrollment code carries a malformed {what}") from None


def parse_code(text: str) -> EnrollmentCode:
    """Parse a code as pasted by a user (whitespace and case are forgiven).

    Raises CodeError with one line saying what is wrong and what to do.
    """
    if not isinstance(text, str):
        raise CodeError("an enrollment code is text")
    if len(text) > MAX_CODE_CHARS:
        raise CodeError(f"not an enrollment code (longer than {MAX_CODE_CHARS} characters)")
    compact = "".join(text.split())
    if not compact.upper().startswith(CODE_PREFIX[:4]):
        raise CodeError(f"not an enrollment code (it should start with {CODE_PREFIX})")
    if not compact.upper().startswith(CODE_PREFIX):
        raise CodeError(
            f"this enrollment code format is not supported by this relay (expected {CODE_PREFIX})"
        )
    body = compact[len(CODE_PREFIX) :].upper().rstrip("=")
    try:
        record = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise CodeError(
            "the enrollment code is damaged (characters outside A-Z and 2-7): copy it again"
        ) from None
    fixed = 1 + TOKEN_ID_BYTES + SECRET_BYTES + FINGERPRINT_BYTES
    if len(record) < fixed + 3 + CHECK_BYTES:
        raise CodeError("the enrollment code is incomplete: copy it again in full")
    payload, check = record[:-CHECK_BYTES], record[-CHECK_BYTES:]
    if not hmac.compare_digest(hashlib.sha256(payload).digest()[:CHECK_BYTES], check):
        raise CodeError("the enrollment code is damaged (checksum mismatch): copy it again in full")
    if payload[0] not in (VERSION, VERSION_WITH_USER):
        raise CodeError(f"enrollment code version {payload[0]} is not supported by this relay")
    pos = 1
    token_id = payload[pos : pos + TOKEN_ID_BYTES].hex()
    pos += TOKEN_ID_BYTES
    secret = payload[pos : pos + SECRET_BYTES]
    pos += SECRET_BYTES
    fingerprint = payload[pos : pos + FINGERPRINT_BYTES].hex()
    pos += FINGERPRINT_BYTES
    site, pos = _take_text(payload, pos, "site")
    device, pos = _take_text(payload, pos, "device name")
    gateway_text, pos = _take_text(payload, pos, "gateway address")
    user: str | None = None
    if payload[0] == VERSION_WITH_USER:
        user, pos = _take_text(payload, pos, "user name")
    if pos != len(payload):
        raise CodeError("the enrollment code has trailing data: copy it again exactly")
    try:
        gateway = parse_address(gateway_text)
    except ValueError as exc:
        raise CodeError(f"the enrollment code carries a bad gateway address: {exc}") from None
    return EnrollmentCode(gateway, fingerprint, site, device, token_id, secret, user)
