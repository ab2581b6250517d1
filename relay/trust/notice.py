"""Agent-signed revocation notices: what lets a device believe a gateway's REVOKED.

A gateway may be compromised, so its word that a device is revoked proves nothing. The
agent therefore signs, per revoked device, a notice with the site CA key (the key that
signs the device certificates, ECDSA P-256), and gateways pass it on untouched in their
GOAWAY REVOKED (relay.trust.revocation.goaway_reason). The device heeds a revocation
only if the notice verifies against its site CA, names its own identity, and is not older
than its current certificate (so an old notice replayed cannot stop a device enrolled
again under the same name).

Signed message: CONTEXT || revocation time (8 bytes, big-endian, whole seconds since the
epoch, rounded down) || the device's SPIFFE id (UTF-8). The context string makes it
useless as anything else the CA key signs (certificates and CRLs are DER, starting
0x30). Text form, 102 characters:

    rn1.<base64url of the 8-byte time, 11 chars>.<base64url of r||s, 64 bytes, 86 chars>

(base64url without padding; r and s are 32-byte big-endian integers).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from relay.trust.revocation import MAX_NOTICE

__all__ = [
    "CONTEXT",
    "NOTICE_LENGTH",
    "NoticeError",
    "sign_notice",
    "verify_notice",
]

CONTEXT: Final = b"dmz-relay revocation v1\0"
PREFIX: Final = "rn1"
_TIME_BYTES: Final = 8
_HALF: Final = 32  # bytes of r and of s (P-256)
_NOTICE_RE: Final = re.compile(r"rn1\.([A-Za-z0-9_-]{11})\.([A-Za-z0-9_-]{86})")
NOTICE_LENGTH: Final = len(PREFIX) + 1 + 11 + 1 + 86
assert NOTICE_LENGTH <= MAX_NOTICE  # what a gateway stores and forwards


class NoticeError(ValueError):
    """A notice is malformed or proves nothing for this device; str() is one line."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, size: int) -> bytes:
    """Strict base64url without padding: exactly `size` bytes, canonical form only."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise NoticeError("the notice is not base64url") from None
    if len(data) != size or _b64(data) != text:
        raise NoticeError("the notice is not in canonical form")
    return data


def _seconds(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("timezone-aware datetime required")
    return int(when.timestamp() // 1)


def _message(uri: str, seconds: int) -> bytes:
    return CONTEXT + seconds.to_bytes(_TIME_BYTES, "big") + uri.encode("utf-8")


def sign_notice(ca_key: ec.EllipticCurvePrivateKey, uri: str, revoked_at: datetime) -> str:
    """The notice that device `uri` was revoked at `revoked_at` (about 50 µs)."""
    seconds = _seconds(revoked_at)
    if not 0 <= seconds < 2**63:
        raise ValueError("revocation time out of range")
    der = ca_key.sign(_message(uri, seconds), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(_HALF, "big") + s.to_bytes(_HALF, "big")
    return f"{PREFIX}.{_b64(seconds.to_bytes(_TIME_BYTES, 'big'))}.{_b64(raw)}"


def verify_notice(
    notice: str,
    *,
    ca_keys: Iterable[ec.EllipticCurvePublicKey],
    uri: str,
    not_before: datetime,
) -> datetime:
    """The revocation time of a notice that proves device `uri` revoked: signed by one of
    `ca_keys`, for `uri`, at or after `not_before` (the device's current certificate).

    Raises NoticeError with a one-line reason otherwise.
    """
    match = _NOTICE_RE.fullmatch(notice) if len(notice) <= MAX_NOTICE else None
    if match is None:
        raise NoticeError("not a revocation notice of this version")
    seconds = int.from_bytes(_unb64(match.group(1), _TIME_BYTES), "big")
    raw = _unb64(match.group(2), 2 * _HALF)
    signature = encode_dss_signature(
        int.from_bytes(raw[:_HALF], "big"), int.from_bytes(raw[_HALF:], "big")
    )
    message = _message(uri, seconds)
    for key in ca_keys:
        try:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        break
    else:
        raise NoticeError("the notice is not signed by this site's CA for this device")
    if seconds < _seconds(not_before):
        raise NoticeError("the notice predates this device's certificate (an old revocation)")
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):  # pragma: no cover - not_before bounds it
        raise NoticeError("the notice's time is out of range") from None
