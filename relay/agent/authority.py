"""Everything the running agent does about device trust, behind one object.

`DeviceAuthority` owns the site CA (key and certificate), the registry, the audit log and
the certificate lifetime, and offers exactly what the agent's links need:

- `serve_enroll(stream)` / `serve_renew(stream)`: target handlers for `enroll` and
  `renew` streams (they also tell the gateway the enrollment result, for its metrics);
- `revocation_snapshot(signed=...)`: the "revoke" bodies to send first on every new
  gateway link, version 1, then version 2 to a gateway that takes it (blocking: it may
  sign many notices; the caller runs it in a worker thread);
- `poll_revocations()`: incremental "revoke" bodies for devices revoked since the last
  call (by `relay device revoke` in another process), to send on every link;
  both carry each device's notice signed with the site CA key (relay.agent.notices);
- `record_refusal(refusal, reporter=...)`: audit a link refusal reported by a gateway
  (relay.agent.linktrust decodes and rate-limits the reports);
- `touch(device_uri)`: the device's last-seen time, on each stream it opens;
- with a `directory:`, enrollment checks the code's user there, every audit event of a
  device names its user, and `run_directory_recheck()` revokes the devices of users who
  left (relay.agent.directory.recheck).

Time comes from `now` (a clock function) so tests can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.agent.audit import AUDIT_FILE, AuditLog, AuditSettings, AuditSink, Outcome
from relay.agent.config import AgentConfig
from relay.agent.directory import Directory
from relay.agent.directory.recheck import DirectoryMetrics, Recheck
from relay.agent.enrollment import EnrollOutcome, serve_enroll_stream
from relay.agent.notices import NoticeSigner
from relay.agent.registry import (
    REGISTRY_FILE,
    DeviceRegistry,
    RegistryError,
    RevocationWatcher,
    RevokeResult,
)
from relay.agent.renewal import RenewalPace, RenewOutcome, serve_renew_stream
from relay.agent.signer import Signer
from relay.agent.syslog import SyslogSender
from relay.agent.syslog import client_context as syslog_context
from relay.net.bytestream import ByteStream
from relay.ops.config import ConfigError
from relay.proto import LinkClosedError
from relay.seal.transport import sealed_peer
from relay.trust import pki
from relay.trust.identity import Identity, IdentityError, parse_spiffe_uri
from relay.trust.revocation import (
    KIND_ENROLL_RESULT,
    Refusal,
    encode_enroll_result,
    encode_revocations,
    enroll_result_for_gateway,
)
from relay.wire import HEADER_ENROLL_RESULTS

__all__ = ["DEFAULT_DEVICE_LIFETIME", "CaSiteError", "DeviceAuthority"]

log = logging.getLogger(__name__)

DEFAULT_DEVICE_LIFETIME: Final = pki.DEVICE_LIFETIME


def _utcnow() -> datetime:
    return datetime.now(dt.UTC)


class CaSiteError(pki.PkiError):
    """The `pki:` CA issues for another site than the agent's `site:` (so every gateway
    would refuse the certificates it signs)."""


def load_ca_pair(
    ca_cert: Path, ca_key: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA certificate and key from the agent's `pki:` section, checked to match."""
    cert = pki.load_cert(ca_cert)
    key = pki.load_key(ca_key)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    cert_key = cert.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or cert_key.public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise pki.PkiError(f"{ca_key} does not match {ca_cert}")
    return key, cert


class DeviceAuthority:
    """The agent's enrollment, renewal, revocation and audit duties for one site."""

    def __init__(
        self,
        *,
        site: str,
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        registry: DeviceRegistry,
        audit: AuditLog,
        lifetime: timedelta = DEFAULT_DEVICE_LIFETIME,
        now: Callable[[], datetime] = _utcnow,
        directory: Directory | None = None,
    ) -> None:
        self.site = site
        self.ca_key = ca_key
        self.ca_cert = ca_cert
        self.trust_domain = pki.trust_domain_of_ca(ca_cert)
        self.registry = registry
        self.audit = audit
        self.lifetime = lifetime
        self.now = now
        self.identity = Identity.agent(self.trust_domain, site)
        self.signer = Signer(registry, ca_key, ca_cert, site, lifetime, audit, now)
        self.notices = NoticeSigner(ca_key)
        self.renewal_pace = RenewalPace()  # each device's renewal in flight
        self._watcher = RevocationWatcher(registry)
        self._watcher.snapshot()  # poll_revocations() reports what changes from now on
        self.enrollments: dict[str, int] = {}  # result -> count, for the agent's metrics
        self.renewals: dict[str, int] = {}
        self.directory = directory
        self.recheck: Recheck | None = None
        if directory is not None:
            audit.user_of = self.user_of
            self.recheck = Recheck(
                directory,
                registry,
                audit,
                agent=self.identity.uri,
                device_uri=self._uri,
                now=now,
                on_revoked=self._watcher.note_local_change,
                metrics=DirectoryMetrics(),
            )

    @classmethod
    def open(
        cls,
        *,
        site: str,
        state_dir: Path,
        ca_cert: Path,
        ca_key: Path,
        lifetime: timedelta = DEFAULT_DEVICE_LIFETIME,
        audit_settings: AuditSettings | None = None,
        audit_sink: AuditSink | None = None,
        now: Callable[[], datetime] = _utcnow,
        directory: Directory | None = None,
    ) -> DeviceAuthority:
        """From the agent's config: `pki.ca_cert`, `pki.ca_key`, `state_dir` (created 0700).

        Raises pki.PkiError (CaSiteError for a CA of another site) or RegistryError with
        one line naming the file.
        """
        key, cert = load_ca_pair(ca_cert, ca_key)
        try:  # before anything is created or any code is spent
            pki.check_ca_site(cert, site, str(ca_cert))
        except pki.PkiError as exc:
            raise CaSiteError(str(exc)) from None
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create state_dir {state_dir}: {exc.strerror}") from None
        settings = audit_settings or AuditSettings()
        identity = Identity.agent(pki.trust_domain_of_ca(cert), site)
        audit = AuditLog(
            state_dir / AUDIT_FILE,
            source_id=identity.uri,
            site=site,
            max_bytes=settings.max_bytes,
            keep=settings.keep,
            max_devices=settings.max_devices,
            sink=audit_sink,
        )
        registry = DeviceRegistry(state_dir / REGISTRY_FILE, site=site)
        return cls(
            site=site,
            ca_key=key,
            ca_cert=cert,
            registry=registry,
            audit=audit,
            lifetime=lifetime,
            now=now,
            directory=directory,
        )

    def close(self) -> None:
        self.audit.close()  # aggregated refusals not written yet: now
        self.registry.close()
        if self.directory is not None:
            self.directory.close()

    # -- streams

    async def serve_enroll(self, stream: ByteStream) -> EnrollOutcome:
        """Target handler for `enroll`; reports the result to the gateway that carried it."""
        outcome = await serve_enroll_stream(stream, self.signer, directory=self.directory)
        self.enrollments[outcome.result] = self.enrollments.get(outcome.result, 0) + 1
        link = getattr(stream, "link", None)  # a relay.net.aio.Stream knows its link
        send = getattr(link, "send_control", None)
        if send is not None:
            with contextlib.suppress(LinkClosedError, ValueError):
                # An older gateway closes this link on a label it does not know.
                announced = stream.headers.get(HEADER_ENROLL_RESULTS)
                label = enroll_result_for_gateway(outcome.result, announced)
                send(KIND_ENROLL_RESULT, encode_enroll_result(label))
        return outcome

    async def serve_renew(self, stream: ByteStream) -> RenewOutcome:
        """Target handler for `renew`, inside a device's sealed session."""
        # The identity of the session's inner certificate, never a gateway's word.
        outcome = await serve_renew_stream(
            stream, self.signer, sealed_peer(stream), self.renewal_pace
        )
        self.renewals[outcome.result] = self.renewals.get(outcome.result, 0) + 1
        return outcome

    def touch(self, device_uri: str) -> None:
        """Last seen for a device (its session's inner certificate; throttled writes)."""
        try:
            identity = parse_spiffe_uri(device_uri)
        except IdentityError:
            return
        if identity.role != "device" or identity.site != self.site:
            return
        try:
            self.registry.touch(identity.name, self.now())
        except RegistryError as exc:
            log.warning("cannot record last seen", extra={"error": str(exc)})

    def user_of(self, device_uri: str) -> str | None:
        """The directory user of one of our devices (for audit events), or None."""
        try:
            identity = parse_spiffe_uri(device_uri)
        except IdentityError:
            return None
        if identity.role != "device" or identity.site != self.site:
            return None
        return self.registry.device_user(identity.name)

    async def run_directory_recheck(self) -> None:
        """The directory re-check on its schedule, until cancelled (nothing without one)."""
        if self.recheck is not None:
            await self.recheck.run()

    # -- revocation

    def _uri(self, name: str) -> str:
        return Identity.device(self.trust_domain, self.site, name).uri

    def revocation_snapshot(self, *, signed: bool = True) -> list[bytes]:
        """Bodies of a full "revoke" list: send them, in order, first on every new link.
        `signed`: version 2, with notices; else version 1 (ids only: what any gateway
        takes, and cheap: nothing to sign).

        Independent of poll_revocations(): a device revoked just before a link comes up
        is in this list and also in the next incremental push (harmless twice).
        """
        revocations = self.registry.revocations()
        if not signed:
            return encode_revocations([self._uri(name) for name in revocations], full=True)
        return self._bodies(revocations, full=True)

    def _bodies(self, revocations: dict[str, datetime], *, full: bool) -> list[bytes]:
        """ "revoke" bodies for these devices (name -> revocation time), with notices."""
        times = {self._uri(name): at for name, at in revocations.items()}
        return encode_revocations(times, full=full, notices=self.notices.notices(times))

    def poll_revocations(self) -> list[bytes]:
        """Bodies of an incremental "revoke" for devices revoked since the last call
        (empty if none); audits each as pushed. Cheap when nothing changed; signs the
        new ones' notices inline (a few, ~50 µs each)."""
        names = self._watcher.poll()
        if not names:
            return []
        at = self.now()
        for name in names:
            self.audit.revocation(
                now=at,
                device=self._uri(name),
                actor=self.identity.uri,
                description=f"revocation of {name} pushed to the gateways",
            )
        times = self.registry.revocations()
        return self._bodies({n: times[n] for n in names if n in times}, full=False)

    def revoke(self, name: str) -> list[bytes]:
        """Revoke in-process (an admin API of the agent); returns bodies to push."""
        self.registry.revoke(name, self.now())
        self._watcher.note_local_change()
        return self.poll_revocations()

    def revoke_by(self, name: str, actor: str) -> tuple[RevokeResult, list[bytes]]:
        """Revoke `name` for `actor` (an IT admin on the IT pages): audited with the actor,
        then the bodies to push at once. An already revoked device changes nothing."""
        at = self.now()
        result = self.registry.revoke(name, at)
        if result is RevokeResult.ALREADY:
            return result, []
        self.audit.revocation(now=at, device=self._uri(name), actor=actor)
        self._watcher.note_local_change()
        return result, self.poll_revocations()

    # -- refusals reported by gateways

    def record_refusal(self, refusal: Refusal, *, reporter: str, rate_limited: int = 0) -> None:
        """Audit a refusal reported by gateway `reporter`; `rate_limited` counts the earlier
        refusals from that gateway which the agent's limit kept out of the trail."""
        description = refusal.reason
        if refusal.suppressed:
            description += f" ({refusal.suppressed} similar refusals not reported)"
        if rate_limited:
            description += (
                f" ({rate_limited} earlier refusals from this gateway rate-limited,"
                " not audited one by one)"
            )
        self.audit.auth_refused(
            now=self.now(),
            identity=refusal.identity or None,
            peer=refusal.peer or None,
            reason=description,
            reporter=reporter,
            outcome=Outcome.MINOR_FAILURE,
        )

    async def run_revocation_push(
        self, send_all: Callable[[list[bytes]], None], interval: float = 0.5
    ) -> None:
        """Poll the registry every `interval` seconds and push new revocations with
        `send_all(bodies)` (which sends each body as a "revoke" control on every link).
        Runs until cancelled; registry errors are logged and retried. Polling runs
        inline: unchanged, it is one PRAGMA (microseconds)."""
        while True:
            try:
                bodies = self.poll_revocations()
            except RegistryError as exc:
                log.warning("revocation poll failed", extra={"error": str(exc)})
                bodies = []
            if bodies:
                send_all(bodies)
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def open_authority(config: AgentConfig) -> AsyncIterator[DeviceAuthority | None]:
    """The DeviceAuthority of `pki:` (None without it), with its optional syslog copy.

    A CA pair that does not load or match, a CA of another site, or a state_dir that
    cannot be used, is a ConfigError naming the file and key. Before it yields, the audit
    trail's refusal budget is read back in a worker thread (`AuditLog.recall_budget`).
    Closes the registry, then flushes syslog.
    """
    if config.pki is None:
        if config.directory is not None:
            log.warning("directory: is set but pki: is not; this agent enrolls no devices")
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
            directory=Directory(config.directory) if config.directory is not None else None,
        )
    except CaSiteError as exc:
        raise ConfigError(config.path, "pki.ca_cert", str(exc)) from None
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
            "directory": config.directory.url if config.directory is not None else "",
        },
    )
    try:
        # Off the loop, before any link or page can bring a refusal (`recall_budget`).
        await asyncio.to_thread(authority.audit.recall_budget, authority.now())
        yield authority
    finally:
        authority.close()
        if sender is not None:
            await sender.close()
