"""gateway.casites: each trusted CA's site, and the bundles it refuses at start-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from gateway.casites import load_ca_sites
from relay.net.tls import TlsConfigError
from relay.trust import pki
from relay.trust.identity import Identity
from tests.pki_helpers import make_pki


def der(path: Path) -> bytes:
    return pki.load_cert(path).public_bytes(serialization.Encoding.DER)


def test_two_site_cas_each_vouch_for_their_own_site(tmp_path: Path) -> None:
    main, north = make_pki(tmp_path / "a"), make_pki(tmp_path / "b", site="north")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(main.ca.read_bytes() + north.ca.read_bytes())
    sites = load_ca_sites(bundle)
    assert sites.trust_domain == "hospital.test"
    assert sorted(sites.sites.values()) == ["main", "north"]
    td = main.trust_domain
    own = main.device("ws1")
    assert sites.refusal(Identity.device(td, "main", "ws1"), der(own.cert)) is None
    forged = main.issue("forged", Identity.device(td, "north", "ws1"))
    assert sites.refusal(Identity.device(td, "north", "ws1"), der(forged.cert)) == "wrong_site"
    agent = north.agent
    assert sites.refusal(Identity.agent(td, "north"), der(agent.cert)) is None


def _legacy_ca(path: Path) -> None:
    """A CA as `relay pki init` made them before CAs named their site."""
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DMZ Relay CA old")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://hospital.test")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pki.write_cert(path, cert)


def test_a_legacy_ca_stops_start_up_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    _legacy_ca(path)
    with pytest.raises(TlsConfigError, match=rf"{path}: CA 'CN=DMZ Relay CA old' names no site"):
        load_ca_sites(path)


def test_cas_of_two_trust_domains_are_refused(tmp_path: Path) -> None:
    a = make_pki(tmp_path / "a")
    b = make_pki(tmp_path / "b", trust_domain="other.test", site="x")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(a.ca.read_bytes() + b.ca.read_bytes())
    with pytest.raises(TlsConfigError, match="several trust domains"):
        load_ca_sites(bundle)
