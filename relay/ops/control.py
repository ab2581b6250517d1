"""A local control endpoint: commands to a running process from the same user, on every
platform (`relay workstation reload|stop`, later `relay prefetch`, `relay cache ...`).

Why loopback TCP and a secret rather than a Unix socket: one mechanism everywhere. The
Windows Proactor loop serves no AF_UNIX sockets, and a Unix socket's protection is its
directory's mode, which Windows does not have. So the server binds 127.0.0.1 port 0 and
writes `control.json` (port, a random 256-bit bearer secret, pid) into the process's
state directory, private to the user by the platform's means (relay.ops.privatefiles).
Whoever can read that file is the same user (or an administrator); anyone else on the
PC can reach the port but not pass the secret (compared in constant time).

Surface: `POST /v1/<command>` with a JSON object, answered with a JSON object (200), or
`{"error": ...}` with 400 (bad request), 401 (no or wrong secret), 403 (a Host that is
not loopback: DNS rebinding from a browser), 404 (unknown command), 413 (body over
MAX_REQUEST), 503 (more than MAX_CONCURRENT commands at once). Handlers register by
name; they never see the secret. The client (`call`) bounds what it reads to MAX_RESPONSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from relay.ops import privatefiles

__all__ = [
    "CONTROL_FILE",
    "MAX_CONCURRENT",
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "ControlError",
    "ControlServer",
    "Handler",
    "call",
    "read_endpoint",
]

log = logging.getLogger(__name__)

CONTROL_FILE: Final = "control.json"
HOST: Final = "127.0.0.1"
MAX_REQUEST: Final = 64 * 1024
MAX_RESPONSE: Final = 4 * 1024 * 1024
MAX_CONCURRENT: Final = 8
MAX_ENDPOINT_FILE: Final = 4096
VERSION: Final = 1

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The running process cannot be reached or refused the command; one line."""


@dataclass(frozen=True)
class Endpoint:
    port: int
    token: str
    pid: int


def _endpoint_file(state_dir: Path) -> Path:
    return Path(state_dir) / CONTROL_FILE


def read_endpoint(state_dir: Path) -> Endpoint:
    """The endpoint a running process wrote into `state_dir`; ControlError if none."""
    path = _endpoint_file(state_dir)
    try:
        with path.open("rb") as f:
            data = json.loads(f.read(MAX_ENDPOINT_FILE + 1)[:MAX_ENDPOINT_FILE])
        endpoint = Endpoint(int(data["port"]), str(data["token"]), int(data["pid"]))
    except FileNotFoundError:
        raise ControlError(f"nothing is running with the state directory {state_dir}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"{path} is not a control endpoint file: {exc}") from None
    if not 0 < endpoint.port < 65536:
        raise ControlError(f"{path}: bad port {endpoint.port}")
    return endpoint


def _write_endpoint(state_dir: Path, endpoint: Endpoint) -> None:
    """control.json, private from creation on and replaced atomically."""
    path = _endpoint_file(state_dir)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    data = json.dumps(
        {"version": VERSION, "port": endpoint.port, "token": endpoint.token, "pid": endpoint.pid}
    ).encode()
    fd = privatefiles.create_private(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class ControlServer:
    """The endpoint of one process; `handlers` maps command names to coroutines."""

    def __init__(self, state_dir: Path, handlers: Mapping[str, Handler]) -> None:
        self.state_dir = Path(state_dir)
        self.handlers = dict(handlers)
        self._token = secrets.token_urlsafe(32)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Bind 127.0.0.1 port 0, then publish the port and secret in control.json."""
        app = web.Application(client_max_size=MAX_REQUEST)
        app.router.add_post("/v1/{command}", self._command)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((HOST, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.port = sock.getsockname()[1]
        _write_endpoint(self.state_dir, Endpoint(self.port, self._token, os.getpid()))
        log.info("control endpoint listening", extra={"port": self.port})

    async def stop(self) -> None:
        """Withdraw control.json (if it is still ours), then stop serving."""
        with contextlib.suppress(ControlError):
            if read_endpoint(self.state_dir).token == self._token:
                _endpoint_file(self.state_dir).unlink(missing_ok=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _refusal(self, request: web.Request) -> web.Response | None:
        host = (request.host or "").rsplit(":", 1)[0].strip("[]").lower()
        if host not in {HOST, "localhost", "::1"}:
            return _answer(403, {"error": "not a loopback Host"})
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self._token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _answer(401, {"error": "no or wrong secret"})
        return None

    async def _command(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        name = request.match_info["command"]
        handler = self.handlers.get(name)
        if handler is None:
            return _answer(404, {"error": f"unknown command {name!r}"})
        if self._slots.locked():  # no await between this check and taking a slot
            return _answer(503, {"error": "busy: too many commands at once"})
        async with self._slots:
            try:
                body = await request.json() if request.can_read_body else {}
            except web.HTTPRequestEntityTooLarge:
                return _answer(413, {"error": f"request over {MAX_REQUEST} bytes"})
            except ValueError:
                return _answer(400, {"error": "the body is not JSON"})
            if not isinstance(body, dict):
                return _answer(400, {"error": "the body is not a JSON object"})
            log.info("control command", extra={"command": name})
            return _answer(200, await handler(body))


def _answer(status: int, body: Mapping[str, Any]) -> web.Response:
    return web.json_response(dict(body), status=status)


async def call(
    state_dir: Path,
    command: str,
    body: Mapping[str, Any] | None = None,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - the whole command, connect to answer
) -> dict[str, Any]:
    """Send `command` to the process running with `state_dir`; its answer. ControlError."""
    endpoint = read_endpoint(state_dir)
    url = f"http://{HOST}:{endpoint.port}/v1/{command}"
    headers = {"Authorization": f"Bearer {endpoint.token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.post(url, json=dict(body or {}), headers=headers) as response,
        ):
            raw = bytearray()
            async for chunk in response.content.iter_any():
                raw += chunk
                if len(raw) > MAX_RESPONSE:
                    break
            status = response.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ControlError(
            f"cannot reach the process (pid {endpoint.pid}) on {HOST}:{endpoint.port}: "
            f"{exc or type(exc).__name__}; is it running?"
        ) from None
    if len(raw) > MAX_RESPONSE:
        raise ControlError(f"the answer to {command!r} is over {MAX_RESPONSE} bytes")
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ControlError(f"the answer to {command!r} is not JSON (HTTP {status})") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the answer to {command!r} is not a JSON object")
    if status != 200:
        raise ControlError(f"{command!r} refused: {answer.get('error', f'HTTP {status}')}")
    return answer
