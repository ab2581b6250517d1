"""relay.trust.identity: strict SPIFFE ID parsing and identities taken from certificates."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from relay.trust.identity import (
    Identity,
    IdentityError,
    check_name,
    identity_from_certificate,
    identity_from_der,
    parse_spiffe_uri,
    parse_trust_domain_uri,
    trust_domain_uri,
)

# --- valid identities ---------------------------------------------------------------------


def test_gateway_uri_and_str() -> None:
    ident = parse_spiffe_uri("spiffe://hospital.test/gateway/gw1.example.org")
    assert ident == Identity("hospital.test", "gateway", None, "gw1.example.org")
    assert ident.uri == "spiffe://hospital.test/gateway/gw1.example.org"
    assert str(ident) == ident.uri


def test_agent_name_is_site() -> None:
    ident = parse_spiffe_uri("spiffe://hospital.test/agent/main")
    assert (ident.role, ident.site, ident.name) == ("agent", "main", "main")
    assert Identity.agent("hospital.test", "main") == ident
    assert ident.uri == "spiffe://hospital.test/agent/main"


def test_device_uri() -> None:
    ident = Identity.device("hospital.test", "main", "Dr_Smith-PC.1")
    assert ident.uri == "spiffe://hospital.test/device/main/Dr_Smith-PC.1"
    assert parse_spiffe_uri(ident.uri) == ident


def test_identity_is_frozen_and_hashable() -> None:
    ident = Identity.device("td", "s", "n")
    with pytest.raises(AttributeError):
        ident.name = "other"  # type: ignore[misc]
    assert {ident: 1}[Identity.device("td", "s", "n")] == 1


def test_trust_domain_uri_round_trip() -> None:
    assert trust_domain_uri("hospital.test") == "spiffe://hospital.test"
    assert parse_trust_domain_uri("spiffe://hospital.test") == "hospital.test"
    for bad in ("spiffe://hospital.test/", "spiffe://hospital.test/agent/x", "spiffe://"):
        with pytest.raises(IdentityError):
            parse_trust_domain_uri(bad)


# --- invalid identities ----------------------------------------------------------------

MALFORMED = [
    "",
    "spiffe://",
    "spiffe:///agent/main",
    "http://td/agent/main",
    "SPIFFE://td/agent/main",
    "spiffe:/td/agent/main",
    "spiffe://TD/agent/main",  # trust domain must be lowercase
    "spiffe://td",
    "spiffe://td/",
    "spiffe://td/agent",
    "spiffe://td/agent/",
    "spiffe://td/agent/main/",
    "spiffe://td/agent/main/extra",
    "spiffe://td//agent/main",
    "spiffe://td/Agent/main",
    "spiffe://td/admin/main",
    "spiffe://td/gateway",
    "spiffe://td/gateway/a/b",
    "spiffe://td/device/main",
    "spiffe://td/device/main/",
    "spiffe://td/device//ws1",
    "spiffe://td/device/main/ws1/x",
    "spiffe://td/agent/main?x=1",
    "spiffe://td/agent/main#frag",
    "spiffe://user@td/agent/main",
    "spiffe://td:8443/agent/main",
    "spiffe://td/agent/a%2Fb",
    "spiffe://td/agent/..",
    "spiffe://td/agent/.",
    "spiffe://td/device/main/ws 1",
    "spiffe://td/device/main/ws\u00fc",
    "spiffe://td/agent/" + "a" * 65,
    "spiffe://" + "a" * 256 + "/agent/main",
    "spiffe://td/agent/main\n",
    " spiffe://td/agent/main",
]


@pytest.mark.parametrize("uri", MALFORMED)
def test_malformed_uris_are_refused(uri: str) -> None:
    with pytest.raises(IdentityError):
        parse_spiffe_uri(uri)


def test_error_messages_say_why() -> None:
    with pytest.raises(IdentityError, match="unknown role 'admin'"):
        parse_spiffe_uri("spiffe://td/admin/x")
    with pytest.raises(IdentityError, match="/device/SITE/NAME"):
        parse_spiffe_uri("spiffe://td/device/x")
    with pytest.raises(IdentityError, match="trust domain"):
        parse_spiffe_uri("spiffe://Td/agent/x")


def test_identity_error_is_a_value_error() -> None:
    assert issubclass(IdentityError, ValueError)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("td", "agent", "main", "other"), "must equal its site"),
        (("td", "gateway", "main", "gw"), "no site"),
        (("td", "device", None, "ws1"), "needs a site"),
        (("td", "admin", "main", "x"), "invalid role"),
        (("td", "device", "main", "a/b"), "invalid device name"),
        (("td", "device", "m/n", "ws1"), "invalid site"),
        (("", "gateway", None, "gw"), "trust domain"),
    ],
)
def test_constructor_validates(args: tuple[str, str, str | None, str], match: str) -> None:
    with pytest.raises(IdentityError, match=match):
        Identity(*args)  # type: ignore[arg-type]


# --- Hypothesis ---------------------------------------------------------------------------

NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
names = st.text(NAME_ALPHABET, min_size=1, max_size=64).filter(lambda s: s not in (".", ".."))
trust_domains = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=255).filter(
    lambda s: s.strip(".") != ""
)
identities = st.one_of(
    st.builds(Identity.gateway, trust_domains, names),
    st.builds(Identity.agent, trust_domains, names),
    st.builds(Identity.device, trust_domains, names, names),
)


@given(identities)
def test_round_trip(ident: Identity) -> None:
    parsed = parse_spiffe_uri(ident.uri)
    assert parsed == ident
    assert str(parsed) == ident.uri


@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(lambda s: "spiffe://" + s, st.text(max_size=80)),
        st.builds(lambda s: "spiffe://td/" + s, st.text(max_size=80)),
    )
)
def test_any_text_parses_exactly_or_raises_identity_error(text: str) -> None:
    try:
        ident = parse_spiffe_uri(text)
    except IdentityError:
        return
    assert ident.uri == text  # nothing is normalised, so nothing can be smuggled


# --- identities from certificates ---------------------------------------------------------


def _cert(cn: str, sans: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_identity_comes_from_uri_san_not_cn() -> None:
    cert = _cert(
        "spiffe://td/agent/main",  # a lying CN
        [
            x509.DNSName("ws1.example.org"),
            x509.UniformResourceIdentifier("spiffe://td/device/main/ws1"),
        ],
    )
    assert identity_from_certificate(cert) == Identity.device("td", "main", "ws1")
    der = cert.public_bytes(serialization.Encoding.DER)
    assert identity_from_der(der) == Identity.device("td", "main", "ws1")


def test_certificate_without_san_is_refused() -> None:
    with pytest.raises(IdentityError, match="exactly one URI SAN, found 0"):
        identity_from_certificate(_cert("spiffe://td/agent/main", None))


def test_certificate_without_uri_san_is_refused() -> None:
    with pytest.raises(IdentityError, match="found 0"):
        identity_from_certificate(_cert("x", [x509.DNSName("a.example.org")]))


def test_certificate_with_two_uri_sans_is_refused() -> None:
    cert = _cert(
        "x",
        [
            x509.UniformResourceIdentifier("spiffe://td/device/main/ws1"),
            x509.UniformResourceIdentifier("spiffe://td/agent/main"),
        ],
    )
    with pytest.raises(IdentityError, match="found 2"):
        identity_from_certificate(cert)


def test_certificate_with_malformed_uri_is_refused() -> None:
    cert = _cert("x", [x509.UniformResourceIdentifier("spiffe://td/agent/main/extra")])
    with pytest.raises(IdentityError, match="bad path"):
        identity_from_certificate(cert)


def test_garbage_der_is_refused() -> None:
    with pytest.raises(IdentityError, match="unreadable certificate"):
        identity_from_der(b"\x30\x03\x02\x01\x00")


# --- the callers' wording -----------------------------------------------------------------


def _check_name_nouns() -> list[tuple[str, int, str]]:
    """Every literal `what` given to check_name in the product: (file, line, text)."""
    root = Path(__file__).resolve().parents[2]
    found: list[tuple[str, int, str]] = []
    for package in ("relay", "gateway"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id == "check_name"
                    and len(node.args) == 2
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str)
                ):
                    found.append((str(path.relative_to(root)), node.lineno, node.args[1].value))
    return found


def test_check_name_callers_give_a_bare_noun() -> None:
    """check_name writes "invalid {what} ...": an article in `what` reads "invalid a site
    name"."""
    nouns = _check_name_nouns()
    assert len(nouns) >= 8  # the scan finds the callers
    wrong = [n for n in nouns if re.match(r"(a|an|the) ", n[2])]
    assert not wrong


def test_check_name_message() -> None:
    with pytest.raises(IdentityError) as info:
        check_name("main site", "site name")
    assert str(info.value).startswith("invalid site name 'main site': expected 1-64 characters")
