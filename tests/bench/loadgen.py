"""The load benchmark's device side: many device links in one process, DICOM at a rising rate.

Run as the `dicom-load` worker (tests/bench/workers.py). It opens `links` device links to
the gateway (one device certificate, each link a full mTLS handshake) and a sealed
session (issue 9) on each of the first `active` ones, sends one request per session, one
at a time (not measured), then for each aggregate rate in `rates` issues requests for
`step` seconds, open loop (one every 1/rate s, whether or not earlier ones finished),
from the active sessions in turn: C-ECHO and study-level C-FIND alternately, each one
relay stream in the relay/dicom/PROTOCOL-DICOM.md codec inside the session, as `relay
workstation` would send them. A request
counts as ok when its FINAL has status 0x0000 within `timeout` s; anything else is an
error. Latency is from opening the stream to the FINAL. Events: `step-start` and `step`
(rate, ok, errors, p50/p99 in ms). It stops after the first step that misses (errors
or p99 at or above `p99_limit_ms`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

from pydicom.dataset import Dataset

from relay import wire
from relay.dicom.codec import FinalResponse, MessageCodec, Request
from relay.dicom.rawds import encode_dataset
from relay.net.aio import Link, Stream
from relay.proto import LinkSettings
from relay.seal.policy import agent_check, session_client_context
from relay.seal.session import establish
from tests.bench.procs import HOST
from tests.bench.targets import SITE, TRUST_DOMAIN

EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
HEADERS: Final = {wire.HEADER_TARGET: wire.TARGET_DICOM, wire.HEADER_DICOM_VERSION: "1"}
_PREFIX: Final = 4


def _find_identifier() -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientID = ""
    ds.StudyDate = ""
    return encode_dataset(ds, EXPLICIT_LE)


async def _final_of(stream: Stream, codec: MessageCodec) -> FinalResponse:
    """Read messages until the FINAL."""
    buf = bytearray()
    while True:
        while len(buf) >= _PREFIX:
            length = int.from_bytes(buf[:_PREFIX], "big")
            if len(buf) < _PREFIX + length:
                break
            msg = codec.decode(bytes(buf[_PREFIX : _PREFIX + length]))
            del buf[: _PREFIX + length]
            if isinstance(msg, FinalResponse):
                return msg
        data = await stream.read()
        if not data:
            raise ConnectionError("stream ended before the FINAL")
        buf += data


class Load:
    def __init__(self, args: dict[str, Any]) -> None:
        self.codec = MessageCodec()
        self.requests = [
            self.codec.encode(Request(op="echo", calling_ae="BENCHLOAD")),
            self.codec.encode(
                Request(
                    op="find",
                    root="study",
                    transfer_syntax=EXPLICIT_LE,
                    dataset=_find_identifier(),
                    calling_ae="BENCHLOAD",
                )
            ),
        ]
        self.timeout = float(args.get("timeout", 10.0))
        self.latencies: list[float] = []
        self.errors = 0
        self.last_error = ""

    async def one(self, link: Link, n: int) -> None:
        started = time.monotonic()
        stream: Stream | None = None
        try:
            async with asyncio.timeout(self.timeout):
                stream = link.open_stream(HEADERS)
                await stream.write(self.requests[n % 2])
                final = await _final_of(stream, self.codec)
                await stream.write_eof()
            if final.status != 0:
                raise RuntimeError(f"status 0x{final.status:04x} {final.comment}")
            self.latencies.append(time.monotonic() - started)
        except Exception as exc:  # every failure is counted; the benchmark reports the last
            self.errors += 1
            self.last_error = repr(exc)[:200]
            if stream is not None:
                stream.reset()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_sessions(links: list[Link], args: dict[str, Any]) -> list[Link]:
    """A sealed session (issue 9) to the agent on each link, as `relay workstation` keeps
    one: requests travel inside it, and the gateway splices its ciphertext."""
    ctx = session_client_context(
        Path(args["device_cert"]), Path(args["device_key"]), Path(args["ca"])
    )
    gate = asyncio.Semaphore(32)

    async def one(link: Link) -> Link:
        async with gate:
            sealed = await establish(
                link.open_stream({wire.HEADER_TARGET: wire.TARGET_SESSION}),
                ctx,
                server_side=False,
                alpn=wire.ALPN_SESSION,
                check_peer=agent_check(TRUST_DOMAIN, SITE),
                settings=LinkSettings(),
                name="bench-session",
            )
            return sealed.link

    return list(await asyncio.gather(*(one(link) for link in links)))


async def run_steps(
    links: list[Link], args: dict[str, Any], emit: Any
) -> None:  # emit: tests.bench.workers.emit
    active = await open_sessions(links[: max(1, int(args["active"]))], args)
    emit("sessions", opened=len(active))
    step, limit = float(args["step"]), float(args["p99_limit_ms"])
    n = 0
    warm = Load(args)  # first associations, imports and caches: not measured
    for _ in range(len(active)):  # each session's first request comes before the steps
        await warm.one(active[n % len(active)], n)
        n += 1
    for rate in args["rates"]:
        load = Load(args)
        emit("step-start", rate=rate)
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        count = int(rate * step)
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(load.one(active[n % len(active)], n)))
            n += 1
        sent_in = time.monotonic() - start
        await asyncio.gather(*tasks)
        p99 = _percentile(load.latencies, 0.99) * 1000
        emit(
            "step",
            rate=rate,
            achieved=count / sent_in if sent_in > 0 else 0.0,
            ok=len(load.latencies),
            errors=load.errors,
            last_error=load.last_error,
            p50_ms=_percentile(load.latencies, 0.5) * 1000,
            p99_ms=p99,
        )
        if load.errors or not p99 < limit:
            break
    emit("done")


async def open_links(args: dict[str, Any], factory: Any, ctx: Any, count: int) -> list[Link]:
    """`count` device links (64 handshakes in flight), in the order they opened."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(64)
    links: list[Link] = []

    async def one() -> None:
        async with gate:
            _, link = await asyncio.wait_for(
                loop.create_connection(factory, HOST, args["port"], ssl=ctx, server_hostname=HOST),
                30.0,
            )
            links.append(link)

    await asyncio.gather(*(one() for _ in range(count)))
    return links
