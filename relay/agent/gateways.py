"""The agent's links to its gateways: one supervised link per address that each gateway
name resolves to, kept in step with DNS.

The hospital opens no inbound port: the agent dials out. A gateway name may resolve to
several addresses (all A and AAAA records, e.g. the pods of a Kubernetes headless
Service); each gets a `KeptLink` (relay.net.dialer) that reconnects with backoff.
Re-resolving every `resolve_interval` adds links for new addresses and drains those of
vanished ones; a name that fails to resolve keeps its links (DNS trouble must not cut
working links).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from relay.net.aio import Link, Stream
from relay.net.backoff import ExponentialBackoff, Uniform
from relay.net.dialer import KeptLink
from relay.ops.config import Address, Backoff
from relay.proto import ErrorCode, LinkSettings
from relay.wire import ALPN_AGENT

__all__ = ["GatewayLinks", "Resolver", "resolve_all"]

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
RETIRE_POLL: Final = 0.1  # seconds between looks at a retiring link's open streams


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
    """One dialled address."""

    ip: str
    port: int


class GatewayLinks:
    """The set of gateway links, by address. Owns their supervisors and retirement."""

    def __init__(
        self,
        gateways: Sequence[Address],
        *,
        ctx: ssl.SSLContext,
        settings: LinkSettings,
        reconnect: Backoff,
        resolve_interval: float,
        drain_grace: float,
        on_stream: Callable[[Stream], None],
        on_up: Callable[[Link], None],
        resolver: Resolver = resolve_all,
        rng: Uniform | None = None,
    ) -> None:
        self.gateways = tuple(gateways)
        self.ctx = ctx
        self.settings = settings
        self.reconnect = reconnect
        self.resolve_interval = resolve_interval
        self.drain_grace = drain_grace
        self.resolver = resolver
        self.rng = rng
        self.links: dict[_Key, KeptLink] = {}
        self.resolutions = 0
        self.resolve_failures = 0
        self._on_stream = on_stream
        self._on_up = on_up
        self._resolve_retry = ExponentialBackoff(1.0, resolve_interval, rng=rng)
        self._resolve_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def up(self) -> int:
        return sum(1 for kept in self.links.values() if kept.up.is_set())

    @property
    def reconnects(self) -> int:
        return sum(kept.stats.reconnects for kept in self.links.values())

    def live_links(self) -> list[Link]:
        return [link for kept in list(self.links.values()) for link in list(kept.links)]

    async def start(self) -> None:
        """Resolve once (links start dialling at once), then keep re-resolving."""
        ok = await self.resolve()
        self._resolve_task = asyncio.get_running_loop().create_task(self._resolve_loop(ok))

    async def _resolve_loop(self, ok: bool) -> None:
        while True:
            if ok:
                self._resolve_retry.reset()
                delay = self.resolve_interval
            else:  # a name did not resolve: retry sooner, backing off up to the interval
                delay = max(self._resolve_retry.next_delay(), 0.5)
            await asyncio.sleep(delay)
            ok = await self.resolve()

    async def resolve(self) -> bool:
        """Look up every gateway name; add links for new addresses, retire vanished ones.

        Returns False if any name failed (its current links are kept).
        """
        self.resolutions += 1
        wanted: dict[_Key, str] = {}
        failed: set[Address] = set()
        for gateway in self.gateways:
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

    def reconfigure(
        self,
        *,
        gateways: Sequence[Address],
        ctx: ssl.SSLContext,
        settings: LinkSettings,
        reconnect: Backoff,
        resolve_interval: float,
        drain_grace: float,
    ) -> None:
        """A reload: new TLS and limits for each link's next dial; links that are up stay.
        A changed gateway list is resolved at once."""
        self.ctx, self.settings = ctx, settings
        for kept in self.links.values():
            kept.ctx = ctx
            kept.settings = settings
            if reconnect != self.reconnect:
                kept.backoff = ExponentialBackoff.from_config(reconnect, rng=self.rng)
        self.reconnect = reconnect
        self.resolve_interval = resolve_interval
        self.drain_grace = drain_grace
        if tuple(gateways) != self.gateways:
            self.gateways = tuple(gateways)
            self._restart_resolving()

    def _add(self, key: _Key, hostname: str) -> None:
        address = Address(key.ip, key.port)
        kept = KeptLink(
            address,
            self.ctx,
            self.settings,
            alpn=ALPN_AGENT,
            name=f"gateway {hostname}:{key.port} at {address}",
            backoff=ExponentialBackoff.from_config(self.reconnect, rng=self.rng),
            server_hostname=hostname,
            on_stream=self._on_stream,
            on_up=self._on_up,
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
            async with asyncio.timeout(self.drain_grace):
                while kept.open_streams:  # noqa: ASYNC110 - no event for "streams changed"
                    await asyncio.sleep(RETIRE_POLL)
        except TimeoutError:
            pass
        finally:
            await kept.close()

    def _restart_resolving(self) -> None:
        if self._resolve_task is None:  # not started, or shutting down
            return
        self._resolve_task.cancel()  # safe: resolve() changes nothing before its last await

        async def resolve_now() -> None:
            await self._resolve_loop(await self.resolve())

        self._resolve_task = asyncio.get_running_loop().create_task(resolve_now())

    async def stop_resolving(self) -> None:
        task, self._resolve_task = self._resolve_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def goaway(self, reason: str) -> None:
        for kept in self.links.values():
            kept.goaway(ErrorCode.SHUTDOWN, reason)

    async def close(self) -> None:
        """Close every link and every retiring one."""
        await asyncio.gather(*(kept.close() for kept in self.links.values()))
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
