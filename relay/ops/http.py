"""The internal HTTP listener of every role: /metrics, /healthz, /readyz (aiohttp).

It binds a separate, internal address (`metrics_listen`), never the public one. The
readiness callback may be a coroutine function (the agent asks its PACS, off the loop).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from relay.ops.config import Address
from relay.ops.listening import announce

Readiness = tuple[bool, str]
ReadyCheck = Callable[[], Readiness | Awaitable[Readiness]]


class AdminServer:
    def __init__(
        self,
        address: Address,
        registry: CollectorRegistry,
        ready: ReadyCheck,
    ) -> None:
        self.address = address
        self.registry = registry
        self.ready = ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address.host, self.address.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.address.port
        for sock in sockets:
            announce("metrics", sock.getsockname())

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        answer = self.ready()
        ok, why = await answer if inspect.isawaitable(answer) else answer
        return web.Response(status=200 if ok else 503, text=f"{why}\n")
