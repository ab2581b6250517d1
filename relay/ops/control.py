"""A local control endpoint: commands to a running process from the same user, on every
platform (`relay workstation reload|stop`, later `relay prefetch`, `relay cache ...`).

Why loopback TCP and a secret rather than a Unix socket: one mechanism everywhere. The
Windows Proactor loop serves no AF_UNIX sockets, and a Unix socket's protection is its
directory's mode, which Windows does not have. So the server binds 127.0.0.1 port 0 and
writes `control.json` (port, a random 256-bit bearer secret, pid) into the process's
state directory, private to the user by the platform's means (relay.ops.privatefiles).
Whoever can read that file is the same user (or an administrator); anyone else on the
PC can reach the port but not pass the secret (compared in constant time).

Who answers matters too: after a crash control.json stays behind, and any local user
may bind its port. So the secret never travels: the client sends a key derived from it
(worthless elsewhere) and a fresh nonce, and the server signs every answer to a let-in
request with the secret itself (an HMAC over the nonce, the command, the status and the
body, X-Relay-Proof). The client first asks `hello`, and sends the command (study UIDs
for `prefetch`...) only to a server that proved itself; an answer without a valid proof
is ForeignEndpoint, never trusted.

Surface: `POST /v1/<command>` with a JSON object, answered with a JSON object (200), or
`{"error": ...}` with 400 (bad request, no or bad nonce), 401 (no or wrong key), 403 (a
Host that is not loopback: DNS rebinding from a browser), 404 (unknown command), 413
(body over MAX_REQUEST), 503 (more than MAX_CONCURRENT commands at once); 401 and 403
and a bad nonce are not signed. Connections go through relay.ops.admission (`LIMITS`):
any local account reaches the port, so idle or half-sent connections are closed after a
deadline and at most 2 x MAX_CONCURRENT are open at once. Handlers register by name;
they never see the secret. The client (`call`) bounds what it reads to MAX_RESPONSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from relay.ops import privatefiles, replacing
from relay.ops.admission import Admission, ConnectionLimits

__all__ = [
    "CONTROL_FILE",
    "HELLO",
    "MAX_CONCURRENT",
    "MAX_NONCE",
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "MIN_NONCE",
    "NONCE_HEADER",
    "PROOF_HEADER",
    "ControlError",
    "ControlServer",
    "ForeignEndpoint",
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
#: Connections open at once, and the deadlines for each request head (and idle keep-alive)
#: and body (at most MAX_REQUEST bytes): any local account can reach the port, and idle or
#: half-sent connections must not hold the endpoint, or a command slot, that `relay
#: workstation reload|stop` and `relay cache wipe` need.
LIMITS: Final = ConnectionLimits(
    max_connections=2 * MAX_CONCURRENT, head_timeout=10.0, body_timeout=10.0
)
MAX_ENDPOINT_FILE: Final = 4096
VERSION: Final = 2  # 2: the server proves the secret; the secret itself stays home
HELLO: Final = "hello"  # the client's first request: is this the server of control.json?
NONCE_HEADER: Final = "X-Relay-Nonce"
PROOF_HEADER: Final = "X-Relay-Proof"
MIN_NONCE: Final = 16  # characters of the client's nonce (url-safe base64)
MAX_NONCE: Final = 64
_NONCE = re.compile(rf"[A-Za-z0-9_-]{{{MIN_NONCE},{MAX_NONCE}}}")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The running process cannot be reached or refused the command; one line."""


class ForeignEndpoint(ControlError):
    """What answers on the port of control.json cannot prove it holds its secret: the file
    is stale (its process is gone) and something else listens there."""


@dataclass(frozen=True)
class Endpoint:
    port: int
    token: str
    pid: int


def _endpoint_file(state_dir: Path) -> Path:
    return Path(state_dir) / CONTROL_FILE


def _client_key(token: str) -> str:
    """What the client sends instead of the secret: whoever receives it (a stranger on
    the port of a stale file) learns nothing that lets it sign an answer."""
    return hmac.new(token.encode(), b"relay control: client key", hashlib.sha256).hexdigest()


def _proof(token: str, nonce: str, command: str, status: int, body: bytes) -> str:
    """The server's signature of one answer, bound to the client's nonce and command."""
    head = f"relay control: answer\n{nonce}\n{command}\n{status}\n".encode()
    return hmac.new(token.encode(), head + body, hashlib.sha256).hexdigest()


def read_endpoint(state_dir: Path) -> Endpoint:
    """The endpoint a running process wrote into `state_dir`; ControlError if none."""
    path = _endpoint_file(state_dir)
    try:
        with path.open("rb") as f:
            data = json.loads(f.read(MAX_ENDPOINT_FILE + 1)[:MAX_ENDPOINT_FILE])
        version = data.get("version")
        endpoint = Endpoint(int(data["port"]), str(data["token"]), int(data["pid"]))
    except FileNotFoundError:
        raise ControlError(f"nothing is running with the state directory {state_dir}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ControlError(f"{path} is not a control endpoint file: {exc}") from None
    if version != VERSION:
        raise ControlError(
            f"{path} was written by another version of relay (control version {version}, "
            f"this one speaks {VERSION}): restart that process (pid {endpoint.pid}) with this "
            "version, or remove the file if it is gone"
        )
    if not 0 < endpoint.port < 65536:
        raise ControlError(f"{path}: bad port {endpoint.port}")
    return endpoint


def _write_endpoint(state_dir: Path, endpoint: Endpoint) -> None:
    """control.json, private from creation on and replaced atomically (on Windows, riding
    out a scanner that holds the fresh file a moment: relay.ops.replacing)."""
    path = _endpoint_file(state_dir)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    data = json.dumps(
        {"version": VERSION, "port": endpoint.port, "token": endpoint.token, "pid": endpoint.pid}
    ).encode()
    fd = privatefiles.create_private(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        replacing.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class ControlServer:
    """The endpoint of one process; `handlers` maps command names to coroutines."""

    def __init__(
        self,
        state_dir: Path,
        handlers: Mapping[str, Handler],
        *,
        limits: ConnectionLimits = LIMITS,
    ) -> None:
        if HELLO in handlers:
            raise ValueError(f"the command name {HELLO!r} is reserved")
        self.state_dir = Path(state_dir)
        self.handlers = dict(handlers)
        self._token = secrets.token_urlsafe(32)
        self._key = f"Bearer {_client_key(self._token)}"
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.limits = limits
        self.admission: Admission | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Bind 127.0.0.1 port 0, then publish the port and secret in control.json."""
        app = web.Application(client_max_size=MAX_REQUEST)
        app.router.add_post("/v1/{command}", self._command)
        admission = Admission(app, self.limits)
        bound = await admission.start(HOST, 0)
        self.admission = admission
        self.port = bound[0].port
        _write_endpoint(self.state_dir, Endpoint(self.port, self._token, os.getpid()))
        log.info("control endpoint listening", extra={"port": self.port})

    async def stop(self) -> None:
        """Withdraw control.json (if it is still ours), then stop serving.

        A file left behind is harmless (a client's proof check refuses whoever answers at
        a stale port), so failing to delete it, as Windows does while any reader (`relay
        workstation status`, a monitoring script) has it open, must not fail the stop.
        """
        with contextlib.suppress(ControlError, OSError):
            if read_endpoint(self.state_dir).token == self._token:
                _endpoint_file(self.state_dir).unlink(missing_ok=True)
        if self.admission is not None:
            await self.admission.stop()
            self.admission = None

    def _refusal(self, request: web.Request) -> web.Response | None:
        host = (request.host or "").rsplit(":", 1)[0].strip("[]").lower()
        if host not in {HOST, "localhost", "::1"}:
            return _answer(403, {"error": "not a loopback Host"})
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), self._key.encode()):
            return _answer(401, {"error": "no or wrong secret"})
        if not _NONCE.fullmatch(request.headers.get(NONCE_HEADER, "")):
            return _answer(400, {"error": f"no or bad {NONCE_HEADER}"})
        return None

    async def _command(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal  # not signed: nobody gets a signature without the key
        name = request.match_info["command"]
        status, body = await self._run(name, request)
        nonce = request.headers[NONCE_HEADER]
        return _answer(status, body, functools.partial(_proof, self._token, nonce, name))

    async def _run(self, name: str, request: web.Request) -> tuple[int, Mapping[str, Any]]:
        if name == HELLO:
            return 200, {"ok": True}
        handler = self.handlers.get(name)
        if handler is None:
            return 404, {"error": f"unknown command {name!r}"}
        if self._slots.locked():  # no await between this check and taking a slot
            return 503, {"error": "busy: too many commands at once"}
        async with self._slots:
            try:
                body = await request.json() if request.can_read_body else {}
            except web.HTTPRequestEntityTooLarge:
                return 413, {"error": f"request over {MAX_REQUEST} bytes"}
            except ValueError:
                return 400, {"error": "the body is not JSON"}
            if not isinstance(body, dict):
                return 400, {"error": "the body is not a JSON object"}
            log.info("control command", extra={"command": name})
            return 200, await handler(body)


def _answer(
    status: int, body: Mapping[str, Any], proof: Callable[[int, bytes], str] | None = None
) -> web.Response:
    """A JSON answer; signed (PROOF_HEADER) when `proof` is given."""
    raw = json.dumps(dict(body)).encode()
    headers = {PROOF_HEADER: proof(status, raw)} if proof is not None else {}
    return web.Response(body=raw, status=status, content_type="application/json", headers=headers)


async def call(
    state_dir: Path,
    command: str,
    body: Mapping[str, Any] | None = None,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - the whole command, connect to answer
) -> dict[str, Any]:
    """Send `command` to the process running with `state_dir`, once it proved it is that
    process (`hello`); its answer. ControlError (ForeignEndpoint: it could not prove it)."""
    endpoint = read_endpoint(state_dir)
    try:
        async with (
            asyncio.timeout(timeout),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        ):
            await _exchange(session, state_dir, endpoint, HELLO, {})
            return await _exchange(session, state_dir, endpoint, command, dict(body or {}))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ControlError(
            f"cannot reach the process (pid {endpoint.pid}) on {HOST}:{endpoint.port}: "
            f"{exc or type(exc).__name__}; is it running?"
        ) from None


async def _exchange(
    session: aiohttp.ClientSession,
    state_dir: Path,
    endpoint: Endpoint,
    command: str,
    body: dict[str, Any],
) -> dict[str, Any]:
    """One request; its answer once its proof is checked (nothing of it is used before)."""
    nonce = secrets.token_urlsafe(24)  # 32 characters
    headers = {"Authorization": f"Bearer {_client_key(endpoint.token)}", NONCE_HEADER: nonce}
    url = f"http://{HOST}:{endpoint.port}/v1/{command}"
    async with session.post(url, json=body, headers=headers) as response:
        raw = bytearray()
        async for chunk in response.content.iter_any():
            raw += chunk
            if len(raw) > MAX_RESPONSE:
                break
        status = response.status
        proof = response.headers.get(PROOF_HEADER, "")
    if len(raw) > MAX_RESPONSE:
        raise ControlError(f"the answer to {command!r} is over {MAX_RESPONSE} bytes")
    expected = _proof(endpoint.token, nonce, command, status, bytes(raw))
    if not hmac.compare_digest(proof.encode("utf-8", "replace"), expected.encode()):
        raise ForeignEndpoint(
            f"what answers on {HOST}:{endpoint.port} cannot prove it holds the secret of "
            f"{_endpoint_file(state_dir)}: the file is stale (left by pid {endpoint.pid}) or "
            "foreign, and another program listens on that port; its answer is not trusted"
        )
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ControlError(f"the answer to {command!r} is not JSON (HTTP {status})") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the answer to {command!r} is not a JSON object")
    if status != 200:
        raise ControlError(f"{command!r} refused: {answer.get('error', f'HTTP {status}')}")
    return answer
