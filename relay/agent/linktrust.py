"""Device trust on the agent's gateway links: revocation lists out, refusal reports in.

Every new gateway link first carries the site's full revocation list (empty without
`pki:`), because a gateway routes nothing of this site to a link before it has that
list; revocations made later are pushed to every live link. The list is built in a
worker thread (it signs a notice per revoked device, ~50 µs each, cached after the first
time); increments pushed meanwhile wait for it and follow it on that link, so none is
lost to a snapshot read before it. Gateways report the links
they refuse; with a DeviceAuthority those go to the audit trail, otherwise to the log.

A gateway may be compromised, and each report would be one audit event written on the
event loop: reports are limited per gateway address (a token bucket: REFUSAL_BURST, then
REFUSALS_PER_SECOND), the way the gateway limits its own. The ones over the limit are
held back and written as one event, the last of them with the count of those before,
once the bucket has a token again (or at shutdown), so a flood can neither rotate the
trail away nor go uncounted (`relay_refusal_reports_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.agent.authority import DeviceAuthority
from relay.agent.registry import RegistryError
from relay.net.aio import Link
from relay.ops.ratelimit import RateLimiter
from relay.proto import ErrorCode, LinkClosedError
from relay.trust.revocation import Refusal, RevocationError, decode_refusal, encode_revocations
from relay.wire import KIND_REFUSAL, KIND_REVOKE

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


@dataclass(eq=False)  # a prometheus registry keys its collectors by identity
class RefusalMetrics(Collector):
    """`relay_refusal_reports_total{result}`: refusal reports from gateways, by what
    became of them."""

    reports: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REPORT_RESULTS, 0))

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "relay_refusal_reports",
            "Refusal reports from gateways: recorded, rate_limited (counted in a later"
            " event) or malformed",
            labels=["result"],
        )
        for result, count in self.reports.items():
            family.add_metric([result], count)
        yield family


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
        # Links whose snapshot is being built: the increments to send after it.
        self._pending: dict[Link, list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def snapshot(self) -> list[bytes]:
        """The full "revoke" list for a new link: the registry's, or an empty one."""
        if self.authority is not None:
            return self.authority.revocation_snapshot()
        return encode_revocations([], full=True)

    def on_link_up(self, link: Link) -> None:
        """First thing on a new gateway link: the full revocation list."""
        # Set here, not at dial: this callback knows which link (and gateway) it is. The
        # gateway sends controls only to links it routes, i.e. after our snapshot.
        link.on_control = functools.partial(self._on_control, link)
        self._pending[link] = []
        task = asyncio.get_running_loop().create_task(
            self._send_snapshot(link), name=f"revocation list for {link.name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_snapshot(self, link: Link) -> None:
        """Build the full list off the loop, then send it and what was pushed meanwhile."""
        try:
            bodies = await asyncio.to_thread(self.snapshot)
        except (RegistryError, RevocationError) as exc:
            self._pending.pop(link, None)
            # Without the list the gateway would never route to us; closing makes the
            # link retry (with backoff) until the registry is readable again.
            log.error(
                "cannot read the revocation list; closing the link",
                extra={"link": link.name, "error": str(exc)},
            )
            link.close(ErrorCode.INTERNAL_ERROR, "revocation list unavailable")
            return
        except BaseException:
            self._pending.pop(link, None)
            raise
        bodies += self._pending.pop(link, [])
        with contextlib.suppress(LinkClosedError, ValueError):
            for body in bodies:
                link.send_control(KIND_REVOKE, body)

    def push(self, bodies: list[bytes]) -> None:
        """Send incremental "revoke" bodies on every live gateway link."""
        sent = 0
        for link in self._live_links():
            pending = self._pending.get(link)
            if pending is not None:  # its snapshot is being built: these follow it
                pending.extend(bodies)
                sent += 1
                continue
            try:
                for body in bodies:
                    link.send_control(KIND_REVOKE, body)
            except (LinkClosedError, ValueError):
                continue  # closing: its replacement starts with a full snapshot
            sent += 1
        log.info("revocations pushed", extra={"messages": len(bodies), "links": sent})
        if self.on_pushed is not None:
            self.on_pushed()

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
