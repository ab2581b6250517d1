"""The site PKI: one ECDSA P-256 CA per site, and the certificates it issues.

Profile (checked by OpenSSL with X509_V_FLAG_X509_STRICT and by cryptography's RFC 5280
verifier in the tests):

- CA: self-signed, BasicConstraints CA pathlen 0 (critical), KeyUsage keyCertSign+cRLSign
  (critical), SKI. Its only URI SAN, `spiffe://TD/site/SITE`, names the trust domain and
  the site it issues for (`trust_domain_of_ca()`, `site_of_ca()` read them back), so that a
  gateway trusting several site CAs refuses a certificate whose site is not its issuer's.
  CAs made before sites were recorded carry `spiffe://TD` only (site None).
- Leaf: BasicConstraints CA false (critical), KeyUsage digitalSignature (critical),
  ExtendedKeyUsage (gateway serverAuth; agent serverAuth+clientAuth, because it may be the
  server of the end-to-end layer; device clientAuth), exactly one URI SAN with the identity,
  plus DNS/IP SANs for a gateway, SKI and AKI, a random serial, SHA-256 signature.
- The CN is informative only (the name); authorization reads the URI SAN.

Private keys are PEM PKCS#8, unencrypted, written with mode 0600 from the start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.ops import privatefiles, replacing
from relay.trust.identity import (
    Identity,
    IdentityError,
    certificate_uris,
    parse_ca_uri,
    site_ca_uri,
)
from relay.trust.users import check_username

CA_LIFETIME: Final = timedelta(days=3650)
SERVER_LIFETIME: Final = timedelta(days=730)  # gateway and agent certificates
DEVICE_LIFETIME: Final = timedelta(days=30)
# The longest a device certificate may live: the agent's `pki.device_lifetime` bound
# (relay.agent.config.MAX_DEVICE_LIFETIME). A lost PC's certificate must end some day.
MAX_DEVICE_LIFETIME: Final = timedelta(days=366)
#: Leaf certificates start this long before "now", so small clock skew between the agent
#: and a device does not make a fresh certificate "not yet valid".
BACKDATE: Final = timedelta(minutes=5)
#: Refuse to read PEM files larger than this (a CA bundle of a few certificates is < 10 KB).
MAX_PEM_BYTES: Final = 1 << 20
#: Keys are written private (relay.ops.privatefiles: 0600, or a user-only ACL on Windows).
PRIVATE_MODE: Final = 0o600

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
PKI_INIT_FILES: Final = (
    "ca.crt",
    "ca.key",
    "gateway.crt",
    "gateway.key",
    "agent.crt",
    "agent.key",
)

_DNS_LABEL_RE: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_NAME_UNSAFE_RE: Final = re.compile(r"[^A-Za-z0-9._-]")


class PkiError(Exception):
    """A user-facing PKI failure; the message is one line and names the file if any."""


# --- keys and certificates -------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime:
    return datetime.now(dt.UTC).replace(microsecond=0)


def _check_p256(key: object, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) or not (
        isinstance(key.curve, ec.SECP256R1)
    ):
        raise PkiError(f"{what}: expected an ECDSA P-256 key")


def create_ca(
    trust_domain: str, site: str, lifetime: timedelta = CA_LIFETIME
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA of `site`, whose only URI SAN is `spiffe://TD/site/SITE`."""
    try:
        td_uri = site_ca_uri(trust_domain, site)
    except IdentityError as exc:
        raise PkiError(str(exc)) from None
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"DMZ Relay CA {trust_domain}"[:64])])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td_uri)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _ca_uri(ca_cert: x509.Certificate) -> tuple[str, str | None]:
    try:
        uris = certificate_uris(ca_cert)
        if len(uris) != 1:
            raise IdentityError(f"expected exactly one URI SAN, found {len(uris)}")
        return parse_ca_uri(uris[0])
    except IdentityError as exc:
        raise PkiError(f"CA certificate carries no trust domain: {exc}") from None


def trust_domain_of_ca(ca_cert: x509.Certificate) -> str:
    """The trust domain stored in a CA certificate by `create_ca` (its URI SAN)."""
    return _ca_uri(ca_cert)[0]


def site_of_ca(ca_cert: x509.Certificate) -> str | None:
    """The site a CA issues for (`spiffe://TD/site/SITE`), or None for a legacy CA."""
    return _ca_uri(ca_cert)[1]


def key_identifier(cert: x509.Certificate, *, authority: bool) -> bytes | None:
    """The certificate's Subject (or, with `authority`, Authority) Key Identifier."""
    kind: type[x509.SubjectKeyIdentifier] | type[x509.AuthorityKeyIdentifier]
    kind = x509.AuthorityKeyIdentifier if authority else x509.SubjectKeyIdentifier
    try:
        value = cert.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    if isinstance(value, x509.AuthorityKeyIdentifier):
        return value.key_identifier
    return value.digest


def check_ca_site(ca_cert: x509.Certificate, site: str, what: str) -> None:
    """Refuse to issue a certificate of `site` from a CA of another site."""
    ca_site = site_of_ca(ca_cert)
    if ca_site is not None and ca_site != site:
        raise PkiError(
            f"{what}: the CA is the CA of site {ca_site!r}; it cannot issue for site {site!r}"
        )


def _eku_for(identity: Identity) -> list[x509.ObjectIdentifier]:
    if identity.role == "gateway":
        return [ExtendedKeyUsageOID.SERVER_AUTH]
    if identity.role == "agent":
        return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.CLIENT_AUTH]


def _leaf_subject(identity: Identity, user: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]
    if user is not None:
        if identity.role != "device":
            raise PkiError("only device certificates carry a directory user")
        try:
            check_username(user)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        attributes.append(x509.NameAttribute(NameOID.USER_ID, user))
    return x509.Name(attributes)


def user_of_certificate(cert: x509.Certificate) -> str | None:
    """The directory user a device certificate names (subject UID), or None."""
    values = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
    return str(values[0].value) if len(values) == 1 else None


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    identity: Identity,
    lifetime: timedelta,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    not_before: datetime | None = None,
    user: str | None = None,
) -> x509.Certificate:
    """Sign a leaf certificate for `identity` (the one URI SAN) and `public_key`.

    `user` (a device's directory user) goes into the subject as UID
    (0.9.2342.19200300.100.1.1, after the CN): informational, for people and logs that
    read certificates; the URI SAN stays the identity every check uses.

    Validity: [not_before, not_before + lifetime] if `not_before` is given (tests use it to
    make expired certificates); otherwise [now - BACKDATE, now + lifetime]. The end is
    clamped to the CA's own expiry, so no leaf outlives its issuer.
    """
    _check_p256(public_key, "certificate public key")
    dns_names, ip_addresses = list(dns_names), list(ip_addresses)
    if identity.role != "gateway" and (dns_names or ip_addresses):
        raise PkiError("only gateway certificates carry DNS or IP SANs")
    if not_before is None:
        now = _now()
        start, end = now - BACKDATE, now + lifetime
    else:
        start = not_before if not_before.tzinfo else not_before.replace(tzinfo=dt.UTC)
        end = start + lifetime
    end = min(end, ca_cert.not_valid_after_utc)
    if end <= start:
        raise PkiError("certificate would be valid for no time (CA expired or lifetime <= 0)")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_addresses]
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(_leaf_subject(identity, user))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(_eku_for(identity)), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def make_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> x509.CertificateSigningRequest:
    """A CSR naming `identity` (the signer must decide the identity itself, not trust this)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def check_csr(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's public key, once its self-signature and key type are checked.

    The signature proves the requester holds the private key; the CSR's names are
    ignored by design (the signer takes the identity from the enrollment record).
    """
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, InvalidSignature, TypeError) as exc:
        raise PkiError(f"unreadable CSR: {exc}") from None
    if not valid:
        raise PkiError("CSR signature is invalid")
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PkiError("CSR key must be ECDSA P-256")
    _check_p256(public_key, "CSR")
    return public_key


def ca_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (what enrollment codes pin)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --- files ------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int, exclusive: bool) -> None:
    """Write `data` to `path` with `mode` from creation on.

    exclusive: fail if `path` exists (O_EXCL). Otherwise write a temporary file beside it
    and rename it over `path`, so a reader never sees a half-written key or certificate.
    """
    path = Path(path)
    target = path if exclusive else path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        if mode == PRIVATE_MODE:  # user-only by the platform's means (ACL on Windows)
            fd = privatefiles.create_private(target)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(target, flags, mode)
    except FileExistsError:
        raise PkiError(f"{target} already exists; refusing to overwrite it") from None
    except privatefiles.PrivateFileError as exc:
        raise PkiError(str(exc)) from None
    except OSError as exc:
        raise PkiError(f"cannot create {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if target != path:
            replacing.replace(target, path)  # Windows: a scanner may hold the fresh file
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise PkiError(f"cannot write {path}: {exc.strerror}") from None


def write_key(path: Path, key: ec.EllipticCurvePrivateKey, *, exclusive: bool = False) -> None:
    """Write an unencrypted PKCS#8 PEM private key, private from creation on (mode 0600;
    a user-only ACL on Windows)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(Path(path), pem, PRIVATE_MODE, exclusive)


def write_cert(
    path: Path,
    cert: x509.Certificate | Sequence[x509.Certificate],
    *,
    exclusive: bool = False,
) -> None:
    """Write one certificate or a chain/bundle as concatenated PEM, mode 0644."""
    certs = [cert] if isinstance(cert, x509.Certificate) else list(cert)
    if not certs:
        raise PkiError(f"{path}: no certificate to write")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    _write_file(Path(path), pem, 0o644, exclusive)


def _read_pem(path: Path) -> bytes:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise PkiError(f"{path}: file not found") from None
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise PkiError(f"{path}: larger than {MAX_PEM_BYTES} bytes")
    return data


def load_certs(path: Path) -> list[x509.Certificate]:
    """All certificates of a PEM file (at least one)."""
    try:
        certs = x509.load_pem_x509_certificates(_read_pem(path))
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate ({exc})") from None
    if not certs:
        raise PkiError(f"{path}: no certificate found")
    return certs


def load_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return load_certs(path)[0]


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM ECDSA P-256 private key."""
    data = _read_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"{path}: encrypted private keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path}: expected an ECDSA P-256 private key")
    return key


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """DIR/ca.key and DIR/ca.crt, checked to be a CA and a matching pair."""
    directory = Path(directory)
    cert = load_cert(directory / CA_CERT)
    key = load_key(directory / CA_KEY)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except (x509.ExtensionNotFound, ValueError):
        is_ca = False
    if not is_ca:
        raise PkiError(f"{directory / CA_CERT}: not a CA certificate")
    cert_key = cert.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or _public_der(cert_key) != _public_der(
        key.public_key()
    ):
        raise PkiError(f"{directory / CA_KEY} does not match {directory / CA_CERT}")
    return key, cert


# --- the commands: relay pki init / relay pki issue -------------------------------------


def split_host_names(
    names: Iterable[str],
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Split gateway names into DNS names and IP addresses, validating each."""
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in names:
        name = raw.strip()
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            if ip not in ips:
                ips.append(ip)
            continue
        host = name.lower().rstrip(".")
        labels = host.split(".")
        if not host or len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(x) for x in labels):
            raise PkiError(f"invalid gateway name {raw!r}: expected a DNS host name or an IP")
        if host not in dns:
            dns.append(host)
    if not dns and not ips:
        raise PkiError("at least one gateway name or IP address is required")
    return dns, ips


def _gateway_identity_name(first: str) -> str:
    """The name in the gateway's SPIFFE ID: its first host name, made SPIFFE-safe (::1)."""
    bare = first.strip().strip("[]").lower()
    return _NAME_UNSAFE_RE.sub("-", bare)[:64].strip(".") or "gateway"


def _write_pair(
    out: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, exclusive: bool
) -> None:
    write_key(out / f"{stem}.key", key, exclusive=exclusive)
    write_cert(out / f"{stem}.crt", cert, exclusive=exclusive)


def _issue_gateway(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    trust_domain: str,
    gateway_names: Sequence[str],
    lifetime: timedelta,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    names = [n for n in gateway_names if n.strip()]
    dns, ips = split_host_names(names)
    identity = Identity.gateway(trust_domain, _gateway_identity_name(names[0]))
    key = generate_key()
    cert = issue_certificate(
        ca_key, ca_cert, key.public_key(), identity, lifetime, dns_names=dns, ip_addresses=ips
    )
    return key, cert


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {directory}: {exc.strerror}") from None


def init_pki(
    directory: Path,
    trust_domain: str,
    site: str,
    gateway_names: Sequence[str],
    *,
    ca_lifetime: timedelta = CA_LIFETIME,
    lifetime: timedelta = SERVER_LIFETIME,
) -> None:
    """`relay pki init`: a new site CA, a gateway and an agent certificate in DIR.

    Refuses to touch a directory that already holds any of the six files (above all
    ca.key: overwriting it would orphan every device). ca.key is created first with
    O_EXCL, so two concurrent runs cannot both succeed.
    """
    directory = Path(directory)
    existing = [name for name in PKI_INIT_FILES if (directory / name).exists()]
    if existing:
        raise PkiError(
            f"{directory / existing[0]} already exists; refusing to overwrite an existing PKI"
        )
    try:
        agent_identity = Identity.agent(trust_domain, site)
    except IdentityError as exc:
        raise PkiError(str(exc)) from None
    ca_key, ca_cert = create_ca(trust_domain, site, ca_lifetime)
    gw_key, gw_cert = _issue_gateway(ca_key, ca_cert, trust_domain, gateway_names, lifetime)
    agent_key = generate_key()
    agent_cert = issue_certificate(
        ca_key, ca_cert, agent_key.public_key(), agent_identity, lifetime
    )
    _mkdir(directory)
    write_key(directory / CA_KEY, ca_key, exclusive=True)
    write_cert(directory / CA_CERT, ca_cert, exclusive=True)
    _write_pair(directory, "gateway", gw_key, gw_cert, exclusive=True)
    _write_pair(directory, "agent", agent_key, agent_cert, exclusive=True)


def issue_gateway(
    directory: Path,
    gateway_names: Sequence[str],
    out: Path,
    lifetime: timedelta = SERVER_LIFETIME,
) -> None:
    """Re-issue OUT/gateway.crt gateway.key ca.crt from DIR's CA (renewal, new names)."""
    ca_key, ca_cert = load_ca(directory)
    key, cert = _issue_gateway(
        ca_key, ca_cert, trust_domain_of_ca(ca_cert), gateway_names, lifetime
    )
    out = Path(out)
    _mkdir(out)
    _write_pair(out, "gateway", key, cert, exclusive=False)
    write_cert(out / CA_CERT, ca_cert)


def issue_agent(
    directory: Path, site: str, out: Path, lifetime: timedelta = SERVER_LIFETIME
) -> None:
    """Re-issue OUT/agent.crt agent.key ca.crt from DIR's CA (renewal)."""
    _issue_for_site(
        directory, site, out, stem="agent", identity_in=lambda td: Identity.agent(td, site),
        lifetime=lifetime,
    )  # fmt: skip


def issue_device(
    directory: Path,
    site: str,
    device: str,
    out: Path,
    lifetime: timedelta = DEVICE_LIFETIME,
    *,
    force: bool = False,
) -> None:
    """`relay pki issue`: OUT/device.crt device.key ca.crt, signed offline by DIR's CA.

    The trust domain comes from the CA certificate. An identity already in OUT is kept
    unless `force` (as `relay enroll` does: replacing it cuts that PC off); forced, its
    files are replaced atomically, never left half-written.
    """
    if not timedelta(0) < lifetime <= MAX_DEVICE_LIFETIME:
        raise PkiError(
            f"a device certificate lives above 0s and at most {MAX_DEVICE_LIFETIME.days}d"
        )
    held = [name for name in ("device.crt", "device.key") if (Path(out) / name).exists()]
    if held and not force:
        raise PkiError(
            f"{out} already holds a device identity ({', '.join(held)}); pass --force to replace it"
        )
    _issue_for_site(
        directory, site, out, stem="device",
        identity_in=lambda td: Identity.device(td, site, device), lifetime=lifetime,
    )  # fmt: skip


def _issue_for_site(
    directory: Path,
    site: str,
    out: Path,
    *,
    stem: str,
    identity_in: Callable[[str], Identity],
    lifetime: timedelta,
) -> None:
    """OUT/STEM.crt STEM.key ca.crt for `identity_in(trust domain)`, signed by DIR's CA
    once it is checked to be SITE's; existing files are replaced atomically."""
    ca_key, ca_cert = load_ca(directory)
    check_ca_site(ca_cert, site, str(directory / CA_CERT))
    try:
        identity = identity_in(trust_domain_of_ca(ca_cert))
    except IdentityError as exc:
        raise PkiError(str(exc)) from None
    key = generate_key()
    cert = issue_certificate(ca_key, ca_cert, key.public_key(), identity, lifetime)
    out = Path(out)
    _mkdir(out)
    _write_pair(out, stem, key, cert, exclusive=False)
    write_cert(out / CA_CERT, ca_cert)
