"""Which site each trusted CA issues for, so a certificate's site must be its issuer's.

OpenSSL checks that a peer's chain ends at one of the CAs of the bundle, but Python 3.11's
ssl module does not say which one. Each leaf names its issuer by Authority Key Identifier
(relay.trust.pki writes it); each CA of the bundle has a Subject Key Identifier and names
its site in its URI SAN (`spiffe://TD/site/SITE`). A device or agent certificate whose
issuer is the CA of another site is refused (`wrong_site`): otherwise a gateway trusting
several site CAs would let one site mint identities of another.

Every CA of the bundle must name its site: a legacy CA (`spiffe://TD` only) stops start-up
and reload with a message naming the file, because nothing would tie it to a site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from relay.net.tls import TlsConfigError
from relay.trust.identity import Identity
from relay.trust.pki import PkiError, key_identifier, load_certs, site_of_ca, trust_domain_of_ca

__all__ = ["CaSites", "load_ca_sites"]


@dataclass(frozen=True)
class CaSites:
    """The bundle's CAs by Subject Key Identifier, each with its site."""

    trust_domain: str
    sites: dict[bytes, str]

    def refusal(self, identity: Identity, der: bytes) -> str | None:
        """`wrong_site` if the certificate `der` of `identity` was not issued by a CA of
        the identity's own site; None if it was."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return "bad_certificate"
        issuer = key_identifier(cert, authority=True)
        if issuer is None or self.sites.get(issuer) != identity.site:
            return "wrong_site"
        return None


def load_ca_sites(path: Path) -> CaSites:
    """Read the CA bundle at `path`; every CA must name its site and share one trust domain."""
    try:
        certs = load_certs(Path(path))
    except PkiError as exc:
        raise TlsConfigError(str(exc), "ca") from None
    sites: dict[bytes, str] = {}
    domains: set[str] = set()
    for cert in certs:
        name = cert.subject.rfc4514_string()
        try:
            domains.add(trust_domain_of_ca(cert))
            site = site_of_ca(cert)
        except PkiError as exc:
            raise TlsConfigError(f"{path}: CA {name!r}: {exc}", "ca") from None
        if site is None:
            raise TlsConfigError(
                f"{path}: CA {name!r} names no site (a CA made before sites were recorded); "
                "make a new one with `relay pki init` so that its site is known",
                "ca",
            )
        ski = key_identifier(cert, authority=False)
        if ski is None:
            raise TlsConfigError(f"{path}: CA {name!r} has no Subject Key Identifier", "ca")
        if sites.get(ski, site) != site:
            raise TlsConfigError(f"{path}: two CAs with one key name different sites", "ca")
        sites[ski] = site
    if len(domains) != 1:
        raise TlsConfigError(
            f"{path}: CAs of several trust domains ({', '.join(sorted(domains))})", "ca"
        )
    return CaSites(domains.pop(), sites)
