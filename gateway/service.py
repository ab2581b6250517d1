"""`relay gateway`: wire config, TLS, server, admin listener and signals together."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from gateway.casites import CaSites, load_ca_sites
from gateway.config import GatewayConfig, GatewayConfigLoader
from gateway.lifecycle import drain, reloader
from gateway.metrics import GatewayMetrics
from gateway.server import GatewayServer
from relay.net.tls import TlsConfigError, server_context, tls_config_error
from relay.ops.binding import listen_errors
from relay.ops.heap import keep_trimmed
from relay.ops.http import AdminServer
from relay.ops.logs import setup_logging
from relay.ops.reloading import check_configured_certificate
from relay.ops.runtime import run_loop

log = logging.getLogger(__name__)


def tls_at_start(config: GatewayConfig) -> tuple[ssl.SSLContext, CaSites]:
    """The listener's TLS context and the CA bundle's sites, or a ConfigError naming the
    config file, the `tls.*` key at fault and its path (exit 2)."""
    check_configured_certificate(
        config.path, "tls.cert", config.tls.cert, config.tls.ca, role="gateway", ca_key="tls.ca"
    )
    try:
        return (
            server_context(config.tls.cert, config.tls.key, config.tls.ca),
            load_ca_sites(config.tls.ca),
        )
    except TlsConfigError as exc:
        raise tls_config_error(exc, config.path) from None


async def run_gateway(
    config: GatewayConfig,
    *,
    load: GatewayConfigLoader | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[GatewayServer], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain and return.

    With `handle_signals`, SIGHUP re-reads `config.path` through `load` (None: no reload).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    metrics = GatewayMetrics()
    context, ca_sites = tls_at_start(config)
    server = GatewayServer(config, context, ca_sites, metrics)
    with listen_errors(config.path, "listen", config.listen):
        await server.start()
    # Handshake floods free memory mid-heap that glibc would otherwise keep (relay.ops.heap).
    trimmer = loop.create_task(
        keep_trimmed(config.heap_slack, on_trim=lambda _: metrics.heap_trims.inc())
    )
    admin: AdminServer | None = None
    if config.metrics_listen is not None:

        def ready() -> tuple[bool, str]:
            if not server.listening:
                return False, "not listening"
            return True, f"listening; agent links for sites: {','.join(server.router.sites())}"

        admin = AdminServer(config.metrics_listen, metrics.registry, ready)
        with listen_errors(config.path, "metrics_listen", config.metrics_listen):
            await admin.start()
    reloads = reloader(server, load) if load is not None else None
    if handle_signals:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        if reloads is not None:
            loop.add_signal_handler(signal.SIGHUP, reloads.request)
    if started is not None:
        started(server)
    try:
        await stop.wait()
        if reloads is not None:  # a prepare under way is abandoned: it must not hold the stop
            reloads.close()
        await drain(server, server.config.drain_grace)
    finally:
        if reloads is not None:
            reloads.close()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        trimmer.cancel()
        await server.stop_accepting()
        if admin is not None:
            await admin.stop()
        log.info("gateway stopped")


def run(config_path: Path, load: GatewayConfigLoader) -> int:
    """`relay gateway`: `load` reads the file (gateway.configfile.load_gateway_config)."""
    config = load(config_path)
    setup_logging("gateway", config.log_level)
    run_loop(run_gateway(config, load=load))
    return 0
