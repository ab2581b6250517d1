"""Drain on SIGTERM, reload on SIGHUP.

Draining stops accepting, sends goaway on every link (devices then reconnect to another
gateway; agents stop expecting streams here; a PC enrolling is told that the gateway is
shutting down, and its enrollment under way may finish), lets spliced streams finish
within the grace period, then closes what is left. Reloading swaps the TLS context and the limits
used for new links; links already up keep theirs. The file work (config, certificates,
keys, the context) is prepared in a worker thread and only the swap runs on the loop,
one reload at a time (relay.ops.reloader): a config on a FIFO or a slow share must not
stall every hospital's traffic. A reloaded certificate must be signed
by the new CA bundle, be valid now and stay a gateway certificate of the same trust
domain (relay.ops.reloading); otherwise, or if anything fails to load, the running
configuration stays (one error line, `relay_reloads_total{result="error"}`). The
listeners need a restart to move; a reload keeps them and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import ssl
from pathlib import Path

from gateway.casites import CaSites, load_ca_sites
from gateway.config import GatewayConfig, GatewayConfigLoader
from gateway.server import GatewayServer
from relay.net.aio import Link
from relay.net.tls import TlsConfigError, server_context, tls_config_error
from relay.ops.config import ConfigError
from relay.ops.reloader import Reloader
from relay.ops.reloading import (
    ReloadError,
    check_configured_certificate,
    keep_restart_only,
    set_log_level,
)
from relay.proto import ErrorCode
from relay.trust.pki import PkiError, load_cert

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


RELOAD_ERRORS = (ConfigError, ReloadError, TlsConfigError, PkiError, OSError, ValueError)


@dataclasses.dataclass(frozen=True)
class PreparedReload:
    """What a reload read and built in its worker thread; applying it is only a swap."""

    config: GatewayConfig  # as the file says: restart-only keys are kept when applied
    context: ssl.SSLContext
    ca_sites: CaSites
    certificate_expiry: float | None  # of the new certificate, for its gauge


def reloader(server: GatewayServer, load: GatewayConfigLoader) -> Reloader[PreparedReload, bool]:
    """The gateway's reloads (SIGHUP): one at a time, the file work off the loop, where it
    would stall every hospital's links and streams (relay.ops.reloader)."""
    return Reloader(
        functools.partial(prepare_reload, server, load),
        functools.partial(apply_reload, server),
        functools.partial(refuse_reload, server),
        RELOAD_ERRORS,
    )


async def reload(server: GatewayServer, load: GatewayConfigLoader) -> bool:
    """One reload, awaited, outside the SIGHUP path (tests); True once applied."""
    return await reloader(server, load).reload()


def prepare_reload(server: GatewayServer, load: GatewayConfigLoader) -> PreparedReload:
    """Worker thread: re-read the config file (through `load`) and the TLS files and build
    the context. Reads of the server only what no apply changes (the path, the trust
    domain)."""
    config = load(server.config.path)
    context, ca_sites = reloaded_tls(server, config)
    return PreparedReload(config, context, ca_sites, _expiry(config.tls.cert))


def apply_reload(server: GatewayServer, prepared: PreparedReload) -> bool:
    """On the loop: swap in what `prepare_reload` built. The restart-only keys are compared
    with the configuration running now, the one this swap replaces."""
    config, restart = keep_restart_only(server.config, prepared.config, RESTART_ONLY)
    if config.log_level != server.config.log_level:
        set_log_level(config.log_level)
    server.apply_config(config, prepared.context, prepared.ca_sites)
    if prepared.certificate_expiry is not None:  # GatewayServer.note_certificate, read before
        server.metrics.certificate_expiry.labels("gateway").set(prepared.certificate_expiry)
    server.metrics.reloads.labels("ok").inc()
    if restart:
        log.warning(
            "reloaded; these settings need a restart and keep their running values",
            extra={"keys": ",".join(restart)},
        )
    log.info("reloaded configuration and certificates")
    return True


def refuse_reload(server: GatewayServer, exc: Exception) -> bool:
    """Keep the running configuration. The error line names the file, the key at fault and
    its path, as a failed start does."""
    server.metrics.reloads.labels("error").inc()
    log.error("reload failed, keeping the running configuration", extra={"error": str(exc)})
    return False


def _expiry(cert: Path) -> float | None:
    with contextlib.suppress(PkiError, OSError, ValueError):
        return load_cert(cert).not_valid_after_utc.timestamp()
    return None


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
