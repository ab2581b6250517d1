"""Whether to believe a gateway that says this workstation is revoked.

The gateway may be compromised: its GOAWAY REVOKED wipes the study cache and stops the
workstation only if its reason carries the agent's notice (relay.trust.notice) signed by
the site CA this workstation pins (the one it checks the agent's certificate with), for
this device's own identity, and not older than the current certificate. Anything else is
one more goaway (relay.net.dialer logs it and dials again later).

Built from the identity files at start, and again after a renewal or a reload, so the
notBefore is always the certificate the next dial presents.

A heeded revocation is also recorded in the state directory (`revoked.json`: the
certificate's SHA-256 fingerprint, its serial and the time; nothing else). launchd and
Task Scheduler restart a process that failed whatever its exit status, so the next start
reads it and exits 3 at once instead of dialling to be told again. A new enrollment
brings another certificate: the marker no longer matches and is removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from relay.ops import privatefiles, replacing
from relay.trust import pki
from relay.trust.identity import identity_from_certificate
from relay.trust.notice import NoticeError, verify_notice
from relay.trust.revocation import notice_in_reason

__all__ = ["MARKER_FILE", "RevocationCheck", "record_revoked", "revoked_since"]

log = logging.getLogger(__name__)

MARKER_FILE = "revoked.json"


def _ca_keys(
    cas: list[x509.Certificate], site: str | None
) -> tuple[ec.EllipticCurvePublicKey, ...]:
    """The keys of the pinned CAs that may speak for `site`: the CAs that name it, or,
    only when none does, the legacy CAs (which name no site), the rule the sealed
    session's TLS follows (relay.seal.policy.load_site_cas). A legacy CA beside the
    site's own is some other issuer's, whose word about this device proves nothing."""
    by_site: dict[str | None, list[ec.EllipticCurvePublicKey]] = {}
    for ca in cas:
        try:
            ca_site = pki.site_of_ca(ca)
        except pki.PkiError:
            continue
        key = ca.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            by_site.setdefault(ca_site, []).append(key)
    return tuple(by_site.get(site) or by_site.get(None) or ())


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


def _fingerprint(cert_path: Path) -> tuple[str, str]:
    """SHA-256 of the certificate (DER, hex) and its serial (hex)."""
    cert = pki.load_cert(cert_path)
    return cert.fingerprint(hashes.SHA256()).hex(), format(cert.serial_number, "x")


def record_revoked(state_dir: Path, cert_path: Path, when: datetime | None = None) -> Path:
    """Write the marker for the certificate at `cert_path`, atomically (a crash leaves
    the old marker or the new one, never half of one). OSError, PkiError if it cannot."""
    sha256, serial = _fingerprint(cert_path)
    at = (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    data = json.dumps({"certificate_sha256": sha256, "serial": serial, "revoked_at": at})
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / MARKER_FILE
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = privatefiles.create_private(tmp)  # as control.json: the state dir is this user's
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data + "\n")
            f.flush()
            os.fsync(f.fileno())
        replacing.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def revoked_since(state_dir: Path, cert_path: Path) -> str | None:
    """When the certificate at `cert_path` was revoked, if the marker names it; else None,
    and a marker naming another certificate (a device enrolled again) is removed."""
    path = state_dir / MARKER_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(raw)
        named, at = str(marker["certificate_sha256"]), str(marker["revoked_at"])
    except (ValueError, KeyError, TypeError):
        named, at = "", ""  # unreadable: it proves nothing; a revoked device is told again
    if named and named == _fingerprint(cert_path)[0]:
        return at
    log.warning(
        "this device has a certificate that was not revoked; removing the old revocation marker",
        extra={"marker": str(path), "revoked_certificate": named or "unreadable"},
    )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return None
