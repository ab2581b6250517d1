"""A copy of the audit trail as RFC 5424 syslog over TLS (RFC 5425), for a SIEM.

Format (RFC 5424), one message per audit event:

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM{json}

PRI is facility 10 (authpriv, security/authorization messages) * 8 + a severity from
the event's outcome (success: notice; minor failure: warning; serious: error; major:
critical). MSGID is the event kind. Over TLS each message is framed by octet counting
(RFC 5425 section 4.3): "LEN SP MSG".

The sender never blocks the agent: events wait in a queue bounded in events (`queue`) and
in bytes (`MAX_QUEUED_BYTES`), and when it is full (the collector is away or slow, or a
flood of events) new events are dropped, counted, and said in one warning a minute.
A collector that cannot be reached or refuses (connect, TLS or write failures) is said
at once in one warning with the reason (never an event's content), and its recovery in
one info line: at most one such warning per FAILURE_LOG_INTERVAL, however it flaps, and
never one line per event. The counters are exported by `SyslogMetrics`
(`relay_syslog_*`).
The audit file is the record of reference; syslog is a best-effort copy: a message whose
write is known to have failed is sent again after reconnecting (so a collector may see
it twice), but syslog over TLS has no acknowledgements, so one written just as the
collector dies can be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.agent.audit import AuditEvent, Outcome
from relay.agent.audit.trail import device_of
from relay.net.backoff import ExponentialBackoff, Uniform
from relay.ops.config import Address

__all__ = [
    "DROP_LOG_INTERVAL",
    "FACILITY_AUTHPRIV",
    "FAILURE_LOG_INTERVAL",
    "MAX_MESSAGE_BYTES",
    "MAX_QUEUED_BYTES",
    "SyslogMetrics",
    "SyslogSender",
    "SyslogStats",
    "client_context",
    "format_rfc5424",
    "octet_frame",
    "severity_for",
]

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV: Final = 10
#: RFC 5425 receivers must accept 2 KiB and should accept 8 KiB; ours are usually < 2 KiB.
MAX_MESSAGE_BYTES: Final = 64 * 1024
#: Framed bytes queued for the collector, whatever the event count allows: the default
#: 1,000 events of the usual size fit eight times over, but a flood of events near
#: MAX_MESSAGE_BYTES (or a large `queue`: up to 1,000,000) would otherwise hold up to
#: `queue` times 64 KiB in the agent for a best-effort copy of the audit file.
MAX_QUEUED_BYTES: Final = 16 * 1024 * 1024
#: Events dropped because the queue is full are said in one warning line at most this
#: often (seconds), with how many; a dead collector must not fill the agent's own log.
DROP_LOG_INTERVAL: Final = 60.0
#: A collector that starts failing is said in one warning at most this often (seconds):
#: one that accepts and drops each connection must not write a warning per event.
FAILURE_LOG_INTERVAL: Final = 60.0
#: A connection the collector closes sooner than this after we opened it counts as a
#: failure (retried after the backoff), and only a send on an older one resets the
#: backoff: a collector that takes each connection and drops it (one that rejects our
#: frames, a proxy without its backend) must not have us handshake in a tight loop.
MIN_CONNECTION_LIFE: Final = 1.0
#: One device's DICOM events may fill at most this share of the queue (1/4): while the
#: collector is slow or away, one device's flood must not keep every other device's
#: events, and the security events, out of the SIEM. Security events have no share
#: of their own: only the queue's bounds hold them.
DEVICE_SHARE: Final = 4
_BOM: Final = b"\xef\xbb\xbf"
_PRINTUSASCII: Final = re.compile(r"[!-~]+")
_SEVERITY: Final = {
    Outcome.SUCCESS: 5,  # notice
    Outcome.MINOR_FAILURE: 4,  # warning
    Outcome.SERIOUS_FAILURE: 3,  # error
    Outcome.MAJOR_FAILURE: 2,  # critical
}


def severity_for(outcome: Outcome) -> int:
    return _SEVERITY.get(outcome, 5)


def _header_field(value: str | None, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII, at most `limit`, or NILVALUE '-'."""
    if not value:
        return "-"
    cleaned = "".join(c if "!" <= c <= "~" else "_" for c in value)[:limit]
    return cleaned if _PRINTUSASCII.fullmatch(cleaned) else "-"


def format_rfc5424(
    message: str,
    *,
    at: datetime,
    severity: int,
    facility: int = FACILITY_AUTHPRIV,
    hostname: str | None = None,
    app_name: str = "dmzrelay",
    procid: str | None = None,
    msgid: str | None = None,
) -> bytes:
    """One RFC 5424 message (no framing). MSG is UTF-8 with the BOM, as RFC 5424 asks."""
    if not 0 <= facility <= 23 or not 0 <= severity <= 7:
        raise ValueError("facility 0-23 and severity 0-7")
    if at.tzinfo is None:
        raise ValueError("timezone-aware time required")
    stamp = at.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = " ".join(
        (
            f"<{facility * 8 + severity}>1",
            stamp,
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(procid, 128),
            _header_field(msgid, 32),
            "-",  # STRUCTURED-DATA: none; the JSON is the message
        )
    )
    return header.encode("ascii") + b" " + _BOM + message.encode("utf-8")


def octet_frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting framing: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass
class SyslogStats:
    sent: int = 0
    dropped: int = 0  # queue full
    oversized: int = 0  # larger than max_message
    errors: int = 0  # connect or write failures


class SyslogSender:
    """Sends framed messages to one collector over TLS; an AuditSink for AuditLog.

    `emit()`/`submit()` must be called from the event loop's thread. Call `start()` in
    the loop, `close()` at shutdown (it flushes what it can within its timeout).
    """

    def __init__(
        self,
        address: Address,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        queue_size: int = 1000,
        max_message: int = MAX_MESSAGE_BYTES,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        connect_timeout: float = 10.0,
        write_timeout: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        rng: Uniform | None = None,
        hostname: str | None = None,
        app_name: str = "dmzrelay",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if queue_size < 1 or max_message < 64 or max_queued_bytes < max_message + 16:
            raise ValueError(
                "queue_size >= 1, max_message >= 64 and max_queued_bytes > max_message required"
            )
        self.address = address
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname if server_hostname is not None else address.host
        self.queue_size = queue_size
        self.max_message = max_message
        self.max_queued_bytes = max_queued_bytes
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.app_name = app_name
        self.procid = str(os.getpid())
        self.stats = SyslogStats()
        # (the device whose DICOM event it is, or None; the frame)
        self._queue: deque[tuple[str | None, bytes]] = deque()
        self._queued_bytes = 0
        self._per_device: dict[str, int] = {}  # events queued per device
        self.device_share = max(1, queue_size // DEVICE_SHARE)
        self._clock = clock
        self._connected_at = 0.0
        self._drop_logged_at: float | None = None
        self._drops_unlogged = 0
        self.failing = False  # the last connect or write failed, none succeeded since
        self._failure_said = False  # that failure was logged (its recovery will be)
        self._failure_logged_at: float | None = None
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()  # set whenever the queue becomes empty
        self._backoff = ExponentialBackoff(retry_initial, retry_max, rng=rng)
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._task: asyncio.Task[None] | None = None

    # -- producing

    def emit(self, event: AuditEvent, line: str) -> None:
        """AuditSink: format the event's JSON line and queue it."""
        message = format_rfc5424(
            line,
            at=event.at,
            severity=severity_for(event.outcome),
            hostname=self.hostname,
            app_name=self.app_name,
            procid=self.procid,
            msgid=event.kind,
        )
        self.submit(message, device=device_of(event))

    def submit(self, message: bytes, *, device: str | None = None) -> bool:
        """Queue one RFC 5424 message (`device`: whose DICOM event it is, held to its
        share of the queue); False (and counted) if dropped."""
        if len(message) > self.max_message:
            self.stats.oversized += 1
            return False
        frame = octet_frame(message)
        if (
            len(self._queue) >= self.queue_size
            or self._queued_bytes + len(frame) > self.max_queued_bytes
            or (device is not None and self._per_device.get(device, 0) >= self.device_share)
        ):
            self._dropped()
            return False
        self._queue.append((device, frame))
        self._queued_bytes += len(frame)
        if device is not None:
            self._per_device[device] = self._per_device.get(device, 0) + 1
        self._ready.set()
        return True

    def _sent(self) -> None:
        """The queue's first frame reached the collector: it leaves the queue."""
        device, frame = self._queue.popleft()
        self._queued_bytes -= len(frame)
        if device is not None:
            left = self._per_device.pop(device) - 1
            if left:
                self._per_device[device] = left

    def _dropped(self) -> None:
        """Count a dropped event; say so at once, then at most every DROP_LOG_INTERVAL."""
        self.stats.dropped += 1
        self._drops_unlogged += 1
        now = self._clock()
        last = self._drop_logged_at
        if last is not None and now - last < DROP_LOG_INTERVAL:
            return
        self._drop_logged_at = now
        count, self._drops_unlogged = self._drops_unlogged, 0
        log.warning(
            "syslog queue for %s full: %d audit event(s) not copied to syslog "
            "(%d dropped in all; the audit file has them)",
            self.address,
            count,
            self.stats.dropped,
        )

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Framed bytes waiting for the collector (at most max_queued_bytes)."""
        return self._queued_bytes

    # -- sending

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 - flush deadline
        """Try to flush within `timeout`, then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    if self._queue:
                        self._drained.clear()
                        await self._drained.wait()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._disconnect()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            if self._writer is not None and not self._alive():
                short = self._clock() - self._connected_at < MIN_CONNECTION_LIFE
                self._disconnect()  # the collector went away since the last write
                if short:
                    self._failed("the collector closed the connection")
                    await asyncio.sleep(self._backoff.next_delay())
                    continue
            if self._writer is None:
                try:
                    await self._connect()
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    self._failed(f"connect: {_reason(exc)}")
                    await asyncio.sleep(self._backoff.next_delay())
                    continue
            writer = self._writer
            assert writer is not None
            head = self._queue[0]
            frame = head[1]
            try:
                writer.write(frame)
                async with asyncio.timeout(self.write_timeout):
                    await writer.drain()
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self._failed(f"write: {_reason(exc)}")
                self._disconnect()
                await asyncio.sleep(self._backoff.next_delay())
                continue
            await asyncio.sleep(0)  # let a write error (EPIPE, reset) reach the protocol
            if not self._alive():
                # Written into a dead connection: send it again on the next one (a
                # collector may see a message twice, never miss one we know failed).
                self._failed("write: the collector closed the connection")
                self._disconnect()
                # Not at once: a collector that takes each connection and drops it would
                # have us reconnect in a tight loop.
                await asyncio.sleep(self._backoff.next_delay())
                continue
            if self._queue and self._queue[0] is head:
                self._sent()
            if self._clock() - self._connected_at >= MIN_CONNECTION_LIFE:
                self._backoff.reset()  # a connection that lasts, not just one that opens
            self.stats.sent += 1
            self._recovered()
            if not self._queue:
                self._drained.set()

    def _failed(self, reason: str) -> None:
        """Count a connect or write failure; say the first of a run of them in a warning,
        at most every FAILURE_LOG_INTERVAL (a later one of the run is said once the
        interval has passed, so a collector down for good is always said)."""
        self.stats.errors += 1
        self.failing = True
        if self._failure_said:
            return
        now = self._clock()
        last = self._failure_logged_at
        if last is not None and now - last < FAILURE_LOG_INTERVAL:
            return
        self._failure_logged_at = now
        self._failure_said = True
        log.warning(
            "syslog collector %s unreachable or refusing (%s): audit events wait in the "
            "queue and are retried (the audit file has them)",
            self.address,
            reason,
        )

    def _recovered(self) -> None:
        """A message reached the collector: say so once if its failure was said."""
        self.failing = False
        if self._failure_said:
            self._failure_said = False
            log.info("syslog collector %s reachable again: sending audit events", self.address)

    async def _connect(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.address.host,
                self.address.port,
                ssl=self.ssl_context,
                server_hostname=self.server_hostname,
            )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A collector sends nothing back (RFC 5425); the reader only tells us when the
        # connection is gone: the TLS transport's is_closing() does not (Python 3.11).
        self._reader = reader
        self._writer = writer
        self._connected_at = self._clock()

    def _alive(self) -> bool:
        writer, reader = self._writer, self._reader
        return (
            writer is not None
            and reader is not None
            and not writer.is_closing()
            and not reader.at_eof()
            and reader.exception() is None
        )

    def _disconnect(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
        self._writer = self._reader = None


def _reason(exc: BaseException) -> str:
    """Why a connect or write failed, for the log: the error, never what was being sent."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the system's
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's text for a refused connect names no cause
    return str(exc) or type(exc).__name__


class SyslogMetrics(Collector):
    """The sender's counters, read at scrape time: `relay_syslog_events_total{result}`
    (sent, dropped: queue full, oversized), `relay_syslog_errors_total` (connect or write
    failures), `relay_syslog_queued_events` / `relay_syslog_queued_bytes`, and
    `relay_syslog_up` (0 while the collector cannot be reached or refuses)."""

    def __init__(self, sender: SyslogSender) -> None:
        self.sender = sender

    def collect(self) -> Iterator[Metric]:
        sender, stats = self.sender, self.sender.stats
        events = CounterMetricFamily(
            "relay_syslog_events", "Audit events copied to syslog, by result", labels=["result"]
        )
        events.add_metric(["sent"], stats.sent)
        events.add_metric(["dropped"], stats.dropped)
        events.add_metric(["oversized"], stats.oversized)
        yield events
        yield CounterMetricFamily(
            "relay_syslog_errors",
            "Connect or write failures to the syslog collector",
            value=stats.errors,
        )
        yield GaugeMetricFamily(
            "relay_syslog_queued_events", "Audit events waiting for the collector", sender.queued
        )
        yield GaugeMetricFamily(
            "relay_syslog_queued_bytes",
            "Framed bytes waiting for the collector",
            sender.queued_bytes,
        )
        yield GaugeMetricFamily(
            "relay_syslog_up",
            "0 while the syslog collector cannot be reached or refuses, else 1",
            0 if sender.failing else 1,
        )


def client_context(
    ca: os.PathLike[str] | str,
    cert: os.PathLike[str] | str | None = None,
    key: os.PathLike[str] | str | None = None,
) -> ssl.SSLContext:
    """A TLS client context for the collector: verified against `ca`, TLS 1.2+.

    (A SIEM is not ours: it may not speak TLS 1.3, so 1.2 is allowed here.)
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx
