"""The agent's links (every address of every gateway, re-resolved) and its shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from relay.agent.config import AgentConfig
from relay.agent.dispatch import TargetHandler
from relay.agent.gateways import resolve_all
from relay.agent.service import Agent, run_agent
from relay.net.bytestream import StreamResetError
from relay.proto import ErrorCode, LinkClosedError
from tests.agent.test_dispatch import device_link, read_all
from tests.ends_helpers import (
    WAIT,
    agent_config,
    running_gateway,
    tcp_service,
    wait_until,
)
from tests.pki_helpers import HOST, SitePki, make_pki, run
from tests.session_helpers import sealed

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def agent_running(
    config: AgentConfig,
    *,
    resolver: object = None,
    handlers: Mapping[str, TargetHandler] | None = None,
) -> AsyncIterator[tuple[Agent, asyncio.Event, asyncio.Task[None]]]:
    stop = asyncio.Event()
    started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
    kwargs: dict[str, object] = {}
    if resolver is not None:
        kwargs["resolver"] = resolver
    task = asyncio.create_task(
        run_agent(
            config,
            stop=stop,
            handlers=handlers or {},
            started=started.set_result,
            handle_signals=False,
            **kwargs,  # type: ignore[arg-type]
        )
    )
    agent = await asyncio.wait_for(started, WAIT)
    try:
        yield agent, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@pytest.fixture
def pki(tmp_path: Path) -> SitePki:
    return make_pki(tmp_path / "pki")


async def test_resolve_all_gives_every_address() -> None:
    assert await resolve_all(HOST, 8443) == [HOST]
    assert HOST in await resolve_all("localhost", 8443)


async def test_one_link_to_each_gateway(pki: SitePki, tmp_path: Path) -> None:
    async with (
        running_gateway(pki, tmp_path) as gw1,
        running_gateway(pki, tmp_path) as gw2,
    ):
        config = agent_config(pki, tmp_path, [gw1.port, gw2.port], {})
        async with agent_running(config) as (agent, _, _):
            await wait_until(lambda: agent.gateways.up == 2)
            for server in (gw1.server, gw2.server):
                await wait_until(functools.partial(lambda s: len(s.links.agents) == 1, server))
                # routed once its revocation snapshot arrived
                await wait_until(functools.partial(lambda s: s.router.sites() == ["main"], server))


async def test_links_follow_dns(pki: SitePki, tmp_path: Path) -> None:
    """Addresses that appear get a link; addresses that vanish are drained and closed.

    "127.1" is another spelling of 127.0.0.1: a second address for the resolver without
    leaving 127.0.0.1.
    """
    answers: dict[str, list[str]] = {"localhost": [HOST]}
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        answer = answers[host]
        if not answer:
            raise OSError("name does not resolve")
        return answer

    async with running_gateway(pki, tmp_path) as gw:
        config = agent_config(pki, tmp_path, [gw.port], {}, gateway_host="localhost")
        async with agent_running(config, resolver=resolver) as (agent, _, _):
            await wait_until(lambda: agent.gateways.up == 1)
            (first,) = agent.gateways.links.values()
            assert first.server_hostname == "localhost"  # the certificate name is checked
            answers["localhost"] = [HOST, "127.1"]
            assert await agent.gateways.resolve()
            await wait_until(lambda: agent.gateways.up == 2)
            await wait_until(lambda: len(gw.server.links.agents) == 2)
            answers["localhost"] = ["127.1"]
            assert await agent.gateways.resolve()
            assert first not in agent.gateways.links.values()
            await wait_until(lambda: len(gw.server.links.agents) == 1)
            assert not first.links  # the retired link was closed
            # DNS failing must not cut a working link.
            answers["localhost"] = []
            assert not await agent.gateways.resolve()
            assert agent.gateways.up == 1 and agent.gateways.resolve_failures == 1


async def test_drain_finishes_streams_in_flight_and_refuses_new_ones(
    pki: SitePki, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        await release.wait()
        writer.write(b"late answer to " + data)
        writer.write_eof()
        await writer.drain()
        writer.close()

    async with running_gateway(pki, tmp_path) as gw, tcp_service(slow_service) as svc:
        config = agent_config(pki, tmp_path, [gw.port], {"slow": (svc.port, False)}, drain_grace=5)
        async with agent_running(config) as (agent, stop, task):
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            outer = await device_link(pki, gw.port)
            device = await sealed(outer, pki, pki.device("ws1"))
            stream = device.open_stream({"target": "tcp:slow"})
            await stream.write(b"q1")
            await stream.write_eof()
            await wait_until(lambda: svc.connections == 1)
            stop.set()  # what SIGTERM does
            (agent_link,) = gw.server.links.agents
            await wait_until(lambda: agent_link.conn.goaway_received)
            await wait_until(lambda: device.conn.goaway_received)  # the session's own goaway
            with pytest.raises(LinkClosedError):
                device.open_stream({"target": "tcp:slow"})
            refused = outer.open_stream({"target": "session"})  # nor a new session
            with pytest.raises(StreamResetError) as info:
                await asyncio.wait_for(refused.read(), WAIT)
            assert info.value.code == ErrorCode.NO_ROUTE
            assert not task.done()  # waiting for the stream in flight
            release.set()
            assert await asyncio.wait_for(read_all(stream), WAIT) == b"late answer to q1"
            await asyncio.wait_for(task, WAIT)
            assert agent.dispatcher.stats.outcomes["closed"] == 1
            device.close()


async def test_drain_grace_cuts_streams_that_do_not_finish(pki: SitePki, tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    async with running_gateway(pki, tmp_path) as gw, tcp_service(silent) as svc:
        config = agent_config(pki, tmp_path, [gw.port], {"s": (svc.port, False)}, drain_grace=0.3)
        async with agent_running(config) as (_, stop, task):
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            outer = await device_link(pki, gw.port)
            device = await sealed(outer, pki, pki.device("ws1"))
            stream = device.open_stream({"target": "tcp:s"})
            await stream.write(b"x")
            await wait_until(lambda: svc.connections == 1)
            stop.set()
            await asyncio.wait_for(task, WAIT)
            with pytest.raises(StreamResetError):
                await asyncio.wait_for(stream.read(), WAIT)
            device.close()


def test_agent_on_uvloop(pki: SitePki, tmp_path: Path) -> None:
    """Production runs uvloop: the same stream path on it."""

    async def scenario() -> None:
        async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
            config = agent_config(pki, tmp_path, [gw.port], {"echo": (echo.port, True)})
            async with agent_running(config):
                await wait_until(lambda: gw.server.router.sites() == ["main"])
                outer = await device_link(pki, gw.port)
                device = await sealed(outer, pki, pki.device("ws1"))
                stream = device.open_stream({"target": "tcp:echo"})
                payload = os.urandom(500_000)
                await stream.write(payload)
                await stream.write_eof()
                assert await asyncio.wait_for(read_all(stream), WAIT) == payload
                device.close()

    run("uvloop", scenario())


async def test_relay_agent_process_exits_0_on_sigterm(pki: SitePki, tmp_path: Path) -> None:
    async with running_gateway(pki, tmp_path) as gw:
        config = tmp_path / "agent.yaml"
        config.write_text(
            "site: main\n"
            f"gateways: ['{HOST}:{gw.port}']\n"
            f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
            "state_dir: state/\n"
            "reconnect: {initial: 0.05s, max: 0.5s}\n"
            "drain_grace: 1s\n"
        )
        log = tmp_path / "agent.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relay.cli",
                "agent",
                "--config",
                str(config),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        try:
            await wait_until(lambda: gw.server.router.sites() == ["main"], within=30)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert code == 0, log.read_text()
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        messages = [entry["msg"] for entry in lines]
        assert "link up" in messages and "agent stopped" in messages
        assert all(entry["role"] == "agent" for entry in lines)


async def test_a_reload_says_when_the_next_start_would_refuse_a_restart_only_setting(
    pki: SitePki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`pki.ca_key` of another CA: the reload applies what it can (and keeps the running
    `pki`), but says as an error that the next start will refuse it, not only "needs a
    restart" (which IT reads as: restart to apply)."""
    from relay.agent.config import load_agent_config

    other = make_pki(tmp_path / "other")
    config = tmp_path / "agent.yaml"
    text = (
        "site: main\n"
        f"gateways: ['{HOST}:1']\n"
        f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"pki: {{ca_cert: {pki.ca}, ca_key: %s}}\n"
    )
    config.write_text(text % (pki.directory / "ca.key"))
    async with agent_running(load_agent_config(config)) as (agent, _, _):
        config.write_text(text % (other.directory / "ca.key") + "drain_grace: 3s\n")
        with caplog.at_level("ERROR"):
            assert await agent.reload()
        assert agent.config.drain_grace == 3.0  # applied
        assert agent.config.pki is not None and agent.config.pki.ca_key == pki.directory / "ca.key"
        assert agent.next_start_error is not None
        assert f"{config}: pki.ca_key:" in agent.next_start_error
        assert any("the next start will fail" in r.getMessage() for r in caplog.records)
        config.write_text(text % (pki.directory / "ca.key"))  # fixed: no error any more
        assert await agent.reload() and agent.next_start_error is None


async def test_per_device_stream_buckets_are_configured_and_reloaded(
    pki: SitePki, tmp_path: Path
) -> None:
    """`per_device.stream_burst` / `stream_rate` set each device's bucket of streams (a
    fleet test with one certificate for many links raises them); a reload applies them."""
    from relay.agent.config import load_agent_config
    from relay.agent.dispatch import STREAM_OPEN_BURST, STREAM_OPEN_RATE
    from relay.ops.config import ConfigError

    config = tmp_path / "agent.yaml"
    text = (
        "site: main\n"
        f"gateways: ['{HOST}:1']\n"
        f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    config.write_text(text)
    async with agent_running(load_agent_config(config)) as (agent, _, _):
        limit = agent.dispatcher.open_limit
        assert (limit.burst, limit.rate) == (STREAM_OPEN_BURST, STREAM_OPEN_RATE)
        config.write_text(text + "per_device: {stream_burst: 5000, stream_rate: 2000}\n")
        assert await agent.reload()
        assert (limit.burst, limit.rate) == (5000, 2000.0)
    for bad in ("{stream_rate: 0}", "{stream_burst: lots}", "{streams: 3}"):
        config.write_text(text + f"per_device: {bad}\n")
        with pytest.raises(ConfigError, match=r"per_device\."):
            load_agent_config(config)


async def test_a_failed_reload_names_the_file_the_key_and_the_path_as_start_up_does(
    pki: SitePki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGHUP with a broken `tls.*` file keeps the running configuration and says what a
    failed start says: "CONFIG: tls.key: PATH ...", not the bare TLS error."""
    from relay.agent.config import load_agent_config
    from relay.agent.service import check_start
    from relay.ops.config import ConfigError

    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    config = tmp_path / "agent.yaml"
    text = (
        f"site: main\ngateways: ['{HOST}:1']\nstate_dir: {tmp_path / 'state'}\n"
        "tls: {{cert: {}, key: {}, ca: {}}}\n"
    )
    config.write_text(text.format(pki.agent.cert, pki.agent.key, pki.ca))
    broken = {
        "tls.key": (pki.agent.cert, pki.gateway.key, pki.ca),  # another certificate's key
        "tls.cert": (junk, pki.agent.key, pki.ca),
        "tls.ca": (pki.agent.cert, pki.agent.key, junk),
    }
    async with agent_running(load_agent_config(config)) as (agent, _, _):
        for key, (cert, tls_key, ca) in broken.items():
            config.write_text(text.format(cert, tls_key, ca))
            with pytest.raises(ConfigError) as at_start:
                check_start(load_agent_config(config))
            caplog.clear()
            with caplog.at_level("ERROR", logger="relay.agent.service"):
                assert not await agent.reload()
            (line,) = [r for r in caplog.records if r.getMessage().startswith("reload failed")]
            said = line.__dict__["error"]
            assert said == str(at_start.value), key
            assert said.startswith(f"{config}: {key}: {junk if key != 'tls.key' else tls_key}")
        assert agent.reloads.error == len(broken) and agent.config.tls.cert == pki.agent.cert


async def test_a_bad_it_pages_key_stops_the_start_before_any_gateway_is_dialled(
    pki: SitePki, tmp_path: Path
) -> None:
    """The IT pages start after the links: their TLS files are checked with the others,
    before the agent resolves (and dials) a single gateway."""
    from relay.agent.config import load_agent_config
    from relay.ops.config import ConfigError

    (tmp_path / "it-admins").write_text("")
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"site: main\ngateways: ['{HOST}:1']\nstate_dir: {tmp_path / 'state'}\n"
        f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
        f"pki: {{ca_cert: {pki.ca}, ca_key: {pki.directory / 'ca.key'}}}\n"
        f"it_pages: {{listen: '{HOST}:0', admins_file: {tmp_path / 'it-admins'}, "
        f"tls: {{cert: {pki.gateway.cert}, key: {pki.agent.key}}}}}\n"
    )
    looked_up: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return [HOST]

    with pytest.raises(ConfigError) as failed:
        await run_agent(
            load_agent_config(config), handlers={}, resolver=resolver, handle_signals=False
        )
    assert str(failed.value).startswith(f"{config}: it_pages.tls.key: {pki.agent.key}")
    assert looked_up == []  # no gateway resolved, none dialled
