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

SIGHUP (`Agent.reloader`): re-read the config file and the TLS files, in a worker thread
(relay.ops.reloader: the links' heartbeats and streams go on meanwhile; reloads run one
at a time, a burst of signals makes at most one more), then swap on the loop. A new certificate,
key or CA bundle goes to every link supervisor for its next dial; links that are up stay
up. The service allow-list, compression level, gateways (re-resolved at once), limits and
backoff of new links, drain grace, resolve interval and log level take effect; the keys
in RESTART_ONLY keep their running values and are logged as needing a restart; new
values that the next start would refuse (`check_start`) are logged as an error. Anything
that does not load or check out keeps the whole running configuration: one error line,
counted in `relay_reloads_total{result="error"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from relay.agent.authority import DeviceAuthority, load_ca_pair, open_authority
from relay.agent.config import AgentConfig, load_agent_config
from relay.agent.dispatch import StreamDispatcher, TargetHandler, stream_quotas
from relay.agent.gateways import GatewayLinks, Resolver, resolve_all
from relay.agent.handlers import default_handlers, pacs_check
from relay.agent.linktrust import LinkTrust
from relay.agent.sessions import session_server
from relay.agent.syslog import SyslogMetrics, SyslogSender
from relay.net.aio import Link, Stream
from relay.net.backoff import Uniform
from relay.net.tls import TlsConfigError, client_context, tls_config_error
from relay.ops.binding import listen_errors
from relay.ops.config import ConfigError
from relay.ops.http import AdminServer
from relay.ops.logs import setup_logging
from relay.ops.metrics import EndMetrics, Sources
from relay.ops.reloader import Reloader
from relay.ops.reloading import (
    ReloadCounter,
    ReloadError,
    check_configured_certificate,
    keep_restart_only,
    log_restart_needed,
    set_log_level,
)
from relay.ops.runtime import run_loop
from relay.seal.policy import enroll_server_context, session_server_context
from relay.trust import pki
from relay.wire import ALPN_AGENT, TARGET_RENEW

__all__ = ["Agent", "agent_metrics", "check_start", "run", "run_agent"]

log = logging.getLogger(__name__)

REVOCATION_POLL = 0.5  # seconds between looks at the registry for new revocations
# Read once at start-up (listeners, the PACS handler, the registry, the audit trail): a
# reload keeps their running values and says that changing them needs a restart.
RESTART_ONLY = (
    "site", "pki", "state_dir", "metrics_listen", "pacs", "audit", "directory", "it_pages",
)  # fmt: skip


RELOAD_ERRORS = (ConfigError, ReloadError, TlsConfigError, pki.PkiError, OSError, ValueError)


@dataclasses.dataclass(frozen=True)
class PreparedReload:
    """What a reload read and built in its worker thread; applying it is only a swap."""

    from_file: AgentConfig  # as the file says: restart-only keys are kept when applied
    contexts: tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]  # reloaded_contexts
    next_start_error: str | None  # check_start of the file, when restart-only keys changed


class Agent:
    """The running agent: its gateway links, what it says about devices on them, and the
    stream dispatcher they share."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        handlers: Mapping[str, TargetHandler] | None = None,
        resolver: Resolver = resolve_all,
        rng: Uniform | None = None,
        metrics: EndMetrics | None = None,
        authority: DeviceAuthority | None = None,
        pacs_ready: Callable[[], Awaitable[tuple[bool, str]]] | None = None,
    ) -> None:
        self.config = config
        self.authority = authority
        self.pacs_ready = pacs_ready
        targets = dict(handlers or {})
        if authority is not None:
            targets[TARGET_RENEW] = authority.serve_renew
        self.dispatcher = StreamDispatcher(
            config.services,
            handlers=targets,
            compression_level=config.compression_level,
            quotas=stream_quotas(config.max_pacs_operations),
        )
        self.dispatcher.set_open_limit(config.stream_burst, config.stream_rate)
        self.sessions = session_server(config, authority, self.dispatcher.on_stream)
        self.gateways = GatewayLinks(
            config.gateways,
            ctx=client_context(config.tls.cert, config.tls.key, config.tls.ca, alpn=ALPN_AGENT),
            settings=config.limits,
            reconnect=config.reconnect,
            resolve_interval=config.resolve_interval,
            drain_grace=config.drain_grace,
            on_stream=self._on_stream,
            on_up=self._on_link_up,
            resolver=resolver,
            rng=rng,
        )
        self.trust = LinkTrust(authority, self.gateways.live_links)
        self.trust.on_pushed = self.sessions.close_revoked  # ours to enforce, whatever gateways do
        self._push_task: asyncio.Task[None] | None = None
        stats = self.dispatcher.stats
        self.metrics = metrics or agent_metrics(config)
        self.metrics.collector.sources = Sources(
            links=self.gateways.links.values,
            codecs=lambda: (stats.codec,),
            streams=lambda: stats.streams,
            refusals=lambda: stats.refused,
            certificate=lambda: self.config.tls.cert,  # a reload may point elsewhere
            seal=lambda: self.sessions.stats,
        )
        self.reloads = ReloadCounter()
        self.metrics.registry.register(self.reloads)
        self.next_start_error: str | None = None  # why the next start fails (last reload)
        self.reloader = Reloader(
            self._prepare_reload, self._apply_reload, self._refuse_reload, RELOAD_ERRORS
        )
        self.metrics.registry.register(self.trust.metrics)
        self._recheck_task: asyncio.Task[None] | None = None
        if authority is not None and authority.recheck is not None:
            self.metrics.registry.register(authority.recheck.metrics)
        if authority is not None and isinstance(authority.audit.sink, SyslogSender):
            self.metrics.registry.register(SyslogMetrics(authority.audit.sink))

    async def readiness(self) -> tuple[bool, str]:
        """Ready with at least one gateway link and, with `pacs:`, a PACS that answers
        C-ECHO (relay.agent.pacs_check: bounded, cached briefly)."""
        up = self.gateways.up
        if not up:
            return False, "no gateway link"
        links = f"{up} gateway link(s) up"
        if self.pacs_ready is None:
            return True, links
        ok, why = await self.pacs_ready()
        return ok, f"{links}; {why}"

    async def start(self) -> None:
        """Start dialling every gateway address; with a DeviceAuthority, also push new
        revocations to every link."""
        if self.authority is not None and self._push_task is None:
            self._push_task = asyncio.get_running_loop().create_task(
                self.authority.run_revocation_push(self.trust.push, REVOCATION_POLL),
                name="revocation push",
            )
        if self.authority is not None and self.authority.recheck is not None:
            self._recheck_task = asyncio.get_running_loop().create_task(
                self.authority.run_directory_recheck(), name="directory re-check"
            )
        await self.gateways.start()

    def _on_link_up(self, link: Link) -> None:
        self.trust.on_link_up(link)

    def _on_stream(self, stream: Stream) -> None:
        """A gateway opened a stream: a sealed session or enrollment, nothing else."""
        self.sessions.on_stream(stream)

    async def reload(self) -> bool:
        """One reload, awaited (SIGHUP calls `reloader.request`): True once applied."""
        return await self.reloader.reload()

    def _prepare_reload(self) -> PreparedReload:
        """Worker thread: re-read the config file and the TLS files and build the contexts.

        Reads of the agent only its running config: only an apply changes it, and the
        reloader runs each apply after its own prepare, one at a time.
        """
        running = self.config
        from_file = load_agent_config(running.path)
        new, restart = keep_restart_only(running, from_file, RESTART_ONLY)
        contexts = reloaded_contexts(new, running.site)
        next_start_error = None
        if restart:  # the next start reads them: it must not be the first to find them bad
            try:
                check_start(from_file)
            except ConfigError as exc:
                next_start_error = str(exc)
        return PreparedReload(from_file, contexts, next_start_error)

    def _apply_reload(self, prepared: PreparedReload) -> bool:
        """On the loop: swap in what `_prepare_reload` built, keep the links up."""
        new, restart = keep_restart_only(self.config, prepared.from_file, RESTART_ONLY)
        self.next_start_error = prepared.next_start_error if restart else None
        ctx, session_ctx, enroll_ctx = prepared.contexts
        old, self.config = self.config, new
        self.gateways.reconfigure(
            gateways=new.gateways,
            ctx=ctx,
            settings=new.limits,
            reconnect=new.reconnect,
            resolve_interval=new.resolve_interval,
            drain_grace=new.drain_grace,
        )
        self.sessions.session_ctx = session_ctx  # new sessions; those open go on
        if self.sessions.enroll_ctx is not None:
            self.sessions.enroll_ctx = enroll_ctx
        self.sessions.settings = new.limits
        self.dispatcher.services = new.services  # new streams; those open go on
        self.dispatcher.compression_level = new.compression_level
        self.dispatcher.set_quotas(stream_quotas(new.max_pacs_operations))
        self.dispatcher.set_open_limit(new.stream_burst, new.stream_rate)
        if new.log_level != old.log_level:
            set_log_level(new.log_level)
        self.reloads.record(True)
        log_restart_needed(log, restart, self.next_start_error)
        log.info(
            "reloaded configuration and certificates",
            extra={"links": len(self.gateways.links), "services": len(new.services)},
        )
        return True

    def _refuse_reload(self, exc: Exception) -> bool:
        """The running configuration stays as it was (one error line, counted)."""
        self.reloads.record(False)
        log.error(
            "reload failed; keeping the running configuration and certificates",
            extra={"config": str(self.config.path), "error": str(exc)},
        )
        return False

    async def shutdown(self, grace: float) -> None:
        """Goaway everywhere, let streams finish within `grace`, close every link."""
        await self.gateways.stop_resolving()
        if self._push_task is not None:
            self._push_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._push_task
            self._push_task = None
        if self._recheck_task is not None:
            self._recheck_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck_task
            self._recheck_task = None
        log.info("agent draining", extra={"links": len(self.gateways.links), "grace_s": grace})
        self.sessions.goaway()  # devices open their next sessions at another agent
        self.gateways.goaway("agent shutting down")
        await self.dispatcher.drain(grace)
        await self.sessions.close(min(grace, 2.0))
        await self.gateways.close()
        self.trust.close()  # refusal reports still held back by the limit, counted
        log.info("agent stopped")


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
    check_start(config)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        authority = await stack.enter_async_context(open_authority(config))
        metrics = agent_metrics(config)
        if handlers is None:
            audit = authority.audit if authority is not None else None
            handlers = await stack.enter_async_context(default_handlers(config, metrics, audit))
        agent = Agent(
            config,
            handlers=handlers,
            resolver=resolver,
            metrics=metrics,
            authority=authority,
            pacs_ready=pacs_check(config),
        )
        if handle_signals:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, agent.reloader.request)
        try:
            await agent.start()
            if config.metrics_listen is not None:
                admin = AdminServer(config.metrics_listen, metrics.registry, agent.readiness)
                with listen_errors(config.path, "metrics_listen", config.metrics_listen):
                    await admin.start()
                stack.push_async_callback(admin.stop)
            if config.it_pages is not None and authority is not None:
                from relay.agent.itpages.server import ItPagesServer

                pages = ItPagesServer(config, authority, agent.trust.push, metrics.registry)
                with listen_errors(config.path, "it_pages.listen", config.it_pages.listen):
                    await pages.start()
                stack.push_async_callback(pages.stop)
            log.info(
                "agent started",
                extra={"site": config.site, "gateways": ",".join(map(str, config.gateways))},
            )
            if started is not None:
                started(agent)
            await stop.wait()
        finally:
            agent.reloader.close()  # a prepare under way is abandoned: it must not hold the stop
            if handle_signals:
                loop.remove_signal_handler(signal.SIGTERM)
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGHUP)
            await agent.shutdown(agent.config.drain_grace)  # as last reloaded


def reloaded_contexts(
    config: AgentConfig, site: str
) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    """The TLS contexts of a reloaded `tls:` (links, sealed sessions, enrollment), checked
    as at start-up and failing as start-up fails: a ConfigError naming the config file,
    the `tls.*` key at fault and its path."""
    tls = config.tls
    check_configured_certificate(
        config.path, "tls.cert", tls.cert, tls.ca, role="agent", site=site, ca_key="tls.ca",
        reloading=True,
    )  # fmt: skip
    try:
        return (
            client_context(tls.cert, tls.key, tls.ca, alpn=ALPN_AGENT),
            session_server_context(tls.cert, tls.key, tls.ca, site=site),
            enroll_server_context(tls.cert, tls.key),
        )
    except TlsConfigError as exc:
        raise tls_config_error(exc, config.path) from None


def check_start(config: AgentConfig) -> None:
    """The certificate checks a reload makes, before the agent starts (ConfigError naming
    the key, exit 2): every gateway would refuse an agent certificate of another role,
    site or CA. With `pki:`, its CA must also be one that `tls.ca` trusts, of the agent's
    trust domain: the devices it signs present their certificates to this agent (and
    their codes name that CA), so another CA fails every enrollment at the PC; and the IT
    pages' TLS files (`check_it_pages_tls`)."""
    tls = config.tls
    identity = check_configured_certificate(
        config.path, "tls.cert", tls.cert, tls.ca, role="agent", site=config.site, ca_key="tls.ca"
    )
    try:  # the key and tls.ca's CAs of our site (the contexts are made later)
        client_context(tls.cert, tls.key, tls.ca, alpn=ALPN_AGENT)
        session_server_context(tls.cert, tls.key, tls.ca, site=config.site)
    except TlsConfigError as exc:
        raise tls_config_error(exc, config.path) from None
    if config.pki is None:
        return
    try:
        ca = pki.load_cert(config.pki.ca_cert)
        pki.check_ca_site(ca, config.site, str(config.pki.ca_cert))
        trusted = pki.load_certs(tls.ca)
    except pki.PkiError as exc:
        raise ConfigError(config.path, "pki.ca_cert", str(exc)) from None
    if ca not in trusted:
        raise ConfigError(
            config.path,
            "pki.ca_cert",
            f"{config.pki.ca_cert} is not one of the CAs of tls.ca ({tls.ca}): the agent "
            "would refuse the devices it enrols",
        )
    if pki.trust_domain_of_ca(ca) != identity.trust_domain:
        raise ConfigError(
            config.path,
            "pki.ca_cert",
            f"{config.pki.ca_cert} is of the trust domain {pki.trust_domain_of_ca(ca)!r}, "
            f"the agent's certificate of {identity.trust_domain!r}",
        )
    try:
        load_ca_pair(config.pki.ca_cert, config.pki.ca_key)
    except pki.PkiError as exc:
        raise ConfigError(config.path, "pki.ca_key", str(exc)) from None
    check_it_pages_tls(config)


def check_it_pages_tls(config: AgentConfig) -> None:
    """`it_pages.tls.*` loads and matches, before any gateway link is dialled: the IT pages
    start after the links, and a bad file found then stopped an agent that had already
    dialled out (ConfigError naming the key and the path, exit 2)."""
    if config.it_pages is None:
        return
    from relay.agent.itpages.server import server_context  # aiohttp: only with it_pages

    try:
        server_context(config.it_pages)
    except TlsConfigError as exc:
        raise tls_config_error(exc, config.path, "it_pages.tls") from None


def agent_metrics(config: AgentConfig) -> EndMetrics:
    """Created before the Agent so that the DICOM handler can report into it; the Agent
    then binds its own sources to it."""
    return EndMetrics("agent", config.site, Sources(links=lambda: ()))


def run(config_path: Path) -> int:
    """`relay agent --config FILE`: load, log JSON, run under uvloop; 0 after a clean drain."""
    config = load_agent_config(config_path)
    setup_logging("agent", config.log_level)
    run_loop(run_agent(config))
    return 0
