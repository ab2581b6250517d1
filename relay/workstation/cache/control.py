"""Interim local control endpoint for `relay prefetch` and `relay cache ...`.

The `ends` branch (issue 11) brings the workstation's real control endpoint
(relay.ops.control: loopback HTTP, a bearer secret in a private file). Until it merges this
is the thinnest stand-in with the same trust model: 127.0.0.1 port 0, a random secret in
`control.json` beside the cache (created private), one JSON line each way. The handlers
(`WorkstationCache.handlers()`) are shaped for relay.ops.control and move over unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

CONTROL_FILE: Final = "control.json"
MAX_LINE: Final = 64 * 1024
MAX_RESPONSE: Final = 4 * 1024 * 1024
MAX_CONCURRENT: Final = 8
TIMEOUT: Final = 30.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The running workstation cannot be reached or refused the command; one line."""


class CacheControlServer:
    def __init__(self, directory: Path, handlers: Mapping[str, Handler]) -> None:
        self.file = Path(directory) / CONTROL_FILE
        self.handlers = dict(handlers)
        self.token = secrets.token_urlsafe(32)
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_LINE)
        port = self._server.sockets[0].getsockname()[1]
        tmp = self.file.with_name(f".{self.file.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"port": port, "token": self.token, "pid": os.getpid()}, f)
        os.replace(tmp, self.file)

    async def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.file.unlink()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with self._slots, asyncio.timeout(TIMEOUT):
                reply = await self._answer(await reader.readline())
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ValueError, OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            token, command, args = str(req["token"]), str(req["command"]), req.get("args", {})
        except (ValueError, KeyError, TypeError):
            return {"error": "bad request"}
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return {"error": "not allowed"}
        handler = self.handlers.get(command)
        if handler is None or not isinstance(args, dict):
            return {"error": f"unknown command {command!r}"}
        return await handler(args)


def call(directory: Path, command: str, args: dict[str, Any], timeout: float = TIMEOUT) -> Any:
    """Send one command to the workstation whose cache is in `directory`."""
    path = Path(directory) / CONTROL_FILE
    try:
        endpoint = json.loads(path.read_text())
        port, token = int(endpoint["port"]), str(endpoint["token"])
    except FileNotFoundError:
        raise ControlError(f"no running workstation uses the cache {directory}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ControlError(f"{path}: not a control file ({exc})") from None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(json.dumps({"token": token, "command": command, "args": args}).encode()
                         + b"\n")  # fmt: skip
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
                if len(data) > MAX_RESPONSE:
                    raise ControlError("the workstation's answer is too large")
    except OSError as exc:
        raise ControlError(f"cannot reach the workstation ({exc})") from None
    reply = json.loads(data or b"{}")
    if isinstance(reply, dict) and "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply
