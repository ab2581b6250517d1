"""`relay workstation`: one link to the gateway with the device identity, and what uses it.

The link is supervised (relay.dialer.KeptLink: reconnects with jittered backoff); the
`Tunnel` opens streams over it for the port forwards and, when `dicom:` is configured,
the local DICOM node. SIGTERM/SIGINT: stop accepting local connections, goaway, let
open ones finish within `drain_grace`, close, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from relay.admin import AdminServer
from relay.aio import link_settings
from relay.backoff import ExponentialBackoff, Uniform
from relay.config import ConfigError
from relay.dialer import KeptLink
from relay.endmetrics import EndMetrics, Sources
from relay.identity import identity_from_certificate
from relay.logs import setup_logging
from relay.pki import load_cert
from relay.proto import ErrorCode
from relay.runtime import run_loop
from relay.tls import ALPN_DEVICE, client_context
from relay.workstation.config import WorkstationConfig, load_workstation_config
from relay.workstation.forward import Forwarder, ForwardListenError
from relay.workstation.tunnel import Tunnel

__all__ = ["Workstation", "dicom_node", "run", "run_workstation"]

log = logging.getLogger(__name__)

COMPRESSION_LEVEL = 3


class Workstation:
    """The running workstation: its supervised link, tunnel and port forwards."""

    def __init__(self, config: WorkstationConfig, *, rng: Uniform | None = None) -> None:
        self.config = config
        files = config.identity_files()
        self.ctx = client_context(files.cert, files.key, files.ca, alpn=ALPN_DEVICE)
        self.kept = KeptLink(
            config.gateway,
            self.ctx,
            link_settings(config.limits),
            alpn=ALPN_DEVICE,
            name=f"gateway {config.gateway}",
            backoff=ExponentialBackoff.from_config(config.reconnect, rng=rng),
        )
        self.tunnel = Tunnel(self.kept, rng=rng)
        self.forwarder = Forwarder(self.tunnel, config.forward, compression_level=COMPRESSION_LEVEL)
        stats = self.forwarder.stats
        self.metrics = EndMetrics(
            "workstation",
            identity_from_certificate(load_cert(files.cert)).site or "",
            Sources(
                links=lambda: (self.kept,),
                codecs=lambda: (stats.codec,),
                streams=lambda: {f"tcp:{k}": v for k, v in stats.connections.items()},
                refusals=lambda: {
                    "no_stream": sum(stats.failed.values()),
                    "capacity": stats.refused,
                },
                certificate=lambda: files.cert,
            ),
        )

    def readiness(self) -> tuple[bool, str]:
        if self.kept.up.is_set():
            return True, "gateway link up"
        return False, f"no gateway link ({self.kept.stats.last_error or 'connecting'})"

    async def start(self) -> None:
        """Listen locally first (a taken port is a start-up error naming the key), then dial."""
        try:
            await self.forwarder.start()
        except ForwardListenError as exc:
            raise ConfigError(self.config.path, f'forward."{exc.address}"', str(exc)) from None
        self.kept.start()

    async def shutdown(self, grace: float) -> None:
        log.info("workstation draining", extra={"grace_s": grace})
        await self.forwarder.stop_accepting()
        self.kept.goaway(ErrorCode.SHUTDOWN, "workstation shutting down")
        await self.forwarder.drain(grace)
        await self.kept.close()
        log.info("workstation stopped")


@contextlib.asynccontextmanager
async def dicom_node(
    config: WorkstationConfig, tunnel: Tunnel, metrics: EndMetrics | None = None
) -> AsyncIterator[object | None]:
    """The local DICOM node when `dicom:` is configured (relay.dicom.node), else None."""
    if config.dicom is None:
        yield None
        return
    from relay.dicom.node import DicomNode

    dicom = config.dicom
    node = DicomNode(
        tunnel.open_stream,
        listen=(dicom.listen.host, dicom.listen.port),
        ae_title=dicom.ae_title,
        destinations={title: (a.host, a.port) for title, a in dicom.destinations.items()},
        stats=metrics.dicom if metrics is not None else None,
    )
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def run_workstation(
    config: WorkstationConfig,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[Workstation], None] | None = None,
    handle_signals: bool = True,
    with_dicom: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain within `config.drain_grace`."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    workstation = Workstation(config)
    if handle_signals:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(workstation.shutdown, config.drain_grace)
            await workstation.start()
            if with_dicom:
                await stack.enter_async_context(
                    dicom_node(config, workstation.tunnel, workstation.metrics)
                )
            if config.metrics_listen is not None:
                admin = AdminServer(
                    config.metrics_listen, workstation.metrics.registry, workstation.readiness
                )
                await admin.start()
                stack.push_async_callback(admin.stop)
            log.info("workstation started", extra={"gateway": str(config.gateway)})
            if started is not None:
                started(workstation)
            await stop.wait()
    finally:
        if handle_signals:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)


def run(config_path: Path) -> int:
    """`relay workstation --config FILE`: load, log JSON, run under uvloop; 0 after a drain."""
    config = load_workstation_config(config_path)
    setup_logging("workstation", config.log_level)
    run_loop(run_workstation(config))
    return 0
