"""Issue 5 end to end: metrics, health, drain, reload, privacy and high availability.

Real `relay gateway|agent|workstation` processes from the CLI over real TLS on 127.0.0.1
(tests/e2e/ops_chain.py); the test process plays the hospital's TCP services and the
user's client. Tests that need promtool or HAProxy are marked `interop` (skipped without
them locally, mandatory in CI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.trust import pki
from tests.e2e.ops_chain import (
    DRAIN_GRACE,
    SITE,
    WAIT,
    CertProbe,
    Node,
    Ops,
    SwitchProxy,
    Upload,
    echo_once,
    file_snapshot,
    haproxy_node,
    http_get,
    open_forward,
    peer_serial,
    scrape,
    serial_of,
    serving,
    status_of,
    until_echo_works,
    value,
    wait_for,
    written_files,
)
from tests.interop.harness import require_tools

MiB = 1 << 20
SLACK = 3.0  # seconds a drain may take beyond its grace period (process exit, logging)


@pytest.fixture
async def services() -> AsyncIterator[dict[str, tuple[int, bool]]]:
    async with serving() as ports:
        yield ports


@pytest.fixture
def ops(tmp_path: Path, services: dict[str, tuple[int, bool]]) -> Iterator[Ops]:
    topology = Ops(tmp_path, services)
    try:
        yield topology
    finally:
        topology.stop_all()


async def basic(
    ops: Ops, gateway_grace: float = DRAIN_GRACE, agent_grace: float = DRAIN_GRACE
) -> tuple[Node, ...]:
    """One gateway, one agent, one workstation, up and forwarding."""
    gw = ops.gateway(drain_grace=gateway_grace)
    ops.start(gw)  # first: the others dial the port it reports
    agent = ops.agent("agent", [gw.listen_port], drain_grace=agent_grace)
    ws = ops.workstation("ws", gw.listen_port)
    ops.start(agent, ws)
    await until_echo_works(ws, logs=ops.logs)
    return gw, agent, ws


async def has_status(port: int, path: str, status: int) -> bool:
    return await status_of(port, path) == status


async def metric(node: Node, name: str, **labels: str) -> float:
    return value(await scrape(node), name, **labels)


async def connect_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def no_reply(ws: Node, service: str, wait: float = 1.5) -> bytes:
    """A new connection through a forward: what came back within `wait` seconds."""
    reader, writer = await open_forward(ws, service)
    try:
        writer.write(b"a new stream during the drain")
        await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            return await asyncio.wait_for(reader.read(100), wait)
        return b""
    finally:
        writer.transport.abort()


async def hold_stream(ws: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An echo stream that stays open (a link that is dropped takes it along)."""
    reader, writer = await open_forward(ws, "echo")
    await round_trip(reader, writer, b"first")
    return reader, writer


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), 10) == data


def log_lines(node: Node, text: str) -> list[str]:
    return [line for line in node.output().splitlines() if text in line]


# --------------------------------------------------------------------------- metrics


@pytest.mark.interop
async def test_every_role_exports_metrics_that_move_and_pass_promtool(ops: Ops) -> None:
    require_tools("promtool")
    gw, agent, ws = await basic(ops)
    nodes = (gw, agent, ws)
    before = {n.name: await scrape(n) for n in nodes}
    packed = b"compressible text " * 50_000
    plain = os.urandom(300_000)
    assert await asyncio.wait_for(echo_once(ws, "zecho", packed), WAIT) == packed
    assert await asyncio.wait_for(echo_once(ws, "echo", plain), WAIT) == plain
    after = {n.name: await scrape(n) for n in nodes}

    def moved(node: Node, name: str, **labels: str) -> float:
        return value(after[node.name], name, **labels) - value(before[node.name], name, **labels)

    g = after[gw.name]
    assert value(g, "relay_links", role="agent", site=SITE) == 1
    assert value(g, "relay_links", role="device", site=SITE) == 1
    # Both requests rode the device's one sealed session: the gateway routed nothing new.
    assert value(g, "relay_streams_total", site=SITE, outcome="routed") == 1
    assert moved(gw, "relay_streams_total", site=SITE, outcome="routed") == 0
    assert moved(gw, "relay_bytes_total", direction="device_to_agent") >= len(plain)
    # The zecho payload crossed the gateway compressed: far less than its raw size.
    assert len(plain) <= moved(gw, "relay_bytes_total", direction="agent_to_device")
    assert (
        moved(gw, "relay_bytes_total", direction="agent_to_device") < len(plain) + len(packed) // 10
    )
    assert value(g, "relay_handshakes_total", result="ok") >= 2
    assert value(g, "relay_draining") == 0

    a = after[agent.name]
    assert value(a, "relay_links", role="gateway", site=SITE) == 1
    assert moved(agent, "relay_streams_total", target="tcp:zecho") == 1
    assert moved(agent, "relay_streams_total", target="tcp:echo") == 1
    raw = moved(agent, "relay_bytes_total", direction="sent", stage="raw")
    wire = moved(agent, "relay_bytes_total", direction="sent", stage="compressed")
    assert raw >= len(packed) + len(plain) > wire > len(plain)
    assert value(a, "relay_certificate_expiry_timestamp_seconds", role="agent") > time.time()

    for node, seal in ((agent, a), (ws, after[ws.name])):  # sealed sessions, both ends
        assert value(seal, "relay_sessions_open") == 1
        assert value(seal, "relay_session_handshakes_total", result="ok", reason="") >= 1
        inside = moved(node, "relay_sealed_bytes_total", direction="sent", stage="plain")
        on_wire = moved(node, "relay_sealed_bytes_total", direction="sent", stage="sealed")
        assert on_wire > inside > 0

    w = after[ws.name]
    assert value(w, "relay_links", role="gateway", site=SITE) == 1
    assert moved(ws, "relay_bytes_total", direction="received", stage="raw") >= len(packed)
    for node in nodes:
        assert "relay_reloads_total" in after[node.name]  # from 0: increase() sees a failure
        out = await asyncio.to_thread(
            subprocess.run,
            ["promtool", "check", "metrics"],
            input=after[node.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, f"{node.name}: {out.stdout}{out.stderr}"


# --------------------------------------------------------------------------- health


async def test_health_and_readiness_follow_the_gateway_links(ops: Ops) -> None:
    gw = ops.gateway(reserved=True)  # its port is known before it runs
    agent = ops.agent("agent", [gw.listen_port])
    ws = ops.workstation("ws", gw.listen_port)
    ops.start(agent, ws)  # nothing listens on the gateway's port yet
    for node in (agent, ws):
        await wait_for(
            f"{node.name} /healthz", lambda n=node: has_status(n.metrics_port, "/healthz", 200)
        )
    assert await http_get(agent.metrics_port, "/readyz") == (503, "no gateway link\n")
    status, why = await http_get(ws.metrics_port, "/readyz")
    assert status == 503 and why.startswith("no gateway link")

    ops.start(gw)
    await wait_for("gateway /healthz", lambda: has_status(gw.metrics_port, "/healthz", 200))
    assert await status_of(gw.metrics_port, "/readyz") == 200  # ready as soon as it listens
    for node in (agent, ws):
        await wait_for(
            f"{node.name} ready", lambda n=node: has_status(n.metrics_port, "/readyz", 200)
        )
    await until_echo_works(ws, logs=ops.logs)

    gw.stop(signal.SIGKILL)  # the links go: neither end is ready, both stay healthy
    for node in (agent, ws):
        await wait_for(
            f"{node.name} not ready", lambda n=node: has_status(n.metrics_port, "/readyz", 503)
        )
        assert await status_of(node.metrics_port, "/healthz") == 200


# --------------------------------------------------------------------------- drain


async def test_gateway_drain_finishes_the_transfer_refuses_new_streams_exits_0(ops: Ops) -> None:
    grace = 10.0
    gw, _, ws = await basic(ops, gateway_grace=grace)
    upload = Upload(ws, "sink", 200 * MiB, rate=30e6)  # about 7 s on the wire
    transfer = asyncio.create_task(upload.run())
    await wait_for("40 MiB in flight", lambda: upload.sent >= 40 * MiB or transfer.done())
    assert not transfer.done()
    routed = await metric(gw, "relay_streams_total", site=SITE, outcome="routed")

    gw.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await wait_for("gateway /readyz 503", lambda: has_status(gw.metrics_port, "/readyz", 503))
    assert await status_of(gw.metrics_port, "/healthz") == 200
    await wait_for("the listener closed", lambda: connect_refused(gw.listen_port), within=5)
    assert await no_reply(ws, "echo") == b""  # nothing new gets through while it drains
    text = await scrape(gw)
    assert not transfer.done(), "the checks above must run during the drain"
    assert value(text, "relay_draining") == 1
    assert value(text, "relay_streams_total", site=SITE, outcome="routed") == routed

    answer = await asyncio.wait_for(transfer, WAIT)
    assert answer == f"{upload.total} {upload.digest}"  # complete and intact
    code = await asyncio.to_thread(gw.wait_exit, grace + SLACK)
    assert code == 0
    assert time.monotonic() - signalled < grace + SLACK


async def test_agent_drain_finishes_the_transfer_and_exits_0(ops: Ops) -> None:
    grace = 10.0
    gw, agent, ws = await basic(ops, agent_grace=grace)
    upload = Upload(ws, "sink", 120 * MiB, rate=25e6)
    transfer = asyncio.create_task(upload.run())
    await wait_for("30 MiB in flight", lambda: upload.sent >= 30 * MiB or transfer.done())
    assert not transfer.done()
    served = await metric(agent, "relay_streams_total")
    no_route = await metric(gw, "relay_streams_total", site=SITE, outcome="no_route")

    agent.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await wait_for("agent /readyz 503", lambda: has_status(agent.metrics_port, "/readyz", 503))
    assert await no_reply(ws, "echo") == b""
    assert not transfer.done(), "the checks above must run during the drain"
    assert await metric(agent, "relay_streams_total") == served  # the agent took no new one
    assert await metric(gw, "relay_streams_total", site=SITE, outcome="no_route") > no_route

    answer = await asyncio.wait_for(transfer, WAIT)
    assert answer == f"{upload.total} {upload.digest}"
    code = await asyncio.to_thread(agent.wait_exit, grace + SLACK)
    assert code == 0
    assert time.monotonic() - signalled < grace + SLACK


# --------------------------------------------------------------------------- reload


async def test_gateway_reload_serves_the_new_certificate_and_keeps_links(
    ops: Ops, tmp_path: Path
) -> None:
    gw, agent, ws = await basic(ops)
    probe_id = ops.device("probe")
    old_serial = serial_of(ops.pki / "gateway.crt")
    assert await peer_serial(gw.listen_port, probe_id) == old_serial
    await wait_for(
        "the probe link gone",
        lambda: metric_is(gw, 1, "relay_links", role="device", site=SITE),
    )
    reader, writer = await hold_stream(ws)
    ws_reconnects = await metric(ws, "relay_reconnects_total")
    agent_reconnects = await metric(agent, "relay_reconnects_total")

    pki.issue_gateway(ops.pki, ["localhost", "127.0.0.1"], tmp_path / "renewed")
    new_serial = serial_of(tmp_path / "renewed" / "gateway.crt")
    assert new_serial != old_serial
    for name in ("gateway.key", "gateway.crt"):
        shutil.copy(tmp_path / "renewed" / name, ops.pki / name)
    gw.send_signal(signal.SIGHUP)
    await wait_for("reload ok", lambda: metric_is(gw, 1, "relay_reloads_total", result="ok"))

    text = await scrape(gw)
    assert value(text, "relay_links", role="device", site=SITE) == 1
    assert value(text, "relay_links", role="agent", site=SITE) == 1
    await round_trip(reader, writer, b"the same stream, after the reload")
    assert await metric(ws, "relay_reconnects_total") == ws_reconnects
    assert await metric(agent, "relay_reconnects_total") == agent_reconnects
    assert await peer_serial(gw.listen_port, probe_id) == new_serial

    # A broken certificate file: the reload fails and the running certificate stays.
    (ops.pki / "gateway.crt").write_text(
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"
    )
    gw.send_signal(signal.SIGHUP)
    await wait_for("reload error", lambda: metric_is(gw, 1, "relay_reloads_total", result="error"))
    assert await metric(gw, "relay_reloads_total", result="ok") == 1
    assert len(log_lines(gw, "reload failed")) == 1
    assert await peer_serial(gw.listen_port, probe_id) == new_serial
    await round_trip(reader, writer, b"still the same stream")
    writer.close()
    ws2 = ops.workstation("ws2", gw.listen_port)  # a new link after the failed reload
    ops.start(ws2)
    await until_echo_works(ws2, logs=ops.logs)
    assert await metric(ws, "relay_reconnects_total") == ws_reconnects


async def metric_is(node: Node, expected: float, name: str, **labels: str) -> bool:
    """For waits: False while the node's metrics listener is not up yet."""
    try:
        return await metric(node, name, **labels) == expected
    except (OSError, TimeoutError):
        return False


async def test_agent_reload_next_dial_presents_the_new_certificate_link_stays(
    ops: Ops, tmp_path: Path
) -> None:
    probe = CertProbe(ops.pki)  # a second "gateway" that records the agent's certificate
    await probe.start()
    try:
        gw, gw2 = ops.gateway(), ops.gateway("gw2")  # gw2: added to the agent's list later
        ops.start(gw, gw2)
        agent = ops.agent("agent", [gw.listen_port, probe.port], services=["echo"])
        ws = ops.workstation("ws", gw.listen_port)
        ops.start(agent, ws)
        await until_echo_works(ws, logs=ops.logs)
        old_serial = serial_of(ops.pki / "agent.crt")
        await wait_for("a dial to the probe", lambda: old_serial in probe.serials)
        reader, writer = await hold_stream(ws)
        reconnects = await metric(agent, "relay_reconnects_total")
        assert await echo_once(ws, "zecho", b"not served yet") == b""
        # (>= 1: a connection refused before our connect() returned is retried)
        assert await metric(agent, "relay_stream_refusals_total", reason="unknown_service") >= 1

        pki.issue_agent(ops.pki, SITE, tmp_path / "renewed")
        new_serial = serial_of(tmp_path / "renewed" / "agent.crt")
        for name in ("agent.key", "agent.crt"):
            shutil.copy(tmp_path / "renewed" / name, ops.pki / name)
        # Services and gateways may change on reload; the metrics listener may not.
        assert agent.config is not None
        gateways = [gw.listen_port, probe.port, gw2.listen_port]
        # (a changed metrics_listen is kept as it runs: it needs a restart)
        agent.config.write_text(ops.agent_config("agent", gateways, metrics="127.0.0.2:0"))
        agent.send_signal(signal.SIGHUP)
        await wait_for("reload ok", lambda: metric_is(agent, 1, "relay_reloads_total", result="ok"))
        await wait_for("a dial with the new certificate", lambda: new_serial in probe.serials)

        await round_trip(reader, writer, b"the link stayed up")
        assert await metric(agent, "relay_reconnects_total") == reconnects
        assert await metric(gw, "relay_links", role="agent", site=SITE) == 1
        await wait_for(
            "a link to the added gateway",
            lambda: metric_is(gw2, 1, "relay_links", role="agent", site=SITE),
        )
        assert await metric(agent, "relay_links", role="gateway", site=SITE) == 2
        assert await metric(agent, "relay_reconnects_total") == reconnects
        packed = b"now allowed " * 1000
        assert await asyncio.wait_for(echo_once(ws, "zecho", packed), WAIT) == packed
        [warning] = log_lines(agent, "need a restart")
        assert "metrics_listen" in warning

        # A key that does not load: the running identity and settings stay.
        (ops.pki / "agent.key").write_text("not a key\n")
        agent.send_signal(signal.SIGHUP)
        await wait_for(
            "reload error", lambda: metric_is(agent, 1, "relay_reloads_total", result="error")
        )
        assert len(log_lines(agent, "reload failed")) == 1
        seen = len(probe.serials)
        await wait_for("another dial", lambda: len(probe.serials) > seen)
        assert set(probe.serials[seen:]) == {new_serial}
        await round_trip(reader, writer, b"still up")
        assert await metric(agent, "relay_reconnects_total") == reconnects
        writer.close()
    finally:
        probe.close()


async def test_workstation_reload_next_dial_presents_the_new_certificate_link_stays(
    ops: Ops, tmp_path: Path
) -> None:
    gw = ops.gateway()
    ops.start(gw)
    agent = ops.agent("agent", [gw.listen_port])
    proxy = SwitchProxy(gw.listen_port)  # lets the test steer the workstation's next dial
    probe = CertProbe(ops.pki)
    await proxy.start()
    await probe.start()
    try:
        ws = ops.workstation("ws", proxy.port)
        ops.start(agent, ws)
        await until_echo_works(ws, logs=ops.logs)
        reader, writer = await hold_stream(ws)
        reconnects = await metric(ws, "relay_reconnects_total")
        identity = ops.device("ws")
        old_serial = serial_of(identity / "device.crt")

        pki.issue_device(ops.pki, SITE, "ws", tmp_path / "renewed")
        new_serial = serial_of(tmp_path / "renewed" / "device.crt")
        for name in ("device.key", "device.crt"):
            shutil.copy(tmp_path / "renewed" / name, identity / name)
        ws.send_signal(signal.SIGHUP)
        await wait_for("reload ok", lambda: metric_is(ws, 1, "relay_reloads_total", result="ok"))
        await round_trip(reader, writer, b"the link stayed up")
        assert await metric(ws, "relay_reconnects_total") == reconnects
        assert await metric(ws, "relay_links", role="gateway", site=SITE) == 1

        # The next dial presents the renewed certificate.
        proxy.target = probe.port
        proxy.cut()
        await wait_for("a dial to the probe", lambda: bool(probe.serials))
        assert set(probe.serials) == {new_serial} and old_serial not in probe.serials
        proxy.target = gw.listen_port
        await until_echo_works(ws, logs=ops.logs)

        # Another device's certificate is no reload: refused, the renewed one stays.
        pki.issue_device(ops.pki, SITE, "other", tmp_path / "other")
        for name in ("device.key", "device.crt"):
            shutil.copy(tmp_path / "other" / name, identity / name)
        ws.send_signal(signal.SIGHUP)
        await wait_for(
            "reload error", lambda: metric_is(ws, 1, "relay_reloads_total", result="error")
        )
        [error] = log_lines(ws, "reload failed")
        assert "/device/main/other" in error
        seen = len(probe.serials)
        proxy.target = probe.port
        proxy.cut()
        await wait_for("another dial", lambda: len(probe.serials) > seen)
        assert set(probe.serials[seen:]) == {new_serial}
        proxy.target = gw.listen_port
        await until_echo_works(ws, logs=ops.logs)
    finally:
        proxy.close()
        probe.close()


# --------------------------------------------------------------------------- privacy


async def test_a_canary_payload_never_reaches_the_gateways_output(ops: Ops, tmp_path: Path) -> None:
    cwd, tmpdir = tmp_path / "gw-cwd", tmp_path / "gw-tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    gw = ops.gateway(log_level="debug", cwd=cwd, env=env)  # the most it ever logs
    ops.start(gw)
    agent = ops.agent("agent", [gw.listen_port])
    ws = ops.workstation("ws", gw.listen_port)
    ops.start(agent, ws)
    await until_echo_works(ws, logs=ops.logs)
    before = file_snapshot(cwd), file_snapshot(tmpdir)

    canary = f"CANARY-{uuid.uuid4().hex}"
    payload = f"PatientName={canary}\n".encode() * 2000
    # Uncompressed: the gateway relays the canary as plain bytes inside the tunnel.
    assert await asyncio.wait_for(echo_once(ws, "echo", payload), WAIT) == payload
    assert await asyncio.wait_for(echo_once(ws, "zecho", payload), WAIT) == payload
    metrics_text = await scrape(gw)
    files = written_files(gw.pid)
    assert gw.stop() == 0
    logged = gw.output()

    forms = {canary, canary.encode().hex(), base64.b64encode(canary.encode()).decode()}
    assert '"level":"debug"' in logged  # debug logging was on: the test has teeth
    for form in forms:
        assert form not in logged
        assert form not in metrics_text
    assert set(files) <= {str(gw.log)}, files  # only the stdout/stderr the test gave it
    assert (file_snapshot(cwd), file_snapshot(tmpdir)) == before == ({}, {})


# --------------------------------------------------------------------------- HA


async def test_two_agents_share_a_site_and_one_dying_leaves_the_other(ops: Ops) -> None:
    gw = ops.gateway()
    ops.start(gw)
    agents = [ops.agent(f"agent{i}", [gw.listen_port]) for i in (1, 2)]
    ws = ops.workstation("ws", gw.listen_port)
    ops.start(*agents, ws)
    await wait_for(
        "both agents linked", lambda: metric_is(gw, 2, "relay_links", role="agent", site=SITE)
    )
    await until_echo_works(ws, logs=ops.logs)
    base = [await metric(a, "relay_streams_total", target="tcp:echo") for a in agents]

    held = [await hold_stream(ws) for _ in range(8)]
    for _, writer in held:
        writer.close()
    spread = [
        await metric(a, "relay_streams_total", target="tcp:echo") - b
        for a, b in zip(agents, base, strict=True)
    ]
    # One device, one sealed session: one agent serves all of its streams (sessions of
    # different devices spread over the agents: tests/gateway/test_router_spread.py).
    assert sorted(spread) == [0, 8], spread
    # The agent holding the session dies: the device opens a new one at the other.
    dead, alive = agents if spread[0] == 8 else agents[::-1]
    assert dead.stop(signal.SIGKILL) is not None
    await wait_for(
        "one agent link left", lambda: metric_is(gw, 1, "relay_links", role="agent", site=SITE)
    )
    survivor = await metric(alive, "relay_streams_total", target="tcp:echo")
    for i in range(5):
        payload = f"after the loss {i}".encode() * 100
        assert await asyncio.wait_for(echo_once(ws, "echo", payload), WAIT) == payload
    assert await metric(alive, "relay_streams_total", target="tcp:echo") == survivor + 5


@pytest.mark.interop
async def test_workstation_fails_over_through_haproxy_to_the_other_gateway(
    ops: Ops, tmp_path: Path
) -> None:
    require_tools("haproxy")
    gateways = [ops.gateway("gw1"), ops.gateway("gw2")]
    ops.start(*gateways)
    agent = ops.agent("agent", [g.listen_port for g in gateways])
    haproxy = ops.add(haproxy_node(tmp_path, gateways))
    front = haproxy.listen_port
    ws = ops.workstation("ws", front)
    ops.start(agent, haproxy)
    for g in gateways:
        await wait_for(
            f"the agent linked to {g.name}",
            lambda g=g: metric_is(g, 1, "relay_links", role="agent", site=SITE),
            logs=ops.logs,
        )
    await wait_for("haproxy listening", lambda: accepts(front), logs=ops.logs)
    ops.start(ws)
    await until_echo_works(ws, logs=ops.logs)
    on = [await metric(g, "relay_links", role="device", site=SITE) for g in gateways]
    assert sorted(on) == [0, 1]
    current, other = (gateways[0], gateways[1]) if on[0] else (gateways[1], gateways[0])
    reconnects = await metric(ws, "relay_reconnects_total")

    assert current.stop(signal.SIGKILL) is not None
    await until_echo_works(ws, logs=ops.logs)  # nobody touched the workstation
    assert await metric(other, "relay_links", role="device", site=SITE) == 1
    assert await metric(ws, "relay_reconnects_total") == reconnects + 1
    assert haproxy.running


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True
