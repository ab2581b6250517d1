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

from relay.ops import control, privatefiles
from relay.ops.control import ControlError, ControlServer


async def echo(body: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "got": body}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(tmp_path, {"echo": echo})
    await srv.start()
    yield srv
    await srv.stop()


async def raw_post(
    port: int, path: str, *, token: str | None, body: bytes = b"{}", host: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
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
    token = control.read_endpoint(tmp_path).token
    status, _ = await raw_post(server.port, "/v1/echo", token=token, host="evil.example")
    assert status == 403
    local = f"localhost:{server.port}"
    status, _ = await raw_post(server.port, "/v1/echo", token=token, host=local)
    assert status == 200


async def test_unknown_commands_and_bad_bodies(server: ControlServer, tmp_path: Path) -> None:
    assert server.port is not None
    token = control.read_endpoint(tmp_path).token
    assert (await raw_post(server.port, "/v1/nope", token=token))[0] == 404
    assert (await raw_post(server.port, "/v1/echo", token=token, body=b"{not json"))[0] == 400
    assert (await raw_post(server.port, "/v1/echo", token=token, body=b"[1]"))[0] == 400
    with pytest.raises(ControlError, match="'nope' refused: unknown command"):
        await control.call(tmp_path, "nope")


async def test_a_request_over_the_limit_is_refused(server: ControlServer, tmp_path: Path) -> None:
    assert server.port is not None
    token = control.read_endpoint(tmp_path).token
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


async def test_a_garbled_endpoint_file(tmp_path: Path) -> None:
    (tmp_path / control.CONTROL_FILE).write_text("not json")
    with pytest.raises(ControlError, match="is not a control endpoint file"):
        control.read_endpoint(tmp_path)
