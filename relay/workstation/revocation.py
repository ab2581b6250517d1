"""Whether to believe a gateway that says this workstation is revoked.

The gateway may be compromised: its GOAWAY REVOKED wipes the study cache and stops the
workstation only if its reason carries the agent's notice (relay.trust.notice) signed by
the site CA this workstation pins (the one it checks the agent's certificate with), for
this device's own identity, and not older than the current certificate. Anything else is
one more goaway (relay.net.dialer logs it and dials again later).

Built from the identity files at start, and again after a renewal or a reload, so the
notBefore is always the certificate the next dial presents.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from relay.trust import pki
from relay.trust.identity import identity_from_certificate
from relay.trust.notice import NoticeError, verify_notice
from relay.trust.revocation import notice_in_reason

__all__ = ["RevocationCheck"]


def _ca_keys(
    cas: list[x509.Certificate], site: str | None
) -> tuple[ec.EllipticCurvePublicKey, ...]:
    """The keys of the pinned CAs that may speak for `site` (a legacy CA names none)."""
    keys = []
    for ca in cas:
        try:
            ca_site = pki.site_of_ca(ca)
        except pki.PkiError:
            continue
        key = ca.public_key()
        if ca_site in (None, site) and isinstance(key, ec.EllipticCurvePublicKey):
            keys.append(key)
    return tuple(keys)


@dataclass(frozen=True)
class RevocationCheck:
    """`check(reason)`: None if the gateway's REVOKED reason proves this device revoked,
    else why not, in one line (no patient data: the reason is ours, not the gateway's)."""

    uri: str
    not_before: datetime
    ca_keys: tuple[ec.EllipticCurvePublicKey, ...]

    @classmethod
    def from_files(cls, cert_path: Path, ca_path: Path) -> RevocationCheck:
        """From the device certificate and the pinned CA file; PkiError if unreadable."""
        cert = pki.load_cert(cert_path)
        identity = identity_from_certificate(cert)
        keys = _ca_keys(pki.load_certs(ca_path), identity.site)
        return cls(identity.uri, cert.not_valid_before_utc, keys)

    def __call__(self, reason: str) -> str | None:
        notice = notice_in_reason(reason)
        if notice is None:
            return "the gateway's word carries no notice from the agent"
        try:
            verify_notice(notice, ca_keys=self.ca_keys, uri=self.uri, not_before=self.not_before)
        except NoticeError as exc:
            return f"the gateway's notice does not prove it: {exc}"
        return None
