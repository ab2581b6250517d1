"""The IT pages' listener: its own address on the agent's inside (`it_pages.listen`),
HTTPS with `it_pages.tls` (required off loopback), never anything on the gateway side.
Its connections, TLS handshakes included, go through relay.ops.admission (`LIMITS`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry

from relay.agent.authority import DeviceAuthority
from relay.agent.config import AgentConfig
from relay.agent.itpages.app import ItPages, ItPagesMetrics, allowed_hosts, make_app
from relay.agent.itpages.auth import (
    Authenticator,
    DirectoryAuthenticator,
    LocalAuthenticator,
    LoginLimiter,
)
from relay.agent.itpages.passwords import PasswordFileError, read_admins
from relay.agent.itpages.sessions import SessionStore
from relay.agent.itpages.settings import ItPagesSettings
from relay.net.tls import TlsConfigError, load_cert_and_key, tls_config_error
from relay.ops.admission import Admission, AdmissionMetrics, ConnectionLimits
from relay.ops.listening import announce

__all__ = ["LIMITS", "ItPagesServer", "admins_file_problem", "server_context"]

log = logging.getLogger(__name__)

#: How often the counts of rate-limited logins whose window ended are audited, when no
#: request comes to do it (every request does it too).
FLUSH_INTERVAL: Final = 60.0

#: A few IT staff, a browser holding up to 6 connections each: 32 open at once; past
#: that a new connection is closed at once (before its TLS handshake). 15 s from accept
#: to a request head, TLS handshake included, at most 15 s idle between requests, and 15 s
#: from a head to the end of its form (at most app.MAX_BODY bytes).
LIMITS: Final = ConnectionLimits(max_connections=32, head_timeout=15.0, body_timeout=15.0)


def server_context(settings: ItPagesSettings) -> ssl.SSLContext | None:
    """TLS 1.2+ with the configured certificate, or None for plain HTTP (loopback)."""
    if settings.cert is None or settings.key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert_and_key(ctx, settings.cert, settings.key)  # TlsConfigError: which file, why
    return ctx


def admins_file_problem(path: Path) -> str | None:
    """Why no one can log in with the admins file as it is now (None: someone can)."""
    if not path.exists():
        return f"{path} does not exist"
    try:
        admins = read_admins(path)
    except PasswordFileError as exc:
        return str(exc)
    return None if admins else f"{path} holds no admin"


def warn_if_no_admin(config_path: Path, path: Path) -> None:
    """One warning at start when no one could log in. Not a start-up error: the file is
    re-read at each login, so `relay it-admin passwd` fixes it without a restart (and
    the agent's devices, links and DICOM do not depend on the IT pages)."""
    problem = admins_file_problem(path)
    if problem is not None:
        log.warning(
            f"{config_path}: it_pages.admins_file: {problem}; no one can log in to the IT "
            f"pages until `relay it-admin passwd --file {path} --user NAME` writes an admin "
            "(no restart needed)"
        )


class ItPagesServer:
    """Built from the agent's config and its DeviceAuthority; `push` sends revocation
    bodies to every gateway link (the agent's LinkTrust.push)."""

    def __init__(
        self,
        config: AgentConfig,
        authority: DeviceAuthority,
        push: Callable[[list[bytes]], None],
        registry: CollectorRegistry | None,
        *,
        limits: ConnectionLimits = LIMITS,
    ) -> None:
        settings = config.it_pages
        assert settings is not None
        self.settings = settings
        try:
            self.ctx = server_context(settings)
        except TlsConfigError as exc:
            raise tls_config_error(exc, config.path, "it_pages.tls") from None
        authenticator: Authenticator
        if settings.admins_file is not None:
            warn_if_no_admin(config.path, settings.admins_file)
            authenticator = LocalAuthenticator(settings.admins_file)
        else:
            assert authority.directory is not None  # the config reader made sure
            authenticator = DirectoryAuthenticator(authority.directory)
        sessions = SessionStore(
            idle=settings.session_idle,
            max_age=settings.session_max,
            max_sessions=settings.max_sessions,
        )
        self.pages = ItPages(
            authority=authority,
            push=push,
            authenticator=authenticator,
            sessions=sessions,
            limiter=LoginLimiter(),
            gateway=settings.enroll_gateway or config.gateways[0],
            tls=self.ctx is not None,
            directory=authority.directory is not None,
            metrics=ItPagesMetrics(registry, sessions),
        )
        self.limits = limits
        self.registry = registry
        self.admission: Admission | None = None
        self._exported: AdmissionMetrics | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        admission = Admission(make_app(self.pages), self.limits, ssl_context=self.ctx)
        address = self.settings.listen
        bound = await admission.start(address.host, address.port)
        self.admission = admission
        if self.registry is not None:
            self._exported = AdmissionMetrics("it", admission)
            self.registry.register(self._exported)
        self.port = bound[0].port if bound else address.port
        self.pages.hosts = allowed_hosts(address, self.port, cert=self.settings.cert)
        for bound_address in bound:
            announce("it-pages", bound_address)
        self._flusher = asyncio.create_task(self._flush_refusals(), name="it-pages refusals")

    async def _flush_refusals(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.pages.flush_refusals()

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._exported is not None and self.registry is not None:
            self.registry.unregister(self._exported)
            self._exported = None
        if self.admission is not None:
            await self.admission.stop()
            self.admission = None
        self.pages.flush_refusals(everything=True)  # counts not audited yet: now
