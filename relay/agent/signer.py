"""Issuing device certificates for this site: what enrollment and renewal share.

Both exchanges end the same way: a checked CSR, an identity the agent has decided on, a
certificate signed by the site CA, recorded in the registry. `Signer` holds what that
needs, so the two stream handlers take one object instead of seven arguments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from relay.agent.audit import AuditLog
from relay.agent.registry import DeviceRegistry, serial_hex
from relay.net.bytestream import ByteStream
from relay.net.jsonframes import MessageError, MessageTooLarge, read_json
from relay.trust import pki
from relay.trust.identity import Identity

__all__ = [
    "MAX_CSR_PEM",
    "Issued",
    "RequestRefused",
    "Signer",
    "csr_identity_uri",
    "load_csr",
    "read_request",
    "sign_device",
]

MAX_CSR_PEM: Final = 8 * 1024


class RequestRefused(Exception):
    """A request refused with a result code (metrics) and a one-line message (the PC)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.message = message


async def read_request(
    stream: ByteStream, *, limit: int, version: int, what: str
) -> dict[str, object]:
    """One framed JSON request of `version`, at most `limit` bytes; anything else is a
    RequestRefused ("oversized" or "malformed") naming `what` (enrollment, renewal)."""
    try:
        request = await read_json(stream, limit=limit)
    except MessageTooLarge as exc:
        raise RequestRefused("oversized", f"the request is larger than {exc.limit} bytes") from None
    except MessageError as exc:
        raise RequestRefused("malformed", f"malformed request: {exc}") from None
    if request.get("v") != version:
        raise RequestRefused("malformed", f"unsupported {what} request version")
    return request


def load_csr(pem: object) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    """Parse and check a CSR (PEM text): its self-signature and its P-256 key.

    Raises RequestRefused ("bad_csr" or "malformed") with a one-line message.
    """
    if not isinstance(pem, str) or not pem.strip():
        raise RequestRefused("malformed", "the request carries no CSR")
    if len(pem) > MAX_CSR_PEM:
        raise RequestRefused("bad_csr", f"the CSR is larger than {MAX_CSR_PEM} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise RequestRefused("bad_csr", "malformed CSR (not a PEM certificate request)") from None
    try:
        public_key = pki.check_csr(csr)
    except pki.PkiError as exc:
        raise RequestRefused("bad_csr", str(exc)) from None
    return csr, public_key


def csr_identity_uri(csr: x509.CertificateSigningRequest) -> str | None:
    """The CSR's single URI SAN, or None if it has none or several."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def sign_device(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    identity: Identity,
    *,
    lifetime: timedelta,
    now: datetime,
    user: str | None = None,
) -> x509.Certificate:
    """A device certificate valid from a little before `now` until `now + lifetime`,
    naming its directory `user` (subject UID) if it has one.

    The start is backdated for clock skew by pki.BACKDATE, but by at most a tenth of
    the lifetime, so that short test lifetimes (seconds) still make sense.
    """
    backdate = min(pki.BACKDATE, lifetime / 10)
    return pki.issue_certificate(
        ca_key,
        ca_cert,
        public_key,
        identity,
        lifetime + backdate,
        not_before=now - backdate,
        user=user,
    )


@dataclass(frozen=True)
class Issued:
    """A certificate this agent signed and recorded."""

    cert: x509.Certificate
    serial: str
    issued_at: datetime
    user: str | None = None


@dataclass(frozen=True)
class Signer:
    """The site CA, the registry and the audit trail, as the enroll and renew handlers use them."""

    registry: DeviceRegistry
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    site: str
    lifetime: timedelta
    audit: AuditLog
    now: Callable[[], datetime]

    @property
    def trust_domain(self) -> str:
        return pki.trust_domain_of_ca(self.ca_cert)

    async def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: Identity,
        user: str | None = None,
    ) -> Issued:
        """Sign a certificate for `identity` and record it in the registry.

        `user`: the directory user enrollment bound the device to; None keeps the one the
        registry has (a renewal). Raises pki.PkiError or RegistryError (the caller answers
        "internal").
        """
        issued_at = self.now()
        bind = user
        if user is None:
            user = await asyncio.to_thread(self.registry.device_user, identity.name)
        cert = sign_device(
            self.ca_key,
            self.ca_cert,
            public_key,
            identity,
            lifetime=self.lifetime,
            now=issued_at,
            user=user,
        )
        serial = serial_hex(cert.serial_number)
        await asyncio.to_thread(
            self.registry.record_certificate,
            identity.name,
            serial,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            issued_at,
            user=bind,
        )
        return Issued(cert, serial, issued_at, user)
