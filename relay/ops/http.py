"""The internal HTTP listener of every role: /metrics, /healthz, /readyz (aiohttp).

It binds a separate, internal address (`metrics_listen`), never the public one. The
readiness callback may be a coroutine function (the agent asks its PACS, off the loop).
Its connections go through relay.ops.admission (`LIMITS`): the gateway's is in the DMZ,
and a scraper needs one connection, a probe one more, for a moment.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from relay.ops.admission import Admission, AdmissionMetrics, ConnectionLimits
from relay.ops.config import Address
from relay.ops.listening import announce

Readiness = tuple[bool, str]
ReadyCheck = Callable[[], Readiness | Awaitable[Readiness]]

#: Prometheus keeps one connection per scraper; probes open one per check and close it.
#: Past 8 open a new one is closed at once; a head (or an idle keep-alive gap) over 10 s
#: ends the connection (Prometheus's scrape_timeout is 10 s by default).
LIMITS: Final = ConnectionLimits(max_connections=8, head_timeout=10.0)


class AdminServer:
    def __init__(
        self,
        address: Address,
        registry: CollectorRegistry,
        ready: ReadyCheck,
        *,
        limits: ConnectionLimits = LIMITS,
    ) -> None:
        self.address = address
        self.registry = registry
        self.ready = ready
        self.limits = limits
        self.admission: Admission | None = None
        self._exported: AdmissionMetrics | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        admission = Admission(app, self.limits)
        bound = await admission.start(self.address.host, self.address.port)
        self.admission = admission
        self._exported = AdmissionMetrics("metrics", admission)
        self.registry.register(self._exported)
        self.port = bound[0].port if bound else self.address.port
        for address in bound:
            announce("metrics", address)

    async def stop(self) -> None:
        if self._exported is not None:
            self.registry.unregister(self._exported)
            self._exported = None
        if self.admission is not None:
            await self.admission.stop()
            self.admission = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        answer = self.ready()
        ok, why = await answer if inspect.isawaitable(answer) else answer
        return web.Response(status=200 if ok else 503, text=f"{why}\n")
