"""`relay workstation`: one link to the gateway with the device identity, and what uses it.

The link is supervised (relay.net.dialer.KeptLink: reconnects with jittered backoff); the
`Tunnel` opens streams over it for the port forwards and, when `dicom:` is configured,
the local DICOM node. SIGTERM/SIGINT (and Ctrl-Break on Windows; relay.ops.signals), or
`relay workstation stop`: stop accepting local connections, goaway, let open ones finish
within `drain_grace`, close, exit 0. The device key must be private (relay.ops.privatefiles):
a key that others may read stops start-up with one line saying what to run.

A gateway's GOAWAY REVOKED stops the workstation (the study cache wiped, exit 3) only
when it carries the agent's signed notice for this device (relay.workstation.revocation);
the agent's own verdict inside the sealed session needs none. The wipe runs in a worker
thread, and the run ends once it is done. The revocation is recorded in `state_dir`
(relay.workstation.revocation): a start with the same certificate exits 3 at once, before
it listens or dials, since launchd and Task Scheduler restart it whatever its status.

The device certificate renews itself over the live link once two thirds of its
lifetime have passed (relay.trust.renewal). The link is kept: the new identity is handed to
the dialer for its next dial, so renewing interrupts no transfer. The new files are read
and their contexts built in a worker thread (as a reload's), then swapped in on the loop,
unless a later renewal came meanwhile (its files are newer). A renewal that a
crash interrupted is completed before the identity is loaded.

SIGHUP, or `relay workstation reload` on every platform (the control endpoint,
relay.workstation.control; `Workstation.reloader`): re-read the config file and the
identity files, in a worker thread (relay.ops.reloader: the session, the DICOM node and
the forwards go on meanwhile; one reload at a time, a burst makes at most one more), then
swap on the loop; a renewal that lands meanwhile keeps its newer identity. The new
certificate, key and CA go to the link supervisor for its next dial (the link that is up
stays up), with the new limits and backoff; drain grace and log level apply at once. The
keys in RESTART_ONLY keep their running values and are logged as needing a restart. Files
that do not load or check out keep everything as it was: one error line, counted in
`relay_reloads_total{result="error"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from relay.dicom.offer import CodecOffer
from relay.net.backoff import ExponentialBackoff, Uniform
from relay.net.dialer import DialError, KeptLink
from relay.net.tls import TlsConfigError, client_context
from relay.ops import privatefiles
from relay.ops.binding import listen_errors
from relay.ops.config import ConfigError
from relay.ops.http import AdminServer
from relay.ops.logs import setup_logging
from relay.ops.metrics import EndMetrics, Sources
from relay.ops.reloader import Reloader, in_daemon_thread
from relay.ops.reloading import (
    ReloadCounter,
    keep_restart_only,
    log_restart_needed,
    set_log_level,
)
from relay.ops.runtime import run_loop
from relay.ops.signals import handling_signals
from relay.proto import ErrorCode
from relay.seal.policy import session_client_context
from relay.trust.identity import identity_from_certificate
from relay.trust.pki import PkiError, load_cert
from relay.trust.renewal import OpenStream, complete_pending_renewal, renewal_loop
from relay.wire import ALPN_DEVICE
from relay.workstation.config import WorkstationConfig, load_workstation_config
from relay.workstation.control import control_endpoint
from relay.workstation.forward import Forwarder, ForwardListenError
from relay.workstation.localpeer import AccountGate
from relay.workstation.ownidentity import (
    check_identity,
    check_reloaded_identity,
    expired_message,
    not_after,
)
from relay.workstation.revocation import RevocationCheck, record_revoked, revoked_since
from relay.workstation.session import SessionKeeper
from relay.workstation.tunnel import Tunnel
from relay.workstation.tunnelmetrics import TunnelMetrics

if TYPE_CHECKING:
    from relay.dicom.node import DicomNode
    from relay.ops.control import ControlServer
    from relay.workstation.cache.service import WorkstationCache
    from relay.workstation.dicomweb.server import DicomwebServer

__all__ = ["Workstation", "dicom_node", "dicomweb_server", "run", "run_workstation"]

log = logging.getLogger(__name__)

COMPRESSION_LEVEL = 3
# `relay workstation` exit statuses besides 0 (drained), 1 (a bug) and 2 (bad config):
EXIT_REVOKED = 3  # the gateway says this device is revoked; only a new enrollment helps
REVOKED_MESSAGE = "this device was revoked by the hospital; enroll it again with `relay enroll`"
#: At a start with the certificate that was revoked ({at}: when it was recorded).
REVOKED_AT_START = "this device was revoked at {at}; enroll it again with `relay enroll`"
# Read once at start-up (the dialled address, local listeners, the renewal loop's
# directory, the cache's key, place and bounds, the prefetcher): a reload keeps their
# running values and says that they need a restart.
RESTART_ONLY = (
    "gateway", "identity_dir", "state_dir", "metrics_listen", "dicom", "forward", "dicomweb",
    "cache", "prefetch",
)  # fmt: skip


RELOAD_ERRORS = (
    ConfigError, TlsConfigError, PkiError, privatefiles.PrivateFileError, OSError, ValueError,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PreparedReload:
    """What a reload read and built in its worker thread; applying it is only a swap."""

    from_file: WorkstationConfig  # as the file says: restart-only keys kept when applied
    ctx: ssl.SSLContext  # the link's, for the next dial
    session_ctx: ssl.SSLContext
    revocation_check: RevocationCheck
    not_after: datetime | None  # of the certificate the next dial presents
    next_start_error: str | None  # check_identity of the file, when identity_dir changed
    renewals: int  # Workstation.renewals when the prepare began


@dataclasses.dataclass(frozen=True)
class RenewedIdentity:
    """What a renewal's files give, built in a worker thread; applying it is a swap."""

    ctx: ssl.SSLContext  # the link's, for the next dial
    session_ctx: ssl.SSLContext
    revocation_check: RevocationCheck
    not_after: datetime | None


@dataclasses.dataclass(frozen=True)
class ReloadOutcome:
    """What `relay workstation reload` answers: of this reload, whatever came after."""

    ok: bool
    restart_needed: tuple[str, ...]  # keys that keep their running values
    error: str | None  # why it failed
    next_start_error: str | None  # applied, but the next start will refuse the file


class Draining(Protocol):
    """A local server that can drain: refuse new work, finish what runs within `grace`."""

    async def drain(self, grace: float) -> None: ...


class Workstation:
    """The running workstation: its supervised link, tunnel and port forwards."""

    def __init__(self, config: WorkstationConfig, *, rng: Uniform | None = None) -> None:
        self.config = config
        try:
            finished = complete_pending_renewal(config.identity_dir)
        except OSError as exc:
            raise ConfigError(config.path, "identity_dir", f"{exc.strerror or exc}") from None
        if finished is not None:
            log.warning(  # relay enroll and the renewal install the same way
                "an interrupted install of the device identity (enrollment or renewal) was "
                + finished
            )
        files = config.identity_files()
        check_identity(config)  # what a reload checks, and an expired certificate
        self.ctx = client_context(files.cert, files.key, files.ca, alpn=ALPN_DEVICE)
        self.identity = identity_from_certificate(load_cert(files.cert))
        self.revocation_check = RevocationCheck.from_files(files.cert, files.ca)
        self.rng = rng
        self.kept = KeptLink(
            config.gateway,
            self.ctx,
            config.limits,
            alpn=ALPN_DEVICE,
            name=f"gateway {config.gateway}",
            backoff=ExponentialBackoff.from_config(config.reconnect, rng=rng),
            on_revoked=self._revoked,
            check_revoked=self._check_revoked,
            on_dial_error=self._dial_failed,
        )
        self.not_after = not_after(files.cert)  # of the certificate the next dial presents
        self.expired: str | None = None  # EXPIRED_MESSAGE once a refusal met it (readiness)
        self.revoked = asyncio.Event()  # set once the wipe is done: the run ends with EXIT_REVOKED
        self._revoking: asyncio.Task[None] | None = None
        self.session = SessionKeeper(
            self.kept,
            session_client_context(files.cert, files.key, files.ca, site=self.identity.site),
            trust_domain=self.identity.trust_domain,
            site=self.identity.site or "",
            settings=config.limits,
            rng=rng,
        )
        self.cache: WorkstationCache | None = None  # set by workstation_cache()
        # The pixel codecs every path announces to the agent; one failing its check at
        # any path is dropped for all (relay.dicom.offer).
        self.codec_offer = CodecOffer()
        self.tunnel = Tunnel(self.session, rng=rng)
        self.renewals = 0
        self.renewal_failures = 0
        self._renewal_task: asyncio.Task[None] | None = None
        self._renewed_loads: set[asyncio.Task[None]] = set()  # renewals' builds under way
        # Who on this PC may use the listeners (local_access); a reload changes it for
        # the connections opened after it.
        self.accounts = AccountGate(config.local_access)
        self.forwarder = Forwarder(
            self.tunnel, config.forward, compression_level=COMPRESSION_LEVEL, accounts=self.accounts
        )
        stats = self.forwarder.stats
        accounts = self.accounts
        self.metrics = EndMetrics(
            "workstation",
            self.identity.site or "",
            Sources(
                links=lambda: (self.kept,),
                codecs=lambda: (stats.codec,),
                streams=lambda: {f"tcp:{k}": v for k, v in stats.connections.items()},
                refusals=lambda: {
                    "no_stream": sum(stats.failed.values()),
                    "capacity": stats.refused,
                    "other_account": accounts.refused_total(),
                },
                certificate=lambda: files.cert,
                seal=lambda: self.session.seal,
            ),
        )
        self.reloads = ReloadCounter()
        self.metrics.registry.register(self.reloads)
        self.metrics.registry.register(TunnelMetrics(self.tunnel.stats))
        self.reload_error: str | None = None  # why the last reload failed
        self.restart_needed: tuple[str, ...] = ()  # keys the last reload could not apply
        self.next_start_error: str | None = None  # why the next start fails (last reload)
        self.reloader = Reloader(
            self._prepare_reload, self._apply_reload, self._refuse_reload, RELOAD_ERRORS
        )
        self._drain_deadline: float | None = None  # loop time: one grace for every drain

    def _dial_failed(self, error: DialError) -> None:
        """A refused dial with an expired certificate: only the gateway's log said why, and
        retrying cannot help (renewal needs the link). Say it here, once."""
        if error.reason in ("connect", "timeout"):  # not the gateway's refusal
            return
        message = expired_message(self.config.identity_dir, self.not_after, datetime.now(UTC))
        if message is not None and self.expired is None:
            log.error(message, extra={"reason": error.reason})
        self.expired = message

    def _check_revoked(self, reason: str) -> str | None:
        """The dialer asks before it heeds a gateway's REVOKED (see RevocationCheck)."""
        return self.revocation_check(reason)

    def _revoked(self, reason: str) -> None:
        """Revoked for good (a verified notice, or the agent's own verdict): wipe the
        cache off the loop, then end the run."""
        log.error(REVOKED_MESSAGE, extra={"gateway_reason": reason})
        if self._revoking is None:
            self._revoking = asyncio.get_running_loop().create_task(
                self._wipe_then_stop(), name="revocation wipe"
            )

    async def _wipe_then_stop(self) -> None:
        try:
            if self.cache is not None:
                await self.cache.wipe_revoked()  # a revoked PC keeps no studies
        except Exception:
            log.exception("the cache wipe on revocation failed")
        finally:
            try:
                self._record_revoked()
            finally:
                self.revoked.set()  # whatever the wipe and the record met

    def _record_revoked(self) -> None:
        """The marker that stops the next start (relay.workstation.revocation)."""
        if self.config.state_dir is None:  # embedded: nobody restarts it
            return
        try:
            record_revoked(self.config.state_dir, self.config.identity_files().cert)
        except (OSError, PkiError) as exc:  # the next start dials and is told again
            log.error("cannot record the revocation", extra={"error": str(exc)})

    def revoked_at_start(self) -> str | None:
        """When the certificate this run would present was revoked, if it was."""
        state_dir = self.config.state_dir
        if state_dir is None:
            return None
        try:
            return revoked_since(state_dir, self.config.identity_files().cert)
        except OSError as exc:  # state_dir a file, the marker unreadable: the operator's fix
            where = exc.filename or state_dir
            message = f"cannot read {where}: {exc.strerror or exc}"
            raise ConfigError(self.config.path, "state_dir", message) from None

    async def revocation_done(self) -> None:
        """Wait for a wipe under way (a stop during it must not cut it short)."""
        if self._revoking is not None:
            await asyncio.shield(self._revoking)

    def readiness(self) -> tuple[bool, str]:
        if self.session.up.is_set():
            return True, "sealed session to the agent up"
        if self.expired is not None:
            return False, self.expired
        if self.kept.up.is_set():
            return False, f"no session ({self.session.stats.last_error or 'connecting'})"
        return False, f"no gateway link ({self.kept.stats.last_error or 'connecting'})"

    async def start(self) -> None:
        """Listen locally first (a taken port is a start-up error naming the key), then dial."""
        try:
            await self.forwarder.start()
        except ForwardListenError as exc:
            raise ConfigError(self.config.path, f'forward."{exc.address}"', str(exc)) from None
        self.kept.start()
        self.session.start()
        if self._renewal_task is None:
            self._renewal_task = asyncio.get_running_loop().create_task(
                renewal_loop(
                    self._current_opener,
                    self.config.identity_dir,
                    on_renewed=self._renewed,
                    on_error=self._renewal_failed,
                ),
                name="certificate renewal",
            )

    # -- renewal

    def _current_opener(self) -> OpenStream | None:
        """Renewal rides the sealed session (the agent knows us from its inner TLS)."""
        link = self.session.link
        if link is None or not self.session.up.is_set() or link.is_closing:
            return None
        return link.open_stream

    def _renewed(self) -> None:
        """New files are in place: their contexts are built in a worker thread (reading
        the files and the key on the loop held every link and association meanwhile), then
        swapped in; the next dial presents them, the live link stays.

        `renewals` moves now, before the build: a reload that prepared before it keeps
        this renewal's contexts, whichever is applied first (see _apply_reload)."""
        self.renewals += 1
        task = asyncio.get_running_loop().create_task(
            self._load_renewed(self.renewals), name="renewed identity"
        )
        self._renewed_loads.add(task)
        task.add_done_callback(self._renewed_loads.discard)

    def _build_renewed(self) -> RenewedIdentity:
        """Worker thread: the renewed files' contexts (the files were checked before they
        were installed)."""
        files = self.config.identity_files()
        return RenewedIdentity(
            ctx=client_context(files.cert, files.key, files.ca, alpn=ALPN_DEVICE),
            session_ctx=session_client_context(
                files.cert, files.key, files.ca, site=self.identity.site
            ),
            revocation_check=RevocationCheck.from_files(files.cert, files.ca),
            not_after=not_after(files.cert),
        )

    async def _load_renewed(self, renewal: int) -> None:
        """Build renewal number `renewal`'s contexts off the loop; swap them in on it unless
        a later renewal came meanwhile (its own build reads newer files)."""
        try:
            built = await in_daemon_thread(self._build_renewed)
        except (TlsConfigError, PkiError, OSError, ValueError) as exc:
            # Keep dialling with the old context (still valid for a third of its
            # lifetime) and say so.
            self.renewal_failures += 1
            log.error("cannot load the renewed identity", extra={"error": str(exc)})
            return
        if renewal != self.renewals:
            return
        self.ctx = self.kept.ctx = built.ctx
        self.not_after, self.expired = built.not_after, None
        self.session.ctx = built.session_ctx  # the next session presents the new certificate
        self.revocation_check = built.revocation_check  # older notices prove nothing now

    def _renewal_failed(self, message: str) -> None:
        self.renewal_failures += 1

    # -- reload (SIGHUP)

    async def reload(self) -> ReloadOutcome:
        """One reload, awaited (`relay workstation reload`; SIGHUP calls `reloader.request`).

        On any error the running configuration stays as it was (one error line, counted).
        ReloadStopped if the workstation stops first.
        """
        return await self.reloader.reload()

    def _prepare_reload(self) -> PreparedReload:
        """Worker thread: re-read the config file and the identity files, check them and
        build the contexts.

        Reads of the workstation only its running config and identity: only an apply
        changes the config, and the reloader runs each apply after its own prepare, one at
        a time. A renewal may land meanwhile: `renewals` tells the apply.
        """
        renewals = self.renewals  # first: files read after it are at least this new
        running = self.config
        from_file = load_workstation_config(running.path)
        new, restart = keep_restart_only(running, from_file, RESTART_ONLY)
        files = new.identity_files()
        check_reloaded_identity(new, self.identity)  # errors name identity_dir
        next_start_error = None
        if "identity_dir" in restart:  # the next start must not be the first to refuse it
            try:
                check_identity(from_file)
            except (ConfigError, privatefiles.PrivateFileError) as exc:
                next_start_error = str(exc)
        return PreparedReload(
            from_file=from_file,
            ctx=client_context(files.cert, files.key, files.ca, alpn=ALPN_DEVICE),
            session_ctx=session_client_context(
                files.cert, files.key, files.ca, site=self.identity.site
            ),
            revocation_check=RevocationCheck.from_files(files.cert, files.ca),
            not_after=not_after(files.cert),
            next_start_error=next_start_error,
            renewals=renewals,
        )

    def _apply_reload(self, prepared: PreparedReload) -> ReloadOutcome:
        """On the loop: swap in what `_prepare_reload` built, keep the link."""
        new, restart = keep_restart_only(self.config, prepared.from_file, RESTART_ONLY)
        self.next_start_error = prepared.next_start_error if "identity_dir" in restart else None
        old, self.config = self.config, new
        if self.renewals == prepared.renewals:  # else a renewal since, loading newer files
            self.ctx = self.kept.ctx = prepared.ctx  # the next dial; the link that is up stays
            self.not_after, self.expired = prepared.not_after, None
            self.session.ctx = prepared.session_ctx
            self.revocation_check = prepared.revocation_check
        self.kept.settings = new.limits
        self.session.settings = new.limits
        if new.reconnect != old.reconnect:
            self.kept.backoff = ExponentialBackoff.from_config(new.reconnect, rng=self.rng)
        if new.log_level != old.log_level:
            set_log_level(new.log_level)
        if new.local_access != old.local_access:
            self.accounts.access = new.local_access
            log.info("local_access is now %s (for new connections)", new.local_access)
        self.reloads.record(True)
        self.reload_error, self.restart_needed = None, tuple(restart)
        log_restart_needed(log, restart, self.next_start_error)
        log.info("reloaded configuration and certificates")
        return ReloadOutcome(True, self.restart_needed, None, self.next_start_error)

    def _refuse_reload(self, exc: Exception) -> ReloadOutcome:
        """The running configuration stays as it was (one error line, counted)."""
        self.reloads.record(False)
        self.reload_error = str(exc)
        log.error(
            "reload failed; keeping the running configuration and certificates",
            extra={"config": str(self.config.path), "error": str(exc)},
        )
        return ReloadOutcome(False, (), self.reload_error, None)

    def _grace_left(self, grace: float) -> float:
        """The drain's grace, counted once from its start, whichever part starts it."""
        now = asyncio.get_running_loop().time()
        if self._drain_deadline is None:
            self._drain_deadline = now + grace
            log.info("workstation draining", extra={"grace_s": grace})
        return max(0.0, self._drain_deadline - now)

    async def drain(self, grace: float, *servers: Draining | None) -> None:
        """Stop accepting anywhere, and drain the local servers (DICOM node, DICOMweb)
        within `grace` while the sealed session still carries their streams (a retrieval
        that resumes, a viewer's next request on its open association). run_workstation
        calls this before it stops those servers, which abort what is left; shutdown()
        then drains the port forwards in the rest of the same grace."""
        grace = self._grace_left(grace)
        await self.forwarder.stop_accepting()
        await asyncio.gather(*(s.drain(grace) for s in servers if s is not None))

    async def shutdown(self, grace: float) -> None:
        grace = self._grace_left(grace)
        if self._renewal_task is not None:
            self._renewal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal_task
            self._renewal_task = None
        for load in list(self._renewed_loads):  # their threads are abandoned (daemons)
            load.cancel()
        await asyncio.gather(*self._renewed_loads, return_exceptions=True)
        await self.forwarder.stop_accepting()
        self.session.stop()  # no new streams; those open finish inside the session
        await self.forwarder.drain(grace)
        await self.session.close()
        self.kept.goaway(ErrorCode.SHUTDOWN, "workstation shutting down")
        await self.kept.close()
        log.info("workstation stopped")


def cache_dir_problem(directory: Path, exc: OSError) -> str:
    """Why `cache.dir` cannot be used: the directory as configured (what the user wrote
    and can fix) and, when it differs, the file inside it that failed."""
    text = f"cannot use {directory}: {exc.strerror or type(exc).__name__}"
    if exc.filename is not None and Path(exc.filename) != directory:
        text += f" ({exc.filename})"
    return text


@contextlib.asynccontextmanager
async def workstation_cache(
    workstation: Workstation, endpoint: ControlServer | None = None
) -> AsyncIterator[WorkstationCache | None]:
    """The study cache (relay.workstation.cache) when the node is on and the cache enabled;
    its commands (`relay prefetch`, `relay cache ...`) join the control `endpoint`."""
    config = workstation.config
    settings = config.cache_settings()
    if (config.dicom is None and config.dicomweb is None) or not settings.enabled:
        yield None
        return
    from relay.workstation.cache.keys import KeyUnavailable
    from relay.workstation.cache.service import WorkstationCache

    try:
        cache = WorkstationCache(
            settings, config.prefetch, workstation.tunnel.open_stream,
            lambda: workstation.kept.up, account=config.keyring_account(workstation.identity),
            legacy_account=config.legacy_keyring_account(workstation.identity),
            offer=workstation.codec_offer,
        )  # fmt: skip
        await cache.start()
    except KeyUnavailable as exc:
        raise ConfigError(config.path, "cache.key", str(exc)) from None
    except OSError as exc:
        raise ConfigError(config.path, "cache.dir", cache_dir_problem(settings.dir, exc)) from None
    commands = cache.handlers()
    if endpoint is not None:
        endpoint.handlers.update(commands)
    workstation.cache = cache
    workstation.metrics.registry.register(cache.metrics)
    try:
        yield cache
    finally:
        if endpoint is not None:
            for name in commands:
                endpoint.handlers.pop(name, None)
        await cache.stop()


@contextlib.asynccontextmanager
async def dicom_node(
    config: WorkstationConfig,
    tunnel: Tunnel,
    metrics: EndMetrics | None = None,
    cache: WorkstationCache | None = None,
    offer: CodecOffer | None = None,
    *,
    accounts: AccountGate | None = None,
) -> AsyncIterator[DicomNode | None]:
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
        cache=cache.server if cache is not None else None,
        offer=offer,
        resume_window=dicom.resume_window,
        admit=functools.partial(accounts.admit, "dicom") if accounts is not None else None,
    )
    with listen_errors(config.path, "dicom.listen", dicom.listen):
        await node.start()
    try:
        yield node
    finally:
        await node.stop()


@contextlib.asynccontextmanager
async def dicomweb_server(
    config: WorkstationConfig,
    tunnel: Tunnel,
    metrics: EndMetrics | None = None,
    cache: WorkstationCache | None = None,
    offer: CodecOffer | None = None,
    *,
    accounts: AccountGate | None = None,
) -> AsyncIterator[DicomwebServer | None]:
    """The DICOMweb server (and the viewer) when `dicomweb:` is configured, else None."""
    if config.dicomweb is None:
        yield None
        return
    from relay.workstation.dicomweb import viewer_routes
    from relay.workstation.dicomweb.server import DicomwebServer

    web = config.dicomweb
    server = DicomwebServer(
        web, tunnel.open_stream, cache=cache.server if cache is not None else None,
        extra_routes=viewer_routes(web), offer=offer, accounts=accounts,
    )  # fmt: skip
    with listen_errors(config.path, "dicomweb.listen", web.listen):
        await server.start()
    if metrics is not None:
        metrics.registry.register(server.metrics)
    if cache is not None:
        cache.on_wiped.append(server.forget_cached)
    try:
        yield server
    finally:
        if cache is not None:
            cache.on_wiped.remove(server.forget_cached)
        if metrics is not None:
            metrics.registry.unregister(server.metrics)
        await server.stop()


async def run_workstation(
    config: WorkstationConfig,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[Workstation], None] | None = None,
    handle_signals: bool = True,
    with_dicom: bool = True,
) -> int:
    """Run until a stop signal, `relay workstation stop` (or `stop` is set), then drain
    within `drain_grace`; 0.

    SIGHUP (where it exists) and `relay workstation reload` reload while it runs. If the
    gateway says the device is revoked, stop the same way and return EXIT_REVOKED.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    workstation = Workstation(config)
    at = workstation.revoked_at_start()
    if at is not None:  # before listening or dialling: the gateway would only say it again
        log.error(REVOKED_AT_START.format(at=at))
        return EXIT_REVOKED
    async with contextlib.AsyncExitStack() as stack:
        if handle_signals:
            stack.enter_context(
                handling_signals(loop, stop=stop.set, reload=workstation.reloader.request)
            )
        # First, so that a second workstation on the same state directory stops here.
        endpoint = await stack.enter_async_context(control_endpoint(workstation, stop.set))
        # The drain grace as last reloaded, read when the drain starts.
        stack.push_async_callback(lambda: workstation.shutdown(workstation.config.drain_grace))
        await workstation.start()
        if with_dicom:
            cache = await stack.enter_async_context(workstation_cache(workstation, endpoint))
            paths = (workstation.tunnel, workstation.metrics, cache, workstation.codec_offer)
            accounts = workstation.accounts
            node = await stack.enter_async_context(dicom_node(config, *paths, accounts=accounts))
            web = await stack.enter_async_context(
                dicomweb_server(config, *paths, accounts=accounts)
            )
            # Exits run last first: this drain comes before the node and the server stop
            # (they abort what is left) and before shutdown stops the sealed session.
            stack.push_async_callback(
                lambda: workstation.drain(workstation.config.drain_grace, node, web)
            )
        if config.metrics_listen is not None:
            admin = AdminServer(
                config.metrics_listen, workstation.metrics.registry, workstation.readiness
            )
            with listen_errors(config.path, "metrics_listen", config.metrics_listen):
                await admin.start()
            stack.push_async_callback(admin.stop)
        # First out: a prepare under way is abandoned (it must not hold the stop) and a
        # `relay workstation reload` waiting for it is answered.
        stack.callback(workstation.reloader.close)
        log.info("workstation started", extra={"gateway": str(config.gateway)})
        if started is not None:
            started(workstation)
        await _first(stop.wait(), workstation.revoked.wait())
        await workstation.revocation_done()  # before anything stops: the wipe completes
    return EXIT_REVOKED if workstation.revoked.is_set() else 0


async def _first(*waits: Coroutine[Any, Any, object]) -> None:
    """Return when the first of `waits` does; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(config_path: Path) -> int:
    """`relay workstation --config FILE`: load, log JSON, run (uvloop where it exists).

    Exit status 0 after a drain, EXIT_REVOKED once the device is revoked.
    """
    config = load_workstation_config(config_path)
    setup_logging("workstation", config.log_level)
    return run_loop(run_workstation(config))
