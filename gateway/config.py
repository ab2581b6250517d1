"""The gateway's configuration file, typed and validated at load time.

Imports `relay.ops.config` only: the gateway never pulls in DICOM or compression code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from relay.ops.config import (
    Address,
    TlsFiles,
    TunnelLimits,
    open_config,
    read_limits,
    read_log_level,
    read_tls,
)

__all__ = ["GatewayConfig", "load_gateway_config"]


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `relay gateway` needs; see config/gateway.yaml for the keys.

    `metrics_listen` None means no metrics/health listener. `drain_grace` and
    `handshake_timeout` are seconds.
    """

    path: Path
    listen: Address
    metrics_listen: Address | None
    tls: TlsFiles
    limits: TunnelLimits = field(default_factory=TunnelLimits)
    drain_grace: float = 30.0
    handshake_timeout: float = 10.0
    max_links: int = 10000
    log_level: str = "info"


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Load and check a gateway config file; raises relay.ops.config.ConfigError."""
    r = open_config(path)
    listen = r.address("listen", listen=True)
    metrics_listen = r.optional_address("metrics_listen", listen=True)
    if metrics_listen == listen and listen.port != 0:
        raise r.error("metrics_listen", f"must differ from listen ({listen})")
    config = GatewayConfig(
        path=Path(os.path.abspath(path)),
        listen=listen,
        metrics_listen=metrics_listen,
        tls=read_tls(r),
        limits=read_limits(r),
        drain_grace=r.duration("drain_grace", 30.0, hi=3600.0),
        handshake_timeout=r.duration("handshake_timeout", 10.0, hi=300.0, above_lo=True),
        max_links=r.integer("max_links", 10000, lo=1, hi=1_000_000),
        log_level=read_log_level(r),
    )
    r.done()
    return config
