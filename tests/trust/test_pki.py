"""relay.trust.pki: the site CA, the certificate profile, and the files `relay pki` writes."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    VerificationError,
)

from relay.trust import pki
from relay.trust.identity import Identity, certificate_uris, identity_from_certificate
from relay.trust.pki import PkiError

TD = "hospital.test"
GATEWAY_NAMES = ["gw.example.org", "localhost", "127.0.0.1", "::1"]


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_pki(directory, TD, "main", GATEWAY_NAMES)
    return directory


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


# --- relay pki init -------------------------------------------------------------------


def test_init_writes_the_six_files(pki_dir: Path) -> None:
    assert sorted(p.name for p in pki_dir.iterdir()) == sorted(pki.PKI_INIT_FILES)
    for name in ("ca.crt", "gateway.crt", "agent.crt"):
        assert (pki_dir / name).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for name in ("ca.key", "gateway.key", "agent.key"):
        pem = (pki_dir / name).read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
        assert isinstance(pki.load_key(pki_dir / name), ec.EllipticCurvePrivateKey)


def test_private_keys_are_mode_0600(pki_dir: Path, tmp_path: Path) -> None:
    for name in ("ca.key", "gateway.key", "agent.key"):
        assert _mode(pki_dir / name) == 0o600, name
    assert _mode(pki_dir / "ca.crt") == 0o644
    pki.issue_device(pki_dir, "main", "ws1", tmp_path / "dev")
    assert _mode(tmp_path / "dev" / "device.key") == 0o600


def test_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pki.init_pki(tmp_path / "p", TD, "main", ["localhost"])
    finally:
        os.umask(old)
    assert _mode(tmp_path / "p" / "ca.key") == 0o600


def test_init_refuses_to_overwrite_ca_key(pki_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in pki_dir.iterdir()}
    with pytest.raises(PkiError, match=r"ca\.(crt|key) already exists; refusing to overwrite"):
        pki.init_pki(pki_dir, TD, "main", ["localhost"])
    assert {p.name: p.read_bytes() for p in pki_dir.iterdir()} == before


def test_init_refuses_when_only_ca_key_exists(tmp_path: Path) -> None:
    tmp_path.joinpath("ca.key").write_text("precious")
    with pytest.raises(PkiError, match=r"ca\.key already exists"):
        pki.init_pki(tmp_path, TD, "main", ["localhost"])
    assert tmp_path.joinpath("ca.key").read_text() == "precious"
    assert not tmp_path.joinpath("ca.crt").exists()


def test_ca_certificate_profile(pki_dir: Path) -> None:
    ca = pki.load_cert(pki_dir / "ca.crt")
    bc = _ext(ca, x509.BasicConstraints)
    assert bc.critical
    assert isinstance(bc.value, x509.BasicConstraints)
    assert (bc.value.ca, bc.value.path_length) == (True, 0)
    ku = _ext(ca, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert pki.trust_domain_of_ca(ca) == TD
    assert ca.signature_hash_algorithm is not None
    assert ca.signature_hash_algorithm.name == "sha256"
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.curve.name == "secp256r1"
    ca.verify_directly_issued_by(ca)


def test_gateway_certificate_has_requested_sans(pki_dir: Path) -> None:
    cert = pki.load_cert(pki_dir / "gateway.crt")
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TD}/gateway/gw.example.org"
    ]
    assert identity_from_certificate(cert) == Identity.gateway(TD, "gw.example.org")
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_gateway_identity_from_an_ipv6_first_name(tmp_path: Path) -> None:
    pki.init_pki(tmp_path, TD, "main", ["[::1]", "localhost"])
    cert = pki.load_cert(tmp_path / "gateway.crt")
    assert identity_from_certificate(cert) == Identity.gateway(TD, "--1")
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]


def test_agent_certificate(pki_dir: Path) -> None:
    cert = pki.load_cert(pki_dir / "agent.crt")
    assert identity_from_certificate(cert) == Identity.agent(TD, "main")
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_leaf_profile(pki_dir: Path) -> None:
    ca = pki.load_cert(pki_dir / "ca.crt")
    for name in ("gateway.crt", "agent.crt"):
        cert = pki.load_cert(pki_dir / name)
        bc = _ext(cert, x509.BasicConstraints)
        assert bc.critical
        assert isinstance(bc.value, x509.BasicConstraints)
        assert not bc.value.ca
        ku = _ext(cert, x509.KeyUsage)
        assert ku.critical
        assert isinstance(ku.value, x509.KeyUsage)
        assert ku.value.digital_signature and not ku.value.key_cert_sign
        aki = _ext(cert, x509.AuthorityKeyIdentifier).value
        ski = _ext(ca, x509.SubjectKeyIdentifier).value
        assert isinstance(aki, x509.AuthorityKeyIdentifier)
        assert isinstance(ski, x509.SubjectKeyIdentifier)
        assert aki.key_identifier == ski.digest
        _ext(cert, x509.SubjectKeyIdentifier)
        cert.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    ("td", "site", "names", "match"),
    [
        ("Hospital", "main", ["localhost"], "trust domain"),
        (TD, "ma/in", ["localhost"], "site"),
        (TD, "main", [], "at least one gateway name"),
        (TD, "main", ["  "], "at least one gateway name"),
        (TD, "main", ["bad_name.example"], "invalid gateway name"),
        (TD, "main", ["-x.example"], "invalid gateway name"),
    ],
)
def test_init_rejects_bad_input_without_writing(
    tmp_path: Path, td: str, site: str, names: list[str], match: str
) -> None:
    with pytest.raises(PkiError, match=match):
        pki.init_pki(tmp_path / "p", td, site, names)
    assert not (tmp_path / "p" / "ca.key").exists()


# --- relay pki issue ------------------------------------------------------------------


def test_issue_device(pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ws1"
    pki.issue_device(pki_dir, "main", "ws1", out)
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "device.crt", "device.key"]
    assert (out / "ca.crt").read_bytes() == (pki_dir / "ca.crt").read_bytes()
    cert = pki.load_cert(out / "device.crt")
    assert identity_from_certificate(cert) == Identity.device(TD, "main", "ws1")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30) + pki.BACKDATE
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = pki.load_key(out / "device.key")
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_issue_device_takes_trust_domain_from_ca(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "p", "other.example", "north", ["localhost"])
    pki.issue_device(tmp_path / "p", "north", "ws7", tmp_path / "o", lifetime=timedelta(days=2))
    cert = pki.load_cert(tmp_path / "o" / "device.crt")
    assert identity_from_certificate(cert).uri == "spiffe://other.example/device/north/ws7"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=2) + pki.BACKDATE


def test_ca_names_its_site(pki_dir: Path) -> None:
    ca = pki.load_cert(pki_dir / "ca.crt")
    assert certificate_uris(ca) == [f"spiffe://{TD}/site/main"]
    assert (pki.trust_domain_of_ca(ca), pki.site_of_ca(ca)) == (TD, "main")
    agent = pki.load_cert(pki_dir / "agent.crt")
    assert pki.key_identifier(agent, authority=True) == pki.key_identifier(ca, authority=False)


def test_a_legacy_ca_has_a_trust_domain_and_no_site() -> None:
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = datetime.now(UTC)
    legacy = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TD}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    assert (pki.trust_domain_of_ca(legacy), pki.site_of_ca(legacy)) == (TD, None)


def test_a_ca_does_not_issue_for_another_site(pki_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="CA of site 'main'; it cannot issue for site 'north'"):
        pki.issue_device(pki_dir, "north", "ws1", tmp_path / "o")
    with pytest.raises(PkiError, match="cannot issue for site 'north'"):
        pki.issue_agent(pki_dir, "north", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_reissue_replaces_files_atomically(pki_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ws1"
    pki.issue_device(pki_dir, "main", "ws1", out)
    first = (out / "device.crt").read_bytes()
    pki.issue_device(pki_dir, "main", "ws1", out, force=True)
    assert (out / "device.crt").read_bytes() != first
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "device.crt", "device.key"]


def test_issue_keeps_an_identity_already_in_out_without_force(
    pki_dir: Path, tmp_path: Path
) -> None:
    """It silently replaced it (that PC then cut off), unlike `relay enroll` and `pki init`."""
    out = tmp_path / "ws1"
    pki.issue_device(pki_dir, "main", "ws1", out)
    first = (out / "device.crt").read_bytes(), (out / "device.key").read_bytes()
    with pytest.raises(pki.PkiError, match=r"already holds a device identity .*--force"):
        pki.issue_device(pki_dir, "main", "ws2", out)
    assert ((out / "device.crt").read_bytes(), (out / "device.key").read_bytes()) == first


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(days=367)])
def test_issue_refuses_a_lifetime_out_of_bounds(
    pki_dir: Path, tmp_path: Path, lifetime: timedelta
) -> None:
    with pytest.raises(pki.PkiError, match="at most 366d"):
        pki.issue_device(pki_dir, "main", "ws1", tmp_path / "o", lifetime)
    assert not (tmp_path / "o").exists()


def test_issue_device_errors(pki_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="invalid device name"):
        pki.issue_device(pki_dir, "main", "../evil", tmp_path / "o")
    with pytest.raises(PkiError, match=r"nowhere/ca\.crt: file not found"):
        pki.issue_device(tmp_path / "nowhere", "main", "ws1", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_load_ca_detects_a_mismatched_key(pki_dir: Path) -> None:
    pki.write_key(pki_dir / "ca.key", pki.generate_key())
    with pytest.raises(PkiError, match="does not match"):
        pki.load_ca(pki_dir)


def test_load_ca_refuses_a_leaf(pki_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "fake"
    d.mkdir()
    (d / "ca.crt").write_bytes((pki_dir / "agent.crt").read_bytes())
    (d / "ca.key").write_bytes((pki_dir / "agent.key").read_bytes())
    with pytest.raises(PkiError, match="not a CA certificate"):
        pki.load_ca(d)


def test_issue_gateway_and_agent_renewal(pki_dir: Path, tmp_path: Path) -> None:
    pki.issue_gateway(pki_dir, ["gw2.example.org", "10.0.0.1"], tmp_path / "g")
    cert = pki.load_cert(tmp_path / "g" / "gateway.crt")
    assert identity_from_certificate(cert) == Identity.gateway(TD, "gw2.example.org")
    pki.issue_agent(pki_dir, "main", tmp_path / "a")
    agent = pki.load_cert(tmp_path / "a" / "agent.crt")
    assert identity_from_certificate(agent) == Identity.agent(TD, "main")
    assert _mode(tmp_path / "a" / "agent.key") == 0o600


# --- the lower-level API --------------------------------------------------------------


def test_not_before_makes_expired_certificates() -> None:
    ca_key, ca_cert = pki.create_ca(TD, "main", timedelta(days=10))
    key = pki.generate_key()
    start = datetime.now(UTC) - timedelta(days=2)
    cert = pki.issue_certificate(
        ca_key,
        ca_cert,
        key.public_key(),
        Identity.device(TD, "main", "old"),
        timedelta(days=1),
        not_before=start,
    )
    assert cert.not_valid_before_utc == start.replace(microsecond=0)
    assert cert.not_valid_after_utc < datetime.now(UTC)


def test_leaf_never_outlives_its_ca() -> None:
    ca_key, ca_cert = pki.create_ca(TD, "main", timedelta(days=1))
    cert = pki.issue_certificate(
        ca_key,
        ca_cert,
        pki.generate_key().public_key(),
        Identity.device(TD, "main", "ws1"),
        timedelta(days=30),
    )
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_only_gateways_get_dns_sans() -> None:
    ca_key, ca_cert = pki.create_ca(TD, "main")
    with pytest.raises(PkiError, match="only gateway"):
        pki.issue_certificate(
            ca_key,
            ca_cert,
            pki.generate_key().public_key(),
            Identity.device(TD, "main", "ws1"),
            timedelta(days=1),
            dns_names=["ws1.example.org"],
        )


def test_serials_are_random_and_large() -> None:
    ca_key, ca_cert = pki.create_ca(TD, "main")
    ident = Identity.device(TD, "main", "ws1")
    serials = {
        pki.issue_certificate(
            ca_key, ca_cert, pki.generate_key().public_key(), ident, timedelta(days=1)
        ).serial_number
        for _ in range(4)
    }
    assert len(serials) == 4
    assert all(s.bit_length() > 64 for s in serials)


def test_csr_round_trip() -> None:
    key = pki.generate_key()
    ident = Identity.device(TD, "main", "ws1")
    csr = pki.make_csr(key, ident)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    loaded = x509.load_pem_x509_csr(pem)
    public_key = pki.check_csr(loaded)
    assert public_key.public_numbers() == key.public_key().public_numbers()
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ident.uri]
    ca_key, ca_cert = pki.create_ca(TD, "main")
    cert = pki.issue_certificate(ca_key, ca_cert, public_key, ident, timedelta(days=1))
    assert identity_from_certificate(cert) == ident


def test_csr_with_another_curve_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="P-256"):
        pki.check_csr(csr)


def test_ca_fingerprint(pki_dir: Path) -> None:
    ca = pki.load_cert(pki_dir / "ca.crt")
    fp = pki.ca_fingerprint(ca)
    assert fp == hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert len(fp) == 64 and fp == fp.lower()


def test_write_cert_bundle_round_trip(tmp_path: Path) -> None:
    _, a = pki.create_ca("a.test", "main")
    _, b = pki.create_ca("b.test", "main")
    pki.write_cert(tmp_path / "bundle.crt", [a, b])
    assert pki.load_certs(tmp_path / "bundle.crt") == [a, b]
    assert pki.load_cert(tmp_path / "bundle.crt") == a
    with pytest.raises(PkiError, match="no certificate to write"):
        pki.write_cert(tmp_path / "empty.crt", [])


def test_write_key_replaces_a_world_readable_file_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("old")
    path.chmod(0o644)
    pki.write_key(path, pki.generate_key())
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary left behind


def test_exclusive_write_refuses_existing(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("old")
    with pytest.raises(PkiError, match="already exists"):
        pki.write_key(path, pki.generate_key(), exclusive=True)
    assert path.read_text() == "old"


def test_load_key_errors(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"missing\.key: file not found"):
        pki.load_key(tmp_path / "missing.key")
    (tmp_path / "garbage.key").write_text("not a key")
    with pytest.raises(PkiError, match="not a PEM private key"):
        pki.load_key(tmp_path / "garbage.key")
    enc = pki.generate_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "enc.key").write_bytes(enc)
    with pytest.raises(PkiError, match="encrypted private keys are not supported"):
        pki.load_key(tmp_path / "enc.key")
    other = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "p384.key").write_bytes(other)
    with pytest.raises(PkiError, match="P-256"):
        pki.load_key(tmp_path / "p384.key")


def test_oversized_pem_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.crt"
    big.write_bytes(b"x" * (pki.MAX_PEM_BYTES + 1))
    with pytest.raises(PkiError, match="larger than"):
        pki.load_cert(big)


def test_trust_domain_of_a_leaf_is_an_error(pki_dir: Path) -> None:
    with pytest.raises(PkiError, match="no trust domain"):
        pki.trust_domain_of_ca(pki.load_cert(pki_dir / "agent.crt"))


# --- an independent RFC 5280 verifier accepts the profile -------------------------------


def test_cryptography_verifier_accepts_our_chains(pki_dir: Path, tmp_path: Path) -> None:
    store = Store([pki.load_cert(pki_dir / "ca.crt")])
    builder = PolicyBuilder().store(store)
    gateway = pki.load_cert(pki_dir / "gateway.crt")
    builder.build_server_verifier(DNSName("gw.example.org")).verify(gateway, [])
    builder.build_server_verifier(IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(gateway, [])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(DNSName("evil.example.org")).verify(gateway, [])
    pki.issue_device(pki_dir, "main", "ws1", tmp_path / "d")
    device = pki.load_cert(tmp_path / "d" / "device.crt")
    verified = builder.build_client_verifier().verify(device, [])
    assert verified.subjects is not None
    assert x509.UniformResourceIdentifier(f"spiffe://{TD}/device/main/ws1") in verified.subjects
    agent = pki.load_cert(pki_dir / "agent.crt")
    builder.build_client_verifier().verify(agent, [])
    with pytest.raises(VerificationError):  # a device certificate is no server certificate
        builder.build_server_verifier(DNSName("gw.example.org")).verify(device, [])
