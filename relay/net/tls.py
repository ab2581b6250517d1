"""TLS contexts for relay links, and the small vocabulary of why a link was refused.

Everything is TLS 1.3 and ALPN-named. The server context asks for a client certificate
but does not require one (CERT_OPTIONAL), because enrollment arrives without one on its
own ALPN; a certificate that *is* presented is always verified against the site CA during
the handshake. After the handshake the caller checks the ALPN, then `peer_identity()` and
`refusal_for_identity()` for the tunnel ALPNs (one per role: device, agent). An unknown
ALPN is not fatal in OpenSSL (the handshake completes with no protocol selected): the
caller refuses it.

Servers run the handshake with `accept_tls()` (not plain transport + loop.start_tls,
which loses the ClientHello under uvloop), and feed failures to
`classify_handshake_error()`.

Refusal reasons are a small fixed set so they can be Prometheus label values.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, Literal, TypeVar, cast

from relay.ops.config import ConfigError
from relay.trust.identity import Identity, identity_from_der
from relay.trust.pki import PkiError, load_cert, trust_domain_of_ca
from relay.wire import ALPN_AGENT, ALPN_DEVICE, ALPN_ENROLL

__all__ = [
    "HANDSHAKE_REFUSALS",
    "IDENTITY_CACHE_SIZE",
    "IDENTITY_REFUSALS",
    "TlsConfigError",
    "TlsPart",
    "accept_tls",
    "classify_handshake_error",
    "client_context",
    "load_cert_and_key",
    "load_trusted_cas",
    "peer_identity",
    "refusal_for_identity",
    "server_context",
    "tls_config_error",
    "trust_domain_of",
]

# One ALPN per endpoint, so that a certificate of one role offered on the other's endpoint
# is refused (an agent process started with a device certificate, say).

#: Handshake failure reasons returned by `classify_handshake_error`.
HANDSHAKE_REFUSALS: Final = (
    "expired",
    "unknown_ca",
    "no_certificate",
    "bad_certificate",
    "protocol",
    "timeout",
    "eof",
    "other",
)
#: Post-handshake reasons returned by `refusal_for_identity`.
IDENTITY_REFUSALS: Final = ("no_certificate", "wrong_domain", "wrong_role")


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


#: Which file of a TLS endpoint a TlsConfigError is about: the names of the config keys
#: (`tls.cert`, `tls.key`, `tls.ca`), so that start-up can name the key to fix.
TlsPart = Literal["cert", "key", "ca"]


class TlsConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file, `part`
    which of the three it is (None: not known)."""

    def __init__(self, message: str, part: TlsPart | None = None) -> None:
        super().__init__(message)
        self.part = part


def tls_config_error(exc: TlsConfigError, file: Path, section: str = "tls") -> ConfigError:
    """A role's start-up error for `exc`: the config file, the key of the file at fault
    (`tls.key`), and the message, which names the path."""
    key = f"{section}.{exc.part}" if exc.part is not None else section
    return ConfigError(file, key, str(exc))


def _base_context(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # Strict RFC 5280 checks of the peer's chain; our own PKI is issued to pass them.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # No compression; no session tickets: resumption buys nothing for a few long-lived
    # links and costs per-link memory (the server also sets num_tickets = 0).
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    return ctx


def load_trusted_cas(ctx: ssl.SSLContext, ca: Path) -> None:
    """Trust the CAs of `ca` in `ctx`; a TlsConfigError ("ca") naming the file and why."""
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise TlsConfigError(f"{ca}: CA file not found", "ca") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsConfigError(f"{ca}: cannot load CA certificates ({exc})", "ca") from None


def load_cert_and_key(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Present `cert` with `key` from `ctx`; a TlsConfigError naming the file at fault
    ("cert" or "key": missing, unloadable, or a key of another certificate) and why."""
    if not Path(cert).is_file():
        raise TlsConfigError(f"{cert}: certificate file not found", "cert")
    if not Path(key).is_file():
        raise TlsConfigError(f"{key}: private key file not found", "key")
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsConfigError(f"{key} does not match the certificate {cert}", "key") from None
        raise _unloadable(cert, key, exc) from None
    except OSError as exc:
        raise _unloadable(cert, key, exc) from None


def _unloadable(cert: Path, key: Path, exc: Exception) -> TlsConfigError:
    """OpenSSL's error for a pair that does not load ("PEM lib") does not say which file
    is at fault: the certificate is, if it does not load alone."""
    try:
        ssl.create_default_context(cafile=str(cert))
    except (ssl.SSLError, OSError, ValueError):
        return TlsConfigError(f"{cert}: cannot load the certificate ({exc})", "cert")
    return TlsConfigError(f"{key}: cannot load the private key ({exc})", "key")


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The gateway's listener context: TLS 1.3, client cert optional but verified if sent."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.num_tickets = 0
    load_cert_and_key(ctx, cert, key)
    load_trusted_cas(ctx, ca)
    ctx.set_alpn_protocols([ALPN_DEVICE, ALPN_AGENT, ALPN_ENROLL])
    return ctx


def client_context(
    cert: Path | None, key: Path | None, ca: Path, alpn: str = ALPN_DEVICE
) -> ssl.SSLContext:
    """A dialer's context: TLS 1.3, the server verified against `ca` only (no system roots).

    check_hostname is on: pass server_hostname = the host dialled (a DNS name or IP that
    the gateway certificate lists). `cert`/`key` go together; enrollment passes neither.
    """
    if (cert is None) != (key is None):
        raise TlsConfigError("a client certificate and its key must be given together")
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    load_trusted_cas(ctx, ca)
    if cert is not None and key is not None:
        load_cert_and_key(ctx, cert, key)
    ctx.set_alpn_protocols([alpn])
    return ctx


async def accept_tls(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    protocol_factory: Callable[[], _P],
    *,
    handshake_timeout: float,
) -> tuple[asyncio.Transport, _P]:
    """Server-side TLS handshake on a socket from `accept()`; raises the handshake's error.

    Uses loop.connect_accepted_socket(ssl=...) so the TLS protocol owns the socket before
    its first read. A plain transport followed by loop.start_tls() loses the ClientHello
    under uvloop (uvloop starts reading right after connection_made, so pause_reading()
    there is a no-op, and the bytes reach the plain protocol before start_tls runs).
    Failures (pass them to classify_handshake_error) close the socket. Sets TCP_NODELAY.
    """
    loop = asyncio.get_running_loop()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(
            protocol_factory, sock, ssl=ctx, ssl_handshake_timeout=handshake_timeout
        )
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    if transport.get_extra_info("ssl_object") is None:  # lost while completing
        transport.abort()
        raise ConnectionResetError("connection lost during the TLS handshake")
    # uvloop hands back its own SSL protocol object; the application protocol is behind it.
    return transport, cast(_P, transport.get_protocol())


#: Certificates whose identity `peer_identity` remembers (about 1 KB each).
IDENTITY_CACHE_SIZE: Final = 1024


@functools.lru_cache(maxsize=IDENTITY_CACHE_SIZE)
def _identity_of(der: bytes) -> Identity:
    return identity_from_der(der)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Identity | None:
    """The verified peer's identity, or None if it sent no certificate.

    Raises IdentityError if the certificate (signed by our CA) carries no valid relay
    SPIFFE ID; count that as "bad_certificate". Devices reconnect with the same
    certificate, and parsing it is ~4% of a gateway handshake: identities are cached by
    the certificate's DER (bounded LRU; an Identity is immutable, and the chain was
    verified by this handshake).
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return _identity_of(der)


def refusal_for_identity(
    identity: Identity | None, trust_domain: str, expected_roles: set[str]
) -> str | None:
    """Why an authenticated peer may not use this endpoint, or None if it may."""
    if identity is None:
        return "no_certificate"
    if identity.trust_domain != trust_domain:
        return "wrong_domain"
    if identity.role not in expected_roles:
        return "wrong_role"
    return None


def trust_domain_of(ca_cert_path: Path) -> str:
    """The trust domain stored in the site CA certificate (see relay.trust.pki)."""
    try:
        return trust_domain_of_ca(load_cert(Path(ca_cert_path)))
    except PkiError as exc:
        raise TlsConfigError(f"{ca_cert_path}: {exc}") from None


# --- classifying handshake failures ------------------------------------------------------

# OpenSSL X509_V_ERR_* codes (stable across 1.1 and 3.x).
_VERIFY_EXPIRED: Final = frozenset({10})  # CERT_HAS_EXPIRED
_VERIFY_UNKNOWN_CA: Final = frozenset(
    {
        2,  # UNABLE_TO_GET_ISSUER_CERT
        18,  # DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # SELF_SIGNED_CERT_IN_CHAIN
        20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }
)
# The same outcomes as seen by the other side: TLS alerts in the OpenSSL reason string.
_REASON_MARKERS: Final = (
    ("CERTIFICATE_EXPIRED", "expired"),
    ("UNKNOWN_CA", "unknown_ca"),
    ("CERTIFICATE_REQUIRED", "no_certificate"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_certificate"),
    ("BAD_CERTIFICATE", "bad_certificate"),
    ("UNSUPPORTED_CERTIFICATE", "bad_certificate"),
    ("CERTIFICATE_REVOKED", "bad_certificate"),
    ("CERTIFICATE_UNKNOWN", "bad_certificate"),
    ("CERTIFICATE_VERIFY_FAILED", "bad_certificate"),
    ("UNEXPECTED_EOF", "eof"),
    ("PROTOCOL_VERSION", "protocol"),
    ("UNSUPPORTED_PROTOCOL", "protocol"),
    ("VERSION_TOO_LOW", "protocol"),
    ("WRONG_VERSION_NUMBER", "protocol"),
    ("HTTP_REQUEST", "protocol"),
    ("HTTPS_PROXY_REQUEST", "protocol"),
    ("NO_SHARED_CIPHER", "protocol"),
    ("NO_SUITABLE", "protocol"),
    ("NO_APPLICATION_PROTOCOL", "protocol"),
    ("HANDSHAKE_FAILURE", "protocol"),
    ("RECORD_LAYER_FAILURE", "protocol"),
    ("PACKET_LENGTH_TOO_LONG", "protocol"),
    ("DECODE_ERROR", "protocol"),
    ("ILLEGAL_PARAMETER", "protocol"),
    ("INAPPROPRIATE_FALLBACK", "protocol"),
    ("MISSING_EXTENSION", "protocol"),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes/contexts (bounded: event loops sometimes wrap ssl errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify_one(exc: BaseException) -> str | None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _VERIFY_EXPIRED:
            return "expired"
        if code in _VERIFY_UNKNOWN_CA:
            return "unknown_ca"
        return "bad_certificate"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".upper()
        for marker, reason in _REASON_MARKERS:
            if marker in text:
                return reason
        return "protocol"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionAbortedError) and "TAKING LONGER" in str(exc).upper():
        return "timeout"  # asyncio's and uvloop's ssl_handshake_timeout
    if isinstance(
        exc,
        ConnectionResetError
        | ConnectionAbortedError
        | BrokenPipeError
        | asyncio.IncompleteReadError
        | EOFError,
    ):
        return "eof"
    return None


def classify_handshake_error(exc: BaseException) -> str:
    """Map a failed TLS handshake (either side; stdlib asyncio or uvloop) to a reason.

    Verification failures seen locally use OpenSSL's verify_code (expired, unknown_ca,
    everything else bad_certificate: not-yet-valid, wrong purpose/EKU, hostname
    mismatch, bad signature); failures reported by the peer arrive as TLS alerts and are
    read from the reason. Result is always one of HANDSHAKE_REFUSALS.
    """
    for link in _chain(exc):
        reason = _classify_one(link)
        if reason is not None:
            return reason
    return "other"
