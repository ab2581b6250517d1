"""Who may be at the other end of a sealed session, and the TLS contexts that check it.

The inner TLS is between the device and its site's agent; the gateway is not a party.
The device is the TLS client (it opens the outer `session` stream) and presents its
device certificate; the agent is the server and presents its agent certificate (which
carries serverAuth). Both verify the chain against the site CA only, then check the
SPIFFE identity: same trust domain, the expected role, the same site. The agent also
refuses revoked devices itself (its registry), whatever the gateway let through.

Enrollment is sealed too: the device has no certificate yet, so the agent's context for
`dmzrelay-enroll-seal/1` asks for none, and the device authenticates the agent against
the CA pinned by the enrollment code.

Hostnames are not checked (the agent has no DNS name the device dials): the identity
check of the URI SAN replaces it, which is stricter (role and site, not just a name).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from relay.net.tls import TlsConfigError, load_cert_and_key, load_trusted_cas
from relay.seal.core import PeerCheck
from relay.trust import pki
from relay.trust.identity import Identity
from relay.wire import ALPN_ENROLL_SEAL, ALPN_SESSION, TARGET_ENROLL, TARGET_SESSION

__all__ = [
    "ALPN_ENROLL_SEAL",
    "ALPN_SESSION",
    "ENROLL_HELLO_SEALED",
    "TARGET_ENROLL",
    "TARGET_SESSION",
    "agent_check",
    "device_check",
    "enroll_client_context",
    "enroll_server_context",
    "no_client_check",
    "session_client_context",
    "session_server_context",
]

#: The clear hello of an `enroll` stream (the site CA) says "v": 2 when the rest of the
#: exchange runs inside TLS; an agent that still says 1 is refused by the PC.
ENROLL_HELLO_SEALED: Final = 2
#: Resumption: the agent issues one TLS 1.3 ticket per session (OpenSSL's default ticket
#: lifetime, 2 h); a reconnect within it skips the certificate exchange. The agent
#: re-checks revocation on every session, resumed or not.


def _context(protocol: int, alpn: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols([alpn])
    return ctx


def session_client_context(
    cert: Path, key: Path, ca: Path, *, site: str | None = None
) -> ssl.SSLContext:
    """The device's context: its certificate; the agent verified against the CAs of
    `site` in `ca` only (`load_site_cas`, as the agent does for devices); None: every CA
    of `ca`."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ALPN_SESSION)
    ctx.check_hostname = False  # replaced by agent_check (URI SAN: role, site, domain)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if site is None:
        load_trusted_cas(ctx, ca)
    else:
        load_site_cas(ctx, ca, site, peer="agent")
    load_cert_and_key(ctx, cert, key)
    return ctx


def session_server_context(
    cert: Path, key: Path, ca: Path, *, site: str | None = None
) -> ssl.SSLContext:
    """The agent's context: a device certificate is required and verified, against the
    CAs of `site` in `ca` only (`load_site_cas`); None: every CA of `ca`."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, ALPN_SESSION)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 1
    if site is None:
        load_trusted_cas(ctx, ca)
    else:
        load_site_cas(ctx, ca, site)
    load_cert_and_key(ctx, cert, key)
    return ctx


def _site_of(ca_cert: x509.Certificate) -> str | None:
    """The site a CA of the bundle issues for (None: a CA older than sites); "" for a CA
    that is not one of ours (no SPIFFE URI)."""
    try:
        return pki.site_of_ca(ca_cert)
    except pki.PkiError:
        return ""


def load_site_cas(ctx: ssl.SSLContext, ca: Path, site: str, *, peer: str = "device") -> None:
    """Trust, of the CAs in the bundle `ca`, only those that issue for `site`.

    The agent's `tls.ca` may hold other sites' CAs (the one that issued a gateway's
    certificate, in a gateway shared by sites), and the inner TLS would take a device
    certificate from any of them: a CA of site B could mint `device/A/NAME`, which the
    identity check passes, and a compromised gateway would not stop it (the gateway's
    `wrong_site` check is not ours to rely on). The device's `ca.crt` likewise (that CA
    could mint `agent/A`, read the session and answer it, a sealed REVOKED included).
    A CA made before CAs named their site (`spiffe://TD` only) is used only when no CA
    names `site`. A TlsConfigError ("ca") when none is left; `peer` names whom it would
    refuse."""
    try:
        certs = pki.load_certs(ca)
    except pki.PkiError as exc:
        raise TlsConfigError(f"{ca}: cannot load CA certificates ({exc})", "ca") from None
    own = [cert for cert in certs if _site_of(cert) == site]
    if not own:
        own = [cert for cert in certs if _site_of(cert) is None]
    if not own:
        raise TlsConfigError(f"{ca}: no CA of site {site!r}: every {peer} would be refused", "ca")
    ctx.load_verify_locations(cadata="".join(c.public_bytes(Encoding.PEM).decode() for c in own))


def enroll_client_context(pinned_ca: Path | str) -> ssl.SSLContext:
    """`relay enroll`: no certificate; the agent verified against the pinned CA (a file,
    or the PEM text that matched the code's fingerprint)."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ALPN_ENROLL_SEAL)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    if isinstance(pinned_ca, str):
        ctx.load_verify_locations(cadata=pinned_ca)
    else:
        load_trusted_cas(ctx, pinned_ca)
    return ctx


def enroll_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The agent's enrollment context: no client certificate (the device has none yet)."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, ALPN_ENROLL_SEAL)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.num_tickets = 0
    load_cert_and_key(ctx, cert, key)
    return ctx


def _expect(peer: Identity | None, trust_domain: str, role: str, site: str) -> str | None:
    if peer is None:
        return "no_certificate"
    if peer.trust_domain != trust_domain:
        return "wrong_domain"
    if peer.role != role:
        return "wrong_role"
    if peer.site != site:
        return "wrong_site"
    return None


def agent_check(trust_domain: str, site: str) -> PeerCheck:
    """The device's check: the peer is `agent/<our site>` in our trust domain."""
    return lambda peer: _expect(peer, trust_domain, "agent", site)


def device_check(
    trust_domain: str, site: str, is_revoked: Callable[[Identity], bool] | None = None
) -> PeerCheck:
    """The agent's check: `device/<our site>/NAME` in our trust domain, not revoked."""

    def check(peer: Identity | None) -> str | None:
        reason = _expect(peer, trust_domain, "device", site)
        if reason is None and peer is not None and is_revoked is not None and is_revoked(peer):
            return "revoked"
        return reason

    return check


def no_client_check(peer: Identity | None) -> str | None:
    """The agent's enrollment check: there is no client certificate to check."""
    return None
