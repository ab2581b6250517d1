"""Device trust on the agent's gateway links: revocation lists out, refusal reports in.

Every new gateway link first carries the site's full revocation list (empty without
`pki:`), because a gateway routes nothing of this site to a link before it has that
list; revocations made later are pushed to every live link. Gateways report the links
they refuse; with a DeviceAuthority those go to the audit trail, otherwise to the log.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

from relay.agent.authority import DeviceAuthority
from relay.agent.registry import RegistryError
from relay.net.aio import Link
from relay.proto import ErrorCode, LinkClosedError
from relay.trust.revocation import RevocationError, decode_refusal, encode_revocations
from relay.wire import KIND_REFUSAL, KIND_REVOKE

__all__ = ["LinkTrust"]

log = logging.getLogger(__name__)


class LinkTrust:
    """What the agent says and hears about devices on each gateway link."""

    def __init__(
        self, authority: DeviceAuthority | None, live_links: Callable[[], list[Link]]
    ) -> None:
        self.authority = authority
        self._live_links = live_links
        self.refusals_reported = 0  # "refusal" reports received from gateways
        self.on_pushed: Callable[[], object] | None = None  # after revocations went out

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
        try:
            bodies = self.snapshot()
        except (RegistryError, RevocationError) as exc:
            # Without the list the gateway would never route to us; closing makes the
            # link retry (with backoff) until the registry is readable again.
            log.error(
                "cannot read the revocation list; closing the link",
                extra={"link": link.name, "error": str(exc)},
            )
            link.close(ErrorCode.INTERNAL_ERROR, "revocation list unavailable")
            return
        with contextlib.suppress(LinkClosedError):
            for body in bodies:
                link.send_control(KIND_REVOKE, body)

    def push(self, bodies: list[bytes]) -> None:
        """Send incremental "revoke" bodies on every live gateway link."""
        sent = 0
        for link in self._live_links():
            try:
                for body in bodies:
                    link.send_control(KIND_REVOKE, body)
            except (LinkClosedError, ValueError):
                continue  # closing: its replacement starts with a full snapshot
            sent += 1
        log.info("revocations pushed", extra={"messages": len(bodies), "links": sent})
        if self.on_pushed is not None:
            self.on_pushed()

    def _on_control(self, link: Link, kind: str, body: bytes) -> None:
        if kind != KIND_REFUSAL:
            log.debug("unknown control message ignored", extra={"kind": kind[:64]})
            return
        self.refusals_reported += 1
        reporter = str(link.peer) if link.peer is not None else link.name
        if self.authority is not None:
            self.authority.record_refusal(body, reporter=reporter)
            return
        try:  # no audit trail without pki: at least the log says who was refused
            refusal = decode_refusal(body)
        except RevocationError as exc:
            log.warning("malformed refusal report", extra={"error": str(exc)})
            return
        log.warning(
            "a gateway refused a link of this site",
            extra={
                "gateway": reporter,
                "reason": refusal.reason,
                "identity": refusal.identity,
                "peer": refusal.peer,
                "suppressed": refusal.suppressed,
            },
        )
