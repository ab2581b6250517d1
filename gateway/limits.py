"""What one device, or one source address, may hold in the gateway (DESIGN.md section 11).

Every enrolled device is a potential attacker, so each has caps: links, open streams
(its sealed sessions: all a device may open through the gateway), and
bytes queued in the gateway's splices on its behalf. A source address has a cap on
connections that have not finished the TLS handshake and a rate of new ones; all sources
together have both too (`AllSourcesLimits`: the handshakes run on the event loop, so a
flood from many sources would otherwise starve every established link). `DeviceLedger`
and `SourceLedger` count; the server, router and splice ask them before they admit, and
each refusal is counted in `relay_limit_hits_total{limit=...}` (the `hit` callback).

Sessions are also opened at a bounded rate per device (a token bucket): a device that
opens and resets sessions in a loop (HTTP/2's rapid reset) would cost its agent a TLS
handshake each. The buckets outlive the device's links (a reconnect must not refill
them), in a table of their own bounded by OPEN_BUCKETS.

An enrollment stream belongs to no device (its PC is not authenticated): its splice has a
budget of its own, ENROLL_BUFFERED.

An agent link's streams are shared fairly: a device may take another stream on an agent
link only while more than `agent_reserve` of that link's streams are free, unless it has
none there yet (the router then tries the site's other agent links first). So one device
at its cap leaves the reserve to others, and a device that has no session yet always
finds one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from relay.ops.ratelimit import RateLimiter
from relay.proto.settings import FieldError, format_size

__all__ = [
    "ALL_SOURCES_LIMITS",
    "ENROLL_BUFFERED",
    "LIMITS",
    "OPEN_BUCKETS",
    "QUIET_SOURCE_RESERVE",
    "SESSION_OPENS_PER_SECOND",
    "SESSION_OPEN_BURST",
    "SOURCE_PREFIX_V6",
    "AllSourcesLimits",
    "DeviceLedger",
    "DeviceLimits",
    "DeviceUsage",
    "SourceLedger",
    "SourceLimits",
    "TokenBucket",
    "source_key",
]

#: Values of the `limit` label of relay_limit_hits_total.
LIMITS: Final = (
    "device_links",
    "device_streams",
    "device_buffered",
    "agent_share",
    "source_handshakes",
    "source_rate",
    "device_opens",
    "enroll_buffered",
    "peer_unread",
    "all_sources_handshakes",
    "all_sources_rate",
)

#: The limits of all sources together (also `relay_refusals_total` reasons): their
#: refusals are logged on a line of their own, not once per source.
ALL_SOURCES_LIMITS: Final = ("all_sources_handshakes", "all_sources_rate")

#: The part (1 / this) of the gateway-wide handshake slots and tokens that a source with a
#: handshake already under way may not take: when a flood has spent the rest, a device
#: dialling from a quiet source still finds some. A source's own handshakes under way are
#: counted anyway (the per-source cap), so telling busy from quiet costs nothing.
QUIET_SOURCE_RESERVE: Final = 8

MiB: Final = 1024 * 1024

#: Sessions one device may open: SESSION_OPEN_BURST at once, then SESSION_OPENS_PER_SECOND.
#: A workstation opens one per link and, refused, retries with backoff (full jitter, at
#: most 5 s apart: 0.4 a second on average, a few quick ones first); a reconnect opens a
#: handful, and a device at its caps (4 links of 8 sessions) holds 32. Not a config key:
#: no honest device comes near it.
SESSION_OPENS_PER_SECOND: Final = 1.0
SESSION_OPEN_BURST: Final = 64

#: Devices whose session-open buckets are remembered, least recently used forgotten first.
#: A bucket is kept after the device's last link is gone (else each reconnect would bring
#: a fresh burst); an empty one is full again SESSION_OPEN_BURST / SESSION_OPENS_PER_SECOND
#: (64 s) after its last use, so forgetting one early takes this many other devices
#: opening sessions within that time. An entry, its key included, is about 300 bytes: 3 MB.
OPEN_BUCKETS: Final = 10_000

#: Bytes the gateway may queue for one enrollment stream, both directions, each chunk
#: counted with splice.CHUNK_COST: over it the stream is reset with LIMIT_EXCEEDED. The
#: PC is anyone, and may send 1-byte DATA frames to an agent link that takes nothing more.
#: A whole enrollment is about 5 KiB (measured: 1 KiB PC -> agent, 4 KiB back), and
#: nothing queues while the agent link has credit. An enrollment link routes one stream,
#: and there are at most enroll.MAX_OPEN (100) links: 6.25 MiB for all of them.
ENROLL_BUFFERED: Final = 64 * 1024

#: What counts as one source for the per-source limits (unfinished handshakes,
#: enrollment attempts, the refusal lines): an IPv4 address, or an IPv6 address's /64.
#: One host is handed a whole /64 (SLAAC on any LAN, a cloud VM, a home line), so keyed
#: by the full address it was 2^64 sources: it could hold every handshake slot up to
#: `max_links` and enroll without a rate. A site's PCs in one /64 share the limits, as
#: PCs behind one IPv4 NAT address always have.
SOURCE_PREFIX_V6: Final = 64


def source_key(host: str) -> str:
    """The per-source limits' key for the address `host` (see SOURCE_PREFIX_V6); an
    IPv4-mapped IPv6 address is its IPv4 address; a string that is no address, itself."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # no zone: fe80::1%eth0
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, SOURCE_PREFIX_V6), strict=False))


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """YAML `per_device:`. Defaults fit a workstation (one link, one sealed session on it)
    with room for reconnects: a new link, or a new session, before the old one is gone."""

    links: int = 4
    streams: int = 8
    buffered: int = 4 * MiB
    agent_reserve: int = 64

    def __post_init__(self) -> None:
        for name, hi in (("links", 10_000), ("streams", 65_535), ("agent_reserve", 65_535)):
            value = getattr(self, name)
            low = 0 if name == "agent_reserve" else 1
            if not low <= value <= hi:
                raise FieldError(name, f"expected an integer {low}-{hi}, got {value}")
        if not 64 * 1024 <= self.buffered <= 1 << 31:
            raise FieldError(
                "buffered", f"expected a size 64KiB-2GiB, got {format_size(self.buffered)}"
            )


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """YAML `per_source:`: connections from one source still in their TLS handshake, and
    how fast it may start new ones (a bucket of `handshake_burst`, refilled at
    `handshake_rate` a second): a TLS handshake costs the gateway a key exchange and a
    signature, so a source reconnecting as fast as it can is a CPU flood even when each
    connection ends at once. The burst is generous: a hospital's PCs behind one NAT
    address all reconnect after a gateway restart."""

    handshakes: int = 32
    handshake_rate: int = 50
    handshake_burst: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.handshakes <= 1_000_000:
            raise FieldError("handshakes", f"expected an integer 1-1000000, got {self.handshakes}")
        if not 1 <= self.handshake_rate <= 1_000_000:
            raise FieldError(
                "handshake_rate", f"expected an integer 1-1000000, got {self.handshake_rate}"
            )
        if not 1 <= self.handshake_burst <= 1_000_000:
            raise FieldError(
                "handshake_burst", f"expected an integer 1-1000000, got {self.handshake_burst}"
            )


@dataclass(frozen=True, slots=True)
class AllSourcesLimits:
    """YAML `all_sources:`: handshakes under way and new ones a second, all sources
    together. The TLS handshake runs on the event loop that relays every established link
    (about 1.2-1.5 ms of CPU for a full mTLS one, tests/bench/handshakes.py), so many
    sources each within their `per_source` limits could still take the whole loop: 300 a
    second is at most about half of it. 1,024 under way is ten times what 300 a second
    over a slow WAN needs, and bounds what half-done handshakes hold (their TLS state and
    read buffers) far below `max_links` of them. The burst (2 s of the rate) exceeds one
    source's, so one source alone never empties it."""

    handshakes: int = 1024
    handshake_rate: int = 300
    handshake_burst: int = 600

    def __post_init__(self) -> None:
        for name in ("handshakes", "handshake_rate", "handshake_burst"):
            value = getattr(self, name)
            if not 1 <= value <= 1_000_000:
                raise FieldError(name, f"expected an integer 1-1000000, got {value}")


class TokenBucket:
    """One bucket of `burst` tokens refilled at `rate` a second, which can be looked at
    without spending (relay.ops.ratelimit's keyed table spends when asked): the
    gateway-wide handshake budget must not be spent on a connection that its source's own
    limits then refuse, nor the source's on one the gateway-wide budget refuses."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def level(self, now: float) -> float:
        """Tokens there are at `now` (the caller's clock, monotonic seconds)."""
        if self._last is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens

    def take(self) -> None:
        """Spend one token (after `level` said there was one)."""
        self._tokens -= 1.0


@dataclass(slots=True)
class DeviceUsage:
    """What one device holds now; `buffered` is changed by the splices directly."""

    links: int = 0
    streams: int = 0
    buffered: int = 0
    by_agent: dict[object, int] = field(default_factory=dict)  # agent link -> streams


class DeviceLedger:
    """Links, streams and queued bytes per device identity (its SPIFFE ID).

    An entry lives while the device holds a link or a stream, so the table is bounded by
    the gateway's `max_links` times `per_device.streams` at worst. The session-open
    buckets are kept apart, longer (`open_buckets` devices at most).
    """

    def __init__(
        self, limits: DeviceLimits, hit: Callable[[str], None], open_buckets: int = OPEN_BUCKETS
    ) -> None:
        self.limits = limits
        self._hit = hit
        self._devices: dict[str, DeviceUsage] = {}
        self._opens = RateLimiter(
            rate=SESSION_OPENS_PER_SECOND, burst=SESSION_OPEN_BURST, max_keys=open_buckets
        )

    def __len__(self) -> int:
        return len(self._devices)

    def usage(self, device: str) -> DeviceUsage:
        found = self._devices.get(device)
        if found is None:
            found = self._devices[device] = DeviceUsage()
        return found

    def _forget_if_idle(self, device: str) -> None:
        usage = self._devices.get(device)
        if usage is not None and not usage.links and not usage.streams and not usage.buffered:
            del self._devices[device]

    # -- links

    def add_link(self, device: str) -> bool:
        """Count a new link of `device`, or False (counted) if it holds its cap already."""
        usage = self.usage(device)
        if usage.links >= self.limits.links:
            self._hit("device_links")
            self._forget_if_idle(device)
            return False
        usage.links += 1
        return True

    def remove_link(self, device: str) -> None:
        usage = self._devices.get(device)
        if usage is not None and usage.links:
            usage.links -= 1
            self._forget_if_idle(device)

    # -- streams

    def spend_open(self, device: str, now: float) -> bool:
        """Take one of `device`'s session opens, or False (counted) if it has none left:
        SESSION_OPEN_BURST, refilled at SESSION_OPENS_PER_SECOND, whatever its links did
        meanwhile. `now` is the caller's clock (monotonic seconds)."""
        allowed = self._opens.allow(device, now)
        if not allowed:
            self._hit("device_opens")
        return allowed

    @property
    def open_buckets(self) -> int:
        """Devices whose session-open buckets are remembered now."""
        return len(self._opens)

    def stream_refusal(self, device: str, agent: object, free: int) -> str | None:
        """Why `device` may not open one more stream on `agent`, which has `free` stream
        slots left; None if it may. A refusal is counted."""
        usage = self._devices.get(device) or DeviceUsage()  # no entry made by asking
        reason: str | None = None
        if usage.streams >= self.limits.streams:
            reason = "device_streams"
        elif usage.buffered >= self.limits.buffered:
            reason = "device_buffered"
        elif not self.within_share(device, agent, free):
            reason = "agent_share"
        if reason is not None:
            self._hit(reason)
        return reason

    def within_share(self, device: str, agent: object, free: int) -> bool:
        """Whether `device` may take one more of the `free` streams of `agent` (not counted)."""
        usage = self._devices.get(device)
        held = usage.by_agent.get(agent, 0) if usage is not None else 0
        return not held or free > self.limits.agent_reserve

    def add_stream(self, device: str, agent: object) -> None:
        usage = self.usage(device)
        usage.streams += 1
        usage.by_agent[agent] = usage.by_agent.get(agent, 0) + 1

    def remove_stream(self, device: str, agent: object) -> None:
        usage = self._devices.get(device)
        if usage is None:
            return
        usage.streams -= 1
        left = usage.by_agent.get(agent, 0) - 1
        if left > 0:
            usage.by_agent[agent] = left
        else:
            usage.by_agent.pop(agent, None)
        self._forget_if_idle(device)

    def over_buffered(self, usage: DeviceUsage) -> bool:
        """True (and counted) when `usage` queues more than the device may."""
        if usage.buffered > self.limits.buffered:
            self._hit("device_buffered")
            return True
        return False

    def over_enroll_buffered(self, usage: DeviceUsage) -> bool:
        """True (and counted) when an enrollment stream's own budget `usage` queues more
        than ENROLL_BUFFERED. Counted here with the devices' limits; no device is charged."""
        if usage.buffered > ENROLL_BUFFERED:
            self._hit("enroll_buffered")
            return True
        return False


class SourceLedger:
    """Connections per source (`source_key`: an IPv4 address, an IPv6 /64) that have not
    finished the handshake, and each source's bucket of new handshakes (the
    `source_buckets` sources seen last are remembered: a forgotten one starts full); and
    the same two for all sources together (`all_sources`).

    The order is fair: a source over its own limits spends nothing of the gateway-wide
    budget, a refusal by the gateway-wide budget spends nothing of the source's, and a
    source with a handshake under way may not take the last 1 / QUIET_SOURCE_RESERVE of
    the gateway-wide slots or tokens, so a flood leaves quiet sources some."""

    def __init__(
        self,
        limits: SourceLimits,
        hit: Callable[[str], None],
        source_buckets: int = OPEN_BUCKETS,
        all_sources: AllSourcesLimits | None = None,
    ) -> None:
        self._hit = hit
        self._pending: dict[str, int] = {}
        self._pending_total = 0
        self._source_buckets = source_buckets
        self.limits = limits
        self.all_sources = all_sources or AllSourcesLimits()

    @property
    def limits(self) -> SourceLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: SourceLimits) -> None:
        """A reload that changes the rate starts every source's bucket full again."""
        old = getattr(self, "_limits", None)
        self._limits = limits
        if old is None or (old.handshake_rate, old.handshake_burst) != (
            limits.handshake_rate,
            limits.handshake_burst,
        ):
            self._rates = RateLimiter(
                limits.handshake_rate, limits.handshake_burst, self._source_buckets
            )

    @property
    def all_sources(self) -> AllSourcesLimits:
        return self._all_sources

    @all_sources.setter
    def all_sources(self, limits: AllSourcesLimits) -> None:
        """A reload that changes the gateway-wide rate starts its bucket full again."""
        old = getattr(self, "_all_sources", None)
        self._all_sources = limits
        if old is None or (old.handshake_rate, old.handshake_burst) != (
            limits.handshake_rate,
            limits.handshake_burst,
        ):
            self._all_rate = TokenBucket(limits.handshake_rate, limits.handshake_burst)

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending(self) -> int:
        """Handshakes under way, all sources together."""
        return self._pending_total

    @property
    def rate_buckets(self) -> int:
        """Sources whose handshake buckets are remembered now."""
        return len(self._rates)

    def begin(self, host: str, now: float) -> str | None:
        """Count a handshake from `host`; else why not (counted): its source has its cap
        of handshakes open (`source_handshakes`), all sources have theirs
        (`all_sources_handshakes`), the gateway-wide bucket is empty
        (`all_sources_rate`), or the source started its burst's worth too fast
        (`source_rate`). `now`: the caller's clock, monotonic seconds."""
        key = source_key(host)
        pending = self._pending.get(key, 0)
        reason: str | None = None
        if pending >= self.limits.handshakes:
            reason = "source_handshakes"
        else:
            reason = self._all_sources_refusal(busy=pending > 0, now=now)
            if reason is None and not self._rates.allow(key, now):
                reason = "source_rate"
        if reason is not None:
            self._hit(reason)
            return reason
        self._all_rate.take()
        self._pending[key] = pending + 1
        self._pending_total += 1
        return None

    def _all_sources_refusal(self, *, busy: bool, now: float) -> str | None:
        """Whether all sources' budget refuses one more handshake (nothing spent); a
        `busy` source (one with a handshake under way) leaves the reserve alone."""
        total = self.all_sources
        slots, tokens = total.handshakes, total.handshake_burst
        reserve_slots = slots // QUIET_SOURCE_RESERVE if busy else 0
        reserve_tokens = tokens // QUIET_SOURCE_RESERVE if busy else 0
        if self._pending_total >= slots - reserve_slots:
            return "all_sources_handshakes"
        if self._all_rate.level(now) < 1.0 + reserve_tokens:
            return "all_sources_rate"
        return None

    def end(self, host: str) -> None:
        key = source_key(host)
        pending = self._pending.get(key, 0)
        if not pending:
            return
        self._pending_total -= 1
        if pending > 1:
            self._pending[key] = pending - 1
        else:
            del self._pending[key]
