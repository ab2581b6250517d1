"""The agent's end of sealed sessions: what it does with the streams a gateway opens.

A gateway opens only two kinds of stream towards us now:

- ``session``: a device's sealed session. We run the TLS server (device certificate
  required, checked against the site CA: role device, our site, our trust domain, not
  revoked in *our* registry) and then the relay/proto Link inside it; its streams go to
  the `StreamDispatcher` exactly as streams of a gateway link used to. The device's
  identity is the inner certificate's, and nothing else (relay.seal.transport.sealed_peer).
- ``enroll``: a PC without a certificate. The site CA goes out in the clear (the PC pins
  it by the fingerprint in its code), then TLS inside the stream authenticates us to the
  PC, and the enrollment exchange (code secret, CSR, certificate) runs inside it.

Anything else is refused with FORBIDDEN. Revoking a device closes its live sessions here,
whatever the gateways do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from cryptography.hazmat.primitives.serialization import Encoding

from relay.agent.authority import DeviceAuthority
from relay.agent.config import AgentConfig
from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.jsonframes import write_json
from relay.net.tls import trust_domain_of
from relay.ops.loglimit import LogLimiter
from relay.ops.tasks import drain_tasks
from relay.proto import ErrorCode, LinkClosedError, LinkSettings
from relay.seal.policy import (
    ENROLL_HELLO_SEALED,
    device_check,
    enroll_server_context,
    no_client_check,
    session_server_context,
)
from relay.seal.session import SealedLink, SealStats, establish
from relay.seal.transport import SealError
from relay.trust.identity import Identity
from relay.wire import (
    ALPN_ENROLL_SEAL,
    ALPN_SESSION,
    HEADER_TARGET,
    TARGET_ENROLL,
    TARGET_SESSION,
)

__all__ = ["MAX_DEVICE_SESSIONS", "SESSION_MAX_STREAMS", "SessionServer", "session_server"]

log = logging.getLogger(__name__)

MAX_SESSIONS: Final = 10_000  # sessions served at once (handshakes included), all devices
MAX_DEVICE_SESSIONS: Final = 8
"""Established sessions of one device at once, over all gateways. A workstation holds
one, two while it replaces one, and for a while one more whose gateway has not yet seen
its old link die (keepalive); an honest gateway lets a device hold 8 (its
`per_device.streams`), but a compromised one need not stop it, and without this cap one
device could hold all of MAX_SESSIONS and lock every other device out. Beyond it the
handshake is refused inside the TLS (a sealed GOAWAY, LIMIT_EXCEEDED,
"too_many_sessions"): the device logs the reason and tries again after its backoff."""
TOO_MANY_SESSIONS: Final = "too_many_sessions"  # the refusal's reason (metric label)
SESSION_LINE_BURST: Final = 40
SESSION_LINE_RATE: Final = 1.0
"""The "session open" / "session closed" INFO lines, per device: this many at once, then
this many a second (the next line let through says how many were held back). Honest
gateways let a device open a session a second after a burst, per gateway; a compromised
one lets it open as many as it can handshake, two lines each."""
SESSION_MAX_STREAMS: Final = 512
"""The MAX_STREAMS that the inner Link of a session (or a sealed enrollment) announces:
what one device may have open at once in one session. The agent's `limits.max_streams`
(4,096) sizes a gateway's link, which carries every device of the site; one device needs
far fewer. A workstation's peak: 256 port-forwarded connections (its own cap,
relay.workstation.forward.MAX_CONNECTIONS), its DICOM node's 8 associations, the browser
viewer's 8 series retrievals (relay.workstation.dicomweb.retrieve.MAX_FLIGHTS) with up to
2 single-instance jumps each, prefetch and warm-up, queries, a renewal: about 300.
512 leaves room for streams still closing. A workstation at the cap waits for a free
stream (relay.workstation.tunnel), it is not refused. What these streams cost the agent
is capped per device besides, over all its sessions (relay.agent.dispatch)."""


class _WithHeaders:
    """An inner stream seen with a few outer headers (the PC's source address)."""

    def __init__(self, inner: Stream, outer: Stream, extra: Mapping[str, str]) -> None:
        self._inner = inner
        self.link = outer.link  # the enrollment result goes to the gateway that carried it
        self.headers = {**inner.headers, **extra}

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self._inner.read(max_bytes)

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    async def write_eof(self) -> None:
        await self._inner.write_eof()

    def reset(self, code: int) -> None:
        self._inner.reset(code)


class _Aborted:
    """The outer enrollment stream as seen after the PC gave up before its TLS: every
    read or write fails as an aborted stream, so the enrollment code records it so."""

    def __init__(self, outer: Stream) -> None:
        self.link = outer.link
        self.headers = dict(outer.headers)

    async def read(self, max_bytes: int = 65536) -> bytes:
        raise StreamResetError(ErrorCode.CANCEL, "the PC left before the sealed exchange")

    async def write(self, data: bytes) -> None:
        raise StreamResetError(ErrorCode.CANCEL, "the PC left before the sealed exchange")

    async def write_eof(self) -> None:
        raise StreamResetError(ErrorCode.CANCEL, "the PC left before the sealed exchange")

    def reset(self, code: int) -> None:
        pass


class SessionServer:
    """Serves `session` and `enroll` streams of every gateway link (`on_stream`)."""

    def __init__(
        self,
        *,
        site: str,
        trust_domain: str,
        session_ctx: ssl.SSLContext,
        enroll_ctx: ssl.SSLContext | None,
        settings: LinkSettings,
        dispatch: Callable[[Stream], None],
        is_revoked: Callable[[Identity], bool] | None = None,
        serve_enroll: Callable[[ByteStream], Awaitable[object]] | None = None,
        ca_pem: str = "",
        touch: Callable[[Identity], None] | None = None,
        handshake_timeout: float = 15.0,
        max_sessions: int = MAX_SESSIONS,
        max_device_sessions: int = MAX_DEVICE_SESSIONS,
    ) -> None:
        self.site = site
        self.trust_domain = trust_domain
        self.session_ctx = session_ctx
        self.enroll_ctx = enroll_ctx
        self.settings = settings
        self.dispatch = dispatch
        self.is_revoked = is_revoked
        self.serve_enroll = serve_enroll
        self.ca_pem = ca_pem
        self.touch = touch
        self.handshake_timeout = handshake_timeout
        self.max_sessions = max_sessions
        self.max_device_sessions = max_device_sessions
        self.device_sessions: Counter[str] = Counter()  # by device URI, only while > 0
        self.stats = SealStats()
        self.refused: dict[str, int] = {}
        self.log_limit = LogLimiter()  # per gateway link and reason
        self.session_lines = LogLimiter(SESSION_LINE_RATE, SESSION_LINE_BURST)  # per device
        self.device_refusals = LogLimiter()  # "session refused" over a device's cap, per device
        self.sessions: dict[Link, Identity] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def inner_settings(self) -> LinkSettings:
        """The settings of the Link inside a session: the configured windows and timers,
        with the per-device stream cap (SESSION_MAX_STREAMS) instead of the gateway link's."""
        return dataclasses.replace(self.settings, max_streams=SESSION_MAX_STREAMS)

    # -- the gateway links' callback

    def on_stream(self, outer: Stream) -> None:
        target = outer.headers.get(HEADER_TARGET, "")
        if self._closing:
            self._refuse(outer, ErrorCode.REFUSED_STREAM, "shutting_down")
        elif target == TARGET_SESSION:
            if len(self._tasks) >= self.max_sessions:
                self._refuse(outer, ErrorCode.LIMIT_EXCEEDED, "too_many_sessions")
                return
            self._spawn(self._serve_session(outer))
        elif target == TARGET_ENROLL and self.serve_enroll is not None:
            self._spawn(self._serve_enroll(outer))
        else:  # request streams travel inside sessions only
            self._refuse(outer, ErrorCode.FORBIDDEN, "not_sealed")

    def _refuse(self, outer: Stream, code: ErrorCode, reason: str) -> None:
        outer.reset(code)
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._warn("outer stream refused", outer, {"reason": reason})

    def _warn(self, message: str, outer: Stream, context: dict[str, object]) -> None:
        """A warning each stream from a gateway may cause (a device's session attempts
        included), limited per gateway link and reason (relay.ops.loglimit)."""
        key = f"{outer.link.name} {context.get('reason', '')}"
        held = self.log_limit.allow(key, time.monotonic())
        if held is not None:
            extra = {"link": outer.link.name, **context}
            log.warning(message, extra={**extra, "suppressed": held} if held else extra)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions

    async def _serve_session(self, outer: Stream) -> None:
        admitted: list[Identity] = []  # the device, once its session counts against its cap

        def check(peer: Identity | None) -> str | None:
            reason = device_check(self.trust_domain, self.site, self.is_revoked)(peer)
            if reason is None and peer is not None:
                reason = self._admit_device(peer)
                if reason is None:
                    admitted.append(peer)
            return reason

        try:
            try:
                sealed = await establish(
                    outer,
                    self.session_ctx,
                    server_side=True,
                    alpn=ALPN_SESSION,
                    check_peer=check,
                    settings=self.inner_settings,
                    name=f"session via {outer.link.name}",
                    on_stream=self._on_inner_stream,
                    timeout=self.handshake_timeout,
                    stats=self.stats,
                )
            except SealError as exc:
                if exc.reason != TOO_MANY_SESSIONS:  # that one is logged per device
                    self._warn(
                        "session refused", outer, {"reason": exc.reason, "detail": exc.detail}
                    )
                return
            await self._run_session(sealed)
        finally:
            for peer in admitted:
                self._release_device(peer)

    def _admit_device(self, peer: Identity) -> str | None:
        """Count one more session of `peer` (checked during its handshake, so that two
        completing at once cannot both pass); TOO_MANY_SESSIONS if it holds its cap."""
        if self.device_sessions[peer.uri] >= self.max_device_sessions:
            held = self.device_refusals.allow(peer.uri, time.monotonic())
            if held is not None:
                context = {
                    "device": peer.uri,
                    "reason": TOO_MANY_SESSIONS,
                    "limit": self.max_device_sessions,
                }
                log.warning(
                    "session refused", extra={**context, "suppressed": held} if held else context
                )
            return TOO_MANY_SESSIONS
        self.device_sessions[peer.uri] += 1
        return None

    def _release_device(self, peer: Identity) -> None:
        """The session of `peer` ended (or never got going): give its count back."""
        self.device_sessions[peer.uri] -= 1
        if self.device_sessions[peer.uri] <= 0:
            del self.device_sessions[peer.uri]

    async def _run_session(self, sealed: SealedLink) -> None:
        link, peer = sealed.link, sealed.handshake.peer
        assert peer is not None  # CERT_REQUIRED
        self.sessions[link] = peer
        if self.is_revoked is not None and self.is_revoked(peer):
            # Revoked between its handshake's check and now: close_revoked may have run
            # in between, before the session was here to be closed.
            link.close(ErrorCode.REVOKED, "device revoked")
        if self.touch is not None:
            self.touch(peer)
        self._session_line(
            "session open",
            {"device": peer.uri, "resumed": sealed.handshake.resumed, "link": link.name},
        )
        try:
            if self._closing:
                link.goaway(ErrorCode.SHUTDOWN, "agent shutting down")
            await link.wait_closed()
            # The last records (an answer, our close_notify) still have to leave through
            # the outer stream: the task ends when that stream is done (bounded: linger).
            await asyncio.shield(sealed.transport.finished)
        finally:
            self.sessions.pop(link, None)
            failure = sealed.transport.failure
            self._session_line(
                "session closed",
                {"device": peer.uri, "reason": failure.reason if failure else "closed"},
            )

    def _session_line(self, message: str, context: dict[str, object]) -> None:
        """An INFO line of a session's life, limited per device (SESSION_LINE_BURST)."""
        held = self.session_lines.allow(str(context["device"]), time.monotonic())
        if held is not None:
            log.info(message, extra={**context, "suppressed": held} if held else context)

    def _on_inner_stream(self, stream: Stream) -> None:
        peer = stream.link.peer
        if self.touch is not None and isinstance(peer, Identity):
            self.touch(peer)
        self.dispatch(stream)

    def close_revoked(self) -> int:
        """Close the sessions of devices revoked since they opened; returns how many."""
        if self.is_revoked is None:
            return 0
        closed = 0
        for link, peer in list(self.sessions.items()):
            if self.is_revoked(peer):
                link.close(ErrorCode.REVOKED, "device revoked")
                closed += 1
        if closed:
            log.warning("sessions of revoked devices closed", extra={"sessions": closed})
        return closed

    # -- enrollment

    async def _serve_enroll(self, outer: Stream) -> None:
        assert self.serve_enroll is not None
        if self.enroll_ctx is None:
            self._refuse(outer, ErrorCode.FORBIDDEN, "no_enrollment")
            return
        try:
            # The CA is public; the PC checks it against the fingerprint in its code and
            # then pins it for the TLS that carries the secret.
            await write_json(outer, {"v": ENROLL_HELLO_SEALED, "ca_pem": self.ca_pem})
        except StreamResetError:
            return
        served: list[asyncio.Task[object]] = []
        serve_enroll = self.serve_enroll

        def on_stream(inner: Stream) -> None:
            if served or inner.headers.get(HEADER_TARGET) != TARGET_ENROLL:
                inner.reset(ErrorCode.FORBIDDEN)
                return
            view = _WithHeaders(
                inner, outer, {k: v for k, v in outer.headers.items() if k.startswith("x-relay-")}
            )
            served.append(asyncio.ensure_future(serve_enroll(view)))

        try:
            sealed = await establish(
                outer,
                self.enroll_ctx,
                server_side=True,
                alpn=ALPN_ENROLL_SEAL,
                check_peer=no_client_check,
                settings=self.inner_settings,
                name=f"enrollment via {outer.link.name}",
                on_stream=on_stream,
                timeout=self.handshake_timeout,
            )
        except SealError as exc:
            # The PC went no further (say its check of the gateway failed): account for
            # the attempt like one aborted after the hello, audit and gateway metric.
            self._warn("sealed enrollment failed", outer, {"reason": exc.reason})
            await serve_enroll(_Aborted(outer))
            return
        try:
            await sealed.link.wait_closed()
        finally:
            for task in served:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*served, return_exceptions=True)

    # -- shutdown

    def goaway(self) -> None:
        """No new sessions or inner streams; devices open their next session elsewhere."""
        self._closing = True
        for link in list(self.sessions):
            with contextlib.suppress(LinkClosedError):
                link.goaway(ErrorCode.SHUTDOWN, "agent shutting down")

    async def close(self, grace: float) -> None:
        """Close every session (after the inner streams drained) and end their tasks."""
        self.goaway()
        for link in list(self.sessions):
            link.close(ErrorCode.SHUTDOWN, "agent shutting down")
        await drain_tasks(self._tasks, grace, "sessions")


def session_server(
    config: AgentConfig, authority: DeviceAuthority | None, dispatch: Callable[[Stream], None]
) -> SessionServer:
    """The agent's sessions (and, with `pki:`, sealed enrollment) for `config`'s site."""
    tls = config.tls
    is_revoked = touch = serve_enroll = None
    enroll_ctx = None
    ca_pem = ""
    if authority is not None:
        registry = authority.registry

        def is_revoked(peer: Identity) -> bool:
            return registry.is_revoked(peer.name)

        def touch(peer: Identity) -> None:
            authority.touch(peer.uri)  # one SQLite write a minute per device at most

        serve_enroll = authority.serve_enroll
        enroll_ctx = enroll_server_context(tls.cert, tls.key)
        ca_pem = authority.ca_cert.public_bytes(Encoding.PEM).decode("ascii")
    return SessionServer(
        site=config.site,
        trust_domain=trust_domain_of(tls.ca),
        session_ctx=session_server_context(tls.cert, tls.key, tls.ca, site=config.site),
        enroll_ctx=enroll_ctx,
        settings=config.limits,
        dispatch=dispatch,
        is_revoked=is_revoked,
        serve_enroll=serve_enroll,
        ca_pem=ca_pem,
        touch=touch,
    )
