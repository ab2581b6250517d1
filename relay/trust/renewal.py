"""Automatic renewal of device certificates over the device's own link.

Policy: a certificate is due for renewal once two thirds of its lifetime have passed
(20 of 30 days by default), leaving a third of the lifetime to retry through outages.

Exchange, on a stream {"target": "renew"} that the workstation opens inside its sealed
session (the agent takes the identity from the session's inner TLS certificate only):

    workstation -> agent  {"v": 1, "csr_pem": "..."}              (a fresh key's CSR)
    agent -> workstation  {"v": 1, "status": "ok", "cert_pem": "...", "ca_pem": "..."}
                       or {"v": 1, "status": "refused", "reason": "<one line>"}

The agent signs only for the identity that the inner TLS authenticated (never for one a
gateway names), only if that device is not revoked, and only when this schedule makes its
newest certificate due (relay.agent.renewal). The workstation checks the new certificate
against the CA it already has (not the one in the answer) and takes it if it is valid now
and not due itself, even if it ends before the current one (a shortened
pki.device_lifetime), then replaces device.key and device.crt crash-safely (see `install`).

The live link is kept: TLS authenticated it at its handshake and nothing on a link
depends on the certificate afterwards, so renewing interrupts no transfer. The new
identity is used at the next dial (reconnect, gateway restart), which reads the files
again. Renewal happens with a third of the lifetime left, so the old certificate is
still valid for any reconnect that happens before the files are replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.jsonframes import MessageError, read_json, write_json
from relay.ops import replacing
from relay.proto import ErrorCode, LinkClosedError, StreamStateError
from relay.trust import pki
from relay.trust.identity import (
    Identity,
    IdentityError,
    identity_from_certificate,
)
from relay.wire import HEADER_TARGET, TARGET_RENEW

__all__ = [
    "TARGET_RENEW",
    "OpenStream",
    "RenewalError",
    "complete_pending_renewal",
    "install",
    "next_renewal_time",
    "renew",
    "renewal_due",
    "renewal_loop",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
MAX_REQUEST: Final = 16 * 1024
MAX_RESPONSE: Final = 64 * 1024
EXCHANGE_TIMEOUT: Final = 30.0
CERT_FILE: Final = "device.crt"
KEY_FILE: Final = "device.key"
CA_FILE: Final = "ca.crt"
# Written completely before any real file is replaced (see `install`).
PENDING_KEY: Final = ".device.key.pending"
PENDING_CA: Final = ".ca.crt.pending"
PENDING_CERT: Final = ".device.crt.pending"

#: Opens a stream on the current link (relay.net.aio.Link.open_stream fits).
OpenStream = Callable[[Mapping[str, str]], ByteStream]


class RenewalError(Exception):
    """Renewal failed; str() is one line. The current identity stays in place."""


def _utcnow() -> datetime:
    return datetime.now(dt.UTC)


# --- policy ---------------------------------------------------------------------------


def next_renewal_time(not_before: datetime, not_after: datetime) -> datetime:
    """When a certificate valid [not_before, not_after] becomes due: 2/3 of the way."""
    return not_before + (not_after - not_before) * 2 / 3


def renewal_due(not_before: datetime, not_after: datetime, now: datetime) -> bool:
    """True once two thirds of the lifetime have passed (and ever after, expired too)."""
    return now >= next_renewal_time(not_before, not_after)


# --- files ----------------------------------------------------------------------------


def _public_der(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey)
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def install(
    identity_dir: Path,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    ca: x509.Certificate | None = None,
) -> None:
    """Replace device.key, device.crt and (given `ca`: enrollment) ca.crt as one set, so
    that a crash at any point leaves a usable identity: renewal and `relay enroll` share it.

    All new files are first written completely (and fsynced) under pending names, the
    certificate last; then the key is renamed into place, then the CA, then the
    certificate. A crash between the renames leaves the new key beside the old
    certificate and the pending certificate: `complete_pending_renewal` (called before
    every load, and by `relay workstation` at start) finishes the job. Renames go through
    relay.ops.replacing: a Windows scanner holding a fresh pending file a moment is ridden
    out, not taken for a failed install.
    """
    d = Path(identity_dir)
    try:
        pki.write_key(d / PENDING_KEY, key)
        if ca is not None:
            pki.write_cert(d / PENDING_CA, ca)
        else:
            with contextlib.suppress(FileNotFoundError):
                (d / PENDING_CA).unlink()  # not part of this set
        pki.write_cert(d / PENDING_CERT, cert)
        replacing.replace(d / PENDING_KEY, d / KEY_FILE)
        if ca is not None:
            replacing.replace(d / PENDING_CA, d / CA_FILE)
        replacing.replace(d / PENDING_CERT, d / CERT_FILE)
    except (pki.PkiError, OSError) as exc:
        raise RenewalError(f"cannot install the new identity in {d}: {exc}") from None
    _fsync_dir(d)


def complete_pending_renewal(identity_dir: Path) -> str | None:
    """Finish or undo an `install` (renewal or enrollment) that a crash interrupted.

    Returns "completed", "discarded" or None (nothing pending). Safe to call always.
    """
    d = Path(identity_dir)
    pending_key, pending_ca, pending_cert = d / PENDING_KEY, d / PENDING_CA, d / PENDING_CERT
    if not pending_cert.exists():  # the crash came before the certificate was written
        discarded = False
        for path in (pending_key, pending_ca):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                discarded = True
        return "discarded" if discarded else None
    try:
        cert = pki.load_cert(pending_cert)
        key = pki.load_key(pending_key if pending_key.exists() else d / KEY_FILE)
        matches = _public_der(cert.public_key()) == _public_der(key)
    except (pki.PkiError, AssertionError):
        matches = False
    if not matches:
        for path in (pending_key, pending_ca, pending_cert):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return "discarded"
    if pending_key.exists():
        replacing.replace(pending_key, d / KEY_FILE)
    if pending_ca.exists():
        replacing.replace(pending_ca, d / CA_FILE)
    replacing.replace(pending_cert, d / CERT_FILE)
    _fsync_dir(d)
    return "completed"


@dataclass(frozen=True)
class _Current:
    identity: Identity
    cert: x509.Certificate
    ca: x509.Certificate


def _load_current(identity_dir: Path) -> _Current:
    d = Path(identity_dir)
    try:
        complete_pending_renewal(d)
        cert = pki.load_cert(d / CERT_FILE)
        ca = pki.load_cert(d / CA_FILE)
        identity = identity_from_certificate(cert)
    except (pki.PkiError, IdentityError, OSError) as exc:
        raise RenewalError(f"cannot read the identity in {d}: {exc}") from None
    if identity.role != "device":
        raise RenewalError(f"{d / CERT_FILE} is not a device certificate ({identity.uri})")
    return _Current(identity, cert, ca)


# --- workstation side -----------------------------------------------------------------


async def renew(
    open_stream: OpenStream,
    identity_dir: Path,
    *,
    now: Callable[[], datetime] = _utcnow,
    timeout: float = EXCHANGE_TIMEOUT,  # noqa: ASYNC109 - bounds the whole exchange
    force: bool = False,
) -> bool:
    """Renew the certificate in `identity_dir` if it is due (or `force`); True if renewed.

    Raises RenewalError (refused, bad answer, files), StreamResetError, LinkClosedError or
    StreamStateError (the link failed or is full: retry later). The files are untouched
    unless it succeeds.
    """
    current = _load_current(identity_dir)
    if not force and not renewal_due(
        current.cert.not_valid_before_utc, current.cert.not_valid_after_utc, now()
    ):
        return False
    key = pki.generate_key()
    csr = pki.make_csr(key, current.identity)
    stream = open_stream({HEADER_TARGET: TARGET_RENEW})
    try:
        async with asyncio.timeout(timeout):
            await write_json(
                stream,
                {
                    "v": PROTOCOL_VERSION,
                    "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                },
            )
            answer = await read_json(stream, limit=MAX_RESPONSE)
            await stream.write_eof()  # both directions closed: the link forgets the stream
    except TimeoutError:
        stream.reset(ErrorCode.CANCEL)
        raise RenewalError(f"no renewal answer within {timeout:g} s") from None
    except MessageError as exc:
        stream.reset(ErrorCode.CANCEL)
        raise RenewalError(f"bad renewal answer: {exc}") from None
    status = answer.get("status")
    if status == "refused":
        reason = "".join(c if c.isprintable() else " " for c in str(answer.get("reason")))
        raise RenewalError(f"renewal refused: {reason[:300]}")
    if status != "ok" or not isinstance(answer.get("cert_pem"), str):
        raise RenewalError("bad renewal answer (no status or certificate)")
    try:
        cert = x509.load_pem_x509_certificate(str(answer["cert_pem"]).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise RenewalError("bad renewal answer (unreadable certificate)") from None
    _check_renewed(cert, key, current, now())
    install(Path(identity_dir), key, cert)
    log.info(
        "certificate renewed",
        extra={
            "identity": current.identity.uri,
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
        },
    )
    return True


def _check_renewed(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, current: _Current, now: datetime
) -> None:
    try:
        cert.verify_directly_issued_by(current.ca)
    except (ValueError, TypeError, InvalidSignature):
        raise RenewalError("the renewed certificate is not signed by our CA") from None
    if _public_der(cert.public_key()) != _public_der(key):
        raise RenewalError("the renewed certificate is not for the new key")
    try:
        identity = identity_from_certificate(cert)
    except IdentityError as exc:
        raise RenewalError(f"the renewed certificate carries no identity: {exc}") from None
    if identity != current.identity:
        raise RenewalError(f"the renewed certificate is for {identity.uri}")
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not nb <= now < na:
        raise RenewalError("the renewed certificate is not valid now (check the clocks)")
    # Not "ends after the current one": a shortened pki.device_lifetime ends it sooner,
    # and refusing it would renew again every minute. Not due yet is what matters.
    if renewal_due(nb, na, now):
        raise RenewalError(
            f"the renewed certificate is due for renewal already (it ends {na:%Y-%m-%d %H:%M}Z;"
            " check the clocks)"
        )


MIN_RETRY = 1.0  # seconds between failed renewal attempts, at least


async def renewal_loop(
    current_opener: Callable[[], OpenStream | None],
    identity_dir: Path,
    *,
    now: Callable[[], datetime] = _utcnow,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    retry: float = 60.0,
    max_sleep: float = 3600.0,
    on_renewed: Callable[[], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> None:
    """Renew forever (cancel to stop): sleep until due, renew over the current link.

    `current_opener()` returns the live link's `open_stream`, or None while there is no
    link. Failures are retried after min(retry, a tenth of the time left), so short
    test lifetimes retry quickly and real ones do not hammer the agent. Sleeps are at
    most `max_sleep`, so a suspended laptop or a clock jump is noticed.
    """

    def report(message: str) -> None:
        log.warning("certificate renewal failed", extra={"error": message})
        if on_error is not None:
            on_error(message)

    while True:
        try:
            current = _load_current(identity_dir)
        except RenewalError as exc:
            report(str(exc))
            await sleep(retry)
            continue
        not_before = current.cert.not_valid_before_utc
        not_after = current.cert.not_valid_after_utc
        t = now()
        wait = (next_renewal_time(not_before, not_after) - t).total_seconds()
        if wait > 0:
            await sleep(min(wait, max_sleep))
            continue
        # A tenth of what is left, but never below MIN_RETRY: an expired certificate
        # (left < 0) must not make the loop spin while the gateway refuses the PC.
        backoff = min(retry, max(MIN_RETRY, (not_after - t).total_seconds() / 10))
        opener = current_opener()
        if opener is None:
            await sleep(backoff)
            continue
        try:
            await renew(opener, identity_dir, now=now, force=True)
        except (RenewalError, StreamResetError, LinkClosedError, StreamStateError, OSError) as exc:
            report(str(exc))
            await sleep(backoff)
            continue
        if on_renewed is not None:
            on_renewed()
