"""`relay enroll CODE --dir OUT`: the PC side of enrollment.

1. Parse the code (gateway address, CA fingerprint, site, device, token id, secret).
2. Dial the gateway with the enrollment ALPN and no client certificate. The PC has no CA
   yet, so the TLS handshake itself cannot verify the gateway (CERT_NONE); instead:
3. open the `enroll` stream; the agent first sends the site CA. Check that its SHA-256
   equals the fingerprint in the code, that the gateway's TLS certificate chains to it
   (RFC 5280 path validation, for the host name or address dialled, at the current time)
   and names a gateway of that trust domain. Only then
4. run TLS 1.3 inside that same stream with the agent (ALPN dmzrelay-enroll-seal/1),
   the agent authenticated against the CA just pinned (relay.seal): the gateway sees
   only ciphertext from here on;
5. generate the P-256 key (it never leaves the PC), send the CSR with the code's token
   id and secret inside that TLS (and, for a code bound to a directory user, that user's
   password, asked before dialling: getpass, --password-file or --password-stdin),
   and receive the certificate;
6. check the certificate (our key, our identity, signed by the pinned CA) and install
   OUT/device.key (private: 0600, or a user-only ACL on Windows), OUT/device.crt and
   OUT/ca.crt as one set, the way renewal does (relay.trust.renewal.install): with
   --force an interruption leaves the identity that was there or, once the new files
   are all written, the new one completed at the next start; never a mix.

Every failure is an EnrollError whose str() is one line for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import ipaddress
import os
import ssl
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.jsonframes import MessageError, read_json, write_json
from relay.net.tls import classify_handshake_error
from relay.ops import privatefiles
from relay.ops.secretinput import (
    Lines,
    SecretInputError,
    SecretReader,
    read_secret_line,
    refuse_garbled,
    without_newline,
)
from relay.proto import ErrorCode, LinkClosedError, LinkSettings
from relay.seal.policy import ENROLL_HELLO_SEALED, agent_check, enroll_client_context
from relay.seal.session import establish
from relay.seal.transport import SealError
from relay.trust import pki
from relay.trust.codes import CodeError, EnrollmentCode, encode_secret, parse_code
from relay.trust.identity import Identity, IdentityError, check_name, identity_from_certificate
from relay.trust.renewal import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    RenewalError,
    complete_pending_renewal,
    install,
)
from relay.wire import ALPN_ENROLL, ALPN_ENROLL_SEAL, HEADER_SITE, HEADER_TARGET, TARGET_ENROLL

__all__ = [
    "DEFAULT_TIMEOUT",
    "EnrollError",
    "enroll",
    "enroll_ssl_context",
    "run_enroll",
    "verify_gateway",
]

DEFAULT_TIMEOUT: Final = 30.0
MAX_RESPONSE: Final = 64 * 1024
MAX_REASON: Final = 300
IDENTITY_FILES: Final = (CERT_FILE, KEY_FILE, CA_FILE)
PROTOCOL_VERSION: Final = 1
PINNED_CA_MISMATCH: Final = "the gateway's certificate is not from the pinned CA"
#: Longest directory password read from a file, stdin or the terminal (characters).
MAX_PASSWORD: Final = 1024


class EnrollError(Exception):
    """Enrollment failed; str() is one line for the user."""


def _utcnow() -> datetime:
    return datetime.now(dt.UTC)


def _one_line(text: object, limit: int = MAX_REASON) -> str:
    """Text from the network, made safe to print: printable, one line, bounded."""
    cleaned = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return cleaned[:limit] or "(no reason given)"


def enroll_ssl_context() -> ssl.SSLContext:
    """TLS 1.3 with the enrollment ALPN, no client certificate, and no chain check in the
    handshake: the PC does not have the CA yet. verify_gateway() checks the chain after."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    ctx.set_alpn_protocols([ALPN_ENROLL])
    return ctx


def _subject(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.rstrip(".").lower())


def verify_gateway(
    leaf_der: bytes | None, ca: x509.Certificate, fingerprint: str, host: str, now: datetime
) -> None:
    """Check the gateway we are talking to against the CA pinned by the code.

    `ca` is what the site sent; `fingerprint` what the code pins. Raises EnrollError.
    """
    actual = pki.ca_fingerprint(ca)
    if actual != fingerprint:
        raise EnrollError(
            f"{PINNED_CA_MISMATCH} (the site's CA is sha256 {actual[:16]}..., "
            f"the code pins {fingerprint[:16]}...)"
        )
    if not leaf_der:
        raise EnrollError(f"{PINNED_CA_MISMATCH} (the gateway sent no certificate)")
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrollError(PINNED_CA_MISMATCH) from None
    try:
        verifier = (
            PolicyBuilder().store(Store([ca])).time(now).build_server_verifier(_subject(host))
        )
        verifier.verify(leaf, [])
    except VerificationError as exc:
        raise EnrollError(
            f"the gateway's certificate is not valid for {host}: {_one_line(exc, 160)}"
        ) from None
    try:
        identity = identity_from_certificate(leaf)
        trust_domain = pki.trust_domain_of_ca(ca)
    except (IdentityError, pki.PkiError) as exc:
        raise EnrollError(f"the gateway's certificate carries no gateway identity: {exc}") from None
    if identity.role != "gateway" or identity.trust_domain != trust_domain:
        raise EnrollError(f"the certificate at {host} is not a gateway's ({identity.uri})")


def _prepare_dir(out_dir: Path, force: bool) -> None:
    """Create OUT (private: 0700, a user-only ACL on Windows) and prove it is writable
    before the code is spent; refuse to replace an identity already there unless `force`
    (it may be the one in use). An install that was interrupted is finished first, so the
    identity it leaves counts as present."""
    try:
        complete_pending_renewal(out_dir)
    except OSError as exc:
        raise EnrollError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    present = [name for name in IDENTITY_FILES if (out_dir / name).exists()]
    if present and not force:
        raise EnrollError(
            f"{out_dir} already holds an identity ({' '.join(present)}); "
            "pass --force to replace it, or choose another --dir"
        )
    try:
        if not out_dir.is_dir():
            out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            privatefiles.protect(out_dir, directory=True)
        probe = out_dir / f".enroll-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EnrollError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    except privatefiles.PrivateFileError as exc:
        raise EnrollError(str(exc)) from None


def _load_pem_cert(text: object, what: str) -> x509.Certificate:
    if not isinstance(text, str) or len(text) > MAX_RESPONSE:
        raise EnrollError(f"the site sent a malformed answer (no {what})")
    try:
        return x509.load_pem_x509_certificate(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise EnrollError(f"the site sent a malformed {what}") from None


async def _dial(
    code: EnrollmentCode,
    timeout: float,  # noqa: ASYNC109 - the TLS handshake's own limit, inside the caller's
) -> tuple[Link, bytes | None]:
    loop = asyncio.get_running_loop()
    host, port = code.gateway.host, code.gateway.port
    try:
        transport, link = await loop.create_connection(
            lambda: Link(client=True, settings=LinkSettings(), name="enroll"),
            host,
            port,
            ssl=enroll_ssl_context(),
            server_hostname=host,
            ssl_handshake_timeout=timeout,
        )
    except ssl.SSLError as exc:
        raise EnrollError(
            f"TLS handshake with the gateway {code.gateway} failed "
            f"({classify_handshake_error(exc)}: {_one_line(exc.reason or exc, 120)})"
        ) from None
    except OSError as exc:
        raise EnrollError(
            f"cannot reach the gateway {code.gateway}: {_one_line(exc.strerror or exc, 120)}"
        ) from None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_ENROLL:
        link.abort()
        raise EnrollError(f"the server at {code.gateway} does not offer enrollment")
    return link, ssl_object.getpeercert(binary_form=True)


def _closed_error(code: EnrollmentCode, link: Link | None = None) -> EnrollError:
    """The gateway ended the link: because it is shutting down (its GOAWAY said so), or,
    saying nothing, because this address made too many attempts."""
    if link is not None and link.goaway_code == ErrorCode.SHUTDOWN:
        return EnrollError(
            f"the gateway {code.gateway} is shutting down (a restart or an update); "
            "try again in a minute"
        )
    return EnrollError(
        f"the gateway {code.gateway} closed the connection (too many attempts from this "
        "address? wait a minute and retry)"
    )


def _stream_error(exc: StreamResetError, code: EnrollmentCode) -> EnrollError:
    if exc.code == ErrorCode.NO_ROUTE:
        return EnrollError(
            f"the gateway {code.gateway} has no link to the agent of site {code.site!r} "
            "right now; try again in a minute"
        )
    if exc.code == ErrorCode.FORBIDDEN:
        return EnrollError(f"the gateway {code.gateway} refused the enrollment request")
    return EnrollError(
        f"the enrollment was aborted ({ErrorCode.name_of(exc.code)}); try again or ask IT"
    )


async def enroll(
    code: str,
    out_dir: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - bounds the whole enrollment
    device: str | None = None,
    force: bool = False,
    now: Callable[[], datetime] = _utcnow,
    password: str | None = None,
) -> Path:
    """Enroll this PC with `code`; write OUT/device.crt device.key ca.crt; return the cert.

    `password`: the directory password of the code's user (sent only inside the sealed
    session; a code without a user sends none).

    `device` asserts the device name (default: the one in the code); the agent refuses
    a name the code was not issued for. An identity already in OUT is refused (before
    the code is spent) unless `force`. Raises EnrollError.
    """
    try:
        parsed = parse_code(code)
    except CodeError as exc:
        raise EnrollError(str(exc)) from None
    name = parsed.device if device is None else device
    try:
        check_name(name, "device name")
    except ValueError as exc:
        raise EnrollError(str(exc)) from None
    out_dir = Path(out_dir)
    _prepare_dir(out_dir, force)
    link: Link | None = None
    try:
        async with asyncio.timeout(timeout):
            link, leaf_der = await _dial(parsed, timeout)
            cert_path = await _exchange(
                link,
                leaf_der=leaf_der,
                code=parsed,
                device=name,
                out_dir=out_dir,
                now=now,
                password=password if parsed.user is not None else None,
            )
    except TimeoutError:
        raise EnrollError(
            f"no answer from the gateway {parsed.gateway} within {timeout:g} s"
        ) from None
    except StreamResetError as exc:
        if link is not None and link.closed.done() and exc.code == ErrorCode.INTERNAL_ERROR:
            raise _closed_error(parsed, link) from None
        if link is not None and link.goaway_code == ErrorCode.SHUTDOWN:
            raise _closed_error(parsed, link) from None
        raise _stream_error(exc, parsed) from None
    except LinkClosedError:
        raise _closed_error(parsed, link) from None
    finally:
        if link is not None:
            link.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await link.wait_closed()
    return cert_path


async def _exchange(
    link: Link,
    *,
    leaf_der: bytes | None,
    code: EnrollmentCode,
    device: str,
    out_dir: Path,
    now: Callable[[], datetime],
    password: str | None = None,
) -> Path:
    outer = link.open_stream({HEADER_TARGET: TARGET_ENROLL, HEADER_SITE: code.site})
    try:
        hello = await read_json(outer, limit=MAX_RESPONSE)
    except MessageError as exc:
        if link.conn.terminated is not None or link.closed.done():
            raise _closed_error(code, link) from None
        raise EnrollError(f"the site did not answer properly: {exc}") from None
    if hello.get("v") != ENROLL_HELLO_SEALED:
        raise EnrollError(
            "the site's agent does not seal enrollment (an older version): "
            "upgrade the agent, then enroll again"
        )
    ca = _load_pem_cert(hello.get("ca_pem"), "CA certificate")
    verify_gateway(leaf_der, ca, code.ca_fingerprint, code.gateway.host, now())
    try:
        identity = Identity.device(pki.trust_domain_of_ca(ca), code.site, device)
    except (IdentityError, pki.PkiError) as exc:
        raise EnrollError(f"cannot form this device's identity: {exc}") from None
    stream = await _seal(outer, ca, identity.trust_domain, code.site)
    key = pki.generate_key()
    csr = pki.make_csr(key, identity)
    request: dict[str, object] = {
        "v": PROTOCOL_VERSION,
        "token_id": code.token_id,
        "secret": encode_secret(code.secret),
        "device": device,
        "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    }
    if password is not None:
        request["password"] = password  # inside the sealed session only
    await write_json(stream, request)
    try:
        answer = await read_json(stream, limit=MAX_RESPONSE)
    except MessageError as exc:
        raise EnrollError(f"the site did not answer properly: {exc}") from None
    status = answer.get("status")
    if status == "refused":
        raise EnrollError(_one_line(answer.get("reason")))
    if status != "ok":
        raise EnrollError("the site sent a malformed answer (no status)")
    cert = _load_pem_cert(answer.get("cert_pem"), "certificate")
    _check_issued(cert, key.public_key(), identity, ca)
    try:
        install(out_dir, key, cert, ca)
    except RenewalError as exc:
        raise EnrollError(str(exc)) from None
    return out_dir / CERT_FILE


async def _seal(outer: ByteStream, ca: x509.Certificate, trust_domain: str, site: str) -> Stream:
    """TLS inside the enrollment stream, the agent authenticated against the pinned CA;
    the code's secret and the CSR travel only inside it. Returns the inner stream."""
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode("ascii")
    try:
        sealed = await establish(
            outer,
            enroll_client_context(ca_pem),
            server_side=False,
            alpn=ALPN_ENROLL_SEAL,
            check_peer=agent_check(trust_domain, site),
            settings=LinkSettings(),
            name="enrollment",
        )
    except SealError as exc:
        raise EnrollError(
            f"the site's agent could not be authenticated ({exc.reason}): {exc.detail}"
        ) from None
    inner = sealed.link.open_stream({HEADER_TARGET: TARGET_ENROLL})
    hello = await read_json(inner, limit=MAX_RESPONSE)
    if _load_pem_cert(hello.get("ca_pem"), "CA certificate") != ca:
        raise EnrollError("the site sent another CA inside the sealed session")
    return inner


def _check_issued(
    cert: x509.Certificate, public_key: object, identity: Identity, ca: x509.Certificate
) -> None:
    def der(key: object) -> bytes:
        assert hasattr(key, "public_bytes")
        data: bytes = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return data

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrollError("the certificate received is not signed by the pinned CA") from None
    if der(cert.public_key()) != der(public_key):
        raise EnrollError("the certificate received is not for this PC's key")
    try:
        got = identity_from_certificate(cert)
    except IdentityError as exc:
        raise EnrollError(f"the certificate received carries no identity: {exc}") from None
    if got != identity:
        raise EnrollError(f"the certificate received is for {got.uri}, not {identity.uri}")


def read_password(
    user: str,
    *,
    password_file: Path | None = None,
    stdin: Lines | None = None,
) -> str:
    """The directory password of `user`: the first line of `password_file`, or of
    `stdin` (--password-stdin; a SecretReader over the bytes), or asked on the terminal
    (getpass: not echoed; works on Windows too). Never from the command line. A password
    with a control character, a BOM or U+FFFD is refused here, before anything is
    dialled (relay.ops.secretinput). Raises EnrollError."""
    try:
        if password_file is not None:
            where = f"the password file {password_file}"
            try:
                with password_file.open("rb") as f:
                    password = read_secret_line(SecretReader(f), where, MAX_PASSWORD)
            except OSError as exc:
                raise EnrollError(f"cannot read the password file {password_file}: {exc}") from None
        elif stdin is not None:
            password = read_secret_line(stdin, "stdin", MAX_PASSWORD)
        else:
            password = _ask_password(user)
    except SecretInputError as exc:
        raise EnrollError(str(exc)) from None
    if not password:
        raise EnrollError(f"no password given for directory user {user!r}")
    return password


def _ask_password(user: str) -> str:
    """The password typed on the terminal, checked as one read from a file."""
    if not sys.stdin.isatty():
        raise EnrollError(
            f"this code is for directory user {user!r} and there is no terminal to ask "
            "for the password: use --password-file FILE or --password-stdin"
        )
    try:
        text = getpass.getpass(f"Directory password for {user}: ")
    except (EOFError, KeyboardInterrupt):
        raise EnrollError("no password entered") from None
    password = without_newline(text)
    if len(password) > MAX_PASSWORD:
        raise EnrollError(f"the password is longer than {MAX_PASSWORD} characters")
    refuse_garbled(password, "the terminal")
    return password


def run_enroll(
    code: str,
    out_dir: Path,
    *,
    device: str | None = None,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    password_file: Path | None = None,
    password_stdin: Lines | None = None,
) -> int:
    """`relay enroll`: 0 on success (one line on stdout); 2 with one line on stderr.

    A code bound to a directory user asks for that user's password first (see
    read_password), before anything is dialled.
    """
    code = code.strip().removeprefix("\ufeff")  # a code pasted from a file with a BOM
    try:
        password: str | None = None
        with contextlib.suppress(CodeError):  # enroll() reports a bad code
            user = parse_code(code).user
            if user is not None:
                password = read_password(user, password_file=password_file, stdin=password_stdin)
        cert_path = asyncio.run(
            enroll(
                code, Path(out_dir), timeout=timeout, device=device, force=force, password=password
            )
        )
    except EnrollError as exc:
        print(f"relay enroll: {exc}", file=sys.stderr)
        return 2
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    identity = identity_from_certificate(cert)
    user = pki.user_of_certificate(cert)
    holder = f" for directory user {user}" if user else ""
    print(
        f"enrolled as {identity.uri}{holder}; wrote {out_dir}/device.crt device.key ca.crt "
        f"(valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z, renewed automatically)"
    )
    return 0
