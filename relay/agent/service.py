"""`relay agent`: dial out to every address of every gateway and serve the streams.

The hospital opens no inbound port: the agent keeps one supervised link (relay.dialer)
to each address that each configured gateway name resolves to (all A and AAAA records,
e.g. the pods of a Kubernetes headless Service), re-resolving every `resolve_interval`
to add links for new addresses and drain those of vanished ones. Streams arriving on
any link go to one `StreamDispatcher`.

SIGTERM/SIGINT: goaway on every link (no new streams), wait for streams in flight up to
`drain_grace`, close, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from relay.admin import AdminServer
from relay.agent.config import AgentConfig, load_agent_config
from relay.agent.streams import StreamDispatcher, TargetHandler
from relay.aio import Stream, link_settings
from relay.backoff import ExponentialBackoff, Uniform
from relay.config import Address
from relay.dialer import KeptLink
from relay.endmetrics import EndMetrics, Sources
from relay.logs import setup_logging
from relay.proto import ErrorCode
from relay.runtime import run_loop
from relay.tls import ALPN_AGENT, client_context

__all__ = ["Agent", "Resolver", "default_handlers", "resolve_all", "run", "run_agent"]

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
TARGET_DICOM = "dicom"
RETIRE_POLL = 0.1


async def resolve_all(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for TCP (A and AAAA), in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    seen: dict[str, None] = {}
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


@dataclass(frozen=True)
class _Key:
    """One dialled address: where we connect, and the name its certificate must carry."""

    ip: str
    port: int


class Agent:
    """The running agent: its links by address, and the stream dispatcher they share."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        handlers: Mapping[str, TargetHandler] | None = None,
        resolver: Resolver = resolve_all,
        rng: Uniform | None = None,
        metrics: EndMetrics | None = None,
    ) -> None:
        self.config = config
        self.ctx = client_context(config.tls.cert, config.tls.key, config.tls.ca, alpn=ALPN_AGENT)
        self.settings = link_settings(config.limits)
        self.dispatcher = StreamDispatcher(
            config.services, handlers=handlers, compression_level=config.compression_level
        )
        self.links: dict[_Key, KeptLink] = {}
        self.resolver = resolver
        self.rng = rng
        self.resolutions = 0
        self.resolve_failures = 0
        self._resolve_retry = ExponentialBackoff(1.0, config.resolve_interval, rng=rng)
        self._resolve_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        stats = self.dispatcher.stats
        self.metrics = metrics or _agent_metrics(config)
        self.metrics.collector.sources = Sources(
            links=self.links.values,
            codecs=lambda: (stats.codec,),
            streams=lambda: stats.streams,
            refusals=lambda: stats.refused,
            certificate=lambda: config.tls.cert,
        )

    # -- metrics

    def readiness(self) -> tuple[bool, str]:
        """Ready with at least one gateway link (the PACS check is the DICOM handler's)."""
        up = self.links_up
        if not up:
            return False, "no gateway link"
        return True, f"{up} gateway link(s) up"

    @property
    def links_up(self) -> int:
        return sum(1 for kept in self.links.values() if kept.up.is_set())

    @property
    def reconnects(self) -> int:
        return sum(kept.stats.reconnects for kept in self.links.values())

    # -- lifecycle

    async def start(self) -> None:
        """Resolve once (links start dialling at once), then keep re-resolving."""
        ok = await self.resolve()
        self._resolve_task = asyncio.get_running_loop().create_task(self._resolve_loop(ok))

    async def _resolve_loop(self, ok: bool) -> None:
        while True:
            if ok:
                self._resolve_retry.reset()
                delay = self.config.resolve_interval
            else:  # a name did not resolve: retry sooner, backing off up to the interval
                delay = max(self._resolve_retry.next_delay(), 0.5)
            await asyncio.sleep(delay)
            ok = await self.resolve()

    async def resolve(self) -> bool:
        """Look up every gateway name; add links for new addresses, retire vanished ones.

        A name that fails to resolve keeps its current links (DNS trouble must not cut
        working links). Returns False if any name failed.
        """
        self.resolutions += 1
        wanted: dict[_Key, str] = {}
        failed: set[Address] = set()
        for gateway in self.config.gateways:
            try:
                ips = await self.resolver(gateway.host, gateway.port)
            except (OSError, UnicodeError) as exc:
                ips = []
                log.warning(
                    "gateway name did not resolve",
                    extra={"gateway": str(gateway), "error": str(exc)},
                )
            if not ips:
                failed.add(gateway)
                continue
            for ip in ips:
                wanted.setdefault(_Key(ip, gateway.port), gateway.host)
        if failed:
            self.resolve_failures += 1
        for key, hostname in wanted.items():
            if key not in self.links:
                self._add(key, hostname)
        failed_hosts = {g.host for g in failed}
        for key in list(self.links):
            kept = self.links[key]
            if key not in wanted and kept.server_hostname not in failed_hosts:
                self._retire(key)
        return not failed

    def _add(self, key: _Key, hostname: str) -> None:
        address = Address(key.ip, key.port)
        kept = KeptLink(
            address,
            self.ctx,
            self.settings,
            alpn=ALPN_AGENT,
            name=f"gateway {hostname}:{key.port} at {address}",
            backoff=ExponentialBackoff.from_config(self.config.reconnect, rng=self.rng),
            server_hostname=hostname,
            on_stream=self._on_stream,
        )
        self.links[key] = kept
        kept.start()
        log.info("gateway address added", extra={"gateway": hostname, "address": str(address)})

    def _retire(self, key: _Key) -> None:
        """An address left DNS: goaway now, close once its streams finish (or grace ends)."""
        kept = self.links.pop(key)
        log.info("gateway address removed", extra={"address": str(kept.address)})
        kept.goaway(ErrorCode.SHUTDOWN, "gateway address no longer resolves")
        task = asyncio.get_running_loop().create_task(self._close_when_idle(kept))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_idle(self, kept: KeptLink) -> None:
        try:
            async with asyncio.timeout(self.config.drain_grace):
                while kept.open_streams:  # noqa: ASYNC110 - no event for "streams changed"
                    await asyncio.sleep(RETIRE_POLL)
        except TimeoutError:
            pass
        finally:
            await kept.close()

    def _on_stream(self, stream: Stream) -> None:
        self.dispatcher.on_stream(stream)

    async def shutdown(self, grace: float) -> None:
        """Goaway everywhere, let streams finish within `grace`, close every link."""
        if self._resolve_task is not None:
            self._resolve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resolve_task
            self._resolve_task = None
        log.info("agent draining", extra={"links": len(self.links), "grace_s": grace})
        for kept in self.links.values():
            kept.goaway(ErrorCode.SHUTDOWN, "agent shutting down")
        await self.dispatcher.drain(grace)
        await asyncio.gather(*(kept.close() for kept in self.links.values()))
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        log.info("agent stopped")


@contextlib.asynccontextmanager
async def default_handlers(
    config: AgentConfig, metrics: EndMetrics | None = None
) -> AsyncIterator[dict[str, TargetHandler]]:
    """The handlers of non-TCP targets: `dicom` when a PACS is configured and the DICOM
    package is available. Owns their lifetime (e.g. the C-MOVE storage SCP)."""
    handlers: dict[str, TargetHandler] = {}
    if config.pacs is None:
        yield handlers
        return
    try:
        from relay.dicom.agent import DicomAgent
        from relay.dicom.pacs_ops import PacsTarget
    except ImportError as exc:  # pragma: no cover - the package ships with relay
        log.error("DICOM support unavailable; dicom streams are refused", extra={"error": str(exc)})
        yield handlers
        return
    target = dataclasses.replace(
        PacsTarget.from_config(config.pacs), compression_level=config.compression_level
    )
    dicom = DicomAgent(target, stats=metrics.dicom if metrics is not None else None)
    await dicom.start()

    async def serve_dicom(stream: Stream) -> None:
        summary = await dicom.serve(stream)
        log.info(
            "dicom operation",
            extra={
                "stream": stream.stream_id,
                "device": stream.headers.get("x-relay-device", ""),
                "op": summary.op,
                "status": summary.status,
                "instances": summary.instances,
                "seconds": round(summary.seconds, 3),
            },
        )

    handlers[TARGET_DICOM] = serve_dicom
    try:
        yield handlers
    finally:
        await dicom.stop()


async def run_agent(
    config: AgentConfig,
    *,
    stop: asyncio.Event | None = None,
    handlers: Mapping[str, TargetHandler] | None = None,
    resolver: Resolver = resolve_all,
    started: Callable[[Agent], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain within `config.drain_grace`.

    `handlers` replaces the default target handlers (DICOM when `pacs:` is set).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        metrics = _agent_metrics(config)
        if handlers is None:
            handlers = await stack.enter_async_context(default_handlers(config, metrics))
        agent = Agent(config, handlers=handlers, resolver=resolver, metrics=metrics)
        if handle_signals:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            await agent.start()
            if config.metrics_listen is not None:
                admin = AdminServer(config.metrics_listen, metrics.registry, agent.readiness)
                await admin.start()
                stack.push_async_callback(admin.stop)
            log.info(
                "agent started",
                extra={"site": config.site, "gateways": ",".join(map(str, config.gateways))},
            )
            if started is not None:
                started(agent)
            await stop.wait()
        finally:
            if handle_signals:
                loop.remove_signal_handler(signal.SIGTERM)
                loop.remove_signal_handler(signal.SIGINT)
            await agent.shutdown(config.drain_grace)


def _agent_metrics(config: AgentConfig) -> EndMetrics:
    """Created before the Agent so that the DICOM handler can report into it; the Agent
    then binds its own sources to it."""
    return EndMetrics("agent", config.site, Sources(links=lambda: ()))


def run(config_path: Path) -> int:
    """`relay agent --config FILE`: load, log JSON, run under uvloop; 0 after a clean drain."""
    config = load_agent_config(config_path)
    setup_logging("agent", config.log_level)
    run_loop(run_agent(config))
    return 0
