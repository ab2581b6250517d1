"""The DICOMweb server's lifecycle: build the operations, listen on loopback, stop.

Started by relay.workstation.service when `dicomweb:` is configured. The listening
address was checked to be loopback at config load; here it is checked again (a guard
against embedding callers) and the Host check learns the real port (port 0 in tests).
Header lines and fields are bounded by aiohttp's parser (`HEADER_LIMITS`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Final

from aiohttp import web

from relay.dicom.codec import DicomLimits, MessageCodec
from relay.dicom.offer import CodecOffer
from relay.dicom.session import OpenStream
from relay.ops.admission import Admission, ConnectionLimits, Vet
from relay.ops.config import Address
from relay.ops.listening import announce
from relay.workstation.cache.serve import CacheServer
from relay.workstation.dicomweb.app import PREFIX, DicomwebService, ExtraRoutes, build_app
from relay.workstation.dicomweb.guard import allowed_hosts
from relay.workstation.dicomweb.headfirst import HeadFirst
from relay.workstation.dicomweb.metrics import DicomwebMetrics
from relay.workstation.dicomweb.retrieve import Retriever
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import DicomSource
from relay.workstation.localpeer import REFUSAL, AccountGate

__all__ = ["HEADER_LIMITS", "LIMITS", "MAX_CONNECTIONS", "DicomwebServer"]

log = logging.getLogger(__name__)

HEADER_LIMITS: Final = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 64}
# Open connections (idle keep-alive ones included): a browser holds at most 6 per host;
# past this a new connection gets a 503 and is closed, before any request is read.
MAX_CONNECTIONS: Final = 128
_BUSY_TEXT: Final = b"too many connections to this DICOMweb server\n"
_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT)
)
_FORBIDDEN_TEXT: Final = f"refused: {REFUSAL}\n".encode()
_FORBIDDEN: Final = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_FORBIDDEN_TEXT), _FORBIDDEN_TEXT)
)
# relay.ops.admission: the cap first (a 503, no account lookup spent on it), then
# `local_access`; 75 s from accept to a request head and between requests (browsers
# drop idle connections sooner: Firefox at 115 s, Chrome at 300 s, and reconnect).
LIMITS: Final = ConnectionLimits(MAX_CONNECTIONS, head_timeout=75.0, busy=_BUSY)


def _account_vet(gate: AccountGate) -> Vet:
    """`local_access` as relay.ops.admission's vetting: the lookup (in a thread) says
    whether the far end runs as our account, before a byte of it is read; another
    account's connection gets a 403 (counted by the gate, under "dicomweb"). None while
    anyone may connect (checked per connection: tests switch it on a running server)."""

    async def vet(peer: tuple[str, int], local: tuple[str, int]) -> bytes | None:
        if gate.anyone:
            return None
        ok = await asyncio.to_thread(gate.admit, "dicomweb", peer, local)
        return None if ok else _FORBIDDEN

    return vet


class DicomwebServer:
    """`start()` listens; `url` is the DICOMweb root once started; `stop()` closes."""

    def __init__(
        self,
        config: DicomwebConfig,
        open_stream: OpenStream,
        *,
        cache: CacheServer | None = None,
        extra_routes: Iterable[ExtraRoutes] = (),
        offer: CodecOffer | None = None,
        accounts: AccountGate | None = None,
    ) -> None:
        """`accounts`: who on this PC may connect (`local_access`); None: anyone."""
        if not config.listen.is_loopback:
            raise ValueError(f"dicomweb.listen must be a loopback address, got {config.listen}")
        self.config = config
        source = DicomSource(open_stream, MessageCodec(DicomLimits(), accept_pixels=True),
                             timeout=config.timeout, cache=cache, offer=offer)  # fmt: skip
        retriever = Retriever(source, cache, hold_size=config.hold_size)
        headfirst = HeadFirst(lambda: retriever.source)  # tests swap the retriever's source
        metrics = DicomwebMetrics(
            lambda: {
                "held_bytes": float(retriever.held),
                "retrievals_running": float(retriever.running()),
                "cache_writes_running": float(w.running() if (w := retriever.writer) else 0),
                "codestreams_held_bytes": float(self.service.codestreams.bytes),
                "cache_reads_held_bytes": float(retriever.reads.bytes),
                "connections_open": float(a.open if (a := self._admission) else 0),
            },
            lambda: {
                "series_retrievals": float(retriever.retrievals),
                "series_from_cache": float(retriever.from_cache),
                "cache_read_failures": float(retriever.cache_failures),
                "series_shared": float(retriever.shared),
                "instances_ahead": float(retriever.jumps),
                "instances_ahead_first": float(retriever.jumps_first),
                "series_written_to_cache": float(w.written if (w := retriever.writer) else 0),
                "cache_write_failures": float(w.failed if (w := retriever.writer) else 0),
                "frames_encoded_htj2k": float(self.service.frames_encoded),
                "frame_ranges": float(self.service.frame_ranges),
                "frame_ranges_refused": float(self.service.frame_ranges_refused),
                "codestream_hits": float(self.service.codestreams.hits),
                "series_headers_retrievals": float(headfirst.started),
                "series_metadata_from_headers": float(headfirst.answered),
                "series_headers_unused": float(headfirst.fell_back),
                "series_headers_complete": float(headfirst.completed),
                "connections_over_limit": float(a.over_cap if (a := self._admission) else 0),
                "connections_timed_out": float(a.timed_out if (a := self._admission) else 0),
            },
        )
        used = headfirst if config.headers_first else None
        self.service = DicomwebService(source, retriever, metrics, config.max_upload,
                                       headfirst=used, write_timeout=config.timeout)  # fmt: skip
        self.app = build_app(self.service, extra_routes)
        self._runner: web.AppRunner | None = None
        self.address: Address | None = None
        self.accounts = accounts or AccountGate()
        self.limits = LIMITS
        self._admission: Admission | None = None

    def forget_cached(self) -> None:
        """After `relay cache wipe`: no decrypted copy of a cached instance stays in this
        server's memory (the reads kept, the cached series' flights, the HTJ2K
        codestreams, which may come from cached series)."""
        self.service.retriever.forget_cached()
        self.service.codestreams.clear()

    @property
    def metrics(self) -> DicomwebMetrics:
        return self.service.metrics

    @property
    def url(self) -> str:
        assert self.address is not None
        return f"http://{self.address}{PREFIX}"

    async def start(self) -> None:
        # handler_cancellation: a client that goes away (the browser closed, a request
        # aborted) cancels its handler, which gives back its request slot and ends its
        # own upstream operation (a C-FIND's stream is reset); series flights are shared
        # tasks and go on. aiohttp's default left the handler running to its end.
        admission = Admission(self.app, self.limits, vet=_account_vet(self.accounts),
                              handler_cancellation=True,
                              **HEADER_LIMITS)  # type: ignore[arg-type]  # fmt: skip
        listen = self.config.listen
        host = "127.0.0.1" if listen.host.lower().rstrip(".") == "localhost" else listen.host
        await admission.start(host, listen.port)
        self._admission = admission
        runner = self._runner = admission.runner
        ports = {int(a[1]) for a in runner.addresses}
        port = next(iter(ports)) if ports else listen.port
        self.address = Address(host, port)
        self.service.allowed_hosts = allowed_hosts(ports or {listen.port})
        self.service.base_url = self.url
        announce("dicomweb", self.address)

    async def drain(self, grace: float) -> None:
        """Stop as a drain should: refuse new connections at once, let the requests under
        way finish within `grace` seconds (their retrievals keep running meanwhile), then
        stop, which cancels what is left. Idle keep-alive connections close at once."""
        runner = self._runner
        if runner is not None:
            for site in list(runner.sites):
                await site.stop()
            server = runner.server
            if server is not None:
                server.pre_shutdown()  # each connection closes once its response is sent
                await server.shutdown(max(0.0, grace))  # then cancels the handlers left
        await self.stop()

    async def stop(self) -> None:
        if self.service.headfirst is not None:
            await self.service.headfirst.close()
        await self.service.retriever.close()
        if self._admission is not None and self._runner is not None:
            await self._admission.stop()  # its counts stay readable
        self._runner = None
