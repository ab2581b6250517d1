"""The gateway's configuration: its type and its schema, checked at load time.

Imports `relay.ops.config` only: the gateway never pulls in DICOM or compression code,
nor the YAML parser (gateway.configfile reads the file; the CLI hands that loader over).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.limits import AllSourcesLimits, DeviceLimits, SourceLimits
from relay.ops.config import (
    DEFAULT_LOG_LEVEL,
    Address,
    ConfigError,
    LinkSettings,
    Reader,
    TlsFiles,
    read_drain_grace,
    read_limits,
    read_log_level,
    read_tls,
)
from relay.proto.settings import format_size

__all__ = ["GatewayConfig", "GatewayConfigLoader", "read_gateway_config"]

MIN_HEAP_SLACK = 1024 * 1024
MAX_HEAP_SLACK = 4 * 1024**3


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `relay gateway` needs; see config/gateway.yaml for the keys.

    `metrics_listen` None means no metrics/health listener. `drain_grace` and
    `handshake_timeout` are seconds. `heap_slack`: free heap bytes kept before they are
    handed back to the kernel (relay.ops.heap).
    """

    path: Path
    listen: Address
    metrics_listen: Address | None
    tls: TlsFiles
    limits: LinkSettings = field(default_factory=LinkSettings)
    drain_grace: float = 30.0
    handshake_timeout: float = 10.0
    max_links: int = 10000
    heap_slack: int = 16 * 1024 * 1024
    log_level: str = DEFAULT_LOG_LEVEL
    per_device: DeviceLimits = field(default_factory=DeviceLimits)
    per_source: SourceLimits = field(default_factory=SourceLimits)
    all_sources: AllSourcesLimits = field(default_factory=AllSourcesLimits)


def read_gateway_config(r: Reader) -> GatewayConfig:
    """The gateway's schema, applied to a parsed config file."""
    listen = r.address("listen", listen=True)
    metrics_listen = r.optional_address("metrics_listen", listen=True)
    if metrics_listen == listen and listen.port != 0:
        raise r.error("metrics_listen", f"must differ from listen ({listen})")
    limits = read_limits(r)
    return GatewayConfig(
        path=Path(os.path.abspath(r.file)),
        listen=listen,
        metrics_listen=metrics_listen,
        tls=read_tls(r),
        limits=limits,
        drain_grace=read_drain_grace(r, GatewayConfig.drain_grace),
        handshake_timeout=r.duration(
            "handshake_timeout", GatewayConfig.handshake_timeout, hi=300.0, above_lo=True
        ),
        max_links=r.integer("max_links", GatewayConfig.max_links, lo=1, hi=1_000_000),
        heap_slack=_heap_slack(r),
        log_level=read_log_level(r),
        per_device=read_per_device(r, limits),
        per_source=read_per_source(r),
        all_sources=read_all_sources(r),
    )


def read_per_device(r: Reader, limits: LinkSettings) -> DeviceLimits:
    """`per_device:`; `buffered` must hold one stream's window in each direction (a slow
    but honest device queues that much) and stay below the link window (so one device can
    never hold an agent link's whole window)."""
    s = r.section("per_device")
    d = DeviceLimits()
    found = s.build(
        DeviceLimits,
        links=s.integer("links", d.links, lo=1, hi=10_000),
        streams=s.integer("streams", d.streams, lo=1, hi=65_535),
        buffered=s.size("buffered", d.buffered),
        agent_reserve=s.integer("agent_reserve", d.agent_reserve, lo=0, hi=65_535),
    )
    low, high = 2 * limits.stream_window, limits.link_window
    if not low <= found.buffered < high:
        raise ConfigError(
            r.file,
            s.key("buffered"),
            f"expected at least 2 x limits.stream_window ({format_size(low)}) and below "
            f"limits.link_window ({format_size(high)}), got {format_size(found.buffered)}",
        )
    return found


def read_per_source(r: Reader) -> SourceLimits:
    """`per_source:` what one source address may hold."""
    s = r.section("per_source")
    d = SourceLimits()
    return s.build(
        SourceLimits,
        handshakes=s.integer("handshakes", d.handshakes, lo=1, hi=1_000_000),
        handshake_rate=s.integer("handshake_rate", d.handshake_rate, lo=1, hi=1_000_000),
        handshake_burst=s.integer("handshake_burst", d.handshake_burst, lo=1, hi=1_000_000),
    )


def read_all_sources(r: Reader) -> AllSourcesLimits:
    """`all_sources:` the handshakes all sources together may start and hold."""
    s = r.section("all_sources")
    d = AllSourcesLimits()
    return s.build(
        AllSourcesLimits,
        handshakes=s.integer("handshakes", d.handshakes, lo=1, hi=1_000_000),
        handshake_rate=s.integer("handshake_rate", d.handshake_rate, lo=1, hi=1_000_000),
        handshake_burst=s.integer("handshake_burst", d.handshake_burst, lo=1, hi=1_000_000),
    )


def _heap_slack(r: Reader) -> int:
    slack = r.size("heap_slack", GatewayConfig.heap_slack)
    if not MIN_HEAP_SLACK <= slack <= MAX_HEAP_SLACK:
        raise r.error("heap_slack", f"expected a size 1MiB-4GiB, got {slack}")
    return slack


# Reads the config file at a path (start-up and SIGHUP): gateway.configfile's.
GatewayConfigLoader = Callable[[Path], GatewayConfig]
