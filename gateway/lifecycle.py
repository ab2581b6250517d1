"""Drain on SIGTERM, reload on SIGHUP.

Draining stops accepting, sends goaway on every link (devices then reconnect to another
gateway; agents stop expecting streams here; a PC enrolling is told that the gateway is
shutting down, and its enrollment under way may finish), lets spliced streams finish
within the grace period, then closes what is left. Reloading swaps the TLS context and the limits
used for new links; links already up keep theirs. A reloaded certificate must be signed
by the new CA bundle, be valid now and stay a gateway certificate of the same trust
domain (relay.ops.reloading); otherwise, or if anything fails to load, the running
configuration stays (one error line, `relay_reloads_total{result="error"}`). The
listeners need a restart to move; a reload keeps them and says so.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from gateway.casites import CaSites, load_ca_sites
from gateway.config import GatewayConfig, GatewayConfigLoader
from gateway.server import GatewayServer
from relay.net.aio import Link
from relay.net.tls import TlsConfigError, server_context, tls_config_error
from relay.ops.config import ConfigError
from relay.ops.reloading import (
    ReloadError,
    check_configured_certificate,
    keep_restart_only,
    set_log_level,
)
from relay.proto import ErrorCode
from relay.trust.pki import PkiError

log = logging.getLogger(__name__)
POLL = 0.05
RESTART_ONLY = ("listen", "metrics_listen")  # bound once at start-up


async def drain(server: GatewayServer, grace: float) -> None:
    loop = asyncio.get_running_loop()
    server.metrics.draining.set(1)
    await server.stop_accepting()
    links = _every_link(server)
    log.info("draining", extra={"links": len(links), "grace_s": grace})
    for link in links:
        link.goaway(ErrorCode.SHUTDOWN, "gateway shutting down")
    deadline = loop.time() + grace
    # Polling is simplest here: streams end in many places, and this runs once per process.
    while loop.time() < deadline and _streams_open(server):  # noqa: ASYNC110
        await asyncio.sleep(POLL)
    left = _streams_open(server)
    if left:
        log.warning("grace period over, closing streams", extra={"streams": left})
    for link in _every_link(server):
        link.close(ErrorCode.SHUTDOWN, "gateway shutting down")
    closing = [link.wait_closed() for link in _every_link(server)]
    if closing:
        await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=2.0)
    for link in _every_link(server):
        link.abort()


def _every_link(server: GatewayServer) -> list[Link]:
    """Tunnel links and enrollment links: a PC enrolling hears SHUTDOWN too, not a bare
    end of its connection, which `relay enroll` could only read as a refusal."""
    return [*server.links.all(), *server.enrollment.links]


def _streams_open(server: GatewayServer) -> int:
    return sum(link.conn.open_streams for link in server.links.all())


def reload(server: GatewayServer, load: GatewayConfigLoader) -> bool:
    """Re-read the config file (through `load`) and certificates; on any error keep the
    running ones. The error line names the file, the key at fault and its path, as a
    failed start does."""
    path = server.config.path
    try:
        config, restart = keep_restart_only(server.config, load(path), RESTART_ONLY)
        context, ca_sites = reloaded_tls(server, config)
    except (ConfigError, ReloadError, TlsConfigError, PkiError, OSError, ValueError) as exc:
        server.metrics.reloads.labels("error").inc()
        log.error("reload failed, keeping the running configuration", extra={"error": str(exc)})
        return False
    if config.log_level != server.config.log_level:
        set_log_level(config.log_level)
    server.apply_config(config, context, ca_sites)
    server.note_certificate()
    server.metrics.reloads.labels("ok").inc()
    if restart:
        log.warning(
            "reloaded; these settings need a restart and keep their running values",
            extra={"keys": ",".join(restart)},
        )
    log.info("reloaded configuration and certificates")
    return True


def reloaded_tls(server: GatewayServer, config: GatewayConfig) -> tuple[ssl.SSLContext, CaSites]:
    """The listener's TLS context and the CA bundle's sites of a reloaded `tls:`, checked
    as at start-up (gateway.service.tls_at_start) and failing as start-up fails: a
    ConfigError naming the config file, the `tls.*` key at fault and its path."""
    tls = config.tls
    try:
        ca_sites = load_ca_sites(tls.ca)
    except TlsConfigError as exc:
        raise tls_config_error(exc, config.path) from None
    if ca_sites.trust_domain != server.trust_domain:
        # Every device and agent certificate names the running one: they would all be
        # refused. A new trust domain is a new deployment: restart.
        raise ConfigError(
            config.path,
            "tls.ca",
            f"{tls.ca}: trust domain {ca_sites.trust_domain!r}, running with "
            f"{server.trust_domain!r} (restart to change it)",
        )
    check_configured_certificate(
        config.path, "tls.cert", tls.cert, tls.ca, role="gateway", ca_key="tls.ca", reloading=True
    )
    try:
        return server_context(tls.cert, tls.key, tls.ca), ca_sites
    except TlsConfigError as exc:
        raise tls_config_error(exc, config.path) from None
