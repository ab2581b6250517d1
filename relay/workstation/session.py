"""The workstation's sealed session: one TLS session with its site's agent, kept up.

`SessionKeeper` opens a `session` stream on the supervised gateway link (relay.net.dialer
`KeptLink`), runs the TLS client inside it with the device certificate (the agent checked
against the site CA: role agent, our site, our trust domain) and the relay/proto Link
inside that. The `Tunnel` opens the request streams (DICOM, TCP forwards, renewal) on
this inner link exactly as it did on the gateway link before: it sees the same `up`,
`link`, `address` and `stats.last_error`.

The session is "up" only once the agent's first inner bytes arrive: under TLS 1.3 our
handshake completes before the agent has checked our certificate, and a refusal (revoked)
comes as a sealed GOAWAY that we log as the reason.

When the session breaks (gateway or agent gone), a new one is opened on the next link,
with backoff; the retrievals that broke resume as before (relay.dicom). When the agent
says goaway (it drains), or the gateway link is replaced, a new session is opened at once
and the old one closes when its streams are done. Reconnects resume the TLS session
(ticket) where the agent still knows it: no certificate exchange.

A ticket is dropped when an attempt that offered it is refused, by the agent (a sealed
GOAWAY: "expired", when the agent's clock is past the certificate the ticket carries,
revoked, ...) or by us (the agent's resumed certificate expired): the next attempt is a
full handshake with the certificate of the current context, which OpenSSL checks. Kept,
the ticket was offered again at every attempt and refused again each time, until it
aged out (2 h) or the context changed. An attempt that fails on the way (the outer
stream reset, its end, a timeout) says nothing of the ticket and keeps it.

Offline. `offline()` says the link is known down: no session for `OFFLINE_AFTER` seconds
and at least one attempt (a dial of the gateway, or a session) failed since it went.
The Tunnel then fails new opens at once instead of waiting its open timeout (15 s a
click for a radiologist working offline); a blip (the session just lost, its first
reconnect in flight) still waits. Time comes from `clock`, so tests drive it. `retry_in()`
says when the next attempt is due (our backoff's pause, or the gateway link's before its
next dial): the offline 503's Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from relay.net.aio import Link, Stream
from relay.net.backoff import ExponentialBackoff, Uniform
from relay.net.dialer import KeptLink
from relay.ops.config import Address
from relay.ops.loglimit import LogLimiter
from relay.proto import ErrorCode, LinkClosedError, LinkSettings, Priority, StreamStateError
from relay.seal.core import SealCore
from relay.seal.policy import agent_check
from relay.seal.session import HANDSHAKE_TIMEOUT, SealStats, establish
from relay.seal.transport import SealError, SealTransport
from relay.wire import (
    ALPN_SESSION,
    HEADER_PRIORITY,
    HEADER_TARGET,
    TARGET_DICOM,
    TARGET_SESSION,
    TCP_TARGET_PREFIX,
)
from relay.workstation import priorities
from relay.workstation.forwardbudget import ForwardBudget

__all__ = ["OFFLINE_AFTER", "SessionKeeper", "SessionStats", "known_down"]

log = logging.getLogger(__name__)

RETRY_BASE: Final = 0.05
RETRY_CAP: Final = 5.0
WATCH: Final = 0.5  # how often an open session checks that its gateway link is current
DRAIN_POLL: Final = 0.1
OFFLINE_AFTER: Final = 3.0
"""Seconds without a session, with a failed attempt among them, after which the link is
known down (`offline`): longer than a gateway restart's first failed redials, short
against the Tunnel's 15 s open timeout."""
#: Failures of an attempt that say nothing about the ticket it offered (the path broke).
PATH_FAILURES: Final = frozenset({"outer_reset", "eof", "timeout"})
FORWARD_LINK_CREDIT: Final = 16 * 1024
"""Link credit a forwarded connection's unread bytes hold at most (of its 1 MiB stream
window; relay.proto.Connection.hold_link_credit). Local programs keep many forwarded
connections (relay.workstation.forward.MAX_CONNECTIONS, 256) and one that stops reading
them used to hold 1 MiB each: sixteen took the whole 16 MiB link window and froze the
session (DICOM, DICOMweb, renewal). 256 x 16 KiB is a quarter of it. What they hold
beyond it counts against the keeper's ForwardBudget (16 MiB for all together)."""


@dataclass
class SessionStats:
    """What the Tunnel and the metrics read (same names as relay.net.dialer.LinkStats)."""

    attempts: int = 0
    opened: int = 0
    failures: int = 0
    refusals: int = 0  # the agent refused us (revoked, ...)
    resumed: int = 0  # sessions opened from a ticket (no certificate exchange)
    tickets_dropped: int = 0  # tickets refused (see the module docstring)
    last_error: str = ""


def known_down(*, down_for: float, failed: int, after: float = OFFLINE_AFTER) -> bool:
    """Whether a link without a session for `down_for` seconds, `failed` attempts having
    failed since, is known down (rather than in a blip that a reconnect will end)."""
    return failed > 0 and down_for >= after


_BUDGET_LINES = LogLimiter()  # one key: a wave of resets is a few lines, then a count


def _budget_reset_line(budget: ForwardBudget) -> None:
    held = _BUDGET_LINES.allow("forward budget", time.monotonic())
    if held is not None:
        log.warning(
            "forwarded connections whose programs read nothing hold too much: the longest "
            "unread reset",
            extra={"limit": budget.limit, "evicted": budget.evicted, "suppressed": held},
        )


class _ForwardStream(Stream):
    """A forwarded connection's stream: its unread bytes count in the link's
    `forward_budget`, which resets the longest-unread stream when they are too many."""

    def __init__(self, link: _SessionLink, stream_id: int, headers: Mapping[str, str]) -> None:
        super().__init__(link, stream_id, headers)
        self._budget = link.forward_budget

    def _on_data(self, data: bytes) -> None:
        super()._on_data(data)
        if self.reset_code is None and data:
            evicted = self._budget.evicted
            self._budget.arrived(self, len(data))
            if self._budget.evicted != evicted:
                _budget_reset_line(self._budget)

    def acknowledge(self, size: int) -> None:
        self._budget.taken(self, size)
        super().acknowledge(size)

    def _on_reset(self, code: int) -> None:
        if self.reset_code is None:
            self._budget.gone(self, self.buffered)
        super()._on_reset(code)


class _SessionLink(Link):
    """The inner link; `first_data` resolves when the agent speaks (it accepted us)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # the keeper's, shared by its sessions (set before any forward is opened)
        self.forward_budget = ForwardBudget(reset_code=ErrorCode.CANCEL)
        self.first_data: asyncio.Future[None] = self.loop.create_future()
        self.goaway_reason: tuple[int, str] | None = None
        self.on_goaway = self._goaway
        self.conn.extra_window_limit = priorities.VIEWER_WINDOW * priorities.VIEWER_WINDOW_STREAMS

    def open_stream(self, headers: Mapping[str, str], priority: Priority | None = None) -> Stream:
        """As Link's, and a viewer's DICOM stream (u<=3) gets priorities.VIEWER_WINDOW more
        window while fewer than VIEWER_WINDOW_STREAMS hold it. Not every stream at that
        urgency: a forwarded connection, kept alive for minutes, would hold one of those
        few for as long as it lives. A forwarded connection's unread bytes hold at most
        FORWARD_LINK_CREDIT of the link window."""
        target = headers.get(HEADER_TARGET, "")
        if target.startswith(TCP_TARGET_PREFIX):
            stream: Stream = self._open_forward(headers, priority)
        else:
            stream = super().open_stream(headers, priority)
        prio = stream.priority
        viewer = prio is not None and prio.urgency <= priorities.VIEWER.urgency
        if viewer and target == TARGET_DICOM:
            self.conn.grow_window(stream.stream_id, priorities.VIEWER_WINDOW)
            self.flush()
        elif target.startswith(TCP_TARGET_PREFIX):
            self.conn.hold_link_credit(stream.stream_id, FORWARD_LINK_CREDIT)
        return stream

    def _open_forward(self, headers: Mapping[str, str], priority: Priority | None) -> Stream:
        """Link.open_stream, with a stream whose unread bytes count in forward_budget."""
        if priority is not None:
            headers = {**headers, HEADER_PRIORITY: priority.field()}
        stream_id = self.conn.open_stream(headers)
        stream = self.streams[stream_id] = _ForwardStream(self, stream_id, headers)
        self.flush()
        return stream

    def _goaway(self, code: int, reason: str) -> None:
        self.goaway_reason = (code, reason)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.first_data.done():
            self.first_data.set_result(None)


class SessionKeeper:
    """Keeps one sealed session to the agent over `kept`; see the module docstring."""

    def __init__(
        self,
        kept: KeptLink,
        ctx: ssl.SSLContext,
        *,
        trust_domain: str,
        site: str,
        settings: LinkSettings,
        rng: Uniform | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        offline_after: float = OFFLINE_AFTER,
    ) -> None:
        self.kept = kept
        self.ctx = ctx
        self.trust_domain = trust_domain
        self.site = site
        self.settings = settings
        self.handshake_timeout = handshake_timeout
        self.backoff = ExponentialBackoff(RETRY_BASE, RETRY_CAP, rng=rng)
        self._link: _SessionLink | None = None
        self._outer: Link | None = None  # the gateway link the current session runs on
        self.up = asyncio.Event()
        self.links: set[Link] = set()  # the current session and any still draining
        self.stats = SessionStats()
        self.seal = SealStats()
        # A TLS ticket is only valid with the context that made it (a renewal or a reload
        # replaces the context): keep the pair.
        self._ticket: tuple[ssl.SSLContext, ssl.SSLSession] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.clock = clock
        self.offline_after = offline_after
        self._down_since = clock()  # when the last session ended (or we started)
        self._retry_at: float | None = None  # loop time our backoff's pause ends (retry_in)
        self._failed_at_down = self._failed_attempts()
        # What all forwarded connections may hold unread, over every session of ours.
        self.forward_budget = ForwardBudget(reset_code=ErrorCode.CANCEL)

    @property
    def address(self) -> Address:
        return self.kept.address

    @property
    def link(self) -> Link | None:
        """The session new streams go to, or None while there is no usable one.

        Checked at every use, not only by the watcher: between a gateway's (or the agent's)
        goaway and the watcher's next look, a stream opened on the old session would reach
        a draining gateway's agent as if nothing had happened.
        """
        link, outer = self._link, self._outer
        if link is None or outer is None or self._stopping:
            return None
        if link.closed.done() or link.goaway_reason is not None or link.is_closing:
            return None
        if outer.is_closing or self.kept.link is not outer:
            return None
        return link

    def _failed_attempts(self) -> int:
        """Failed attempts so far: the gateway link's dials and our sessions."""
        return self.kept.stats.failures + self.stats.failures + self.stats.refusals

    def offline(self) -> str | None:
        """Why the link is known down (see the module docstring), or None: a session is
        up, or it went too recently, or no attempt has failed since."""
        if self.up.is_set():
            return None
        failed = self._failed_attempts() - self._failed_at_down
        if not known_down(
            down_for=self.clock() - self._down_since, failed=failed, after=self.offline_after
        ):
            return None
        why = self.stats.last_error if self.kept.up.is_set() else self.kept.stats.last_error
        return f"offline: no session with the agent through {self.address} ({why or 'down'})"

    def retry_in(self) -> float | None:
        """Seconds until the next reconnect attempt, if one is scheduled: our next session
        while the gateway link is up, else the gateway link's next dial (its backoff). None
        while an attempt is under way, or nothing says when."""
        at = self._retry_at if self.kept.up.is_set() else getattr(self.kept, "retry_at", None)
        if not isinstance(at, float):
            return None
        return max(0.0, at - asyncio.get_running_loop().time())

    async def _pause(self, delay: float) -> None:
        """The backoff's pause before the next session attempt; `retry_in` tells it."""
        self._retry_at = asyncio.get_running_loop().time() + delay
        try:
            await asyncio.sleep(delay)
        finally:
            self._retry_at = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="session")

    @property
    def open_streams(self) -> int:
        return sum(link.conn.open_streams for link in self.links)

    # -- the loop

    async def _run(self) -> None:
        while not self._stopping:
            await self.kept.up.wait()
            outer_link = self.kept.link
            try:
                link = await self._open(outer_link) if outer_link is not None else None
            except Exception:  # a bug must not end the workstation's sessions for good
                log.exception("opening a session failed unexpectedly")
                self.stats.failures += 1
                self.stats.last_error = "session: internal error (see the log)"
                link = None
            if link is None or outer_link is None:
                await self._pause(self.backoff.next_delay())
                continue
            self.backoff.reset()
            self._link, self._outer = link, outer_link
            self.up.set()
            try:
                await self._watch(link, outer_link)
            finally:
                self.up.clear()
                self._down_since, self._failed_at_down = self.clock(), self._failed_attempts()
                if self._link is link:
                    self._link = self._outer = None
            self._retire(link)

    async def _open(self, outer_link: Link | None) -> _SessionLink | None:
        """One attempt: a session on `outer_link`, accepted by the agent; None if not."""
        assert outer_link is not None
        self.stats.attempts += 1
        offered = self._resumable()
        try:
            outer = outer_link.open_stream({HEADER_TARGET: TARGET_SESSION})
        except (LinkClosedError, StreamStateError) as exc:
            self.stats.last_error = f"gateway link: {exc}"
            return None
        try:
            sealed = await establish(
                outer,
                self.ctx,
                server_side=False,
                alpn=ALPN_SESSION,
                check_peer=agent_check(self.trust_domain, self.site),
                settings=self.settings,
                name="session",
                session=offered,
                timeout=self.handshake_timeout,
                stats=self.seal,
                link_class=_SessionLink,
            )
            holder = sealed.link
            assert isinstance(holder, _SessionLink)
            first: set[asyncio.Future[Any]] = {holder.first_data, holder.closed}
            async with asyncio.timeout(self.handshake_timeout):
                await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        except SealError as exc:
            self.stats.failures += 1
            self.stats.last_error = f"session: {exc.reason}: {exc.detail}"
            log.warning("session failed", extra={"reason": exc.reason, "detail": exc.detail})
            if offered is not None and exc.reason not in PATH_FAILURES:
                self._drop_ticket(offered)
            return None
        except TimeoutError:
            self.stats.failures += 1
            self.stats.last_error = "session: the agent did not answer"
            sealed.link.abort()
            return None
        if holder.goaway_reason is not None or holder.closed.done():
            code, reason = holder.goaway_reason or (0, "closed")
            self.stats.refusals += 1
            self.stats.last_error = f"{ErrorCode.name_of(code)}: {reason}"
            log.error("the agent refused the session", extra={"reason": reason})
            sealed.link.abort()
            if offered is not None:
                self._drop_ticket(offered)
            if code == ErrorCode.REVOKED:  # the agent's own, sealed verdict: stop for good
                self._stopping = True
                self.kept.revoked_by_peer(reason)
            return None
        self._keep_ticket(sealed.transport.core)
        holder.forward_budget = self.forward_budget
        self.stats.opened += 1
        self.stats.resumed += sealed.handshake.resumed
        self.links.add(holder)
        holder.closed.add_done_callback(lambda _: self.links.discard(holder))
        log.info(
            "session open",
            extra={"agent": str(sealed.handshake.peer), "resumed": sealed.handshake.resumed},
        )
        return holder

    async def _watch(self, link: _SessionLink, outer_link: Link) -> None:
        """Until the session ends, the agent says goaway, or the gateway link changes."""
        while not self._stopping:
            if link.closed.done() or link.goaway_reason is not None or link.is_closing:
                return
            if outer_link.is_closing or self.kept.link is not outer_link:
                return  # the gateway link is going (goaway) or replaced: the next session
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH):
                    await asyncio.shield(link.closed)
        return

    def _retire(self, link: Link) -> None:
        """Close `link` once its streams are done (it takes no new ones from us)."""
        transport = link.transport
        if isinstance(transport, SealTransport):  # tickets come after the handshake
            self._keep_ticket(transport.core)
        if link.closed.done():
            return

        async def close_when_idle() -> None:
            while link.conn.open_streams and not link.closed.done():  # noqa: ASYNC110
                await asyncio.sleep(DRAIN_POLL)
            link.close()

        task = asyncio.get_running_loop().create_task(close_when_idle())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    def _resumable(self) -> ssl.SSLSession | None:
        if self._ticket is not None and self._ticket[0] is self.ctx:
            return self._ticket[1]
        return None

    def _drop_ticket(self, refused: ssl.SSLSession) -> None:
        """Forget `refused` (not a newer ticket kept meanwhile): the next attempt is a
        full handshake."""
        if self._ticket is not None and self._ticket[1] is refused:
            self._ticket = None
            self.stats.tickets_dropped += 1
            log.info("session ticket dropped; the next session presents the certificate")

    def _keep_ticket(self, core: SealCore) -> None:
        ticket = core.session
        if ticket is not None:
            self._ticket = (core.context, ticket)

    # -- shutdown

    def stop(self) -> None:
        """No new sessions; the current one takes no new streams from the Tunnel."""
        self._stopping = True
        self.up.clear()
        if self._task is not None:
            self._task.cancel()

    async def close(self, grace: float = 2.0) -> None:
        self.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for link in list(self.links):
            link.close(ErrorCode.SHUTDOWN, "workstation shutting down")
        waits = [link.wait_closed() for link in self.links]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*waits, return_exceptions=True)
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        self._link = self._outer = None
