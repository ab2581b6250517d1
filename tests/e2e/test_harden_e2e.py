"""Issue 10 end to end: one device cannot take the gateway down for the others.

Real processes from the CLI (`relay gateway`, `relay agent`, `relay workstation`) and the
embedded PACS; DCMTK's echoscu and findscu ask the honest workstation `ws1`. The
attackers are devices of the same site with valid certificates (clients in this test
process, in a thread of their own) that open sealed sessions and sit on them, an address that
opens connections and never starts TLS, and certificates whose site is not the site of
the CA that issued them.

The gateway runs with small caps so the test stays small: an agent link of 24 streams,
8 streams per device (the agent's own cap of sealed sessions per device is 8 too), 8 of
every agent link kept in reserve, 16 unfinished handshakes
per address.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest

from relay import wire
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.proto import ErrorCode, LinkSettings
from relay.seal.policy import agent_check, session_client_context
from relay.seal.session import SealedLink, establish
from relay.trust import pki
from relay.trust.identity import Identity
from tests.e2e.chain import RELAY, Proc
from tests.e2e.dicom_chain import HOST, LIMITS, DicomChain, PacsProcess, running_dicom_chain
from tests.interop.harness import dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
AGENT_STREAMS = 24
DEVICE_STREAMS = 8  # no more than the agent's own cap, sessions.MAX_DEVICE_SESSIONS
RESERVE = 8
SOURCE_HANDSHAKES = 16
DEVICE_LINKS = 4  # the default
FLOOD_SOURCE = "127.0.0.2"  # the flood comes from another loopback address than ws1


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    require_tools("echoscu", "findscu")
    server = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    yield server
    server.stop()


class HardenedChain(DicomChain):
    """The DICOM chain with small caps, and a second site CA (`north`) in the gateway's
    bundle."""

    def setup(self) -> HardenedChain:
        super().setup()
        pki.init_pki(self.tmp / "pki-north", "hospital.test", "north", [HOST])
        bundle = self.tmp / "bundle.crt"
        bundle.write_bytes(
            (self.tmp / "pki" / "ca.crt").read_bytes()
            + (self.tmp / "pki-north" / "ca.crt").read_bytes()
        )
        gateway = self.tmp / "gateway.yaml"
        gateway.write_text(
            gateway.read_text().replace("ca: pki/ca.crt", "ca: bundle.crt")
            + f"per_device: {{streams: {DEVICE_STREAMS}, agent_reserve: {RESERVE}}}\n"
            + f"per_source: {{handshakes: {SOURCE_HANDSHAKES}}}\n"
        )
        agent = self.tmp / "agent.yaml"
        capped = LIMITS.replace("}", f", max_streams: {AGENT_STREAMS}}}")
        agent.write_text(agent.read_text().replace(LIMITS, capped))
        return self

    def gateway_metric(self, name: str, labels: str) -> float:
        return self.metric("gateway", name, labels)

    def hits(self, limit: str) -> float:
        return self.gateway_metric("relay_limit_hits_total", f'limit="{limit}"')


@pytest.fixture(scope="module")
def chain(pacs: PacsProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedChain]:
    # Idle DICOM streams are dropped by the agent after pacs.timeout: longer than the test.
    c = HardenedChain(tmp_path_factory.mktemp("chain"), pacs.port, pacs_timeout="5m")
    with running_dicom_chain(c):
        yield c


def wait_for(predicate: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Poll a condition (bounded); the assertion is the condition itself."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.05)


def echo_and_find(chain: DicomChain, rounds: int) -> None:
    """The honest radiologist: C-ECHO and C-FIND, each must succeed every time."""
    for _ in range(rounds):
        assert dcmtk.echoscu(chain.node, timeout=TIMEOUT).ok
        found = dcmtk.findscu(chain.node, "STUDY", {"PatientID": ""}, timeout=TIMEOUT)
        assert len(found.values("PatientID")) == 2  # the demo's CT and MR studies


# --------------------------------------------------------------------------- greedy devices


class Greedy:
    """A device with a valid certificate that opens `count` sealed sessions with its agent
    and sits on them, in a thread with its own event loop; `held` (sessions established)
    and `refused` (outer streams reset with LIMIT_EXCEEDED) say what the gateway did."""

    def __init__(self, chain: DicomChain, name: str, count: int) -> None:
        out = chain.tmp / name
        pki.issue_device(chain.tmp / "pki", "main", name, out, timedelta(days=1))
        self.files = (out / "device.crt", out / "device.key", out / "ca.crt")
        self.port = chain.ports["gateway"]
        self.count = count
        self.streams: list[Stream] = []
        self.sessions: list[Link] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)

    def __enter__(self) -> Greedy:
        self._thread.start()
        assert self._opened.wait(30), "the greedy device never linked"
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def refused(self) -> int:
        return sum(s.reset_code == ErrorCode.LIMIT_EXCEEDED for s in list(self.streams))

    @property
    def held(self) -> int:
        return sum(not link.closed.done() for link in list(self.sessions))

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        link = await dial(self.files, self.port)
        ctx = session_client_context(*self.files)
        self.streams = [
            link.open_stream({"target": wire.TARGET_SESSION}) for _ in range(self.count)
        ]
        self._opened.set()
        sealed = await asyncio.gather(
            *(self._establish(stream, ctx) for stream in self.streams), return_exceptions=True
        )
        self.sessions = [s.link for s in sealed if isinstance(s, SealedLink)]
        await self._stop.wait()
        for session in self.sessions:
            session.abort()
        link.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(link.wait_closed(), 5)

    @staticmethod
    async def _establish(stream: Stream, ctx: ssl.SSLContext) -> SealedLink:
        return await establish(
            stream,
            ctx,
            server_side=False,
            alpn=wire.ALPN_SESSION,
            check_peer=agent_check("hospital.test", "main"),
            settings=LinkSettings(),
            name="greedy",
        )


async def dial(files: tuple[Path, Path, Path], port: int) -> Link:
    cert, key, ca = files
    ctx = tls.client_context(cert, key, ca, wire.ALPN_DEVICE)
    _, link = await asyncio.get_running_loop().create_connection(
        lambda: Link(client=True, settings=LinkSettings()),
        HOST,
        port,
        ssl=ctx,
        server_hostname=HOST,
    )
    return link


def test_links_over_the_device_cap_are_refused(chain: HardenedChain) -> None:
    out = chain.tmp / "many-links"
    pki.issue_device(chain.tmp / "pki", "main", "many-links", out, timedelta(days=1))
    files = (out / "device.crt", out / "device.key", out / "ca.crt")
    before = chain.hits("device_links")

    async def five_links() -> None:
        links = [await dial(files, chain.ports["gateway"]) for _ in range(DEVICE_LINKS + 1)]
        await asyncio.to_thread(
            wait_for, lambda: chain.hits("device_links") == before + 1, "the fifth refused"
        )
        closed = await asyncio.wait_for(links[-1].wait_closed(), TIMEOUT)
        assert closed is not None
        assert not any(link.closed.done() for link in links[:-1])
        for link in links:
            link.close()

    asyncio.run(five_links())
    assert chain.gateway_metric("relay_refusals_total", 'reason="device_links"') >= 1
    echo_and_find(chain, rounds=1)


def test_devices_at_their_caps_leave_the_others_working(chain: HardenedChain) -> None:
    """One device at its stream cap, another at its share of the agent link: ws1's C-ECHO
    and C-FIND succeed throughout, and each refusal is counted."""
    streams_before, share_before = chain.hits("device_streams"), chain.hits("agent_share")
    with Greedy(chain, "greedy1", 30) as first:
        # The device cap bites first: 8 held, 22 refused.
        wait_for(lambda: first.refused == 30 - DEVICE_STREAMS, "greedy1 refused over its cap")
        wait_for(lambda: first.held == DEVICE_STREAMS, "greedy1's sessions established")
        # greedy2 may take the agent link's free streams down to the reserve (ws1's
        # session holds one as well).
        open_now = chain.gateway_metric("relay_streams_open", 'site="main"')
        held = int(AGENT_STREAMS - open_now - RESERVE)
        assert held > 0
        with Greedy(chain, "greedy2", 30) as second:
            wait_for(lambda: second.refused == 30 - held, "greedy2 refused over its share")
            wait_for(lambda: second.held == held, "greedy2's sessions established")
            echo_and_find(chain, rounds=3)
            assert (first.held, second.held) == (DEVICE_STREAMS, held)
    assert chain.hits("device_streams") - streams_before == 30 - DEVICE_STREAMS
    assert chain.hits("agent_share") - share_before == 30 - held
    echo_and_find(chain, rounds=1)


# --------------------------------------------------------------------------- handshake flood


@contextlib.contextmanager
def silent_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections from FLOOD_SOURCE that never send a byte."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((FLOOD_SOURCE, 0))
            sock.connect((HOST, port))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_a_handshake_flood_from_one_address_leaves_devices_connecting(
    chain: HardenedChain,
) -> None:
    before = chain.hits("source_handshakes")
    chain.procs["ws1"].stop()
    with silent_connections(chain.ports["gateway"], 200):
        wait_for(
            lambda: chain.hits("source_handshakes") - before == 200 - SOURCE_HANDSHAKES,
            "the flood refused beyond its cap",
        )
        chain.procs["ws1"].start()  # a legitimate device connects during the flood
        chain.wait_ready()
        echo_and_find(chain, rounds=2)
    refusals = chain.gateway_metric("relay_refusals_total", 'reason="source_handshakes"')
    assert refusals >= 200 - SOURCE_HANDSHAKES


# --------------------------------------------------------------------------- the issuer's site


def workstation(chain: DicomChain, name: str, identity_dir: Path) -> Proc:
    """A `relay workstation` with another identity (no DICOM node)."""
    config = chain.tmp / f"{name}.yaml"
    config.write_text(
        f"gateway: {HOST}:{chain.ports['gateway']}\n"
        f"identity_dir: {identity_dir}\n"
        "reconnect: {initial: 0.1s, max: 1s}\n"
        "drain_grace: 1s\n" + LIMITS
    )
    return Proc(name, [*RELAY, "workstation", "--config", str(config)], chain.tmp / f"{name}.log")


def issue(ca_dir: Path, identity: Identity, out: Path, ca_for_gateway: Path) -> Path:
    """A device certificate signed by `ca_dir`'s CA whatever the identity's site says."""
    ca_key, ca_cert = pki.load_ca(ca_dir)
    key = pki.generate_key()
    cert = pki.issue_certificate(ca_key, ca_cert, key.public_key(), identity, timedelta(days=1))
    out.mkdir(parents=True, exist_ok=True)
    pki.write_key(out / "device.key", key)
    pki.write_cert(out / "device.crt", cert)
    # the gateway's CAs, and the issuer's (the workstation checks its own certificate
    # against ca.crt at start-up, as enrollment installs it, and needs a CA of its own
    # site there for its sealed session)
    issuer = (ca_dir / "ca.crt").read_bytes()
    gateway_ca = ca_for_gateway.read_bytes()
    (out / "ca.crt").write_bytes(gateway_ca + (b"" if issuer in gateway_ca else issuer))
    return out


def refused_in_log(chain: DicomChain, uri: str) -> bool:
    """The gateway logged a wrong_site refusal of `uri` (one JSON line with both)."""
    return any(
        '"reason":"wrong_site"' in line and f'"identity":"{uri}"' in line
        for line in chain.procs["gateway"].output().splitlines()
    )


def test_a_certificate_of_another_site_is_refused(chain: HardenedChain) -> None:
    """main's CA mints a device of site north, north's CA one of site main: both refused,
    while north's own device is linked (two site CAs of one trust domain in the bundle)."""
    cas = chain.tmp / "bundle.crt"  # main's and north's CAs, as the gateway holds them
    td = "hospital.test"
    forged = [
        issue(chain.tmp / "pki", Identity.device(td, "north", "x1"), chain.tmp / "x1", cas),
        issue(chain.tmp / "pki-north", Identity.device(td, "main", "x2"), chain.tmp / "x2", cas),
    ]
    own = issue(chain.tmp / "pki-north", Identity.device(td, "north", "n1"), chain.tmp / "n1", cas)
    before = chain.gateway_metric("relay_refusals_total", 'reason="wrong_site"')
    procs = [workstation(chain, p.name, p) for p in (*forged, own)]
    try:
        for proc in procs:
            proc.start()
        for uri in (
            "spiffe://hospital.test/device/north/x1",
            "spiffe://hospital.test/device/main/x2",
        ):
            # Each forged device retries; wait until each one's refusal is in the log.
            wait_for(partial(refused_in_log, chain, uri), f"{uri} refused as wrong_site")
        assert chain.gateway_metric("relay_refusals_total", 'reason="wrong_site"') >= before + 2
        wait_for(
            lambda: chain.gateway_metric("relay_links", 'role="device",site="north"') == 1,
            "north's own device linked",
        )
    finally:
        for proc in procs:
            proc.stop()
    echo_and_find(chain, rounds=1)
