"""Who is at the other end of a link: SPIFFE-style identities carried in one URI SAN.

Role and site are authorization inputs, so they come only from the certificate's single
URI SAN (never from the CN, which is informative), and the parser is strict: anything that
is not exactly one of the three shapes below is refused rather than guessed at.

    spiffe://<trust-domain>/gateway/<name>
    spiffe://<trust-domain>/agent/<site>
    spiffe://<trust-domain>/device/<site>/<name>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

from cryptography import x509

Role = Literal["gateway", "agent", "device"]

ROLES: Final[frozenset[str]] = frozenset(get_args(Role))
SCHEME_PREFIX: Final = "spiffe://"
MAX_URI_LENGTH: Final = 2048  # the SPIFFE ID limit
MAX_TRUST_DOMAIN_LENGTH: Final = 255
MAX_NAME_LENGTH: Final = 64

_TRUST_DOMAIN_RE: Final = re.compile(r"[a-z0-9._-]{1,255}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


class IdentityError(ValueError):
    """A SPIFFE ID or certificate does not carry a valid relay identity."""


def check_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if valid: lowercase letters, digits, '.', '-', '_' (SPIFFE)."""
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise IdentityError(
            f"invalid trust domain {trust_domain!r}: expected 1-255 characters "
            "of lowercase a-z, 0-9, '.', '-', '_'"
        )
    if trust_domain.strip(".") == "":
        raise IdentityError(f"invalid trust domain {trust_domain!r}")
    return trust_domain


def check_name(name: object, what: str = "name") -> str:
    """Return `name` if it is a valid site, device, gateway or service name
    ([A-Za-z0-9._-]{1,64}); the one rule for every name that ends up in an identity, a
    stream target, a file name or a registry key ('.' and '..' are refused).

    Raises IdentityError (a ValueError, so config readers name the key).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise IdentityError(
            f"invalid {what} {name!r}: expected 1-64 characters of A-Z, a-z, 0-9, '.', '-', '_'"
        )
    return name


@dataclass(frozen=True)
class Identity:
    """A relay identity; constructing one validates it, so every instance is well formed."""

    trust_domain: str
    role: Role
    site: str | None
    name: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if self.role not in ROLES:
            raise IdentityError(f"invalid role {self.role!r}: expected one of {sorted(ROLES)}")
        if self.role == "gateway":
            if self.site is not None:
                raise IdentityError("a gateway identity has no site")
        else:
            if self.site is None:
                raise IdentityError(f"an {self.role} identity needs a site")
            check_name(self.site, "site name")
            if self.role == "agent" and self.name != self.site:
                raise IdentityError("an agent identity's name must equal its site")
        check_name(self.name, "device name" if self.role == "device" else "name")

    @classmethod
    def gateway(cls, trust_domain: str, name: str) -> Identity:
        return cls(trust_domain, "gateway", None, name)

    @classmethod
    def agent(cls, trust_domain: str, site: str) -> Identity:
        return cls(trust_domain, "agent", site, site)

    @classmethod
    def device(cls, trust_domain: str, site: str, name: str) -> Identity:
        return cls(trust_domain, "device", site, name)

    @property
    def uri(self) -> str:
        base = f"{SCHEME_PREFIX}{self.trust_domain}/{self.role}"
        if self.role == "gateway":
            return f"{base}/{self.name}"
        if self.role == "agent":
            return f"{base}/{self.site}"
        return f"{base}/{self.site}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def trust_domain_uri(trust_domain: str) -> str:
    """The SPIFFE ID of a trust domain itself (what the CA certificate carries)."""
    return SCHEME_PREFIX + check_trust_domain(trust_domain)


CA_SITE_SEGMENT: Final = "site"


def site_ca_uri(trust_domain: str, site: str) -> str:
    """The SPIFFE ID a site CA carries: `spiffe://TD/site/SITE` (ties the CA to its site)."""
    return f"{trust_domain_uri(trust_domain)}/{CA_SITE_SEGMENT}/{check_name(site, 'site')}"


def parse_ca_uri(uri: str) -> tuple[str, str | None]:
    """(trust domain, site) of a CA's URI SAN: `spiffe://TD/site/SITE`, or the legacy
    `spiffe://TD` (site None)."""
    domain, path = _split(uri)
    if path is None:
        return domain, None
    segments = path.split("/")
    if len(segments) != 2 or segments[0] != CA_SITE_SEGMENT:
        raise IdentityError(f"bad CA ID {uri!r}: expected spiffe://TD/site/SITE")
    try:
        return domain, check_name(segments[1], "site")
    except IdentityError as exc:
        raise IdentityError(f"{exc} in {uri!r}") from None


def _split(uri: str) -> tuple[str, str | None]:
    """Split a spiffe:// URI into (trust domain, path or None), validating the domain."""
    if not isinstance(uri, str):
        raise IdentityError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
    if len(uri) > MAX_URI_LENGTH:
        raise IdentityError(f"SPIFFE ID longer than {MAX_URI_LENGTH} characters")
    if not uri.startswith(SCHEME_PREFIX):
        raise IdentityError(f"not a SPIFFE ID (expected 'spiffe://...'): {uri!r}")
    rest = uri[len(SCHEME_PREFIX) :]
    domain, slash, path = rest.partition("/")
    if not domain:
        raise IdentityError(f"SPIFFE ID without a trust domain: {uri!r}")
    try:
        check_trust_domain(domain)
    except IdentityError as exc:
        raise IdentityError(f"{exc} in {uri!r}") from None
    return domain, (path if slash else None)


def parse_trust_domain_uri(uri: str) -> str:
    """Parse 'spiffe://TD' (no path) and return TD."""
    domain, path = _split(uri)
    if path is not None:
        raise IdentityError(f"expected a trust domain ID without a path: {uri!r}")
    return domain


def parse_spiffe_uri(uri: str) -> Identity:
    """Parse a relay SPIFFE ID strictly; raise IdentityError with the reason otherwise."""
    domain, path = _split(uri)
    if not path:
        raise IdentityError(f"SPIFFE ID without a path: {uri!r}")
    segments = path.split("/")
    role, args = segments[0], segments[1:]
    expected = {"gateway": 1, "agent": 1, "device": 2}
    if role not in expected:
        raise IdentityError(f"unknown role {role!r} in {uri!r}: expected gateway, agent or device")
    if len(args) != expected[role]:
        shape = {
            "gateway": "/gateway/NAME",
            "agent": "/agent/SITE",
            "device": "/device/SITE/NAME",
        }[role]
        raise IdentityError(f"bad path in {uri!r}: expected {shape}")
    try:
        if role == "gateway":
            return Identity.gateway(domain, args[0])
        if role == "agent":
            return Identity.agent(domain, args[0])
        return Identity.device(domain, args[0], args[1])
    except IdentityError as exc:
        raise IdentityError(f"{exc} in {uri!r}") from None


def certificate_uris(cert: x509.Certificate) -> list[str]:
    """All URI SANs of `cert` (empty if it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:  # duplicate or malformed extensions
        raise IdentityError(f"unreadable certificate extensions: {exc}") from None
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The identity in the certificate's one URI SAN; the CN is ignored on purpose."""
    uris = certificate_uris(cert)
    if len(uris) != 1:
        raise IdentityError(f"certificate must carry exactly one URI SAN, found {len(uris)}")
    return parse_spiffe_uri(uris[0])


def identity_from_der(der: bytes) -> Identity:
    """Parse a DER certificate (as from getpeercert(binary_form=True)) to its identity."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"unreadable certificate: {exc}") from None
    return identity_from_certificate(cert)
