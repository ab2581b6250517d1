"""Control messages between the gateway and its agents.

From an agent: `hello` (what it speaks, first on the link), `revoke` (full snapshot on
link-up, then increments) and `enroll-result`. To that agent: `hello`, once, in answer
to its own (the "revoke" versions this gateway takes; sent in answer rather than
unasked, because an agent installs its control handler only once its link is up, and
would drop a hello that came with our SETTINGS). To the agents of a site: `refusal`,
when the gateway refused a link that claimed an identity of that site, rate-limited so
a flood of bad handshakes cannot flood agents.
Revocations live in memory only; a restarted gateway relearns them from each agent's
snapshot before it routes that agent's site. Each comes with the agent's signed notice,
kept as an opaque string for the revoked device (the gateway does not verify it). A
current agent sends version 1 first (routed at once), then version 2 once we answered
its hello; an older agent (no hello) sends version 1 only, which is logged once per site.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable

from gateway.metrics import GatewayMetrics
from gateway.router import Router
from relay.net.aio import Link
from relay.ops.ratelimit import RateLimiter
from relay.proto import ErrorCode, LinkClosedError
from relay.trust.identity import Identity
from relay.trust.revocation import (
    ENROLL_RESULT_OTHER,
    KIND_ENROLL_RESULT,
    KIND_HELLO,
    KIND_REFUSAL,
    KIND_REVOKE,
    REVOKE_VERSION,
    Hello,
    Refusal,
    RevocationAssembler,
    RevocationError,
    RevocationList,
    decode_hello,
    decode_revocations,
    encode_hello,
    encode_refusal,
    enroll_result_label,
)

log = logging.getLogger(__name__)

REFUSALS_PER_SECOND = 5.0
REFUSAL_BURST = 20
MAX_SITES = 1000  # sites whose refusal reports are paced (and their held-back counts kept)


class AgentControl:
    """Handles the control messages of one agent link of `site`."""

    def __init__(
        self,
        link: Link,
        site: str,
        *,
        router: Router,
        revoked: RevocationList,
        metrics: GatewayMetrics,
        close_device: Callable[[str], None],
    ) -> None:
        self.link = link
        self.site = site
        self.router = router
        self.revoked = revoked
        self.metrics = metrics
        self.close_device = close_device
        self.assembler = RevocationAssembler()
        self.routed = False
        self.hello: Hello | None = None  # what the agent said it speaks, if it did
        self.answered = False  # our hello went out (once per link)

    def __call__(self, kind: str, body: bytes) -> None:
        try:
            if kind == KIND_REVOKE:
                self._on_revoke(body)
            elif kind == KIND_ENROLL_RESULT:
                self._on_enroll_result(body)
            elif kind == KIND_HELLO:
                self._on_hello(body)
            else:
                log.debug("unknown control message ignored", extra={"kind": kind[:64]})
        except (RevocationError, ValueError) as exc:
            log.error(
                "agent sent a bad control message; closing its link",
                extra={"site": self.site, "kind": kind, "error": str(exc)},
            )
            self.link.close(ErrorCode.PROTOCOL_ERROR, "bad control message")

    def _on_hello(self, body: bytes) -> None:
        """Note what the agent speaks and answer, once, with what we take. A malformed
        hello is only a lost upgrade (the agent keeps sending version 1): logged, the link
        kept."""
        if self.answered:
            log.debug("repeated hello ignored", extra={"site": self.site})
            return
        self.answered = True
        try:
            self.hello = decode_hello(body)
        except RevocationError as exc:
            log.warning(
                "agent sent a malformed hello; it gets no answer",
                extra={"site": self.site, "error": str(exc)},
            )
            return
        with contextlib.suppress(LinkClosedError):
            self.link.send_control(KIND_HELLO, encode_hello())

    def _on_enroll_result(self, body: bytes) -> None:
        """Count the result; a label we do not know (a newer agent's) as "other"."""
        label = enroll_result_label(body)
        if label == ENROLL_RESULT_OTHER:
            log.debug("unknown enroll-result label counted as other", extra={"site": self.site})
        self.metrics.enrollments.labels(label).inc()

    def _upgrades(self) -> bool:
        """Whether this agent said it sends signed notices (a version-2 list follows)."""
        return self.hello is not None and REVOKE_VERSION in self.hello.revoke

    def _on_revoke(self, body: bytes) -> None:
        update = self.assembler.feed(decode_revocations(body))
        if update is None:
            return
        if (
            update.version == 1
            and update.devices
            and not self._upgrades()
            and self.site not in self.revoked.unsigned_sites
        ):
            self.revoked.unsigned_sites.add(self.site)
            log.warning(
                "an agent of this site revokes devices without signed notices (an older "
                "agent): current workstations will not heed their revocation from a "
                "gateway; upgrade the agent",
                extra={"site": self.site},
            )
        for uri in self.revoked.apply(self.site, update):
            log.info("device revoked", extra={"identity": uri})
            self.close_device(uri)
        self.metrics.revocations.set(len(self.revoked))
        if update.full and not self.routed:
            # Only now may the site's device streams go to this agent link.
            self.routed = True
            self.router.add_agent(self.site, self.link)


class RefusalReporter:
    """Tells the agents of a site about refused links that claimed one of its identities."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.limiter = RateLimiter(REFUSALS_PER_SECOND, REFUSAL_BURST, max_keys=MAX_SITES)
        # held-back counts by site, bounded as the limiter's table (sites come from
        # refused certificates: an agent CA could name any number)
        self.suppressed: OrderedDict[str, int] = OrderedDict()

    def report(self, reason: str, identity: Identity | None, peer: str, now: float) -> None:
        """To the agents of the identity's site; without an identity (an enrollment
        attempt turned away before it named a site), to every agent."""
        site = identity.site if identity is not None else None
        key = site or "*"
        if not self.limiter.allow(key, now):
            self.suppressed[key] = self.suppressed.pop(key, 0) + 1
            while len(self.suppressed) > MAX_SITES:
                self.suppressed.popitem(last=False)
            return
        uri = identity.uri if identity is not None else ""
        try:
            body = encode_refusal(Refusal(reason, uri, peer[:64], self.suppressed.pop(key, 0)))
        except RevocationError:
            return
        for link in self.router.agent_links(site):
            try:
                link.send_control(KIND_REFUSAL, body)
            except (LinkClosedError, ValueError):
                continue
