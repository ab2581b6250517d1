"""Device trust on the agent's gateway links: revocation lists out, refusal reports in.

Every new gateway link first carries a "hello" (the "revoke" versions we speak) and the
site's full revocation list (empty without `pki:`) in version 1, which every gateway
takes: a gateway routes nothing of this site to a link before it has a full list, and an
older gateway closes the link on version 2. A gateway that answers the hello with
version 2 then gets the full list again in version 2, each device with its signed
notice, and version-2 increments from then on; one that never answers (an older one)
gets version 1 for as long as the link lives. The version is per link: an agent may
serve gateways of both releases at once. Revocations made later are pushed to every live
link, in the version of that link.

A full list is built in a worker thread (version 2 signs a notice per revoked device,
~50 µs each, cached after the first time); increments pushed meanwhile wait for it and
follow it on that link, so none is lost to a list read before it. Across the switch the
gateway holds the union: an increment sent in version 1 before the version-2 list was
read is in that list (the registry had it before we pushed it), and one pushed while the
list is built follows it. Gateways report the links they refuse; with a DeviceAuthority
those go to the audit trail, otherwise to the log.

A gateway may be compromised, and each report would be one audit event written on the
event loop: reports are limited per gateway address (a token bucket: REFUSAL_BURST, then
REFUSALS_PER_SECOND), the way the gateway limits its own. The ones over the limit are
held back and written as one event, the last of them with the count of those before,
once the bucket has a token again (or at shutdown), so a flood can neither rotate the
trail away nor go uncounted (`relay_refusal_reports_total`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from relay.agent.authority import DeviceAuthority
from relay.agent.registry import RegistryError
from relay.net.aio import Link
from relay.ops.labelled import LabelledCounts
from relay.ops.ratelimit import RateLimiter
from relay.proto import ErrorCode, LinkClosedError
from relay.trust.revocation import (
    REVOKE_VERSION,
    VERSION,
    Refusal,
    RevocationError,
    decode_hello,
    decode_refusal,
    encode_hello,
    encode_revocations,
    increment_without_notices,
)
from relay.wire import KIND_HELLO, KIND_REFUSAL, KIND_REVOKE

__all__ = [
    "REFUSALS_PER_SECOND",
    "REFUSAL_BURST",
    "REPORT_RESULTS",
    "LinkTrust",
    "RefusalMetrics",
]

log = logging.getLogger(__name__)

#: Refusal reports of one gateway address recorded one by one: a burst, then one a
#: minute. An honest gateway sends at most 20 at once and 5 a second (gateway/control.py);
#: a flood then costs the trail about 1,440 events (~1.6 MB) a day per gateway address.
REFUSAL_BURST: Final = 20
REFUSALS_PER_SECOND: Final = 1 / 60
#: `relay_refusal_reports_total{result}`: written (audit or log), held back by the
#: limit (counted in a later event), or not a refusal report at all.
REPORT_RESULTS: Final = ("recorded", "rate_limited", "malformed")


class RefusalMetrics(LabelledCounts):
    """`relay_refusal_reports_total{result}`: refusal reports from gateways, by what
    became of them (`reports`, bumped by LinkTrust)."""

    def __init__(self) -> None:
        self.reports: dict[str, int] = dict.fromkeys(REPORT_RESULTS, 0)
        super().__init__(
            "relay_refusal_reports",
            "Refusal reports from gateways: recorded, rate_limited (counted in a later"
            " event) or malformed",
            "result",
            lambda: self.reports,
        )


@dataclass
class _LinkState:
    """The revocation side of one gateway link."""

    #: The "revoke" version this link's gateway gets: 1 until it announces more.
    version: int = VERSION
    #: Increments (as pushed) waiting for the full list being built; None when none is.
    pending: list[bytes] | None = None
    #: The gateway announced version 2 while a version-1 list was being built.
    upgrade: bool = False


@dataclass
class _Held:
    """Reports of one gateway address held back by the limit: the last one, and the
    refusals before it (each report's own and the ones it says were `suppressed`)."""

    last: Refusal
    reporter: str
    earlier: int
    timer: asyncio.TimerHandle | None


class LinkTrust:
    """What the agent says and hears about devices on each gateway link."""

    def __init__(
        self,
        authority: DeviceAuthority | None,
        live_links: Callable[[], list[Link]],
        *,
        burst: int = REFUSAL_BURST,
        per_second: float = REFUSALS_PER_SECOND,
    ) -> None:
        self.authority = authority
        self._live_links = live_links
        self.on_pushed: Callable[[], object] | None = None  # after revocations went out
        self.metrics = RefusalMetrics()
        # Keyed by the link's name, i.e. the gateway address it dials: a gateway that
        # closes its link gets the same bucket on the next one.
        self._limiter = RateLimiter(per_second, burst)
        self._refill = 1 / per_second  # at most this long until the bucket has a token
        self._held: dict[str, _Held] = {}
        # Each live link's revocation version and the increments waiting for its list.
        self._links: dict[Link, _LinkState] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def snapshot(self, version: int = REVOKE_VERSION) -> list[bytes]:
        """The full "revoke" list for a link, in `version`: the registry's, or an empty
        one. Blocking (version 2 signs notices): run it in a worker thread."""
        signed = version >= REVOKE_VERSION
        if self.authority is not None:
            return self.authority.revocation_snapshot(signed=signed)
        return encode_revocations([], full=True, notices={} if signed else None)

    def on_link_up(self, link: Link) -> None:
        """First thing on a new gateway link: our hello, then the full list in version 1."""
        # Set here, not at dial: this callback knows which link (and gateway) it is. The
        # gateway answers our hello, and sends other controls only to links it routes.
        link.on_control = functools.partial(self._on_control, link)
        state = self._links[link] = _LinkState()
        link.closed.add_done_callback(lambda _: self._links.pop(link, None))
        try:
            link.send_control(KIND_HELLO, encode_hello())
        except (LinkClosedError, ValueError):
            return  # closing already: its replacement starts over
        self._build(link, state, VERSION)

    def _build(self, link: Link, state: _LinkState, version: int) -> None:
        """Build `link`'s full list in `version` off the loop; increments wait for it."""
        state.version, state.pending = version, []
        task = asyncio.get_running_loop().create_task(
            self._send_snapshot(link, state), name=f"revocation list for {link.name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_snapshot(self, link: Link, state: _LinkState) -> None:
        """Send the full list and what was pushed meanwhile; then the version-2 list, if
        the gateway announced it while this one was being built."""
        try:
            bodies = await asyncio.to_thread(self.snapshot, state.version)
        except (RegistryError, RevocationError) as exc:
            state.pending = None
            # Without the list the gateway would never route to us; closing makes the
            # link retry (with backoff) until the registry is readable again.
            log.error(
                "cannot read the revocation list; closing the link",
                extra={"link": link.name, "error": str(exc)},
            )
            link.close(ErrorCode.INTERNAL_ERROR, "revocation list unavailable")
            return
        except BaseException:
            state.pending = None
            raise
        pending, state.pending = state.pending or [], None
        bodies += self._in_version(pending, state.version)
        try:
            for body in bodies:
                link.send_control(KIND_REVOKE, body)
        except (LinkClosedError, ValueError):
            return
        if state.upgrade:
            state.upgrade = False
            self._build(link, state, REVOKE_VERSION)

    @staticmethod
    def _in_version(bodies: list[bytes], version: int) -> list[bytes]:
        """Incremental bodies (as pushed) in the form a link of `version` takes."""
        if version >= REVOKE_VERSION:
            return list(bodies)
        return [v1 for body in bodies for v1 in increment_without_notices(body)]

    def push(self, bodies: list[bytes]) -> None:
        """Send incremental "revoke" bodies on every live gateway link, each in the
        version its gateway takes (converted once per version, not per link)."""
        sent = 0
        forms: dict[int, list[bytes]] = {}
        for link in self._live_links():
            state = self._links.get(link)
            if state is not None and state.pending is not None:
                state.pending.extend(bodies)  # its list is being built: these follow it
                sent += 1
                continue
            version = state.version if state is not None else VERSION
            try:
                if version not in forms:
                    forms[version] = self._in_version(bodies, version)
                for body in forms[version]:
                    link.send_control(KIND_REVOKE, body)
            except RevocationError as exc:  # a body we made ourselves: a bug, not the link's
                log.error("cannot convert a revocation increment", extra={"error": str(exc)})
                continue
            except (LinkClosedError, ValueError):
                continue  # closing: its replacement starts with a full snapshot
            sent += 1
        log.info("revocations pushed", extra={"messages": len(bodies), "links": sent})
        if self.on_pushed is not None:
            self.on_pushed()

    def _on_hello(self, link: Link, body: bytes) -> None:
        """The gateway's answer to our hello: version 2 from now on, if it takes it."""
        state = self._links.get(link)
        if state is None:
            return
        try:
            version = decode_hello(body).revoke_version()
        except RevocationError as exc:
            log.warning(
                "gateway sent a malformed hello; it keeps getting version-1 revocations",
                extra={"link": link.name, "error": str(exc)},
            )
            return
        if version <= state.version or state.upgrade:
            return  # nothing newer, or already switching
        if state.pending is not None:
            state.upgrade = True  # after the list being built, which it must have first
            return
        log.debug("gateway takes signed revocations", extra={"link": link.name})
        self._build(link, state, version)

    def close(self) -> None:
        """At shutdown: write every count still held back (one event per gateway
        address), whatever the buckets say. Lists still being built are dropped (their
        links close with the agent)."""
        for task in list(self._tasks):
            task.cancel()
        for key in list(self._held):
            held = self._held.pop(key)
            if held.timer is not None:
                held.timer.cancel()
            self._record(held.last, held.reporter, held.earlier)

    def _on_control(self, link: Link, kind: str, body: bytes) -> None:
        if kind == KIND_HELLO:
            self._on_hello(link, body)
            return
        if kind != KIND_REFUSAL:
            log.debug("unknown control message ignored", extra={"kind": kind[:64]})
            return
        reporter = str(link.peer) if link.peer is not None else link.name
        allowed = self._limiter.allow(link.name, time.monotonic())
        try:
            refusal = decode_refusal(body)
        except RevocationError as exc:
            self.metrics.reports["malformed"] += 1
            if allowed:  # a flood of them is counted, not logged line by line
                log.warning("malformed refusal report", extra={"error": str(exc)})
            return
        if not allowed:
            self.metrics.reports["rate_limited"] += 1
            self._hold(link.name, refusal, reporter)
            return
        self.metrics.reports["recorded"] += 1
        earlier = 0
        held = self._held.pop(link.name, None)
        if held is not None:  # this event carries the count of the ones held back
            if held.timer is not None:
                held.timer.cancel()
            earlier = held.earlier + 1 + held.last.suppressed
        self._record(refusal, reporter, earlier)

    def _hold(self, key: str, refusal: Refusal, reporter: str) -> None:
        held = self._held.get(key)
        if held is not None:
            held.earlier += 1 + held.last.suppressed
            held.last, held.reporter = refusal, reporter
            return
        self._held[key] = _Held(refusal, reporter, 0, self._flush_later(key))

    def _flush_later(self, key: str) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside a loop: the next report or close() writes it
            return None
        return loop.call_later(self._refill, self._flush, key)

    def _flush(self, key: str) -> None:
        """The held-back count of `key`, once its bucket has a token again."""
        held = self._held.get(key)
        if held is None:
            return
        if not self._limiter.allow(key, time.monotonic()):
            held.timer = self._flush_later(key)
            return
        del self._held[key]
        self._record(held.last, held.reporter, held.earlier)

    def _record(self, refusal: Refusal, reporter: str, rate_limited: int) -> None:
        """One refusal to the audit trail (or, without `pki:`, the log), with the count of
        the earlier ones from the same gateway that were held back."""
        if self.authority is not None:
            self.authority.record_refusal(refusal, reporter=reporter, rate_limited=rate_limited)
            return
        log.warning(  # no audit trail without pki: at least the log says who was refused
            "a gateway refused a link of this site",
            extra={
                "gateway": reporter,
                "reason": refusal.reason,
                "identity": refusal.identity,
                "peer": refusal.peer,
                "suppressed": refusal.suppressed,
                "rate_limited": rate_limited,
            },
        )
