"""relay.ops.control: the local control endpoint, over real loopback TCP with aiohttp."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay.ops import control, privatefiles
from relay.ops.admission import ConnectionLimits
from relay.ops.control import ControlError, ControlServer
from tests.replacing_helpers import scanner_holds_each_fresh_file_once


async def echo(body: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "got": body}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(tmp_path, {"echo": echo})
    await srv.start()
    yield srv
    await srv.stop()


async def raw_post(
    port: int,
    path: str,
    *,
    token: str | None,
    body: bytes = b"{}",
    host: str | None = None,
    nonce: str | None = "n" * 32,
) -> tuple[int, dict[str, Any]]:
    """`token`: what goes after Bearer (the key derived from the secret, to be let in)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if nonce is not None:
        headers[control.NONCE_HEADER] = nonce
    if host is not None:
        headers["Host"] = host
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{path}", data=body, headers=headers) as r,
    ):
        return r.status, json.loads(await r.read())


async def test_a_command_round_trips(server: ControlServer, tmp_path: Path) -> None:
    assert await control.call(tmp_path, "echo", {"n": 1}) == {"ok": True, "got": {"n": 1}}


async def test_the_endpoint_file_is_private_and_names_the_port(
    server: ControlServer, tmp_path: Path
) -> None:
    path = tmp_path / control.CONTROL_FILE
    privatefiles.check_private(path, "control endpoint file")
    endpoint = control.read_endpoint(tmp_path)
    assert endpoint.port == server.port
    assert len(endpoint.token) >= 40  # 256 random bits, url-safe base64


async def test_no_or_a_wrong_secret_is_refused(server: ControlServer) -> None:
    assert server.port is not None
    status, answer = await raw_post(server.port, "/v1/echo", token=None)
    assert (status, answer) == (401, {"error": "no or wrong secret"})
    status, _ = await raw_post(server.port, "/v1/echo", token="guess")
    assert status == 401


async def test_a_foreign_host_header_is_refused(server: ControlServer, tmp_path: Path) -> None:
    """A browser page on evil.example rebinding its name to 127.0.0.1 sends its own Host."""
    assert server.port is not None
    token = control._client_key(control.read_endpoint(tmp_path).token)
    status, _ = await raw_post(server.port, "/v1/echo", token=token, host="evil.example")
    assert status == 403
    local = f"localhost:{server.port}"
    status, _ = await raw_post(server.port, "/v1/echo", token=token, host=local)
    assert status == 200


async def test_unknown_commands_and_bad_bodies(server: ControlServer, tmp_path: Path) -> None:
    assert server.port is not None
    token = control._client_key(control.read_endpoint(tmp_path).token)
    assert (await raw_post(server.port, "/v1/nope", token=token))[0] == 404
    assert (await raw_post(server.port, "/v1/echo", token=token, body=b"{not json"))[0] == 400
    assert (await raw_post(server.port, "/v1/echo", token=token, body=b"[1]"))[0] == 400
    with pytest.raises(ControlError, match="'nope' refused: unknown command"):
        await control.call(tmp_path, "nope")


async def test_a_request_over_the_limit_is_refused(server: ControlServer, tmp_path: Path) -> None:
    assert server.port is not None
    token = control._client_key(control.read_endpoint(tmp_path).token)
    fits = json.dumps({"x": "a" * (control.MAX_REQUEST - 100)}).encode()
    assert (await raw_post(server.port, "/v1/echo", token=token, body=fits))[0] == 200
    over = json.dumps({"x": "a" * control.MAX_REQUEST}).encode()
    assert (await raw_post(server.port, "/v1/echo", token=token, body=over))[0] == 413


async def test_commands_at_once_are_bounded(tmp_path: Path) -> None:
    release = asyncio.Event()
    entered = 0

    async def hold(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal entered
        entered += 1
        await release.wait()
        return {"ok": True}

    srv = ControlServer(tmp_path, {"hold": hold})
    await srv.start()
    try:
        held = [
            asyncio.create_task(control.call(tmp_path, "hold"))
            for _ in range(control.MAX_CONCURRENT)
        ]
        async with asyncio.timeout(10):
            while entered < control.MAX_CONCURRENT:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.01)
        with pytest.raises(ControlError, match="busy"):
            await control.call(tmp_path, "hold")
        release.set()
        assert all(a == {"ok": True} for a in await asyncio.gather(*held))
        assert await control.call(tmp_path, "hold") == {"ok": True}
    finally:
        release.set()
        await srv.stop()


async def test_an_answer_over_the_limit_is_refused_by_the_client(tmp_path: Path) -> None:
    async def huge(body: dict[str, Any]) -> dict[str, Any]:
        return {"x": "a" * control.MAX_RESPONSE}

    srv = ControlServer(tmp_path, {"huge": huge})
    await srv.start()
    try:
        with pytest.raises(ControlError, match="over"):
            await control.call(tmp_path, "huge")
    finally:
        await srv.stop()


async def test_stop_withdraws_the_file_and_a_stale_file_says_so(tmp_path: Path) -> None:
    srv = ControlServer(tmp_path, {"echo": echo})
    await srv.start()
    saved = (tmp_path / control.CONTROL_FILE).read_bytes()
    await srv.stop()
    assert not (tmp_path / control.CONTROL_FILE).exists()
    with pytest.raises(ControlError, match="nothing is running with the state directory"):
        await control.call(tmp_path, "echo")
    fd = privatefiles.create_private(tmp_path / control.CONTROL_FILE)  # a crashed process's
    os.write(fd, saved)
    os.close(fd)
    with pytest.raises(ControlError, match=r"cannot reach the process .*is it running"):
        await control.call(tmp_path, "echo", timeout=5)


async def test_stop_stops_even_if_the_file_cannot_be_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: a reader holding control.json open makes the delete fail (sharing violation)."""
    srv = ControlServer(tmp_path, {"echo": echo})
    await srv.start()
    port = srv.port

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(32, "The process cannot access the file", str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    await srv.stop()
    monkeypatch.undo()
    assert (tmp_path / control.CONTROL_FILE).exists()  # left behind: the proof check's job
    with pytest.raises(aiohttp.ClientConnectionError):  # and no longer serving
        async with aiohttp.ClientSession() as session:
            await session.post(f"http://127.0.0.1:{port}/v1/echo")


def test_the_endpoint_file_rides_out_a_scanner_holding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: an antivirus scanner opens the fresh file a moment and the rename into
    control.json fails once: that failed the workstation's start."""
    refused = scanner_holds_each_fresh_file_once(monkeypatch)
    control._write_endpoint(tmp_path, control.Endpoint(4242, "secret", 7))
    assert refused and control.read_endpoint(tmp_path) == control.Endpoint(4242, "secret", 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [control.CONTROL_FILE]


async def test_a_garbled_endpoint_file(tmp_path: Path) -> None:
    (tmp_path / control.CONTROL_FILE).write_text("not json")
    with pytest.raises(ControlError, match="is not a control endpoint file"):
        control.read_endpoint(tmp_path)


# --- who answers: the server proves it holds the secret ---------------------------------

Seen = list[tuple[str, dict[str, str], bytes]]


async def listen(port: int, handle: Any) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/v1/{command}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
async def impostor(tmp_path: Path) -> AsyncIterator[Seen]:
    """A process died and left control.json; another local user now listens on its port
    and answers every command with success."""
    srv = ControlServer(tmp_path, {"echo": echo})
    await srv.start()
    assert srv.port is not None
    saved = (tmp_path / control.CONTROL_FILE).read_bytes()
    await srv.stop()
    fd = privatefiles.create_private(tmp_path / control.CONTROL_FILE)  # as a crash leaves it
    os.write(fd, saved)
    os.close(fd)
    seen: Seen = []

    async def anything(request: web.Request) -> web.Response:
        seen.append((request.match_info["command"], dict(request.headers), await request.read()))
        return web.json_response({"ok": True, "wiped": 12, "pid": 4242})

    runner = await listen(srv.port, anything)
    yield seen
    await runner.cleanup()


async def test_an_answer_that_does_not_prove_the_secret_is_not_trusted(
    impostor: Seen, tmp_path: Path
) -> None:
    with pytest.raises(ControlError, match="cannot prove it holds the secret") as info:
        await control.call(tmp_path, "cache-wipe")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / control.CONTROL_FILE) in message
    assert "stale" in message


async def test_an_impostor_learns_neither_the_secret_nor_the_command(
    impostor: Seen, tmp_path: Path
) -> None:
    token = control.read_endpoint(tmp_path).token
    with pytest.raises(ControlError):
        await control.call(tmp_path, "prefetch", {"studies": ["1.2.840.999.123"]})
    assert impostor  # it was asked something...
    for command, headers, body in impostor:  # ...but nothing worth having
        assert command != "prefetch" and b"1.2.840.999.123" not in body
        assert all(token not in value for value in headers.values())


Tamper = Any  # (command, status, body, proof, earlier answers) -> (status, body, proof)


@pytest.fixture
async def on_path(server: ControlServer, tmp_path: Path) -> AsyncIterator[list[Tamper]]:
    """A relay between the client and the real server (control.json points at it), that
    passes requests on and may change the answers: `on_path.append(tamper)`."""
    assert server.port is not None
    endpoint = control.read_endpoint(tmp_path)
    tampers: list[Tamper] = []
    earlier: list[tuple[int, bytes, str]] = []

    async def relay(request: web.Request) -> web.Response:
        command = request.match_info["command"]
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith(("x-", "a"))}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{server.port}/v1/{command}",
                data=await request.read(),
                headers={**headers, "Content-Type": "application/json"},
            ) as r,
        ):
            status, body = r.status, await r.read()
            proof = r.headers.get(control.PROOF_HEADER, "")
        answer = (status, body, proof)
        for tamper in tampers:
            answer = tamper(command, *answer, earlier)
        earlier.append((status, body, proof))
        return web.Response(
            status=answer[0], body=answer[1], headers={control.PROOF_HEADER: answer[2]}
        )

    sock_runner = await listen(0, relay)
    port = sock_runner.addresses[0][1]
    control._write_endpoint(tmp_path, control.Endpoint(port, endpoint.token, endpoint.pid))
    yield tampers
    await sock_runner.cleanup()


async def test_a_proven_answer_passes_a_faithful_relay(
    on_path: list[Tamper], tmp_path: Path
) -> None:
    assert await control.call(tmp_path, "echo", {"n": 1}) == {"ok": True, "got": {"n": 1}}


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c, s, b, p, e: (s, b.replace(b'"n": 1', b'"n": 2'), p),  # another body
        lambda c, s, b, p, e: (400, b, p),  # another status
        lambda c, s, b, p, e: e[0] if c == "echo" else (s, b, p),  # the hello's answer
        lambda c, s, b, p, e: (s, b, ""),  # no proof
    ],
    ids=["body", "status", "replayed", "none"],
)
async def test_a_changed_or_replayed_answer_is_refused(
    on_path: list[Tamper], tmp_path: Path, tamper: Tamper
) -> None:
    on_path.append(tamper)
    with pytest.raises(ControlError, match="cannot prove it holds the secret"):
        await control.call(tmp_path, "echo", {"n": 1})


async def test_the_secret_itself_never_travels(server: ControlServer, tmp_path: Path) -> None:
    """The client sends a key derived from the secret, and a refused request gets no proof:
    nobody can make the server sign without the secret."""
    assert server.port is not None
    token = control.read_endpoint(tmp_path).token
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{server.port}/v1/echo",
            json={},
            headers={"Authorization": f"Bearer {token}", control.NONCE_HEADER: "n" * 32},
        ) as r,
    ):
        assert r.status == 401
        assert control.PROOF_HEADER not in r.headers


async def test_the_nonce_is_required_and_bounded(server: ControlServer, tmp_path: Path) -> None:
    assert server.port is not None
    bearer = control._client_key(control.read_endpoint(tmp_path).token)
    for nonce, status in [
        (None, 400),
        ("n" * (control.MIN_NONCE - 1), 400),
        ("n" * control.MIN_NONCE, 200),
        ("n" * control.MAX_NONCE, 200),
        ("n" * (control.MAX_NONCE + 1), 400),
        ("n" * 31 + "/", 400),
    ]:
        code, answer = await raw_post(server.port, "/v1/echo", token=bearer, nonce=nonce)
        assert code == status, (nonce, answer)


def test_a_handler_may_not_take_the_name_of_the_hello(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        ControlServer(tmp_path, {control.HELLO: echo})


async def test_an_endpoint_file_of_another_version(tmp_path: Path) -> None:
    (tmp_path / control.CONTROL_FILE).write_text(
        '{"version": 1, "port": 1, "token": "t", "pid": 2}'
    )
    with pytest.raises(ControlError, match="another version of relay"):
        control.read_endpoint(tmp_path)


async def test_idle_and_half_sent_connections_are_bounded_and_closed(tmp_path: Path) -> None:
    """Any local account reaches the port: connections over the cap are closed at once,
    one that sends half a request head is closed at the deadline, and the command a
    radiologist runs still gets through once they are gone."""
    srv = ControlServer(
        tmp_path, {"echo": echo}, limits=ConnectionLimits(max_connections=3, head_timeout=1.0)
    )
    await srv.start()
    assert srv.port is not None and srv.admission is not None
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(3):  # each sends half a head and stalls
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"POST /v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await writer.drain()
            held.append((reader, writer))
        over_r, over_w = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await asyncio.wait_for(over_r.read(), 5) == b""  # over the cap: closed at once
        over_w.close()
        assert srv.admission.over_cap == 1
        # the stalled ones end at the deadline (read sees their end), then a command works
        for reader, _ in held:
            assert b"200" not in await asyncio.wait_for(reader.read(), 10)
        assert srv.admission.timed_out == 3
        assert await control.call(tmp_path, "echo", {"x": 1}) == {"ok": True, "got": {"x": 1}}
    finally:
        for _, writer in held:
            writer.close()
        await srv.stop()
