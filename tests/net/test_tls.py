"""relay.net.tls: real TLS 1.3 handshakes over 127.0.0.1, on the stdlib loop and on uvloop.

Server-side outcomes are asserted on the server's own handshake exception: in TLS 1.3 the
client may finish its handshake before the server rejects the client certificate.
"""

from __future__ import annotations

import ast
import asyncio
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from relay import wire
from relay.net import tls
from relay.trust import pki
from relay.trust.identity import Identity, IdentityError, identity_from_der
from tests.pki_helpers import (
    HOST,
    ClientFn,
    LoopKind,
    Outcome,
    Pair,
    ServerMode,
    SitePki,
    handshake,
    make_pki,
    raw_client,
    run,
    tls_client,
)

TD = "hospital.test"

# Where the gateway's handshake can run: relay.net.tls.accept_tls on both loops, and plain
# loop.start_tls on the stdlib loop (under uvloop that path loses the ClientHello; see
# accept_tls's docstring).
SERVER_PATHS: list[tuple[LoopKind, ServerMode]] = [
    ("asyncio", "accept_tls"),
    ("asyncio", "start_tls"),
    ("uvloop", "accept_tls"),
]


@dataclass
class World:
    site: SitePki
    other: SitePki  # another CA, same trust domain name
    device: Pair
    expired: Pair
    not_yet_valid: Pair
    foreign_device: Pair
    no_identity: Pair  # signed by the site CA, but without a URI SAN

    def server_ctx(self) -> ssl.SSLContext:
        gw = self.site.gateway
        return tls.server_context(gw.cert, gw.key, self.site.ca)

    def client_ctx(self, pair: Pair | None, alpn: str = wire.ALPN_DEVICE) -> ssl.SSLContext:
        if pair is None:
            return tls.client_context(None, None, self.site.ca, alpn=alpn)
        return tls.client_context(pair.cert, pair.key, self.site.ca, alpn=alpn)


def _issue_without_uri(site: SitePki, directory: Path) -> Pair:
    key = pki.generate_key()
    now = datetime.now(UTC)
    ca_ski = site.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spiffe-less")]))
        .issuer_name(site.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("ws.example.org")]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(site.ca_key, hashes.SHA256())
    )
    pair = Pair(directory / "nouri.crt", directory / "nouri.key")
    pki.write_cert(pair.cert, cert)
    pki.write_key(pair.key, key)
    return pair


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    site = make_pki(tmp_path_factory.mktemp("site"), trust_domain=TD)
    other = make_pki(tmp_path_factory.mktemp("other"), trust_domain=TD)
    now = datetime.now(UTC)
    return World(
        site=site,
        other=other,
        device=site.device("ws1"),
        expired=site.device("old", not_before=now - timedelta(days=2), lifetime=timedelta(days=1)),
        not_yet_valid=site.device(
            "future", not_before=now + timedelta(days=1), lifetime=timedelta(days=1)
        ),
        foreign_device=other.device("ws9"),
        no_identity=_issue_without_uri(site, site.directory),
    )


def _go(
    kind: LoopKind,
    mode: ServerMode,
    server: ssl.SSLContext,
    client: ClientFn,
    handshake_timeout: float = 10.0,
) -> Outcome:
    return run(kind, handshake(server, client, handshake_timeout, mode))


paths = pytest.mark.parametrize(("kind", "mode"), SERVER_PATHS)


# --- accepted --------------------------------------------------------------------------


@paths
def test_device_certificate_is_accepted(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.device)))
    assert out.server_error is None and out.client_error is None
    assert out.server_alpn == out.client_alpn == wire.ALPN_DEVICE
    ident = tls.peer_identity(out.server_ssl_object)
    assert ident == Identity.device(TD, "main", "ws1")
    assert tls.refusal_for_identity(ident, TD, {"device"}) is None
    assert tls.refusal_for_identity(ident, TD, {"agent"}) == "wrong_role"
    assert out.server_ssl_object.version() == "TLSv1.3"


def test_identities_are_cached_by_certificate_within_a_bound(world: World) -> None:
    kind, mode = SERVER_PATHS[0]
    first = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.device)))
    again = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.device)))
    hits = tls._identity_of.cache_info().hits
    assert tls.peer_identity(first.server_ssl_object) == Identity.device(TD, "main", "ws1")
    assert tls.peer_identity(again.server_ssl_object) == Identity.device(TD, "main", "ws1")
    assert tls._identity_of.cache_info().hits >= hits + 1
    assert tls._identity_of.cache_info().maxsize == tls.IDENTITY_CACHE_SIZE


@paths
def test_agent_certificate_is_accepted(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.site.agent)))
    assert out.server_error is None and out.client_error is None
    ident = tls.peer_identity(out.server_ssl_object)
    assert ident is not None
    assert (ident.role, ident.site, ident.name) == ("agent", "main", "main")
    assert tls.refusal_for_identity(ident, TD, {"agent"}) is None
    assert tls.refusal_for_identity(ident, TD, {"device"}) == "wrong_role"


def test_client_sees_the_gateway_identity_and_accepts_its_dns_name(world: World) -> None:
    seen: list[Identity | None] = []

    async def client(port: int) -> str | None:
        _, writer = await asyncio.open_connection(
            HOST, port, ssl=world.client_ctx(world.device), server_hostname="localhost"
        )
        seen.append(tls.peer_identity(writer.get_extra_info("ssl_object")))
        writer.close()
        return None

    out = run("uvloop", handshake(world.server_ctx(), client))
    assert out.server_error is None and out.client_error is None
    assert seen == [Identity.gateway(TD, "localhost")]


@paths
def test_no_client_certificate_gives_no_identity(
    kind: LoopKind, mode: ServerMode, world: World
) -> None:
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(None, wire.ALPN_ENROLL)))
    assert out.server_error is None and out.client_error is None
    assert out.server_alpn == out.client_alpn == wire.ALPN_ENROLL
    assert out.server_peer_der is None
    assert tls.peer_identity(out.server_ssl_object) is None
    assert tls.refusal_for_identity(None, TD, {"device"}) == "no_certificate"


@paths
def test_unknown_alpn_is_left_for_the_caller(
    kind: LoopKind, mode: ServerMode, world: World
) -> None:
    # OpenSSL completes the handshake without ALPN; the caller must refuse that.
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.device, "h2")))
    assert out.server_error is None
    assert out.server_alpn is None


def test_certificate_signed_by_our_ca_without_uri_is_a_bad_certificate(world: World) -> None:
    out = _go(
        "asyncio", "accept_tls", world.server_ctx(), tls_client(world.client_ctx(world.no_identity))
    )
    assert out.server_error is None
    with pytest.raises(IdentityError, match="exactly one URI SAN"):
        tls.peer_identity(out.server_ssl_object)


# --- refused, seen from the server --------------------------------------------------------


def _server_reason(out: Outcome) -> str:
    assert out.server_error is not None, "the server accepted the handshake"
    reason = tls.classify_handshake_error(out.server_error)
    assert reason in tls.HANDSHAKE_REFUSALS
    return reason


@paths
def test_expired_device_certificate(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.expired)))
    assert _server_reason(out) == "expired"
    assert isinstance(out.server_error, ssl.SSLCertVerificationError)


@paths
def test_not_yet_valid_is_a_bad_certificate(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.not_yet_valid)))
    assert _server_reason(out) == "bad_certificate"


@paths
def test_certificate_from_another_ca(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.foreign_device)))
    assert _server_reason(out) == "unknown_ca"


@paths
def test_server_certificate_as_client_certificate(
    kind: LoopKind, mode: ServerMode, world: World
) -> None:
    # The gateway certificate has serverAuth only: OpenSSL's purpose check refuses it.
    out = _go(kind, mode, world.server_ctx(), tls_client(world.client_ctx(world.site.gateway)))
    assert _server_reason(out) == "bad_certificate"


@paths
def test_tls12_client_is_refused(kind: LoopKind, mode: ServerMode, world: World) -> None:
    ctx = world.client_ctx(world.device)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    out = _go(kind, mode, world.server_ctx(), tls_client(ctx))
    assert _server_reason(out) == "protocol"
    assert out.client_error is not None
    assert out.server_alpn is None


@paths
def test_plain_http_is_a_protocol_error(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), raw_client(b"GET / HTTP/1.0\r\n\r\n"))
    assert _server_reason(out) == "protocol"


@paths
def test_close_before_hello_is_eof(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), raw_client(b""))
    assert _server_reason(out) == "eof"


@paths
def test_close_mid_handshake_is_eof(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), raw_client(b"\x16\x03\x01\x02\x00\x01\x00"))
    assert _server_reason(out) == "eof"


@paths
def test_silent_client_times_out(kind: LoopKind, mode: ServerMode, world: World) -> None:
    out = _go(kind, mode, world.server_ctx(), raw_client(b"", hold=True), handshake_timeout=0.2)
    assert _server_reason(out) == "timeout"


# --- refused, seen from the client ----------------------------------------------------


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_client_refuses_a_gateway_from_another_ca(kind: LoopKind, world: World) -> None:
    other_ctx = tls.client_context(world.device.cert, world.device.key, world.other.ca)
    out = run(kind, handshake(world.server_ctx(), tls_client(other_ctx)))
    assert out.client_error is not None
    assert tls.classify_handshake_error(out.client_error) == "unknown_ca"


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_client_checks_the_host_name(kind: LoopKind, world: World) -> None:
    client = tls_client(world.client_ctx(world.device), server_hostname="evil.example.org")
    out = run(kind, handshake(world.server_ctx(), client))
    assert out.client_error is not None
    assert tls.classify_handshake_error(out.client_error) == "bad_certificate"


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_client_refuses_a_device_certificate_as_server(kind: LoopKind, world: World) -> None:
    server = tls.server_context(world.device.cert, world.device.key, world.site.ca)
    out = run(kind, handshake(server, tls_client(world.client_ctx(world.device))))
    assert out.client_error is not None
    assert tls.classify_handshake_error(out.client_error) == "bad_certificate"


# --- contexts ----------------------------------------------------------------------------


def test_context_settings(world: World) -> None:
    server = world.server_ctx()
    assert server.minimum_version == server.maximum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert server.options & ssl.OP_NO_TICKET
    assert server.num_tickets == 0
    client = world.client_ctx(world.device)
    assert client.minimum_version == client.maximum_version == ssl.TLSVersion.TLSv1_3
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


def test_context_errors_name_the_file(world: World, tmp_path: Path) -> None:
    gw = world.site.gateway
    with pytest.raises(tls.TlsConfigError, match=r"missing\.crt: certificate file not found"):
        tls.server_context(tmp_path / "missing.crt", gw.key, world.site.ca)
    with pytest.raises(tls.TlsConfigError, match=r"nope\.crt: CA file not found"):
        tls.server_context(gw.cert, gw.key, tmp_path / "nope.crt")
    with pytest.raises(tls.TlsConfigError, match=r"agent\.key does not match .*gateway\.crt"):
        tls.server_context(gw.cert, world.site.agent.key, world.site.ca)
    (tmp_path / "junk.crt").write_text("junk")
    with pytest.raises(tls.TlsConfigError, match=r"junk\.crt"):
        tls.client_context(None, None, tmp_path / "junk.crt")
    with pytest.raises(tls.TlsConfigError, match="together"):
        tls.client_context(world.device.cert, None, world.site.ca)


def test_context_errors_say_which_file_is_at_fault(world: World, tmp_path: Path) -> None:
    """`part` is the config key's last name (tls.cert, tls.key, tls.ca): OpenSSL's "PEM
    lib" for a pair that does not load says neither."""
    gw, site = world.site.gateway, world.site
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    cases = [
        ((junk, gw.key, site.ca), "cert", f"{junk}: cannot load the certificate"),
        ((gw.cert, junk, site.ca), "key", f"{junk}: cannot load the private key"),
        ((gw.cert, site.agent.key, site.ca), "key", f"{site.agent.key} does not match"),
        ((gw.cert, gw.key, junk), "ca", f"{junk}: cannot load CA certificates"),
        ((tmp_path / "no.crt", gw.key, site.ca), "cert", f"{tmp_path / 'no.crt'}: certificate"),
        ((gw.cert, tmp_path / "no.key", site.ca), "key", f"{tmp_path / 'no.key'}: private key"),
    ]
    for (cert, key, ca), part, text in cases:
        with pytest.raises(tls.TlsConfigError) as info:
            tls.server_context(cert, key, ca)
        assert (info.value.part, str(info.value).startswith(text)) == (part, True), info.value
        error = tls.tls_config_error(info.value, tmp_path / "gw.yaml")
        assert str(error) == f"{tmp_path / 'gw.yaml'}: tls.{part}: {info.value}"


def test_the_file_loaders_are_public_and_no_module_imports_a_private_name() -> None:
    """The IT pages and the sealed sessions load their files with relay.net.tls's
    loaders: those are its API (named in `__all__`), not private names reached into."""
    assert {"load_cert_and_key", "load_trusted_cas"} <= set(tls.__all__)
    assert all(hasattr(tls, name) for name in tls.__all__)
    root = Path(__file__).resolve().parents[2]
    private = []
    for source in [*(root / "relay").rglob("*.py"), *(root / "gateway").rglob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "relay.net.tls":
                private += [f"{source}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_trust_domain_of(world: World) -> None:
    assert tls.trust_domain_of(world.site.ca) == TD
    with pytest.raises(tls.TlsConfigError, match="no trust domain"):
        tls.trust_domain_of(world.device.cert)


# --- refusal reasons ---------------------------------------------------------------------


def test_refusal_for_identity() -> None:
    device = Identity.device(TD, "main", "ws1")
    assert tls.refusal_for_identity(device, TD, {"device"}) is None
    assert tls.refusal_for_identity(device, "other.test", {"device"}) == "wrong_domain"
    assert tls.refusal_for_identity(device, TD, {"agent", "gateway"}) == "wrong_role"
    assert tls.refusal_for_identity(None, TD, {"device"}) == "no_certificate"
    assert set(tls.IDENTITY_REFUSALS) == {"no_certificate", "wrong_domain", "wrong_role"}


def test_wrong_domain_certificate_from_our_ca(world: World) -> None:
    # Even a certificate our CA signed is refused if it names another trust domain.
    key = pki.generate_key()
    cert = pki.issue_certificate(
        world.site.ca_key,
        world.site.ca_cert,
        key.public_key(),
        Identity.device("elsewhere.test", "main", "ws1"),
        timedelta(days=1),
    )
    ident = identity_from_der(cert.public_bytes(Encoding.DER))
    assert tls.refusal_for_identity(ident, TD, {"device"}) == "wrong_domain"


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code = code
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (_verify_error(10), "expired"),
        (_verify_error(20), "unknown_ca"),
        (_verify_error(19), "unknown_ca"),
        (_verify_error(26), "bad_certificate"),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "eof"),
        (BrokenPipeError(), "eof"),
        (ValueError("something else"), "other"),
        (RuntimeError("wrapped"), "other"),
    ],
)
def test_classify_synthetic(exc: BaseException, reason: str) -> None:
    assert tls.classify_handshake_error(exc) == reason


def test_classify_follows_the_cause_chain() -> None:
    try:
        try:
            raise _verify_error(10)
        except ssl.SSLError as inner:
            raise RuntimeError("handshake failed") from inner
    except RuntimeError as outer:
        assert tls.classify_handshake_error(outer) == "expired"


def test_classify_cyclic_chain_terminates() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert tls.classify_handshake_error(a) == "other"
