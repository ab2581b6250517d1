"""`relay agent`: dial out to every address of every gateway and serve the streams.

The hospital opens no inbound port: the agent keeps one supervised link (relay.net.dialer)
to each address that each configured gateway name resolves to (all A and AAAA records,
e.g. the pods of a Kubernetes headless Service), re-resolving every `resolve_interval`
to add links for new addresses and drain those of vanished ones. Streams arriving on
any link go to one `StreamDispatcher`.

Device trust (docs/ENROLLMENT.md section 8): every new gateway link first carries the
site's full revocation list (empty without `pki:`), because a gateway routes nothing to
a link before it has that list. With `pki:`, a `DeviceAuthority` serves the `enroll`
and `renew` stream targets, records each device's last-seen time, pushes revocations
made by `relay device revoke` to every live link, and audits the refusals gateways
report (optionally copying the audit trail to syslog over TLS).

SIGTERM/SIGINT: goaway on every link (no new streams), wait for streams in flight up to
`drain_grace`, close, exit 0.

SIGHUP (`Agent.reload`): re-read the config file and the TLS files. A new certificate,
key or CA bundle goes to every link supervisor for its next dial; links that are up stay
up. The service allow-list, compression level, gateways (re-resolved at once), limits and
backoff of new links, drain grace, resolve interval and log level take effect; the keys
in RESTART_ONLY keep their running values and are logged as needing a restart. Anything
that does not load or check out keeps the whole running configuration: one error line,
counted in `relay_reloads_total{result="error"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from relay.agent.audit import AuditLog
from relay.agent.authority import DeviceAuthority
from relay.agent.config import AgentConfig, load_agent_config
from relay.agent.dispatch import StreamDispatcher, TargetHandler
from relay.agent.registry import RegistryError
from relay.agent.syslog import SyslogSender
from relay.agent.syslog import client_context as syslog_context
from relay.net.aio import Link, Stream, link_settings
from relay.net.backoff import ExponentialBackoff, Uniform
from relay.net.dialer import KeptLink
from relay.net.tls import TlsConfigError, client_context
from relay.ops.config import Address, ConfigError
from relay.ops.http import AdminServer
from relay.ops.logs import setup_logging
from relay.ops.metrics import EndMetrics, Sources
from relay.ops.reloading import (
    ReloadCounter,
    ReloadError,
    check_own_certificate,
    keep_restart_only,
    set_log_level,
)
from relay.ops.runtime import run_loop
from relay.proto import ErrorCode, LinkClosedError
from relay.trust import pki
from relay.trust.revocation import (
    KIND_REFUSAL,
    KIND_REVOKE,
    RevocationError,
    decode_refusal,
    encode_revocations,
)
from relay.wire import ALPN_AGENT, HEADER_DEVICE, TARGET_DICOM, TARGET_ENROLL, TARGET_RENEW

__all__ = [
    "Agent",
    "Resolver",
    "default_handlers",
    "open_authority",
    "resolve_all",
    "run",
    "run_agent",
]

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
RETIRE_POLL = 0.1
REVOCATION_POLL = 0.5  # seconds between looks at the registry for new revocations
# Read once at start-up (listeners, the PACS handler, the registry, the audit trail): a
# reload keeps their running values and says that changing them needs a restart.
RESTART_ONLY = ("site", "pki", "state_dir", "metrics_listen", "pacs", "audit")


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
        authority: DeviceAuthority | None = None,
    ) -> None:
        self.config = config
        self.ctx = client_context(config.tls.cert, config.tls.key, config.tls.ca, alpn=ALPN_AGENT)
        self.settings = link_settings(config.limits)
        self.authority = authority
        targets = dict(handlers or {})
        if authority is not None:
            targets[TARGET_ENROLL] = authority.serve_enroll
            targets[TARGET_RENEW] = authority.serve_renew
        self.dispatcher = StreamDispatcher(
            config.services, handlers=targets, compression_level=config.compression_level
        )
        self.links: dict[_Key, KeptLink] = {}
        self.resolver = resolver
        self.rng = rng
        self.resolutions = 0
        self.resolve_failures = 0
        self._resolve_retry = ExponentialBackoff(1.0, config.resolve_interval, rng=rng)
        self._resolve_task: asyncio.Task[None] | None = None
        self._push_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.refusals_reported = 0  # "refusal" reports received from gateways
        stats = self.dispatcher.stats
        self.metrics = metrics or _agent_metrics(config)
        self.metrics.collector.sources = Sources(
            links=self.links.values,
            codecs=lambda: (stats.codec,),
            streams=lambda: stats.streams,
            refusals=lambda: stats.refused,
            certificate=lambda: self.config.tls.cert,  # a reload may point elsewhere
        )
        self.reloads = ReloadCounter()
        self.metrics.registry.register(self.reloads)

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
        """Resolve once (links start dialling at once), then keep re-resolving; with a
        DeviceAuthority, also push new revocations to every link."""
        loop = asyncio.get_running_loop()
        if self.authority is not None and self._push_task is None:
            self._push_task = loop.create_task(
                self.authority.run_revocation_push(self.send_revocations, REVOCATION_POLL),
                name="revocation push",
            )
        ok = await self.resolve()
        self._resolve_task = loop.create_task(self._resolve_loop(ok))

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
            on_up=self._on_link_up,
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
        device = stream.headers.get(HEADER_DEVICE)
        if device and self.authority is not None:
            self.authority.touch(device)  # one SQLite write a minute per device at most
        self.dispatcher.on_stream(stream)

    # -- device trust on the links

    def revocation_snapshot(self) -> list[bytes]:
        """The full "revoke" list for a new link: the registry's, or an empty one."""
        if self.authority is not None:
            return self.authority.revocation_snapshot()
        return encode_revocations([], full=True)

    def _on_link_up(self, link: Link) -> None:
        """First thing on a new gateway link: the full revocation list. The gateway routes
        this site's devices to the link only once it has it."""
        # Set here, not at dial: this callback knows which link (and gateway) it is. The
        # gateway sends controls only to links it routes, i.e. after our snapshot.
        link.on_control = functools.partial(self._on_control, link)
        try:
            bodies = self.revocation_snapshot()
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

    def send_revocations(self, bodies: list[bytes]) -> None:
        """Send incremental "revoke" bodies on every live gateway link."""
        sent = 0
        for kept in list(self.links.values()):
            for link in list(kept.links):
                try:
                    for body in bodies:
                        link.send_control(KIND_REVOKE, body)
                except (LinkClosedError, ValueError):
                    continue  # closing: its replacement starts with a full snapshot
                sent += 1
        log.info("revocations pushed", extra={"messages": len(bodies), "links": sent})

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

    # -- reload (SIGHUP)

    def reload(self) -> bool:
        """Re-read the config file and TLS files; apply what is safe, keep links up.

        On any error the running configuration stays as it was (one error line, counted).
        """
        try:
            new = load_agent_config(self.config.path)
            new, restart = keep_restart_only(self.config, new, RESTART_ONLY)
            tls = new.tls
            check_own_certificate(tls.cert, tls.ca, role="agent", site=self.config.site)
            ctx = client_context(tls.cert, tls.key, tls.ca, alpn=ALPN_AGENT)
            settings = link_settings(new.limits)
        except (ConfigError, ReloadError, TlsConfigError, pki.PkiError, OSError, ValueError) as exc:
            self.reloads.record(False)
            log.error(
                "reload failed; keeping the running configuration and certificates",
                extra={"config": str(self.config.path), "error": str(exc)},
            )
            return False
        old, self.config = self.config, new
        self.ctx, self.settings = ctx, settings
        for kept in self.links.values():  # their next dial; the link that is up stays
            kept.ctx = ctx
            kept.settings = settings
            if new.reconnect != old.reconnect:
                kept.backoff = ExponentialBackoff.from_config(new.reconnect, rng=self.rng)
        self.dispatcher.services = new.services  # new streams; those open go on
        self.dispatcher.compression_level = new.compression_level
        if new.log_level != old.log_level:
            set_log_level(new.log_level)
        if new.gateways != old.gateways:
            self._restart_resolving()
        self.reloads.record(True)
        if restart:
            log.warning(
                "reloaded; these settings need a restart and keep their running values",
                extra={"keys": ",".join(restart)},
            )
        log.info(
            "reloaded configuration and certificates",
            extra={"links": len(self.links), "services": len(new.services)},
        )
        return True

    def _restart_resolving(self) -> None:
        """The gateway list changed: resolve now (then on the usual interval)."""
        if self._resolve_task is None:  # not started, or shutting down
            return
        self._resolve_task.cancel()  # safe: resolve() changes nothing before its last await

        async def resolve_now() -> None:
            await self._resolve_loop(await self.resolve())

        self._resolve_task = asyncio.get_running_loop().create_task(resolve_now())

    # -- shutdown

    async def shutdown(self, grace: float) -> None:
        """Goaway everywhere, let streams finish within `grace`, close every link."""
        for task in (self._resolve_task, self._push_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._resolve_task = self._push_task = None
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
    config: AgentConfig,
    metrics: EndMetrics | None = None,
    audit: AuditLog | None = None,
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

    from relay.agent.dicom_audit import DicomAuditor

    auditor = DicomAuditor(audit) if audit is not None else None

    async def serve_dicom(stream: Stream) -> None:
        device = stream.headers.get(HEADER_DEVICE, "")
        begin = (lambda s: auditor.begin(device, s)) if auditor is not None else None
        summary = await dicom.serve(stream, on_request=begin)
        if auditor is not None:
            auditor.end(device, summary)
        log.info(
            "dicom operation",
            extra={
                "stream": stream.stream_id,
                "device": stream.headers.get(HEADER_DEVICE, ""),
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
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain within `drain_grace`.

    SIGHUP reloads (`Agent.reload`) while it runs.

    `handlers` replaces the default target handlers (DICOM when `pacs:` is set); with
    `pki:` the `enroll` and `renew` targets are added to them.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        authority = await stack.enter_async_context(open_authority(config))
        metrics = _agent_metrics(config)
        if handlers is None:
            audit = authority.audit if authority is not None else None
            handlers = await stack.enter_async_context(default_handlers(config, metrics, audit))
        agent = Agent(
            config, handlers=handlers, resolver=resolver, metrics=metrics, authority=authority
        )
        if handle_signals:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, agent.reload)
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
                loop.remove_signal_handler(signal.SIGHUP)
            await agent.shutdown(agent.config.drain_grace)  # as last reloaded


@contextlib.asynccontextmanager
async def open_authority(config: AgentConfig) -> AsyncIterator[DeviceAuthority | None]:
    """The DeviceAuthority of `pki:` (None without it), with its optional syslog copy.

    A CA pair that does not load or match, or a state_dir that cannot be used, is a
    ConfigError naming the file and key. Closes the registry, then flushes syslog.
    """
    if config.pki is None:
        if config.audit.syslog is not None:
            log.warning("audit.syslog is set but pki: is not; this agent writes no audit events")
        yield None
        return
    sender: SyslogSender | None = None
    syslog = config.audit.syslog
    if syslog is not None:
        try:
            ctx = syslog_context(syslog.ca, syslog.cert, syslog.key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(config.path, "audit.syslog", str(exc)) from None
        sender = SyslogSender(syslog.address, ctx, queue_size=syslog.queue)
    try:
        authority = DeviceAuthority.open(
            site=config.site,
            state_dir=config.state_dir,
            ca_cert=config.pki.ca_cert,
            ca_key=config.pki.ca_key,
            lifetime=timedelta(seconds=config.pki.device_lifetime),
            audit_settings=config.audit,
            audit_sink=sender,
        )
    except pki.PkiError as exc:
        raise ConfigError(config.path, "pki", str(exc)) from None
    except RegistryError as exc:
        raise ConfigError(config.path, "state_dir", str(exc)) from None
    if sender is not None:
        sender.start()
    log.info(
        "device authority ready",
        extra={
            "site": config.site,
            "state_dir": str(config.state_dir),
            "device_lifetime_s": config.pki.device_lifetime,
            "syslog": str(syslog.address) if syslog is not None else "",
        },
    )
    try:
        yield authority
    finally:
        authority.close()
        if sender is not None:
            await sender.close()


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
