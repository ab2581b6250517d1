"""Dialling a gateway, and keeping one link to one address up for as long as we run.

`dial` makes one link: TCP, TLS 1.3 with our client certificate, the expected ALPN, a
gateway identity, and then waits for the gateway's first protocol bytes. That last step
matters: under TLS 1.3 the client's handshake completes before the server has checked
the client certificate, so a refused device would otherwise look connected. The gateway
only starts speaking once it has accepted our identity.

`KeptLink` supervises one address: dial, serve until the link closes or the gateway sends
goaway, back off (full jitter, see relay.net.backoff), dial again. After a goaway the old link
keeps draining its streams while a new one is dialled, so new streams need not wait.

One refusal may end the supervision instead: the gateway's GOAWAY with code REVOKED (at
the dial or on a live link); `dial` raises `Revoked`. A gateway may be compromised, so
its word alone proves nothing: the supervision stops only on a device's link (ALPN_DEVICE:
gateways revoke devices only) and only if the owner's `check_revoked(reason)` accepts
the reason (the workstation verifies the agent's signed notice in it); then it tells its
owner through `on_revoked`. Anything else that learns of a revocation in a way it trusts
(a session the agent refused inside its TLS) calls `KeptLink.revoked_by_peer`. Otherwise
(an agent's link, no checker, a reason the checker refuses) REVOKED is one more goaway:
the link is left, one warning says why (at most one per REVOKED_LOG_INTERVAL, the others
counted in it), and the next dial waits REVOKED_BACKOFF of the backoff's cap, never a
permanent stop. The dialer holds no trust policy of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.net.aio import Link, Stream
from relay.net.backoff import ExponentialBackoff
from relay.net.tls import classify_handshake_error, peer_identity
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkSettings
from relay.trust.identity import IdentityError
from relay.wire import ALPN_DEVICE

__all__ = ["DialError", "KeptLink", "LinkStats", "Revoked", "dial"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0  # how long close() waits for a link to finish sending its goaway
# Delay before dialling again after an unheeded REVOKED (a link other than a device's):
# uniform over this fraction of the backoff's cap up to the cap. Long, so a gateway that
# says it again and again costs one dial per cap, as a gateway refusing TLS would; never
# forever, so a compromised gateway cannot make us stop dialling it.
REVOKED_BACKOFF = (0.5, 1.0)
# Seconds between two warnings about an unheeded REVOKED on one supervised address.
REVOKED_LOG_INTERVAL = 600.0


class DialError(Exception):
    """One dial failed; `reason` is a short metric-safe word (connect, timeout, alpn, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Revoked(DialError):
    """The peer says our identity was revoked: the device must be enrolled again.

    `peer_reason` is the peer's own words (bounded by the protocol's GOAWAY reason limit).
    """

    def __init__(self, message: str, peer_reason: str = "") -> None:
        super().__init__("revoked", message)
        self.peer_reason = peer_reason


class _DialedLink(Link):
    """A client link that reports the peer's first bytes (the gateway accepted us) and
    remembers the peer's GOAWAY (a refusal after the handshake carries its code)."""

    def __init__(self, **kwargs: Any) -> None:
        on_goaway: Callable[[int, str], None] | None = kwargs.pop("on_goaway", None)
        super().__init__(on_goaway=self._goaway_received, **kwargs)
        self.first_data: asyncio.Future[None] = self.loop.create_future()
        self.peer_goaway: tuple[int, str] | None = None
        self._then_goaway = on_goaway

    def _goaway_received(self, code: int, reason: str) -> None:
        if self.peer_goaway is None:
            self.peer_goaway = (code, reason)
        if self._then_goaway is not None:
            self._then_goaway(code, reason)

    @property
    def revoked(self) -> bool:
        return self.peer_goaway is not None and self.peer_goaway[0] == ErrorCode.REVOKED

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.first_data.done():
            self.first_data.set_result(None)


async def dial(
    address: Address,
    ctx: ssl.SSLContext,
    settings: LinkSettings,
    *,
    alpn: str,
    name: str,
    timeout: float,  # noqa: ASYNC109 - bounds the TCP connect, TLS and the gateway's answer
    server_hostname: str | None = None,
    on_stream: Callable[[Stream], None] | None = None,
    on_control: Callable[[str, bytes], None] | None = None,
    on_goaway: Callable[[int, str], None] | None = None,
) -> Link:
    """One link to `address`, accepted by the gateway within `timeout`; raises DialError.

    `server_hostname` is the name checked against the gateway certificate (default
    `address.host`; pass the configured name when dialling an address it resolved to).
    """
    loop = asyncio.get_running_loop()
    hostname = server_hostname or address.host

    def factory() -> _DialedLink:
        return _DialedLink(
            client=True,
            settings=settings,
            name=name,
            on_stream=on_stream,
            on_control=on_control,
            on_goaway=on_goaway,
        )

    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout(timeout):
            transport, link = await loop.create_connection(
                factory,
                address.host,
                address.port,
                ssl=ctx,
                server_hostname=hostname,
                ssl_handshake_timeout=timeout,
            )
    except TimeoutError:
        raise DialError("timeout", f"{address}: no TLS link within {timeout}s") from None
    except (ssl.SSLError, ConnectionResetError, ConnectionAbortedError) as exc:
        # Reset or aborted mid-handshake is the peer refusing TLS, not an unreachable host.
        reason = classify_handshake_error(exc)
        raise DialError(reason, f"{address}: TLS handshake failed ({reason}): {exc}") from None
    except OSError as exc:
        raise DialError("connect", f"{address}: {exc.strerror or exc}") from None
    try:
        ssl_object = transport.get_extra_info("ssl_object")
        selected = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if selected != alpn:
            raise DialError("alpn", f"{address}: gateway chose ALPN {selected!r}, not {alpn!r}")
        try:
            identity = peer_identity(ssl_object)
        except IdentityError as exc:
            raise DialError("identity", f"{address}: {exc}") from None
        if identity is None or identity.role != "gateway":
            raise DialError("identity", f"{address}: peer is {identity}, not a relay gateway")
        link.peer = identity
        # The gateway speaks only after authenticating us; a refusal closes the link.
        remaining = max(0.001, deadline - loop.time())
        waits: set[asyncio.Future[Any]] = {link.first_data, link.closed}
        done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if link.revoked:
            assert link.peer_goaway is not None
            reason = link.peer_goaway[1]
            raise Revoked(f"{address}: the gateway refused us: revoked ({reason})", reason)
        if link.first_data.done() and not link.closed.done():
            return link
        if not done:
            raise DialError("timeout", f"{address}: the gateway did not answer within {timeout}s")
        raise DialError("refused", f"{address}: the gateway closed the link (refused us)")
    except BaseException:
        link.abort()
        raise


@dataclass
class LinkStats:
    """Counters of one supervised address (the metrics layer reads them)."""

    attempts: int = 0
    connects: int = 0
    failures: int = 0
    reconnects: int = 0  # connects after the first
    goaways: int = 0
    unheeded_revocations: int = 0  # REVOKED goaways not heeded (see the module docstring)
    last_error: str = ""


class KeptLink:
    """Keeps one link to one address up: dial, serve, back off with jitter, dial again.

    `link` is the current usable link or None; `up` is set while there is one. `start()`
    launches the supervisor; `goaway()` stops dialling and asks the gateway for no new
    streams; `close()` closes every link and ends the supervisor (no task survives).
    The gateway's GOAWAY REVOKED is final only on a device's link (`alpn` ALPN_DEVICE)
    whose `check_revoked(reason)` returns None (proven); it then calls `on_revoked`.
    Otherwise `check_revoked` returns why not, in one line; see the module docstring.
    `on_dial_error` hears of each failed dial (its owner may know why, e.g. its own
    certificate has expired).
    """

    def __init__(
        self,
        address: Address,
        ctx: ssl.SSLContext,
        settings: LinkSettings,
        *,
        alpn: str,
        name: str,
        backoff: ExponentialBackoff,
        server_hostname: str | None = None,
        on_stream: Callable[[Stream], None] | None = None,
        on_control: Callable[[str, bytes], None] | None = None,
        on_up: Callable[[Link], None] | None = None,
        on_revoked: Callable[[str], None] | None = None,
        check_revoked: Callable[[str], str | None] | None = None,
        on_dial_error: Callable[[DialError], None] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.ctx = ctx
        self.settings = settings
        self.alpn = alpn
        self.name = name
        self.backoff = backoff
        self.server_hostname = server_hostname
        self.on_stream = on_stream
        self.on_control = on_control
        self.on_up = on_up
        self.on_revoked = on_revoked
        self.check_revoked = check_revoked
        self.on_dial_error = on_dial_error
        self.connect_timeout = connect_timeout
        self.link: Link | None = None
        self.up = asyncio.Event()
        self.links: set[Link] = set()  # the current one and any still draining
        self.stats = LinkStats()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.revoked: str | None = None  # the peer's reason, once it said we are revoked
        # Loop time of the next dial while backing off, else None (the workstation's
        # offline 503 says when to try again: relay.workstation.session.retry_in).
        self.retry_at: float | None = None
        self._unheeded_logged_at: float | None = None  # loop time of the last warning
        self._unheeded_unlogged = 0  # unheeded REVOKED since that warning

    def __repr__(self) -> str:
        return f"<KeptLink {self.name} {self.address}>"

    @property
    def _log(self) -> dict[str, object]:
        return {"link": self.name, "address": str(self.address)}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=repr(self))

    @property
    def open_streams(self) -> int:
        return sum(link.conn.open_streams for link in self.links)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self.stats.attempts += 1
            lost: asyncio.Future[None] = loop.create_future()

            def mark_lost(*_: object, lost: asyncio.Future[None] = lost) -> None:
                if not lost.done():
                    lost.set_result(None)

            def goaway_received(
                code: int, reason: str, mark_lost: Callable[..., None] = mark_lost
            ) -> None:
                if code == ErrorCode.REVOKED:
                    self._gateway_says_revoked(reason)
                mark_lost()

            try:
                link = await dial(
                    self.address,
                    self.ctx,
                    self.settings,
                    alpn=self.alpn,
                    name=self.name,
                    timeout=self.connect_timeout,
                    server_hostname=self.server_hostname,
                    on_stream=self.on_stream,
                    on_control=self.on_control,
                    on_goaway=goaway_received,
                )
            except Revoked as exc:
                self.stats.failures += 1
                self._gateway_says_revoked(exc.peer_reason)
                if self._stopping:
                    return
                await self._pause(self._revoked_delay())
                continue
            except DialError as exc:
                self.stats.failures += 1
                self.stats.last_error = exc.reason
                delay = self.backoff.next_delay()
                log.warning(
                    "dial failed",
                    extra={**self._log, "reason": exc.reason, "error": str(exc), "retry_s": delay},
                )
                if self.on_dial_error is not None:
                    try:
                        self.on_dial_error(exc)
                    except Exception:
                        log.exception("on_dial_error callback failed", extra=self._log)
                await self._pause(delay)
                continue
            except Exception as exc:  # a bug must not end the supervision: log, back off
                self.stats.failures += 1
                self.stats.last_error = "internal"
                log.exception("dial crashed", extra={**self._log, "error": str(exc)})
                await self._pause(self.backoff.next_delay())
                continue
            await self._serve(link, lost, mark_lost)

    async def _serve(
        self, link: Link, lost: asyncio.Future[None], mark_lost: Callable[..., None]
    ) -> None:
        loop = asyncio.get_running_loop()
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        self.links.add(link)
        link.closed.add_done_callback(lambda _: self.links.discard(link))
        link.closed.add_done_callback(mark_lost)
        self.link = link
        self.up.set()
        since = loop.time()
        log.info("link up", extra={**self._log, "peer": str(link.peer)})
        try:
            if self.on_up is not None:
                try:
                    self.on_up(link)
                except Exception:
                    log.exception("on_up callback failed", extra=self._log)
            await lost
        finally:
            if self.link is link:
                self.link = None
                self.up.clear()
        lasted = loop.time() - since
        self.backoff.link_lasted(lasted)
        if link.closed.done():
            end = link.closed.result()
            log.log(
                logging.INFO if self._stopping else logging.WARNING,
                "link down",
                extra={
                    **self._log,
                    "code": ErrorCode.name_of(end.code),
                    "reason": end.reason,
                    "lasted_s": round(lasted, 3),
                },
            )
        elif self.revoked is None:  # goaway: the old link drains while we dial a replacement
            self.stats.goaways += 1
            log.info("gateway sent goaway; dialling a new link", extra=self._log)
        if not self._stopping:
            # Even after a goaway: a gateway that keeps sending them must not make us spin.
            # After a long-lived link the backoff was reset, so this is at most `base`;
            # after an unheeded REVOKED, REVOKED_BACKOFF.
            revoked = isinstance(link, _DialedLink) and link.revoked
            await self._pause(self._revoked_delay() if revoked else self.backoff.next_delay())

    async def _pause(self, delay: float) -> None:
        """The backoff's pause before the next dial, with `retry_at` saying when it ends."""
        self.retry_at = asyncio.get_running_loop().time() + delay
        try:
            await asyncio.sleep(delay)
        finally:
            self.retry_at = None

    def _gateway_says_revoked(self, reason: str) -> None:
        """The gateway's GOAWAY REVOKED: final for a device's link whose owner's check
        accepts it. Otherwise a goaway like another: unproven, it must not stop the
        dialling for good."""
        why = self._why_not_heeded(reason)
        if why is None:
            self.revoked_by_peer(reason)
            return
        self.stats.last_error = "revoked"
        self.stats.unheeded_revocations += 1
        now = asyncio.get_running_loop().time()
        last = self._unheeded_logged_at
        if last is not None and now - last < REVOKED_LOG_INTERVAL:
            self._unheeded_unlogged += 1
            return
        log.warning(
            "the gateway says this identity is revoked; not heeded, dialling again after "
            "a long backoff",
            extra={**self._log, "why": why, "not_logged_since": self._unheeded_unlogged},
        )
        self._unheeded_logged_at, self._unheeded_unlogged = now, 0

    def _why_not_heeded(self, reason: str) -> str | None:
        """None if the gateway's REVOKED is proven for us, else why not (one line)."""
        if self.alpn != ALPN_DEVICE:
            return "gateways revoke only devices"
        if self.check_revoked is None:
            return "no way to check a gateway's word here"
        try:
            return self.check_revoked(reason)
        except Exception:
            log.exception("check_revoked callback failed", extra=self._log)
            return "the check failed"

    def _revoked_delay(self) -> float:
        """REVOKED_BACKOFF of the cap, jittered; counts as one attempt of the backoff."""
        self.backoff.next_delay()
        low, high = REVOKED_BACKOFF
        return self.backoff.rng.uniform(low * self.backoff.cap, high * self.backoff.cap)

    def revoked_by_peer(self, reason: str) -> None:
        """The peer says our identity is revoked: stop dialling, tell the owner once.

        Called on the gateway's GOAWAY REVOKED on a device's link (at the dial or on a
        live link), and by anything else that learns it (a session refused
        as revoked). Open links are left to the peer, which closes them.
        """
        if self.revoked is not None:
            return
        self.revoked = reason or "revoked"
        self.stats.last_error = "revoked"
        self._stopping = True
        self.up.clear()
        self.link = None
        if self._task is not None and not self.links and asyncio.current_task() is not self._task:
            self._task.cancel()  # dialling or backing off: nothing left to do
        if self.on_revoked is None:
            log.error(
                "the peer says this identity is revoked", extra={**self._log, "reason": reason}
            )
            return
        try:
            self.on_revoked(self.revoked)  # the owner says it, in its own words
        except Exception:
            log.exception("on_revoked callback failed", extra=self._log)

    def goaway(self, code: int = ErrorCode.SHUTDOWN, reason: str = "shutting down") -> None:
        """Stop dialling and send goaway on every link: no new streams, open ones go on."""
        self._stopping = True
        if self._task is not None and self.link is None:
            self._task.cancel()  # dialling or backing off: nothing to keep
        self.up.clear()
        self.link = None
        for link in list(self.links):
            with contextlib.suppress(Exception):
                link.goaway(code, reason)

    async def close(self, code: int = ErrorCode.SHUTDOWN, reason: str = "shutting down") -> None:
        """Close every link (after a goaway), then end the supervisor."""
        self.goaway(code, reason)
        for link in list(self.links):
            link.close(code, reason)
        waits = [asyncio.ensure_future(link.wait_closed()) for link in list(self.links)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=CLOSE_TIMEOUT)
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        for link in list(self.links):
            link.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
