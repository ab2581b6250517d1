"""Sans-I/O TLS 1.3 over memory BIOs, in the style of h11 and aioquic.

`SealCore` takes the ciphertext that arrived (`receive_data`) and returns events; takes
plaintext to send (`send`); and collects ciphertext to write (`data_to_send`). It never
touches a socket or an event loop, and reads the time only through its `clock`, so two
cores can be driven against each other in memory (tests/seal). The handshake and the
record layer are the stdlib `ssl` module's (OpenSSL): we add no cryptography of our own,
only the checks of who the peer is (`check_peer`), of the protocol version (the ALPN),
and of the validity of a resumed session's certificate (below).

Resumption. OpenSSL checks the peer's certificate (chain, dates) at a full handshake
only; a resumed session brings the certificate of that first handshake along unchecked,
and the ticket each resumption issues starts a new ticket lifetime. So a peer could
resume, ticket after ticket, long after its certificate expired (and a device could
then renew it). The core therefore checks the resumed certificate's dates against
`clock` itself and refuses one not valid now ("expired", sealed like any refusal).

Every buffer is bounded (`SealLimits`): received ciphertext is decrypted as it arrives,
so the incoming BIO holds at most one partial record; plaintext sent before the
handshake completes is queued up to `max_early_plaintext`, in one buffer (a list of the
caller's writes cost ~40 bytes of objects per write besides its bytes: 2-byte writes held
1.4 MB under a 64 KiB bound); ciphertext not yet collected is refused above
`max_outgoing` (the caller must drain `data_to_send()` first).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from cryptography import x509

from relay.net.tls import classify_handshake_error
from relay.trust.identity import Identity, IdentityError, identity_from_der

__all__ = [
    "FAILURE_REASONS",
    "Clock",
    "HandshakeComplete",
    "PeerCheck",
    "PlaintextReceived",
    "SealBufferFull",
    "SealCore",
    "SealEvent",
    "SealLimits",
    "SealStateError",
    "SessionClosed",
    "SessionFailed",
    "resumed_certificate_problem",
]

#: Why a session failed: a fixed set, so the values can be Prometheus labels.
FAILURE_REASONS: Final = (
    "integrity",  # a record did not authenticate: altered, dropped, replayed, reordered
    "expired",
    "unknown_ca",
    "no_certificate",
    "bad_certificate",
    "wrong_domain",
    "wrong_role",
    "wrong_site",
    "revoked",
    "too_many_sessions",  # the agent's cap on one device's sessions (relay.agent.sessions)
    "version",  # no common session ALPN: the peer speaks another protocol version
    "protocol",
    "eof",  # the outer stream ended without a TLS close_notify (truncation)
    "outer_reset",  # the outer stream was reset (gateway or link gone)
    "buffer",  # a bound was exceeded
    "timeout",
    "other",
)

READ_CHUNK: Final = 64 * 1024
# The largest TLS record on the wire (RFC 8446 5.2: 2^14 + 256 plus the 5-byte header).
MAX_RECORD: Final = 16384 + 256 + 5


@dataclass(frozen=True)
class SealLimits:
    """Bounds of one core's buffers (bytes)."""

    max_incoming: int = 256 * 1024  # ciphertext fed to OpenSSL before it is decrypted
    max_outgoing: int = 4 * 1024 * 1024  # ciphertext produced and not collected
    max_early_plaintext: int = 256 * 1024  # plaintext sent before the handshake completes

    def __post_init__(self) -> None:
        if self.max_incoming < MAX_RECORD:
            raise ValueError(f"max_incoming must hold one TLS record ({MAX_RECORD} bytes)")
        if self.max_outgoing < MAX_RECORD or self.max_early_plaintext < 0:
            raise ValueError("seal limits too small")


@dataclass(frozen=True)
class HandshakeComplete:
    """The peer is authenticated and accepted: plaintext may flow."""

    peer: Identity | None  # None only where no client certificate is asked (enrollment)
    alpn: str
    resumed: bool


@dataclass(frozen=True)
class PlaintextReceived:
    data: bytes


@dataclass(frozen=True)
class SessionClosed:
    """The peer closed the session cleanly (TLS close_notify)."""


@dataclass(frozen=True)
class SessionFailed:
    reason: str  # one of FAILURE_REASONS
    detail: str  # one line for logs; never payload


SealEvent = HandshakeComplete | PlaintextReceived | SessionClosed | SessionFailed
#: Decides whether the authenticated peer may use this session: None, or a reason.
PeerCheck = Callable[[Identity | None], str | None]
#: The time a resumed session's certificate is checked against (aware, UTC).
Clock = Callable[[], datetime]
State = Literal["handshake", "open", "closed", "failed"]


class SealStateError(Exception):
    """send() on a session that is closed or failed."""


class SealBufferFull(Exception):
    """send() beyond a bound: collect data_to_send() first (or wait for the handshake)."""


_INTEGRITY_MARKERS: Final = ("BAD_RECORD_MAC", "DECRYPTION_FAILED", "BAD_DECRYPT")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def resumed_certificate_problem(der: bytes, now: datetime) -> str | None:
    """Why the certificate `der` that a resumed session carries is not valid at `now`
    (one line), or None. OpenSSL checked it only at the session's full handshake."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "the resumed session's certificate cannot be read"
    if now < cert.not_valid_before_utc:
        return f"the resumed session's certificate is not valid before {cert.not_valid_before_utc}"
    if now > cert.not_valid_after_utc:
        return f"the resumed session's certificate expired at {cert.not_valid_after_utc}"
    return None


def _classify_record_error(exc: ssl.SSLError) -> str:
    text = f"{exc.reason or ''} {exc}".upper()
    if any(marker in text for marker in _INTEGRITY_MARKERS):
        return "integrity"
    if isinstance(exc, ssl.SSLEOFError):
        return "eof"
    return "protocol"


class SealCore:
    """One end of a sealed session. See the module docstring."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        alpn: str,
        check_peer: PeerCheck,
        session: ssl.SSLSession | None = None,
        limits: SealLimits | None = None,
        refusal_message: Callable[[str, str], bytes] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.limits = limits or SealLimits()
        self._clock = clock or _utcnow  # a resumed session's certificate is checked at it
        self.alpn = alpn
        self.server_side = server_side
        self._check_peer = check_peer
        self._refusal_message = refusal_message
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        try:
            self._ssl = ctx.wrap_bio(
                self._incoming, self._outgoing, server_side=server_side, session=session
            )
        except ValueError:  # a ticket of another context: a full handshake instead
            self._ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self.state: State = "handshake"
        self.failure: SessionFailed | None = None
        self.peer: Identity | None = None
        self._early = bytearray()  # plaintext sent before the handshake completed
        self.sealed_in = 0  # ciphertext bytes received
        self.sealed_out = 0  # ciphertext bytes collected
        self.plain_in = 0  # plaintext bytes delivered
        self.plain_out = 0  # plaintext bytes accepted by send()
        if not server_side:
            self._handshake()  # the ClientHello

    # -- API

    @property
    def context(self) -> ssl.SSLContext:
        """The context this session was made with (a ticket resumes only with it)."""
        return self._ssl.context

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session to resume a later session with (client side)."""
        return self._ssl.session if self.state == "open" else None

    def receive_data(self, data: bytes) -> list[SealEvent]:
        """Ciphertext from the peer; b"" means the outer stream ended."""
        events: list[SealEvent] = []
        if self.state in ("closed", "failed"):
            return events
        if not data:
            return self._fail(events, "eof", "the stream ended without a TLS close_notify")
        self.sealed_in += len(data)
        view = memoryview(data)
        room = self.limits.max_incoming
        while view and self.state in ("handshake", "open"):
            take = max(room - self._incoming.pending, 0)
            if take == 0:  # one record never needs this much: refuse rather than hold it
                return self._fail(events, "buffer", "incoming TLS backlog over its limit")
            self._incoming.write(view[:take])
            view = view[take:]
            if self.state == "handshake":
                self._handshake(events)
            if self.state == "open":
                self._read(events)
        return events

    def send(self, data: bytes) -> None:
        """Seal `data` for the peer (queued, bounded, until the handshake completes)."""
        if self.state in ("closed", "failed"):
            raise SealStateError(f"session {self.state}")
        if not data:
            return
        if self.state == "handshake":
            if len(self._early) + len(data) > self.limits.max_early_plaintext:
                raise SealBufferFull("plaintext queued before the handshake over its limit")
            self._early += data
            return
        if self._outgoing.pending > self.limits.max_outgoing:
            raise SealBufferFull("ciphertext not collected over its limit")
        self._write(data)

    def close(self) -> None:
        """Send a TLS close_notify; nothing can be sent after it."""
        if self.state != "open":
            if self.state == "handshake":
                self.state = "closed"
            return
        self.state = "closed"
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is written; we do not wait for the peer's
        except ssl.SSLError:
            pass

    def data_to_send(self) -> bytes:
        data = self._outgoing.read()
        self.sealed_out += len(data)
        return data

    # -- internals

    def _write(self, data: bytes | bytearray) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:  # pragma: no cover - OpenSSL refuses writes only after failure
            self._fail([], "protocol", f"TLS write failed: {exc.reason or exc}")
            raise SealStateError("session failed") from exc
        self.plain_out += len(data)

    def _handshake(self, events: list[SealEvent] | None = None) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as exc:
            reason = _classify_record_error(exc)
            if reason != "integrity":
                reason = classify_handshake_error(exc)
            self._fail(events, reason, f"TLS handshake: {exc.reason or exc}")
            return
        alpn = self._ssl.selected_alpn_protocol()
        if alpn != self.alpn:
            self._refuse(
                events,
                "version",
                f"no common session protocol: this end speaks {self.alpn}, "
                f"the peer offered or chose {alpn or 'something else'}; upgrade the older end",
            )
            return
        try:
            der = self._ssl.getpeercert(binary_form=True)
            peer = identity_from_der(der) if der else None
        except IdentityError as exc:
            self._refuse(events, "bad_certificate", f"peer certificate: {exc}")
            return
        if der and self._ssl.session_reused:
            problem = resumed_certificate_problem(der, self._clock())
            if problem is not None:
                self._refuse(events, "expired", f"peer {peer}: {problem}")
                return
        refusal = self._check_peer(peer)
        if refusal is not None:
            self._refuse(events, refusal, f"peer {peer or 'without a certificate'} refused")
            return
        self.peer = peer
        self.state = "open"
        if events is not None:
            events.append(HandshakeComplete(peer, alpn, self._ssl.session_reused))
        early, self._early = self._early, bytearray()
        if early:
            self._write(early)

    def _read(self, events: list[SealEvent]) -> None:
        while True:
            try:
                data = self._ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as exc:
                reason = _classify_record_error(exc)
                if reason == "protocol":  # e.g. the server's alert about our certificate
                    reason = classify_handshake_error(exc)
                self._fail(events, reason, f"TLS record: {exc.reason or exc}")
                return
            if not data:  # the peer's close_notify (CPython returns b"" for it)
                self.state = "closed"
                events.append(SessionClosed())
                return
            self.plain_in += len(data)
            events.append(PlaintextReceived(data))

    def _refuse(self, events: list[SealEvent] | None, reason: str, detail: str) -> None:
        """An authenticated handshake whose peer we do not accept: say why (sealed, so
        the peer can trust it), close, fail."""
        self.state = "open"
        if self._refusal_message is not None:
            self._write(self._refusal_message(reason, detail))
        self.close()
        self._fail(events, reason, detail)

    def _fail(self, events: list[SealEvent] | None, reason: str, detail: str) -> list[SealEvent]:
        out = events if events is not None else []
        if self.state != "failed":
            self.state = "failed"
            self._early = bytearray()  # and its memory
            self.failure = SessionFailed(reason if reason in FAILURE_REASONS else "other", detail)
            out.append(self.failure)
        return out
