"""What the agent does with a stream the gateway opens towards it: dispatch by `target`.

- ``tcp:<service>``: connect to that service of the `services:` allow-list and splice
  (compressing our direction iff the service says `compress: true` and the opener
  offered zstd, see relay.net.compression). An unknown service is reset with FORBIDDEN, a failed
  connect with CONNECT_FAILED.
- any other target (``dicom``...): the handler registered under that name, if any; no
  handler means FORBIDDEN. Handlers are plain coroutines taking the stream, so the DICOM
  code plugs in without this module knowing it. A handler the drain cuts short resets
  its stream with SHUTDOWN (the workstation resumes a retrieval elsewhere or once the
  agent is back); one that returns leaving the stream open, with CANCEL.

Streams arrive here from inside a device's sealed session (relay.agent.sessions); the
device's identity, from the session's inner certificate, is logged with the outcome,
never any payload.

What a stream costs here is bounded per device (its identity URI, over all its sessions
and gateways): `tcp:` streams (a socket and a task each) by MAX_DEVICE_TCP_STREAMS, and
`dicom` streams (a thread and a PACS association each) by a per-device share of the
site's `pacs.max_operations`, which also bounds them for all devices together, so that
the PACS's own association limit is not met by the sum. A stream over a cap is reset at
once with LIMIT_EXCEEDED and counted; its count is given back when its task ends,
however it ends (see `Quota`, `stream_quotas`). A `dicom` stream counts against the
all-devices cap only once its handler has read the whole request (`admit_request`): a
device trickling its requests holds its own share, never the site's PACS slots.

The caps bound what a device holds, not how fast it churns: a device closing each stream
as soon as it is open would make the agent open thousands of connections a second into
the hospital's services (or queries at the PACS, each an audit event). So each device
also has a token bucket for the streams we would serve (STREAM_OPEN_BURST at once, then
STREAM_OPEN_RATE a second); over it a stream is reset with LIMIT_EXCEEDED and counted
(`<kind>_rate`). Refused streams (unknown targets) cost nothing to speak of and spend no
token. The per-stream INFO lines ("stream open", "stream closed") are limited per device
too, by their own budget (STREAM_LOG_BURST, STREAM_LOG_RATE), so a churning device fills
neither the log nor the refusal warnings' budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from relay.agent.config import DEFAULT_PACS_OPERATIONS, ServiceConfig
from relay.net.aio import Stream
from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.compression import CodecStats, CodecStream, offers_zstd
from relay.net.tcpsplice import SpliceStats, abort_socket, splice, tune_socket
from relay.ops.loglimit import LogLimiter
from relay.ops.ratelimit import RateLimiter
from relay.ops.tasks import drain_tasks
from relay.proto import ErrorCode
from relay.seal.transport import sealed_peer
from relay.wire import HEADER_TARGET, TARGET_DICOM, TCP_TARGET_PREFIX

__all__ = [
    "CONNECT_TIMEOUT",
    "HEADER_TARGET",
    "MAX_CONNECTS",
    "MAX_DEVICE_CONNECTS",
    "MAX_DEVICE_PACS_OPERATIONS",
    "MAX_DEVICE_TCP_STREAMS",
    "QUIET_DEVICE_RESERVE",
    "QUOTA_TCP",
    "STREAM_LOG_BURST",
    "STREAM_LOG_RATE",
    "STREAM_OPEN_BURST",
    "STREAM_OPEN_RATE",
    "TCP_TARGET_PREFIX",
    "ConnectSlots",
    "DispatchStats",
    "Quota",
    "QuotaUsage",
    "StreamDispatcher",
    "TargetHandler",
    "admit_request",
    "stream_quotas",
]

log = logging.getLogger(__name__)

MAX_CONNECTS: Final = 64  # TCP connects to services in progress at once
CONNECT_TIMEOUT: Final = 10.0  # waiting for a connect slot plus the connect itself
MAX_DEVICE_CONNECTS: Final = MAX_CONNECTS // 4
"""Of the MAX_CONNECTS, those one device may have in progress at once (16); its others
wait their turn, within CONNECT_TIMEOUT. A device opening streams to a service whose
connects hang (a host that drops SYNs) held every slot for CONNECT_TIMEOUT, again and
again within its stream rate, and every other device's forwards waited and failed. A
browser opening many forwarded connections at once still gets them all: a connect to a
live service takes milliseconds."""
_MAX_LOGGED = 256  # header values are logged truncated

QUOTA_TCP: Final = "tcp"
"""The quota of every `tcp:<service>` stream (handler targets have their own, by name)."""
MAX_DEVICE_TCP_STREAMS: Final = 256
"""`tcp:` streams one device may have served at once (connecting or spliced), over all its
sessions and gateways. Each holds a socket to the service and a task here. It is the
workstation's own cap on forwarded connections, all ports together
(relay.workstation.forward.MAX_CONNECTIONS): an honest workstation never meets it."""
MAX_DEVICE_PACS_OPERATIONS: Final = 32
"""`dicom` streams one device may have served at once (each a thread and, once its request
is read, a PACS association). A workstation's peak: its DICOM node's 8 associations
(relay.dicom.node) plus the browser viewer's 8 series retrievals
(relay.workstation.dicomweb.retrieve.MAX_FLIGHTS) and their single-instance jumps, with
prefetch and queries beside them. Never more than half of `pacs.max_operations`
(`stream_quotas`), so one device cannot take every PACS slot of the site."""

QUIET_DEVICE_RESERVE: Final = 4
"""A device holding any of a quota's total (`pacs.max_operations`) may not take its last
1 / QUIET_DEVICE_RESERVE (16 of 64): a device holding none finds one there however the
others fill the rest. Each device's share (half) alone let two devices hold every PACS
slot for as long as their operations lasted; now two take at most three quarters, and
each device of the reserve one slot of it (as the gateway's QUIET_SOURCE_RESERVE for
handshakes)."""

STREAM_OPEN_BURST: Final = MAX_DEVICE_TCP_STREAMS + 2 * MAX_DEVICE_PACS_OPERATIONS
"""Streams one device may have admitted at once before its rate applies (320): both of its
caps filled together (a browser opening the workstation's 256 forwarded connections at
once while the viewer holds its 32 DICOM operations), and the DICOM ones turned over once
more (the C-FINDs of a study being opened end in milliseconds and are followed by the
next). An honest workstation cannot hold more than 288 at once, so a burst of those is
never refused."""
STREAM_OPEN_RATE: Final = 50.0
"""Streams per second one device may open after the burst (3,000 a minute). A workstation
opens streams as a person works: a C-FIND per query, a C-GET per series (at most 8 series
and 16 single-instance jumps in flight, each lasting seconds), prefetch one study at a
time, forwarded connections that a browser keeps alive. Bursts beyond that are what the
bucket's depth is for. A device churning streams gets 50 connections or queries a
second, where it had as many as the loop could open (2,500 a second in a test)."""
STREAM_LOG_BURST: Final = 100
"""Per-stream INFO lines ("stream open", "stream closed") one device may write at once."""
STREAM_LOG_RATE: Final = 1.0
"""...and per second after that; the next line let through says how many were held back
(`suppressed`). The stream counters in the metrics count every stream."""

TargetHandler = Callable[[Stream], Awaitable[object]]


@dataclass
class DispatchStats:
    """Plain counters for the metrics layer. Keys are bounded: service names from the
    config, registered handler names, and a fixed set of outcomes."""

    streams: Counter[str] = field(default_factory=Counter)  # by target: tcp:<name>, dicom
    refused: Counter[str] = field(default_factory=Counter)  # by reason
    outcomes: Counter[str] = field(default_factory=Counter)  # splice results
    tcp_bytes_in: int = 0  # from services towards devices
    tcp_bytes_out: int = 0  # from devices towards services
    codec: CodecStats = field(default_factory=CodecStats)  # raw and compressed bytes


@dataclass(frozen=True)
class Quota:
    """How many streams of one kind may be served at once: per device (its identity URI,
    over all its sessions and gateways) and, unless `total` is None, for all devices.

    `total_on_request`: a stream counts against `total` only once its handler calls
    `admit_request` (its request wholly read), not from its open: what the total guards
    (PACS associations) is taken only then, so a device sending its requests slowly
    holds its own share while it does, not the site's slots."""

    per_device: int
    total: int | None = None
    total_on_request: bool = False


def stream_quotas(pacs_operations: int = DEFAULT_PACS_OPERATIONS) -> dict[str, Quota]:
    """The agent's quotas for `pacs.max_operations` = `pacs_operations`: `tcp:` streams per
    device; `dicom` streams per device and in all. A device's share is at most half of
    the total (and MAX_DEVICE_PACS_OPERATIONS): one device never starves the others."""
    per_device = min(MAX_DEVICE_PACS_OPERATIONS, max(1, pacs_operations // 2))
    return {
        QUOTA_TCP: Quota(MAX_DEVICE_TCP_STREAMS),
        TARGET_DICOM: Quota(per_device, pacs_operations, total_on_request=True),
    }


_ADMISSION: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "stream_admission", default=None
)


def admit_request() -> bool:
    """For a handler, once it has read its stream's whole request and before it takes what
    its quota's total guards: count the stream against that total. False if the total is
    full: the stream is then reset with LIMIT_EXCEEDED and the refusal counted
    (`<kind>_total`), and the handler must give up. True outside a dispatcher's task, for
    a target without a total, and when called again."""
    admission = _ADMISSION.get()
    return True if admission is None else admission()


class QuotaUsage:
    """Streams being served under one quota, counted by device. Entries exist only while a
    device has a stream counted, so the table is bounded by the streams open.

    Of the total, the last 1 / QUIET_DEVICE_RESERVE is for devices holding none of it:
    a device's share alone (half) let two devices take every slot, for as long as their
    operations lasted (a retrieve whose answers a device reads slowly lasts)."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.total = 0
        self.by_device: Counter[str] = Counter()  # streams counted, total or not
        self.holding: Counter[str] = Counter()  # streams counted against the total

    def _total_refuses(self, device: str) -> bool:
        """Whether one more stream of `device` against the total is refused: the total is
        full, or `device` already holds some and only the quiet devices' reserve is left."""
        total = self.quota.total
        if total is None:
            return False
        reserve = total // QUIET_DEVICE_RESERVE if self.holding[device] else 0
        return self.total >= total - reserve

    def take(self, device: str) -> str | None:
        """Count one more stream of `device`: None if admitted, else which cap refused it
        ("per_device" or "total"); a refused stream is not counted. With
        `total_on_request` the total is left to `take_total`."""
        if self.by_device[device] >= self.quota.per_device:
            return "per_device"
        if self.quota.total_on_request:
            self.by_device[device] += 1
            return None
        if self._total_refuses(device):
            return "total"
        self.by_device[device] += 1
        self.holding[device] += 1
        self.total += 1
        return None

    def take_total(self, device: str) -> bool:
        """Count a stream of `device` that `take` admitted against the total
        (`total_on_request`): False, not counted, if refused (`_total_refuses`)."""
        if self._total_refuses(device):
            return False
        self.holding[device] += 1
        self.total += 1
        return True

    def give_back(self, device: str, *, total: bool = True) -> None:
        """The end of a stream that `take` admitted; `total`: whether it was counted
        against the total (always, unless `total_on_request`)."""
        if total:
            self.total -= 1
            self.holding[device] -= 1
            if self.holding[device] <= 0:
                del self.holding[device]
        self.by_device[device] -= 1
        if self.by_device[device] <= 0:
            del self.by_device[device]


class ConnectSlots:
    """Connects in progress per device, at most `per_device` each (the others wait). An
    entry lives while its device has a connect waiting or in progress, so the table is
    bounded by the `tcp:` streams being served."""

    def __init__(self, per_device: int) -> None:
        self.per_device = per_device
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    def __len__(self) -> int:
        return len(self._slots)

    @contextlib.asynccontextmanager
    async def slot(self, device: str) -> AsyncIterator[None]:
        """Hold one of `device`'s connect slots (waiting for one if need be)."""
        semaphore, users = self._slots.get(device, (None, 0))
        if semaphore is None:
            semaphore = asyncio.Semaphore(self.per_device)
        self._slots[device] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._slots[device]
            if users <= 1:
                del self._slots[device]
            else:
                self._slots[device] = (semaphore, users - 1)


class StreamDispatcher:
    """Serves incoming streams, one task each; `on_stream` is the links' callback."""

    def __init__(
        self,
        services: Mapping[str, ServiceConfig],
        *,
        handlers: Mapping[str, TargetHandler] | None = None,
        compression_level: int = 3,
        max_connects: int = MAX_CONNECTS,
        max_device_connects: int = MAX_DEVICE_CONNECTS,
        connect_timeout: float = CONNECT_TIMEOUT,
        quotas: Mapping[str, Quota] | None = None,
        open_burst: int = STREAM_OPEN_BURST,
        open_rate: float = STREAM_OPEN_RATE,
    ) -> None:
        """`quotas`: by QUOTA_TCP or a handler's target name (default `stream_quotas()`);
        a handler target without one is not counted. `open_burst`, `open_rate`: each
        device's bucket of streams to serve (every target we serve, quota or not)."""
        self.services = services
        self.handlers = dict(handlers or {})
        self.compression_level = compression_level
        self.connect_timeout = connect_timeout
        self.stats = DispatchStats()
        self.usage = {kind: QuotaUsage(q) for kind, q in (quotas or stream_quotas()).items()}
        self._connects = asyncio.Semaphore(max_connects)
        self.device_connects = ConnectSlots(max_device_connects)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.log_limit = LogLimiter()  # refusals and failed connects, per device
        # Keyed by the device's identity: enrolled devices, so the table's bound (the
        # least recently seen forgotten first) is never met by one device alone.
        self.open_limit = RateLimiter(open_rate, open_burst)
        # The per-stream INFO lines, per device: a budget of their own, so that a device
        # churning admitted streams does not silence the warnings about its refusals.
        self.stream_log_limit = LogLimiter(STREAM_LOG_RATE, STREAM_LOG_BURST)

    def set_open_limit(self, burst: int | None, rate: float | None) -> None:
        """Each device's bucket of streams (`per_device.stream_burst`, `stream_rate`; None:
        STREAM_OPEN_BURST, STREAM_OPEN_RATE), from now on; the buckets keep their tokens."""
        self.open_limit.burst = burst if burst is not None else STREAM_OPEN_BURST
        self.open_limit.rate = float(rate) if rate is not None else STREAM_OPEN_RATE

    def set_quotas(self, quotas: Mapping[str, Quota]) -> None:
        """New caps for new streams (a reload); the streams in flight stay counted."""
        for kind, quota in quotas.items():
            usage = self.usage.get(kind)
            if usage is None:
                self.usage[kind] = QuotaUsage(quota)
            else:
                usage.quota = quota

    @property
    def active(self) -> int:
        """Streams being served now."""
        return len(self._tasks)

    # -- the link callback

    def on_stream(self, stream: Stream) -> None:
        headers = stream.headers
        target = headers.get(HEADER_TARGET, "")
        peer = sealed_peer(stream)  # the inner certificate's identity (relay.seal)
        device = peer.uri if peer is not None else ""
        context: dict[str, object] = {
            "stream": stream.stream_id,
            "link": stream.link.name,
            "device": device,
            "target": target[:_MAX_LOGGED],
        }
        if self._closing:
            self._refuse(stream, ErrorCode.REFUSED_STREAM, "shutting_down", context)
            return
        if target.startswith(TCP_TARGET_PREFIX):
            service = self.services.get(target[len(TCP_TARGET_PREFIX) :])
            if service is None:
                self._refuse(stream, ErrorCode.FORBIDDEN, "unknown_service", context)
                return
            if self._admit(stream, QUOTA_TCP, device, context):
                serving = self._serve_tcp(stream, service, device, context)
                self._spawn(serving, stream, QUOTA_TCP, device)
            return
        handler = self.handlers.get(target)
        if handler is None:
            self._refuse(stream, ErrorCode.FORBIDDEN, "unknown_target", context)
            return
        if self._admit(stream, target, device, context):
            usage = self.usage.get(target)
            deferred = usage is not None and usage.quota.total_on_request
            counted = [not deferred]  # whether the stream holds a count of the total

            def admission() -> bool:
                if counted[0] or usage is None:
                    return True
                counted[0] = usage.take_total(device)
                if not counted[0]:
                    limit = usage.quota.total
                    self._refuse(
                        stream, ErrorCode.LIMIT_EXCEEDED, f"{target}_total",
                        {**context, "limit": limit},
                    )  # fmt: skip
                return counted[0]

            serving = self._serve_handler(handler, stream, context, admission)
            self._spawn(serving, stream, target, device, counted)

    def _admit(self, stream: Stream, kind: str, device: str, context: dict[str, object]) -> bool:
        """Spend one of the device's stream tokens, then count the stream under its quota,
        if `kind` has one; over either, refuse it now."""
        if not self.open_limit.allow(device, time.monotonic()):
            self._refuse(
                stream,
                ErrorCode.LIMIT_EXCEEDED,
                f"{kind}_rate",
                {**context, "limit": f"{self.open_limit.burst} at once, {self.open_limit.rate}/s"},
            )
            return False
        usage = self.usage.get(kind)
        if usage is None:
            return True
        over = usage.take(device)
        if over is None:
            return True
        limit = usage.quota.per_device if over == "per_device" else usage.quota.total
        self._refuse(
            stream, ErrorCode.LIMIT_EXCEEDED, f"{kind}_{over}", {**context, "limit": limit}
        )
        return False

    def _refuse(
        self, stream: Stream, code: ErrorCode, reason: str, context: dict[str, object]
    ) -> None:
        stream.reset(code)
        self.stats.refused[reason] += 1
        self._warn("stream refused", {**context, "reason": reason})

    def _warn(self, message: str, context: dict[str, object]) -> None:
        """A warning a device causes per stream, limited per device (relay.ops.loglimit)."""
        held = self.log_limit.allow(str(context.get("device", "")), time.monotonic())
        if held is not None:
            log.warning(message, extra={**context, "suppressed": held} if held else context)

    def _info(self, message: str, context: dict[str, object]) -> None:
        """A per-stream INFO line, limited per device by its own budget."""
        held = self.stream_log_limit.allow(str(context.get("device", "")), time.monotonic())
        if held is not None:
            log.info(message, extra={**context, "suppressed": held} if held else context)

    def _spawn(
        self,
        coro: Awaitable[None],
        stream: Stream,
        kind: str,
        device: str,
        counted: list[bool] | None = None,
    ) -> None:
        """`counted`: whether the stream holds a count of its quota's total (set by its
        admission; None: it does from its open)."""
        self.stats.streams[stream.headers.get(HEADER_TARGET, "")] += 1
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        usage = self.usage.get(kind)
        if usage is not None:
            # However the task ends (returns, raises, is cancelled before it ran), the
            # count is given back: the stream's reset or the link's loss end it too.
            task.add_done_callback(
                lambda _: usage.give_back(device, total=counted is None or counted[0])
            )

    # -- serving

    async def _serve_tcp(
        self, stream: Stream, service: ServiceConfig, device: str, context: dict[str, object]
    ) -> None:
        address = service.address
        try:
            async with (
                asyncio.timeout(self.connect_timeout),
                self.device_connects.slot(device),  # first: one device waits on its own
                self._connects,
            ):
                reader, writer = await asyncio.open_connection(address.host, address.port)
        except (OSError, TimeoutError) as exc:
            stream.reset(ErrorCode.CONNECT_FAILED)
            self.stats.refused["connect_failed"] += 1
            self._warn(
                "service connect failed",
                {**context, "service": service.name, "error": str(exc) or "timeout"},
            )
            return
        tune_socket(writer)
        app: ByteStream = stream
        if offers_zstd(stream.headers):
            codec = CodecStream(
                stream, service.compress, self.compression_level, stats=self.stats.codec
            )
            app = codec
            try:
                # Eagerly: the workstation learns from this byte whether the service
                # compresses, before the service says anything.
                await codec.send_marker()
            except StreamResetError:
                abort_socket(writer)
                writer.close()
                return
        self._info("stream open", {**context, "service": service.name})
        stats = SpliceStats()
        try:
            result = await splice(app, reader, writer, stats=stats)
        finally:
            self.stats.tcp_bytes_in += stats.tcp_to_stream
            self.stats.tcp_bytes_out += stats.stream_to_tcp
            stream.release()
        self.stats.outcomes[result.value] += 1
        self._info(
            "stream closed",
            {
                **context,
                "service": service.name,
                "outcome": result.value,
                "code": ErrorCode.name_of(stats.reset_code or 0),
                "bytes_to_device": stats.tcp_to_stream,
                "bytes_from_device": stats.stream_to_tcp,
            },
        )

    async def _serve_handler(
        self,
        handler: TargetHandler,
        stream: Stream,
        context: dict[str, object],
        admission: Callable[[], bool] | None = None,
    ) -> None:
        """`admission`: what the handler's `admit_request` calls (this task's context)."""
        _ADMISSION.set(admission)
        self._info("stream open", context)
        try:
            await handler(stream)
        except asyncio.CancelledError:
            # Only the drain (or the loop's end) cancels us: the agent is stopping, not
            # giving up on the request, so the workstation may resume it elsewhere or
            # once we are back. CANCEL is kept for a handler that gave up by itself.
            stream.reset(ErrorCode.SHUTDOWN if self._stopping() else ErrorCode.CANCEL)
            raise
        except Exception:
            log.exception("stream handler failed", extra=context)
            stream.reset(ErrorCode.INTERNAL_ERROR)
            self.stats.outcomes["handler_error"] += 1
            return
        finally:
            stream.release()
        if not stream.local_closed and stream.reset_code is None:
            stream.reset(ErrorCode.CANCEL)  # the handler left it open: do not leak it
        self.stats.outcomes["handled"] += 1
        self._info("stream closed", context)

    # -- shutdown

    def _stopping(self) -> bool:
        """Whether our own task was cancelled: the drain, or the loop ending."""
        task = asyncio.current_task()
        return self._closing or (task is not None and task.cancelling() > 0)

    async def drain(self, grace: float) -> int:
        """Refuse new streams, let the ones in flight finish within `grace` seconds, then
        cancel the rest (a handler's stream is reset with SHUTDOWN). Returns how many
        were cancelled."""
        self._closing = True
        return await drain_tasks(self._tasks, grace, "streams")

    async def close(self) -> None:
        """Cancel everything now."""
        with contextlib.suppress(Exception):
            await self.drain(0.0)
